"""One round of local training on a worker, from a round start to an encoded update.

Runs on the worker's training thread and never touches the broker: it turns a
decoded RoundStart into the bytes of an Update (or a TrainingFailed) message.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coordinator.downlink import apply_model_delta
from coordinator.strategies.common import EVAL_EVERY_KEY, LOCAL_TEST_SAMPLES, PERSONAL_LAYERS_KEY, parse_patterns, split_personal
from fedmq.errors import ConfigError, FedmqError
from fedmq.tasks import LocalData, Task, TrainConfig
from fedmq.tasks.base import seed_torch
from schemas import codecs
from schemas import tensors as wire_tensors
from schemas.messages import RoundStart, TrainingFailed, Update, encode_message
from schemas.wire import WireTensor
from worker.privacy import SamplePrivacy, privatize_trained_state
from worker.strategies import HookRound, PersonalLayers, StrategyHook, hook_for

logger = logging.getLogger(__name__)

# Round-start config keys that map onto TrainConfig fields.
_TRAIN_KEYS = ("local_epochs", "learning_rate", "batch_size", "momentum", "weight_decay", "proximal_mu", "max_steps", "time_budget_s")


class MissingBaseModelError(FedmqError):
    """A round start carries a delta against a model version that this worker does not hold."""


@dataclass
class LocalOverrides:
    """Limits a worker sets on its own local work, for slower hardware. None keeps the round's value."""

    local_epochs: int | None = None
    max_steps: int | None = None
    time_budget_s: float | None = None


# Codecs that send every value; floating buffers use float16 under any other codec.
DENSE_CODECS = ("float32", "float16", "bfloat16")


def warm_up() -> None:
    """Load now what the first round would otherwise load lazily: the codec kernels and torch's optimizer machinery.

    torch 2.13 imports torch._dynamo when the first optimizer is built, about 1.5 s of
    CPU on a 2-core x86-64 VM, and the codec kernels take about 0.5 s more. Without this
    call a worker's first round is seconds late, more so when several workers start on
    one machine.
    """
    codecs.load_kernels()
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def round_seed(seed: int, round_number: int, worker_id: str) -> int:
    """Return the training seed of one worker in one round, stable across processes and restarts."""
    return (seed * 1_000_003 + round_number * 7_919 + zlib.crc32(worker_id.encode())) % (2**31 - 1)


def train_config_from(start: RoundStart, worker_id: str, overrides: LocalOverrides) -> TrainConfig:
    config = start.config
    values: dict[str, Any] = {key: config[key] for key in _TRAIN_KEYS if config.get(key) is not None}
    if overrides.local_epochs is not None:
        values["local_epochs"] = overrides.local_epochs
    if overrides.max_steps is not None:
        values["max_steps"] = overrides.max_steps
    if overrides.time_budget_s is not None:
        values["time_budget_s"] = overrides.time_budget_s
    values["seed"] = round_seed(int(config.get("seed", 0)), start.round, worker_id)
    return TrainConfig(**values)


@dataclass
class RoundPlan:
    """How one round starts on this worker, before local training.

    ``shared_start`` contains the shared tensors the model starts from (the received
    global ones, or the chosen cluster model under IFCA), and ``model_state`` the
    whole state dict, with the worker's own personal tensors. ``aux`` holds the
    strategy tensors the update carries and ``metrics`` the local evaluation.
    """

    train_config: TrainConfig
    hook: StrategyHook
    hook_round: HookRound
    patterns: tuple[str, ...]
    shared_start: dict[str, torch.Tensor]
    model_state: dict[str, torch.Tensor]
    aux: dict[str, torch.Tensor]
    metrics: dict[str, float]


