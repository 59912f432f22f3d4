"""Differential privacy on the worker: the noise share of DP-FedAvg, and DP-SGD through Opacus.

Client level. When the round start carries ``dp_noise_std`` (DP-FedAvg with worker
placement, see ``coordinator.strategies.dpfedavg``), ``privatize_trained_state``
clips the worker's update, all floating tensors together, to ``dp_clip_norm`` and
adds Gaussian noise of std ``dp_noise_std`` to every value before the update is
encoded. Because the noise is added here, the coordinator never receives the
clipped update without it. With adaptive clipping the worker also sends whether its update
was unclipped, as a noisy share ``b - 1/2 + N(0, dp_count_noise_std^2)``.

Sample level. ``SamplePrivacy`` replaces the task's local training with DP-SGD
(Abadi et al., "Deep Learning with Differential Privacy", CCS 2016) as Opacus
implements it: Poisson-sampled batches with expected size ``batch_size``, per-sample
gradients clipped to ``max_grad_norm``, Gaussian noise of std
``noise_multiplier * max_grad_norm`` on their sum, and an RDP accountant. That
protects each record of the worker's own data, also against the coordinator. The
accountant's history persists in the worker's state folder, so the epsilon of every
round the worker ever trained is counted, and the worker reports it in each update's
metrics.

Noise is drawn from generators seeded from the operating system's entropy, never
from the round's seed, which the coordinator knows.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from coordinator.privacy import (
    CONFIG_CLIP_NORM,
    CONFIG_COUNT_NOISE_STD,
    CONFIG_NOISE_STD,
    METRIC_NOISE_STD,
    METRIC_UNCLIPPED_SHARE,
    PrivacyAccountant,
    clip_update,
)
from fedmq.errors import CheckpointError, ConfigError
from fedmq.tasks import LocalData, Task, TrainConfig, TrainResult

logger = logging.getLogger(__name__)

METRIC_SAMPLE_EPSILON = "dp_sample_epsilon"
METRIC_SAMPLE_DELTA = "dp_sample_delta"
ACCOUNTANT_FILE = "dp_sgd_accountant.json"


# Client level: the worker's noise share


def privatize_trained_state(
    start_state: Mapping[str, torch.Tensor],
    trained: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    *,
    rng: np.random.Generator | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Return ``trained`` with its update clipped and noised as the round config requests, and the metrics to send.

    The update is ``trained - start_state`` over the floating tensors of
    ``start_state``. Without ``dp_noise_std`` in ``config`` the state comes back
    unchanged with no metrics. ``rng`` defaults to a generator seeded from the
    operating system. Raises ConfigError for invalid DP settings in the config.
    """
    if CONFIG_NOISE_STD not in config:
        return dict(trained), {}
    clip_norm = _positive(config, CONFIG_CLIP_NORM)
    noise_std = _non_negative(config, CONFIG_NOISE_STD)
    count_noise_std = _non_negative(config, CONFIG_COUNT_NOISE_STD) if CONFIG_COUNT_NOISE_STD in config else 0.0
    rng = rng if rng is not None else np.random.default_rng()

    names = [name for name, tensor in start_state.items() if tensor.is_floating_point()]
    deltas = {name: (trained[name].detach().to(torch.float32) - start_state[name].to(torch.float32)).numpy() for name in names}
    clipped = clip_update(deltas, names, clip_norm)

    private = dict(trained)
    for name in names:
        noisy = clipped.values[name] + (rng.standard_normal(clipped.values[name].shape) * noise_std).astype(np.float32)
        start = start_state[name]
        private[name] = (start.to(torch.float32) + torch.from_numpy(noisy)).to(start.dtype)

    metrics = {METRIC_NOISE_STD: noise_std}
    if count_noise_std > 0:
        unclipped = 0.0 if clipped.clipped else 1.0
        metrics[METRIC_UNCLIPPED_SHARE] = unclipped - 0.5 + float(rng.standard_normal()) * count_noise_std
    return private, metrics


def _positive(config: Mapping[str, Any], key: str) -> float:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"round config {key} must be a finite number > 0, but got {value!r}")
    return float(value)


def _non_negative(config: Mapping[str, Any], key: str) -> float:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"round config {key} must be a finite number >= 0, but got {value!r}")
    return float(value)


# Sample level: DP-SGD


@dataclass(frozen=True)
class SamplePrivacySettings:
    """DP-SGD settings of one worker: noise multiplier, per-sample clip norm and the delta its epsilon is reported at."""

    noise_multiplier: float
    max_grad_norm: float = 1.0
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise ConfigError(f"DP-SGD noise_multiplier must be > 0, but got {self.noise_multiplier!r}")
        if not self.max_grad_norm > 0:
            raise ConfigError(f"DP-SGD max_grad_norm must be > 0, but got {self.max_grad_norm!r}")
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"DP-SGD delta must be in (0, 1), but got {self.delta!r}")


