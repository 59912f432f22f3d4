"""Worker-side parts of the strategies: hooks into local training and personal layers.

A round start names its strategy in ``config["strategy"]`` and ``hook_for`` returns
the matching StrategyHook. ``LocalTrainer.run_round`` calls the hook three times:

1. ``choose_start``: which shared state to train from (IFCA picks a cluster model).
2. ``gradient_hook``: a function that edits the gradients before every optimizer
   step (SCAFFOLD's correction), or None. A hook may instead replace local
   training altogether (Δ-SGD, ``replaces_training``).
3. ``finish``: the strategy tensors and metrics that the update carries.

Strategies without a worker side (FedAvg, FedProx, FedNova, the server optimizers)
get the base StrategyHook, which changes nothing. The server sides and the names
that travel are in ``coordinator.strategies``.

Everything here runs on the worker's training thread.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from coordinator.strategies.common import (
    DELTA_SGD_AMPLIFIER_KEY,
    IFCA_CHOICE,
    IFCA_CLUSTERS_KEY,
    IFCA_WEIGHTS_CLUSTER_KEY,
    SCAFFOLD_CONTROL_PREFIX,
    SCAFFOLD_DELTA_PREFIX,
    STRATEGY_KEY,
    effective_steps,
    ifca_cluster_name,
)
from fedmq.errors import MessageError
from fedmq.tasks import LocalData, Task, TrainConfig, TrainResult
from fedmq.tasks.base import GradientHook

logger = logging.getLogger(__name__)

SCAFFOLD_STATE_FILE = "scaffold_control.safetensors"
PERSONAL_STATE_FILE = "personal.safetensors"


@dataclass
class HookRound:
    """The parts of one round that a hook receives: the round start's config and aux tensors, and the local TrainConfig."""

    round: int
    config: Mapping[str, Any]
    train_config: TrainConfig
    aux: Mapping[str, torch.Tensor]


