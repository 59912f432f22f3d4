"""SCAFFOLD: stochastic controlled averaging (Karimireddy et al., "SCAFFOLD: Stochastic
Controlled Averaging for Federated Learning", ICML 2020), with the paper's option II
for the client control variate.

The server keeps a control variate c, one tensor per trainable parameter, and each
worker i keeps its own c_i on its disk. In each round:

1. The round start carries c in ``RoundStart.aux`` (names ``scaffold.c/<parameter>``).
2. The worker adds c - c_i to every gradient before each optimizer step, which
   corrects the drift of its local optimum away from the global one.
3. After K local steps from x to y_i with learning rate lr, the worker sets
   c_i+ = c_i - c + (x - y_i) / (K * lr) and sends delta_c_i = c_i+ - c_i in
   ``Update.aux`` (names ``scaffold.delta_c/<parameter>``). ``worker.strategies``
   replaces K by the effective step count of momentum SGD when momentum is used.
4. The server applies the sample-weighted mean model delta, as FedAvg does, and sets
   c = c + sum_i delta_c_i / N, where N is the total number of workers.

Option II assumes plain SGD steps, so round starts set the local momentum to
``local_momentum``, 0 by default. With momentum, the worker uses the effective step
count instead of K, but SCAFFOLD with the task's momentum of 0.9 diverged on the
digits benchmark (``docs/strategies.md``), while plain SGD converged.

The paper averages the model deltas uniformly. This strategy weights them by sample
count like FedAvg, which is the same when every worker has as many samples. N is
the larger of ``num_clients`` and the number of distinct workers that have sent an
update in this run. Both c and that set of workers are saved in the checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from coordinator.aggregation import WeightedSum, apply_mean_delta
from coordinator.strategies.base import ClientUpdate, Strategy
from coordinator.strategies.common import SCAFFOLD_CONTROL_PREFIX, SCAFFOLD_DELTA_PREFIX
from coordinator.validation import RejectedUpdate
from schemas.tensors import read_only_torch


class Scaffold(Strategy):
    """Server side of SCAFFOLD (see the module docstring)."""

    name = "scaffold"

    def __init__(self, *, server_learning_rate: float = 1.0, num_clients: int = 0, local_momentum: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= local_momentum < 1.0:
            raise ValueError(f"local_momentum must be in [0, 1), but got {local_momentum}")
        if server_learning_rate <= 0:
            raise ValueError(f"server_learning_rate must be > 0, but got {server_learning_rate}")
        if num_clients < 0:
            raise ValueError(f"num_clients must be >= 0 (0 counts the workers seen), but got {num_clients}")
        self.server_learning_rate = server_learning_rate
        self.num_clients = num_clients
        self.local_momentum = local_momentum
        self.control: dict[str, torch.Tensor] = {}
        self.workers_seen: set[str] = set()
        self._sum: WeightedSum | None = None
        self._control_sum: dict[str, torch.Tensor] = {}
        self._updates = 0

    def begin_round(self, template: Mapping[str, torch.Tensor]) -> None:
        for name, tensor in template.items():
            if self.is_optimized(name, template) and name not in self.control:
                self.control[name] = torch.zeros(tensor.shape, dtype=torch.float32)
        self._sum = WeightedSum(template)
        self._control_sum = {name: torch.zeros_like(tensor) for name, tensor in self.control.items()}
        self._updates = 0

    def round_config(self, round_number: int) -> dict[str, Any]:
        return {**super().round_config(round_number), "momentum": self.local_momentum}

    def round_aux(self, round_number: int, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {SCAFFOLD_CONTROL_PREFIX + name: tensor for name, tensor in self.control.items()}

    def check_update(self, update: ClientUpdate) -> None:
        for name, control in self.control.items():
            key = SCAFFOLD_DELTA_PREFIX + name
            if key not in update.aux:
                raise RejectedUpdate("missing_control_variate", f"SCAFFOLD update lacks the strategy tensor {key!r}")
            shape = tuple(np.shape(update.aux[key]))
            if shape != tuple(control.shape):
                raise RejectedUpdate("wrong_shape", f"strategy tensor {key!r} has shape {list(shape)}, expected {list(control.shape)}")
            if np.asarray(update.aux[key]).dtype.kind != "f":
                raise RejectedUpdate("wrong_dtype", f"strategy tensor {key!r} must be floating, but came as {np.asarray(update.aux[key]).dtype}")

    def add_update(self, update: ClientUpdate) -> None:
        if self._sum is None:
            raise RuntimeError("strategy scaffold: add_update came before begin_round")
        self._sum.add(update.values, float(update.num_samples))
        for name, total in self._control_sum.items():
            delta = read_only_torch(np.asarray(update.aux[SCAFFOLD_DELTA_PREFIX + name], dtype=np.float32))
            total.add_(delta.reshape(total.shape))
        self._updates += 1
        self.workers_seen.add(update.worker_id)

    def finish_round(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._sum is None:
            raise RuntimeError("strategy scaffold: finish_round came before begin_round")
        mean = self._sum.mean()
        new_state = apply_mean_delta(global_state, mean, learning_rate=self.server_learning_rate)
        total_clients = self.total_clients()
        for name, total in self._control_sum.items():
            self.control[name] = self.control[name] + total / total_clients
        return new_state

    def total_clients(self) -> int:
        """Return N of step 4: ``num_clients``, or the number of workers seen, whichever is larger."""
        return max(self.num_clients, len(self.workers_seen), 1)

    def round_summary(self) -> dict[str, Any]:
        norm = sum(float(tensor.pow(2).sum()) for tensor in self.control.values()) ** 0.5
        return {"control_norm": norm, "updates": self._updates, "total_clients": self.total_clients()}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"c/{name}": tensor for name, tensor in self.control.items()}

    def state_scalars(self) -> dict[str, Any]:
        return {"workers_seen": sorted(self.workers_seen)}

    def load_state(self, tensors: Mapping[str, torch.Tensor], scalars: Mapping[str, Any]) -> None:
        self.control = {name.removeprefix("c/"): tensor.clone() for name, tensor in tensors.items() if name.startswith("c/")}
        self.workers_seen = set(scalars.get("workers_seen", []))