class SamplePrivacy:
    """Local training as DP-SGD with Opacus, with an accountant that persists across rounds.

    Training uses cross-entropy on the task's model, like ``Task.train``, so a task
    that overrides ``train`` is rejected. ``state_dir`` keeps the accountant's history;
    without it the history lasts as long as the process. ``seed`` makes sampling and
    noise reproducible for tests only.
    """

    def __init__(self, settings: SamplePrivacySettings, *, state_dir: Path | None = None, seed: int | None = None) -> None:
        self.settings = settings
        self.state_path = state_dir / ACCOUNTANT_FILE if state_dir is not None else None
        self.accountant = PrivacyAccountant(delta=settings.delta)
        self._seed = seed
        if self.state_path is not None and self.state_path.exists():
            self._load()

    def epsilon(self) -> float:
        """Return the per-record epsilon spent over every DP-SGD step so far, at ``settings.delta``."""
        return self.accountant.epsilon()

    def metrics(self) -> dict[str, float]:
        return {METRIC_SAMPLE_EPSILON: self.epsilon(), METRIC_SAMPLE_DELTA: self.settings.delta}

    def train(self, task: Task, model: nn.Module, data: LocalData, config: TrainConfig) -> TrainResult:
        """Train ``model`` in place with DP-SGD and account the steps; the result's metrics include the epsilon.

        Raises ConfigError when the task overrides ``Task.train`` or ``proximal_mu`` is
        above 0, because per-sample clipping would not cover a custom loss or the
        proximal term.
        """
        if type(task).train is not Task.train:
            raise ConfigError(f"task {task.name!r} overrides Task.train, so DP-SGD, which trains with cross-entropy, cannot run it")
        if config.proximal_mu > 0:
            raise ConfigError(f"DP-SGD cannot add the FedProx proximal term (proximal_mu {config.proximal_mu}); run without it")
        if data.num_train == 0:
            return TrainResult(0, 0, {"loss": 0.0, "accuracy": 0.0, "train_time_s": 0.0, **self.metrics()})

        from opacus import PrivacyEngine

        with warnings.catch_warnings():
            # secure_mode needs torchcsprng; the generators below are seeded from the OS instead.
            warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
            engine = PrivacyEngine(accountant="rdp")
        # A new engine per round, because one engine expects one dataset object; the history carries over.
        engine.accountant.history = list(self.accountant.history)

        dataset = TensorDataset(data.x_train, data.y_train)
        sampling = torch.Generator().manual_seed(self._draw_seed())
        noise = torch.Generator().manual_seed(self._draw_seed())
        loader = DataLoader(dataset, batch_size=config.batch_size, generator=sampling)
        optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=config.momentum, weight_decay=config.weight_decay)
        private_model, private_optimizer, private_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=self.settings.noise_multiplier,
            max_grad_norm=self.settings.max_grad_norm,
            poisson_sampling=True,
            noise_generator=noise,
        )
        try:
            result = _run_dp_sgd(private_model, private_optimizer, private_loader, config)
        finally:
            # Removes Opacus's hooks, so the plain model serves the next round.
            private_model._close()

        self.accountant.load_history(engine.accountant.history)
        self._save()
        result.metrics.update(self.metrics())
        logger.info(
            "DP-SGD: %d steps with noise multiplier %.3g and clip norm %.3g; per-record epsilon %.3f at delta %.1e",
            result.num_steps, self.settings.noise_multiplier, self.settings.max_grad_norm, self.epsilon(), self.settings.delta,
        )
        return TrainResult(data.num_train, result.num_steps, result.metrics)

    def _draw_seed(self) -> int:
        if self._seed is not None:
            self._seed += 1
            return self._seed
        return secrets.randbits(63)

    def _load(self) -> None:
        assert self.state_path is not None
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
            self.accountant.load_history(state["history"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"cannot read the DP-SGD accountant from {self.state_path}: {exc}; the epsilon spent so far is unknown, "
                "so restore the file or start over with a new state folder and data"
            ) from exc

    def _save(self) -> None:
        if self.state_path is None:
            return
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.state_path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"history": [list(entry) for entry in self.accountant.history], "delta": self.settings.delta}))
        os.replace(temporary, self.state_path)


def _run_dp_sgd(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, config: TrainConfig) -> TrainResult:
    started = time.monotonic()
    model.train()
    num_steps = 0
    last_loss = 0.0
    last_accuracy = 0.0
    stopped = False
    for _ in range(config.local_epochs):
        loss_sum = 0.0
        correct = 0
        seen = 0
        for x_batch, y_batch in loader:
            if _budget_spent(config, num_steps, started):
                stopped = True
                break
            optimizer.zero_grad(set_to_none=True)
            # Opacus's backward hooks fire only when the input takes part in autograd.
            x_batch = x_batch.requires_grad_(True)
            logits = model(x_batch)
            size = int(y_batch.shape[0])
            # A Poisson batch can be empty; the noisy step still runs, as the accounting assumes.
            loss = F.cross_entropy(logits, y_batch, reduction="sum") / max(1, size)
            loss.backward()
            optimizer.step()
            num_steps += 1
            loss_sum += float(loss.detach()) * size
            correct += int((logits.detach().argmax(dim=1) == y_batch).sum())
            seen += size
        if seen > 0:
            last_loss = loss_sum / seen
            last_accuracy = correct / seen
        if stopped:
            break
    return TrainResult(0, num_steps, {"loss": last_loss, "accuracy": last_accuracy, "train_time_s": time.monotonic() - started})


def _budget_spent(config: TrainConfig, num_steps: int, started: float) -> bool:
    if config.max_steps is not None and num_steps >= config.max_steps:
        return True
    return config.time_budget_s is not None and time.monotonic() - started >= config.time_budget_s
