"""Tasks and message helpers shared by the strategy tests."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmq.tasks import DigitsTask, LocalData, PartitionSpec, Task
from schemas import tensors as wire_tensors
from schemas.messages import RoundStart, Update, decode_message


class SmallTask(Task):
    """Three classes of 6-dimensional points, split by worker index, and an MLP 6 -> 5 -> 3."""

    name = "small"

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))

    def load_local_data(self, worker_index: int, num_workers: int, partition: PartitionSpec) -> LocalData:
        generator = torch.Generator().manual_seed(100 + worker_index)
        x = torch.randn(40, 6, generator=generator)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
        return LocalData(x_train=x[:30], y_train=y[:30], x_test=x[30:], y_test=y[30:])

    def load_test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(99)
        x = torch.randn(20, 6, generator=generator)
        return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


# Labels that the workers of the second group see instead of the true ones.
LABEL_PERMUTATION = (9, 8, 7, 6, 5, 4, 3, 2, 1, 0)


class PermutedDigitsTask(DigitsTask):
    """The digits task where workers with an odd index see every label y as LABEL_PERMUTATION[y].

    Two groups of workers with different label maps are two true clusters.
    """

    def load_local_data(self, worker_index: int, num_workers: int, partition: PartitionSpec) -> LocalData:
        data = super().load_local_data(worker_index, num_workers, partition)
        if worker_index % 2 == 0:
            return data
        mapping = torch.tensor(LABEL_PERMUTATION, dtype=torch.int64)
        return LocalData(data.x_train, mapping[data.y_train], data.x_test, mapping[data.y_test])


def seeded_state(task: Task, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {name: tensor.detach().clone() for name, tensor in task.build_model().state_dict().items()}


def round_start(
    task: Task,
    weights: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    *,
    round_number: int = 1,
    aux: Mapping[str, torch.Tensor] | None = None,
) -> RoundStart:
    base = {"codec": "float32", "lossless": "none", "seed": 0, "learning_rate": 0.1, "momentum": 0.0, "batch_size": 64, "local_epochs": 1}
    return RoundStart(
        run_id="run-test",
        round=round_number,
        attempt=0,
        model_version=round_number - 1,
        task=task.name,
        deadline_unix=time.time() + 600,
        config={**base, **config},
        weights=wire_tensors.encode_state(weights),
        aux=wire_tensors.encode_state(aux or {}),
    )


def decode_update(body: bytes) -> tuple[Update, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Return the update, its decoded deltas and its decoded strategy tensors."""
    update = decode_message(body)
    assert isinstance(update, Update)
    deltas = {name: np.array(wire_tensors.decode(tensor, name=name), dtype=np.float64) for name, tensor in update.deltas.items()}
    aux = {name: np.array(wire_tensors.decode(tensor, name=name)) for name, tensor in update.aux.items()}
    return update, deltas, aux
