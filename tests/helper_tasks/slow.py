"""Variants of the digits task for end-to-end tests, loaded as ``tests.helper_tasks.slow:ATTR``.

Both keep the name ``digits`` and the digits model, so their workers interoperate
with a coordinator that runs the built-in digits task.

- ``SlowDigitsTask`` sleeps before each local training call, so a test can act while
  a worker is inside training. ``SLOW_TASK_SLEEP_S`` sets the sleep in seconds
  (default 5). When ``SLOW_TASK_MARKER_DIR`` names a folder, each training call
  first creates ``train-<pid>-<n>.started`` there, with n counting calls from 1.
- ``EmptyDigitsTask`` gives every worker an empty training set, so each update
  carries zero samples.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import torch
from torch import nn

from fedmq.tasks import DigitsTask, LocalData, PartitionSpec, TrainConfig, TrainResult
from fedmq.tasks.base import GradientHook

SLEEP_ENV = "SLOW_TASK_SLEEP_S"
MARKER_DIR_ENV = "SLOW_TASK_MARKER_DIR"
DEFAULT_SLEEP_S = 5.0


class SlowDigitsTask(DigitsTask):
    """The digits task with a sleep before every local training call."""

    def __init__(self) -> None:
        super().__init__()
        self.sleep_s = float(os.environ.get(SLEEP_ENV, DEFAULT_SLEEP_S))
        self._calls = itertools.count(1)

    def train(
        self,
        model: nn.Module,
        data: LocalData,
        config: TrainConfig,
        *,
        global_params: dict[str, torch.Tensor] | None = None,
        gradient_hook: GradientHook | None = None,
    ) -> TrainResult:
        marker_dir = os.environ.get(MARKER_DIR_ENV)
        if marker_dir:
            (Path(marker_dir) / f"train-{os.getpid()}-{next(self._calls)}.started").touch()
        time.sleep(self.sleep_s)
        return super().train(model, data, config, global_params=global_params, gradient_hook=gradient_hook)


class EmptyDigitsTask(DigitsTask):
    """The digits task with no local training samples on any worker."""

    def load_local_data(self, worker_index: int, num_workers: int, partition: PartitionSpec) -> LocalData:
        data = super().load_local_data(worker_index, num_workers, partition)
        return LocalData(
            x_train=data.x_train[:0],
            y_train=data.y_train[:0],
            x_test=data.x_test,
            y_test=data.y_test,
        )
