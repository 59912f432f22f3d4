"""FedAvg: the sample-weighted mean of the workers' updates (McMahan et al., 2017)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from coordinator.aggregation import apply_mean_delta
from coordinator.strategies.base import MeanDeltaStrategy


class FedAvg(MeanDeltaStrategy):
    """New global = global + server_learning_rate * sum_i(n_i * delta_i) / sum_i(n_i).

    Integer and bool tensors follow the rule documented in ``coordinator.aggregation``.
    """

    name = "fedavg"

    def __init__(self, *, server_learning_rate: float = 1.0) -> None:
        super().__init__()
        if server_learning_rate <= 0:
            raise ValueError(f"server_learning_rate must be > 0, but got {server_learning_rate}")
        self.server_learning_rate = server_learning_rate

    def apply_mean(self, global_state: Mapping[str, torch.Tensor], mean: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return apply_mean_delta(global_state, mean, learning_rate=self.server_learning_rate)
