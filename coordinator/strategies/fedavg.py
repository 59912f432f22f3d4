"""FedAvg: the sample-weighted mean of the workers' updates (McMahan et al., 2017)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from coordinator.aggregation import WeightedSum, apply_mean_delta
from coordinator.strategies.base import ClientUpdate, Strategy


class FedAvg(Strategy):
    """New global = global + server_learning_rate * sum_i(n_i * delta_i) / sum_i(n_i).

    The sum streams into one accumulator per tensor, so memory does not grow with
    the number of workers. Integer and bool tensors follow the rule documented in
    ``coordinator.aggregation``.
    """

    name = "fedavg"

    def __init__(self, *, server_learning_rate: float = 1.0) -> None:
        if server_learning_rate <= 0:
            raise ValueError(f"server_learning_rate must be > 0, but got {server_learning_rate}")
        self.server_learning_rate = server_learning_rate
        self._sum: WeightedSum | None = None

    def begin_round(self, template: Mapping[str, torch.Tensor]) -> None:
        self._sum = WeightedSum(template)

    def add_update(self, update: ClientUpdate) -> None:
        assert self._sum is not None, "begin_round must come first"
        self._sum.add(update.values, float(update.num_samples))

    def finish_round(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert self._sum is not None, "begin_round must come first"
        mean = self._sum.mean()
        return apply_mean_delta(global_state, mean, learning_rate=self.server_learning_rate)