class StrategyHook:
    """The worker side of a strategy that needs none: local training runs unchanged.

    A hook with ``replaces_training`` set trains with its own ``train`` instead of
    ``Task.train``.
    """

    replaces_training = False

    def train(
        self, round_: HookRound, task: Task, model: nn.Module, data: LocalData, global_params: Mapping[str, torch.Tensor] | None
    ) -> TrainResult:
        """Train ``model`` in place; called only when ``replaces_training`` is set."""
        raise NotImplementedError(f"{type(self).__name__} does not replace local training")

    def choose_start(
        self, round_: HookRound, received: dict[str, torch.Tensor], loss_of: Callable[[Mapping[str, torch.Tensor]], float]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Return the shared state to train from and strategy tensors for the update.

        ``received`` contains the shared tensors of the round start, and ``loss_of``
        returns the loss of a shared state on the local training data.
        """
        return received, {}

    def gradient_hook(self, round_: HookRound, model: nn.Module) -> GradientHook | None:
        """Return a function that edits the gradients before each optimizer step, or None."""
        return None

    def finish(
        self, round_: HookRound, model: nn.Module, start_state: Mapping[str, torch.Tensor], result: TrainResult
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Return strategy tensors and metrics for the update, after local training."""
        return {}, {}


# SCAFFOLD


class ScaffoldHook(StrategyHook):
    """SCAFFOLD's worker side (``coordinator.strategies.scaffold`` has the algorithm).

    Keeps the client control variate c_i across rounds, in memory and, when the
    worker has a state directory, in ``scaffold_control.safetensors`` there. A
    missing c_i starts at zero.

    Option II of Karimireddy et al. (2020) divides the model change by K * lr for K
    plain SGD steps. With momentum, K becomes ``effective_steps(K, momentum)``, the
    step count that gives the same displacement for a constant gradient.
    """

    def __init__(self, state_dir: Path | None) -> None:
        self.path = state_dir / SCAFFOLD_STATE_FILE if state_dir is not None else None
        self.client_control: dict[str, torch.Tensor] = _load_tensors(self.path) if self.path is not None else {}
        self._server_control: dict[str, torch.Tensor] = {}

    def gradient_hook(self, round_: HookRound, model: nn.Module) -> GradientHook | None:
        parameters = dict(model.named_parameters())
        self._server_control = {}
        for key, tensor in round_.aux.items():
            if not key.startswith(SCAFFOLD_CONTROL_PREFIX):
                continue
            name = key.removeprefix(SCAFFOLD_CONTROL_PREFIX)
            if name not in parameters or tuple(parameters[name].shape) != tuple(tensor.shape):
                raise MessageError(f"round_start.aux.{key}", "a control variate for a model parameter of the same shape", tuple(tensor.shape))
            self._server_control[name] = tensor.to(torch.float32)
        for name, control in self._server_control.items():
            held = self.client_control.get(name)
            if held is None or held.shape != control.shape:
                self.client_control[name] = torch.zeros_like(control)
        corrections = {name: (control - self.client_control[name]) for name, control in self._server_control.items()}

        def correct(trained: nn.Module) -> None:
            for name, parameter in trained.named_parameters():
                correction = corrections.get(name)
                if correction is not None and parameter.grad is not None:
                    parameter.grad.add_(correction.to(device=parameter.grad.device, dtype=parameter.grad.dtype))

        return correct

    def finish(
        self, round_: HookRound, model: nn.Module, start_state: Mapping[str, torch.Tensor], result: TrainResult
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        config = round_.train_config
        steps = effective_steps(result.num_steps, config.momentum)
        parameters = dict(model.named_parameters())
        aux: dict[str, torch.Tensor] = {}
        for name, control in self._server_control.items():
            old = self.client_control[name]
            if steps > 0:
                drift = start_state[name].to(torch.float32) - parameters[name].detach().to(torch.float32).cpu()
                new = scaffold_client_control(old, control, drift, steps=steps, learning_rate=config.learning_rate)
            else:
                new = old
            aux[SCAFFOLD_DELTA_PREFIX + name] = new - old
            self.client_control[name] = new
        # NOTE: c_i is saved before the update is published. If the update never
        # reaches the coordinator (or is rejected), the server's c misses this change
        # and differs from the mean of the workers' c_i by it / N for the rest of the run.
        if self.path is not None:
            _save_tensors(self.path, self.client_control)
        return aux, {"effective_steps": steps}


def scaffold_client_control(
    client_control: torch.Tensor, server_control: torch.Tensor, drift: torch.Tensor, *, steps: float, learning_rate: float
) -> torch.Tensor:
    """Return option II's c_i+ = c_i - c + (x - y_i) / (steps * learning_rate), where ``drift`` is x - y_i."""
    return client_control - server_control + drift / (steps * learning_rate)


# IFCA


class IfcaHook(StrategyHook):
    """IFCA's worker side: train the cluster model with the lowest loss on the local training data.

    Ties go to the lowest cluster index. The chosen index travels as
    ``aux["ifca.choice"]`` and in the metric ``cluster``.
    """

    def __init__(self) -> None:
        self.last_losses: list[float] = []
        self.last_choice = 0

    def choose_start(
        self, round_: HookRound, received: dict[str, torch.Tensor], loss_of: Callable[[Mapping[str, torch.Tensor]], float]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        clusters = ifca_cluster_states(round_.config, received, round_.aux)
        losses = [loss_of(cluster) for cluster in clusters]
        choice = min(range(len(clusters)), key=lambda index: (losses[index], index))
        self.last_losses = losses
        self.last_choice = choice
        return clusters[choice], {IFCA_CHOICE: torch.tensor([choice], dtype=torch.int64)}

    def finish(
        self, round_: HookRound, model: nn.Module, start_state: Mapping[str, torch.Tensor], result: TrainResult
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        return {}, {"cluster": float(self.last_choice), "cluster_loss": float(self.last_losses[self.last_choice])}


def ifca_cluster_states(
    config: Mapping[str, Any], received: Mapping[str, torch.Tensor], aux: Mapping[str, torch.Tensor]
) -> list[dict[str, torch.Tensor]]:
    """Rebuild the K cluster models of an IFCA round start: one in ``weights``, the others in ``aux``."""
    count = config.get(IFCA_CLUSTERS_KEY)
    in_weights = config.get(IFCA_WEIGHTS_CLUSTER_KEY, 0)
    if not isinstance(count, int) or count < 2:
        raise MessageError(f"round_start.config.{IFCA_CLUSTERS_KEY}", "an integer >= 2", count)
    if not isinstance(in_weights, int) or not 0 <= in_weights < count:
        raise MessageError(f"round_start.config.{IFCA_WEIGHTS_CLUSTER_KEY}", f"an integer in [0, {count})", in_weights)
    clusters = []
    for index in range(count):
        if index == in_weights:
            clusters.append(dict(received))
            continue
        cluster = {}
        for name in received:
            key = ifca_cluster_name(index, name)
            if key not in aux:
                raise MessageError(f"round_start.aux.{key}", f"tensor {name!r} of cluster {index}", "nothing (the tensor is missing)")
            cluster[name] = aux[key]
        clusters.append(cluster)
    return clusters


# Δ-SGD


class DeltaSgdHook(StrategyHook):
    """Δ-SGD's worker side: local training with the step size rule of ``coordinator.strategies.deltasgd``.

    The rule compares the gradients at x_k and at x_{k-1} on the same minibatch, as
    the authors' implementation does, so each step runs a second forward and
    backward pass at the previous parameters. Gradients of different minibatches
    differ by their noise even where the loss is flat, which drives the step size
    toward zero. That needs the batch itself, which a gradient hook does not see, so
    this hook replaces ``Task.train`` with its own loop: the same seeded batch order,
    budgets and metrics, and mean cross-entropy plus the FedProx term when
    ``proximal_mu`` > 0. A task that overrides ``Task.train`` with another loss
    trains with cross-entropy under this strategy.
    """

    replaces_training = True

    def __init__(self) -> None:
        self.rule: DeltaSgdRule | None = None

    def train(
        self, round_: HookRound, task: Task, model: nn.Module, data: LocalData, global_params: Mapping[str, torch.Tensor] | None
    ) -> TrainResult:
        config = round_.train_config
        amplifier = float(round_.config.get(DELTA_SGD_AMPLIFIER_KEY, 0.1))
        self.rule = DeltaSgdRule(initial_step=config.learning_rate, amplifier=amplifier)
        if data.num_train == 0:
            return TrainResult(0, 0, {"loss": 0.0, "accuracy": 0.0, "train_time_s": 0.0})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            return _train_delta_sgd(self.rule, model, data, config, global_params)

    def finish(
        self, round_: HookRound, model: nn.Module, start_state: Mapping[str, torch.Tensor], result: TrainResult
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        steps = self.rule.steps if self.rule is not None else []
        if not steps:
            return {}, {}
        return {}, {"mean_step_size": float(sum(steps) / len(steps)), "last_step_size": float(steps[-1])}


class DeltaSgdRule:
    """The Δ-SGD step sizes of one round, one ``next_step`` call per local step."""

    def __init__(self, *, initial_step: float, amplifier: float) -> None:
        if initial_step <= 0:
            raise ValueError(f"initial_step must be > 0, but got {initial_step}")
        if amplifier <= 0:
            raise ValueError(f"amplifier must be > 0, but got {amplifier}")
        self.initial_step = initial_step
        self.amplifier = amplifier
        self.steps: list[float] = []
        self._theta = 1.0

    def next_step(self, moved: float, changed: float) -> float:
        """Return the next step size from ||x_k - x_{k-1}|| (``moved``) and ||g_k - g_{k-1}|| (``changed``).

        Both distances are ignored at step 0, which uses the initial step.
        """
        if not self.steps:
            step = self.initial_step
        else:
            previous = self.steps[-1]
            step = math.sqrt(1.0 + self.amplifier * self._theta) * previous
            if moved > 0 and changed > 0:
                step = min(step, moved / (2.0 * changed))
            self._theta = step / previous
        self.steps.append(step)
        return step


def _train_delta_sgd(
    rule: DeltaSgdRule, model: nn.Module, data: LocalData, config: TrainConfig, global_params: Mapping[str, torch.Tensor] | None
) -> TrainResult:
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    device = parameters[0].device
    anchors = [tensor.detach().to(device) for tensor in global_params.values()] if config.proximal_mu > 0 and global_params else []
    previous_model = copy.deepcopy(model)
    previous_parameters = [parameter for parameter in previous_model.parameters() if parameter.requires_grad]
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    previous_model.train()

    started = time.monotonic()
    num_steps = 0
    first_epoch_seen = 0
    last_loss = last_accuracy = 0.0
    stopped = False
    for epoch in range(config.local_epochs):
        order = torch.randperm(data.num_train, generator=generator).to(device)
        loss_sum, correct, seen = 0.0, 0, 0
        for start in range(0, data.num_train, config.batch_size):
            if _budget_spent(config, num_steps, started):
                stopped = True
                break
            batch = order[start : start + config.batch_size]
            x_batch, y_batch = x_train[batch], y_train[batch]

            # Gradients at x_k and, on the same batch, at x_{k-1}.
            logits, loss = _backward(model, parameters, x_batch, y_batch, anchors, config.proximal_mu)
            moved = changed = 0.0
            if num_steps > 0:
                _backward(previous_model, previous_parameters, x_batch, y_batch, anchors, config.proximal_mu)
                moved = _distance([p.detach() for p in parameters], [p.detach() for p in previous_parameters])
                changed = _distance(_gradients(parameters), _gradients(previous_parameters))
            step = rule.next_step(moved, changed)

            # x_{k-1} <- x_k, then x_{k+1} = x_k - step * (g_k + weight_decay * x_k).
            with torch.no_grad():
                for parameter, previous in zip(parameters, previous_parameters, strict=True):
                    previous.copy_(parameter)
                    gradient = _gradient(parameter)
                    if config.weight_decay:
                        gradient = gradient + config.weight_decay * parameter
                    parameter.sub_(step * gradient)
            num_steps += 1
            loss_sum += float(loss.detach()) * int(batch.shape[0])
            correct += int((logits.detach().argmax(dim=1) == y_batch).sum())
            seen += int(batch.shape[0])
        if epoch == 0:
            first_epoch_seen = seen
        if seen:
            last_loss, last_accuracy = loss_sum / seen, correct / seen
        if stopped:
            break

    # Buffers such as BatchNorm statistics follow the training passes of ``model`` only.
    return TrainResult(
        num_samples=first_epoch_seen,
        num_steps=num_steps,
        metrics={"loss": last_loss, "accuracy": last_accuracy, "train_time_s": time.monotonic() - started},
    )


def _backward(
    model: nn.Module, parameters: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor, anchors: list[torch.Tensor], mu: float
) -> tuple[torch.Tensor, torch.Tensor]:
    for parameter in parameters:
        parameter.grad = None
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    objective = loss
    if anchors:
        objective = loss + 0.5 * mu * sum((p - a).pow(2).sum() for p, a in zip(parameters, anchors, strict=True))
    objective.backward()
    return logits, loss


def _gradient(parameter: nn.Parameter) -> torch.Tensor:
    return parameter.grad.detach() if parameter.grad is not None else torch.zeros_like(parameter)


def _gradients(parameters: list[nn.Parameter]) -> list[torch.Tensor]:
    return [_gradient(parameter) for parameter in parameters]


def _budget_spent(config: TrainConfig, num_steps: int, started: float) -> bool:
    if config.max_steps is not None and num_steps >= config.max_steps:
        return True
    return config.time_budget_s is not None and time.monotonic() - started >= config.time_budget_s


def _distance(first: list[torch.Tensor], second: list[torch.Tensor]) -> float:
    squared = 0.0
    for a, b in zip(first, second, strict=True):
        squared += float((a.to(torch.float64) - b.to(torch.float64)).pow(2).sum())
    return math.sqrt(squared)


# Hook registry

HOOKS: dict[str, Callable[[Path | None], StrategyHook]] = {
    "scaffold": ScaffoldHook,
    "ifca": lambda state_dir: IfcaHook(),
    "deltasgd": lambda state_dir: DeltaSgdHook(),
}


def hook_for(config: Mapping[str, Any], state_dir: Path | None, cache: dict[str, StrategyHook]) -> StrategyHook:
    """Return the hook of the round's strategy, creating it once per strategy name in ``cache``."""
    name = str(config.get(STRATEGY_KEY) or "")
    if name not in cache:
        factory = HOOKS.get(name)
        cache[name] = factory(state_dir) if factory is not None else StrategyHook()
    return cache[name]


# Personal layers


class PersonalLayers:
    """The worker's personalized tensors, which never leave the worker.

    Held in memory and, when the worker has a state directory, in
    ``personal.safetensors`` there, so a restarted worker keeps its personalized
    model. Until the worker has trained once, ``values`` falls back to the initial
    values it is given.
    """

    def __init__(self, state_dir: Path | None) -> None:
        self.path = state_dir / PERSONAL_STATE_FILE if state_dir is not None else None
        self.tensors: dict[str, torch.Tensor] = _load_tensors(self.path) if self.path is not None else {}

    def values(self, initial: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return the held tensor for each name of ``initial`` whose shape and dtype match, else the initial value."""
        values = {}
        for name, tensor in initial.items():
            held = self.tensors.get(name)
            usable = held is not None and held.shape == tensor.shape and held.dtype == tensor.dtype
            values[name] = held if usable and held is not None else tensor
        return values

    def store(self, personal: Mapping[str, torch.Tensor]) -> None:
        """Keep the trained personal tensors, and write them to the state directory when there is one."""
        self.tensors.update({name: tensor.detach().cpu().clone() for name, tensor in personal.items()})
        if self.path is not None and personal:
            _save_tensors(self.path, self.tensors)


# Files


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        return {}
    try:
        return dict(safetensors.torch.load_file(str(path)))
    except (OSError, safetensors.SafetensorError) as exc:
        logger.warning("cannot read %s (%s); starting this state from scratch", path, exc)
        return {}


def _save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write tensors atomically: a temporary file renamed over the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    safetensors.torch.save_file({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}, str(staging))
    os.replace(staging, path)