class LocalTrainer:
    """The worker's model, data, personal layers, strategy hooks and error-feedback state across rounds."""

    def __init__(self, task: Task, data: LocalData, *, worker_id: str, state_dir: Path | None, overrides: LocalOverrides) -> None:
        self.task = task
        self.data = data
        self.worker_id = worker_id
        self.overrides = overrides
        self.model = task.build_model()
        self.state_dir = state_dir
        self.error_feedback = codecs.ErrorFeedback()
        if state_dir is not None:
            state_dir.mkdir(parents=True, exist_ok=True)
            self.error_feedback = codecs.ErrorFeedback.load(self._feedback_path)
        self.personal = PersonalLayers(state_dir)
        self.hooks: dict[str, StrategyHook] = {}
        self._initial_states: dict[int, dict[str, torch.Tensor]] = {}
        # The global model of the last round start, which the next delta applies to.
        self.held_run_id: str | None = None
        self.held_version = -1
        self.held_state: dict[str, torch.Tensor] | None = None
        # Set by the worker to train with DP-SGD instead of the task's training.
        self.sample_privacy: SamplePrivacy | None = None

    @property
    def _feedback_path(self) -> Path:
        assert self.state_dir is not None
        return self.state_dir / "error_feedback.safetensors"

    def run_round(self, start: RoundStart) -> tuple[bytes, dict[str, Any]]:
        """Train on one round start and return the encoded Update and a summary for the log."""
        started = time.monotonic()
        plan = self.plan_round(start)
        config = plan.train_config
        self.model.load_state_dict(plan.model_state)
        self.held_version = start.model_version

        # Local training, with the strategy's gradient hook.
        seed_torch(config.seed)
        global_params = {name: tensor.detach().clone() for name, tensor in self.model.named_parameters()} if config.proximal_mu > 0 else None
        gradient_hook = plan.hook.gradient_hook(plan.hook_round, self.model)
        if self.sample_privacy is not None:
            if gradient_hook is not None or plan.hook.replaces_training:
                raise ConfigError("DP-SGD cannot run with the strategy's gradient hook, because per-sample clipping would not cover it")
            result = self.sample_privacy.train(self.task, self.model, self.data, config)
        elif plan.hook.replaces_training:
            result = plan.hook.train(plan.hook_round, self.task, self.model, self.data, global_params)
        else:
            result = self.task.train(self.model, self.data, config, global_params=global_params, gradient_hook=gradient_hook)
        trained = self.model.state_dict()
        _, personal = split_personal(trained, plan.patterns)
        self.personal.store(personal)
        hook_aux, hook_metrics = plan.hook.finish(plan.hook_round, self.model, plan.shared_start, result)
        # DP-FedAvg with worker placement: clip the shared update and add this worker's noise share.
        trained, privacy_metrics = privatize_trained_state(plan.shared_start, trained, start.config)

        # Encode: shared floating tensors as compressed deltas, the rest exactly.
        codec_spec = codecs.CodecSpec.parse(str(start.config.get("codec", "float16")))
        rng = np.random.default_rng(config.seed)
        deltas = self._encode_deltas(plan.shared_start, trained, codec_spec, rng)
        if self.state_dir is not None and codec_spec.name not in ("float32",):
            self.error_feedback.save(self._feedback_path)

        metrics = {key: float(value) for key, value in result.metrics.items()}
        metrics.update(hook_metrics)
        metrics.update(plan.metrics)
        metrics.update(privacy_metrics)
        metrics["train_time_s"] = round(time.monotonic() - started, 4)
        update = Update(
            run_id=start.run_id,
            round=start.round,
            attempt=start.attempt,
            model_version=start.model_version,
            worker_id=self.worker_id,
            num_samples=result.num_samples,
            num_steps=result.num_steps,
            metrics=metrics,
            deltas=deltas,
            codec=codec_spec.to_text(),
            aux=wire_tensors.encode_state({**plan.aux, **hook_aux}),
        )
        body = encode_message(update, lossless_method=str(start.config.get("lossless", "auto")))
        summary = {"num_samples": result.num_samples, "num_steps": result.num_steps, "bytes": len(body), **metrics}
        return body, summary

    def plan_round(self, start: RoundStart, *, evaluate: bool | None = None) -> RoundPlan:
        """Decode a round start, pick the start state and run the local evaluation when it is due.

        The evaluation is due when the round start's ``eval_every`` is above 0 and
        divides its model version; ``evaluate`` overrides that. It measures, on the
        local test split, the model the federation gives this worker (metrics
        ``local_loss`` and ``local_accuracy``) and, with personal layers, the same
        shared tensors with this worker's personal tensors (``personal_loss`` and
        ``personal_accuracy``). The model is left holding the last state evaluated.
        """
        config = train_config_from(start, self.worker_id, self.overrides)
        patterns = parse_patterns(str(start.config.get(PERSONAL_LAYERS_KEY) or ""))
        received, dropped = split_personal(self.decode_weights(start), patterns)
        if dropped:
            logger.debug("worker %s round %d: ignoring personal tensors %s in the round start", self.worker_id, start.round, sorted(dropped)[:5])
        aux = wire_tensors.decode_state(start.aux)
        hook = hook_for(start.config, self.state_dir, self.hooks)
        hook_round = HookRound(round=start.round, config=start.config, train_config=config, aux=aux)

        # Personal tensors: the worker's own, else the run's initial values.
        initial_personal: dict[str, torch.Tensor] = {}
        if patterns:
            _, initial_personal = split_personal(self._initial_state(int(start.config.get("seed", 0))), patterns)
        own_personal = self.personal.values(initial_personal)

        def loss_of(shared: Mapping[str, torch.Tensor]) -> float:
            self.model.load_state_dict({**own_personal, **shared})
            return float(self.task.evaluate(self.model, self.data.x_train, self.data.y_train)["loss"])

        shared_start, hook_aux = hook.choose_start(hook_round, received, loss_of)

        # Local evaluation on the local test split.
        metrics: dict[str, float] = {}
        eval_every = int(start.config.get(EVAL_EVERY_KEY) or 0)
        due = eval_every > 0 and start.model_version % eval_every == 0
        if (due if evaluate is None else evaluate) and self.data.num_test > 0:
            metrics[LOCAL_TEST_SAMPLES] = float(self.data.num_test)
            metrics.update(self._evaluate("local", {**initial_personal, **shared_start}))
            if patterns:
                metrics.update(self._evaluate("personal", {**own_personal, **shared_start}))

        return RoundPlan(
            train_config=config,
            hook=hook,
            hook_round=hook_round,
            patterns=patterns,
            shared_start=shared_start,
            model_state={**own_personal, **shared_start},
            aux=hook_aux,
            metrics=metrics,
        )

    def holds_weights_for(self, start: RoundStart) -> bool:
        """Return whether ``start`` brings a full model, or a delta whose base this trainer holds."""
        if start.weights_kind == "full":
            return True
        if self.held_state is None or self.held_run_id != start.run_id:
            return False
        return self.held_version in (start.base_version, start.model_version)

    def version_held_for(self, run_id: str) -> int:
        """Return the model version held for run ``run_id``, or -1 when it holds none of that run."""
        return self.held_version if self.held_run_id == run_id and self.held_state is not None else -1

    def decode_weights(self, start: RoundStart) -> dict[str, torch.Tensor]:
        """Return the global tensors of a round start, and hold them for the next delta.

        A full model always replaces the held one, so a coordinator that restarted
        without its worker view brings every worker back to the same weights. A delta
        applies to the held model (see coordinator.downlink). Raises
        MissingBaseModelError for a delta whose base is not held.
        """
        if start.weights_kind == "full":
            state = wire_tensors.decode_state(start.weights)
        elif not self.holds_weights_for(start):
            raise MissingBaseModelError(
                f"round {start.round} of run {start.run_id} carries a delta from model version {start.base_version}, "
                f"but this worker holds version {self.version_held_for(start.run_id)}; it needs the full model"
            )
        elif self.held_version == start.model_version:
            assert self.held_state is not None
            state = self.held_state
        else:
            assert self.held_state is not None
            state = apply_model_delta(self.held_state, start.weights)
        self.held_state = state
        self.held_run_id = start.run_id
        self.held_version = start.model_version
        return state

    def _evaluate(self, prefix: str, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        self.model.load_state_dict(state)
        evaluation = self.task.evaluate(self.model, self.data.x_test, self.data.y_test)
        return {f"{prefix}_loss": float(evaluation["loss"]), f"{prefix}_accuracy": float(evaluation["accuracy"])}

    def _initial_state(self, seed: int) -> dict[str, torch.Tensor]:
        """Return the model state that the coordinator starts a run with: built under ``torch.manual_seed(seed)``."""
        if seed not in self._initial_states:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = self.task.build_model()
            self._initial_states[seed] = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
        return self._initial_states[seed]

    def _encode_deltas(
        self,
        global_state: dict[str, torch.Tensor],
        trained: dict[str, torch.Tensor],
        spec: codecs.CodecSpec,
        rng: np.random.Generator,
    ) -> dict[str, WireTensor]:
        deltas: dict[str, WireTensor] = {}
        buffers = {name for name, _ in self.model.named_buffers()}
        buffer_spec = spec if spec.name in DENSE_CODECS else codecs.CodecSpec("float16")
        for name, start_value in global_state.items():
            value = trained[name]
            dtype = wire_tensors.wire_dtype(value)
            if not value.is_floating_point():
                deltas[name] = wire_tensors.encode_raw(wire_tensors.to_numpy(value), dtype)
                continue
            # Floating buffers such as BatchNorm's running mean and variance travel dense,
            # without error feedback: a sparse or stochastically rounded delta of a running
            # variance, averaged over workers, can make it negative.
            tensor_spec = buffer_spec if name in buffers else spec
            lossy = tensor_spec.name != "float32" and name not in buffers
            delta = (value.detach().to(torch.float32) - start_value.to(torch.float32)).numpy()
            if lossy:
                delta = self.error_feedback.compensate(name, delta)
            encoded = codecs.encode(delta, tensor_spec, rng=rng, dtype=dtype)
            if lossy:
                sent = codecs.decode(encoded.codec, encoded.params, encoded.shape, encoded.arrays)
                self.error_feedback.record(name, delta, sent)
            deltas[name] = WireTensor(codec=encoded.codec, shape=tuple(encoded.shape), dtype=dtype, arrays=encoded.arrays, params=dict(encoded.params))
        return deltas


def failure_message(start: RoundStart, worker_id: str, error: BaseException) -> bytes:
    message = TrainingFailed(
        run_id=start.run_id,
        round=start.round,
        attempt=start.attempt,
        model_version=start.model_version,
        worker_id=worker_id,
        error_type=type(error).__name__,
        error_message=str(error)[:2000],
    )
    return encode_message(message)
