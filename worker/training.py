"""One round of local training on a worker, from a round start to an encoded update.

Runs on the worker's training thread and never touches the broker: it turns a
decoded RoundStart into the bytes of an Update (or a TrainingFailed) message.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmq.tasks import LocalData, Task, TrainConfig
from schemas import codecs
from schemas import tensors as wire_tensors
from schemas.messages import RoundStart, TrainingFailed, Update, encode_message
from schemas.wire import WireTensor

logger = logging.getLogger(__name__)

# Round-start config keys that map onto TrainConfig fields.
_TRAIN_KEYS = ("local_epochs", "learning_rate", "batch_size", "momentum", "weight_decay", "proximal_mu", "max_steps", "time_budget_s")


@dataclass
class LocalOverrides:
    """Limits a worker sets on its own local work, for slower hardware. None keeps the round's value."""

    local_epochs: int | None = None
    max_steps: int | None = None
    time_budget_s: float | None = None


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


class LocalTrainer:
    """The worker's model, data and error-feedback state across rounds."""

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
        self.held_version = -1

    @property
    def _feedback_path(self) -> Path:
        assert self.state_dir is not None
        return self.state_dir / "error_feedback.safetensors"

    def run_round(self, start: RoundStart) -> tuple[bytes, dict[str, Any]]:
        """Train on one round start and return the encoded Update and a summary for the log."""
        started = time.monotonic()
        global_state = wire_tensors.decode_state(start.weights)
        self.model.load_state_dict(global_state)
        self.held_version = start.model_version
        config = train_config_from(start, self.worker_id, self.overrides)
        torch.manual_seed(config.seed)

        global_params = {name: tensor.detach().clone() for name, tensor in self.model.named_parameters()} if config.proximal_mu > 0 else None
        result = self.task.train(self.model, self.data, config, global_params=global_params)
        trained = self.model.state_dict()

        # Encode: floating tensors as compressed deltas, the rest exactly.
        codec_spec = codecs.CodecSpec.parse(str(start.config.get("codec", "float16")))
        rng = np.random.default_rng(config.seed)
        deltas = self._encode_deltas(global_state, trained, codec_spec, rng)
        if self.state_dir is not None and codec_spec.name not in ("float32",):
            self.error_feedback.save(self._feedback_path)

        metrics = {key: float(value) for key, value in result.metrics.items()}
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
        )
        body = encode_message(update, lossless_method=str(start.config.get("lossless", "auto")))
        summary = {"num_samples": result.num_samples, "num_steps": result.num_steps, "bytes": len(body), **metrics}
        return body, summary

    def _encode_deltas(
        self,
        global_state: dict[str, torch.Tensor],
        trained: dict[str, torch.Tensor],
        spec: codecs.CodecSpec,
        rng: np.random.Generator,
    ) -> dict[str, WireTensor]:
        deltas: dict[str, WireTensor] = {}
        lossy = spec.name != "float32"
        for name, start_value in global_state.items():
            value = trained[name]
            dtype = wire_tensors.wire_dtype(value)
            if not value.is_floating_point():
                deltas[name] = wire_tensors.encode_raw(wire_tensors.to_numpy(value), dtype)
                continue
            delta = (value.detach().to(torch.float32) - start_value.to(torch.float32)).numpy()
            if lossy:
                delta = self.error_feedback.compensate(name, delta)
            encoded = codecs.encode(delta, spec, rng=rng, dtype=dtype)
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
