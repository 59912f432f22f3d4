"""Tasks that the fault tests load in worker processes by 'tests.faults.tasks:Name' spec.

Faults are set per process through environment variables, so one test can give each
worker its own behaviour while the coordinator and every worker load the same task:

- ``FEDMQ_FAULT_TRAIN_DELAY_S``: seconds to sleep before each local training call,
  from call ``FEDMQ_FAULT_DELAY_FROM_CALL`` on (counted from 1, default 1).
- ``FEDMQ_FAULT_FAIL_CALLS``: comma-separated ``CALL:ERROR`` pairs. The CALL-th
  training call of the process (counted from 1) raises ERROR, one of
  ``RuntimeError`` or ``MemoryError``. The MemoryError comes from a real failed
  allocation.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from fedmq.tasks import DigitsTask, LocalData, TrainConfig, TrainResult
from fedmq.tasks.base import GradientHook

DELAY_ENV = "FEDMQ_FAULT_TRAIN_DELAY_S"
DELAY_FROM_ENV = "FEDMQ_FAULT_DELAY_FROM_CALL"
FAIL_ENV = "FEDMQ_FAULT_FAIL_CALLS"

# A bytearray of this many bytes exceeds any address space, so allocating it raises MemoryError.
_IMPOSSIBLE_ALLOCATION_BYTES = 1 << 62


def _failures_from_environment() -> dict[int, str]:
    failures: dict[int, str] = {}
    text = os.environ.get(FAIL_ENV, "").strip()
    for item in filter(None, (part.strip() for part in text.split(","))):
        call, _, error = item.partition(":")
        if error not in ("RuntimeError", "MemoryError"):
            raise ValueError(f"{FAIL_ENV} entries must be CALL:RuntimeError or CALL:MemoryError, but got {item!r}")
        failures[int(call)] = error
    return failures


class FaultyDigitsTask(DigitsTask):
    """The digits task with the delays and failures set in the environment (see the module docstring)."""

    name = "digits-faulty"

    def __init__(self) -> None:
        super().__init__()
        self.delay_s = float(os.environ.get(DELAY_ENV, "0") or 0)
        self.delay_from_call = int(os.environ.get(DELAY_FROM_ENV, "1") or 1)
        self.failures = _failures_from_environment()
        self.calls = 0

    def train(
        self,
        model: nn.Module,
        data: LocalData,
        config: TrainConfig,
        *,
        global_params: dict[str, torch.Tensor] | None = None,
        gradient_hook: GradientHook | None = None,
    ) -> TrainResult:
        self.calls += 1
        if self.delay_s > 0 and self.calls >= self.delay_from_call:
            time.sleep(self.delay_s)
        failure = self.failures.get(self.calls)
        if failure == "RuntimeError":
            raise RuntimeError(f"injected failure in training call {self.calls}")
        if failure == "MemoryError":
            bytearray(_IMPOSSIBLE_ALLOCATION_BYTES)
        return super().train(model, data, config, global_params=global_params, gradient_hook=gradient_hook)


class WideDigitsTask(DigitsTask):
    """The digits task with a hidden layer of 8,192 units: about 614,000 parameters, 2.5 MB in float32."""

    name = "digits-wide"

    def __init__(self) -> None:
        super().__init__(hidden_units=8192)
