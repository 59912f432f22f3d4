"""FedAvgM: FedAvg with server momentum (Hsu, Qi and Brown, "Measuring the Effects of
Non-Identical Data Distribution for Federated Visual Classification", 2019)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from coordinator.strategies.base import MeanDeltaStrategy, apply_steps


def momentum_step(velocity: torch.Tensor, mean_delta: torch.Tensor, *, momentum: float, learning_rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(step, new_velocity)`` with ``v = momentum * v + delta`` and ``step = learning_rate * v``."""
    new_velocity = momentum * velocity + mean_delta
    return learning_rate * new_velocity, new_velocity


class FedAvgM(MeanDeltaStrategy):
    """Each round, for every trainable parameter with mean delta D (sample-weighted):

    1. v = server_momentum * v + D, with v = 0 before the first round.
    2. x = x + server_learning_rate * v.

    Floating buffers move by D, and integer and bool tensors take the mean value.
    The velocities are saved in the checkpoint. The default momentum of 0.7 comes from
    a short sweep on the benchmarks of ``docs/strategies.md``: 0.9 with a server
    learning rate of 1.0 lost 2.5 points on MNIST with Dirichlet 0.1.
    """

    name = "fedavgm"

    def __init__(self, *, server_learning_rate: float = 1.0, server_momentum: float = 0.7) -> None:
        super().__init__()
        if server_learning_rate <= 0:
            raise ValueError(f"server_learning_rate must be > 0, but got {server_learning_rate}")
        if not 0.0 <= server_momentum < 1.0:
            raise ValueError(f"server_momentum must be in [0, 1), but got {server_momentum}")
        self.server_learning_rate = server_learning_rate
        self.server_momentum = server_momentum
        self.velocity: dict[str, torch.Tensor] = {}

    def apply_mean(self, global_state: Mapping[str, torch.Tensor], mean: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        steps = {}
        for name, delta in mean.items():
            if not self.is_optimized(name, self._template):
                continue
            velocity = self.velocity.get(name, torch.zeros_like(delta))
            steps[name], self.velocity[name] = momentum_step(
                velocity, delta, momentum=self.server_momentum, learning_rate=self.server_learning_rate
            )
        return apply_steps(global_state, mean, steps)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"velocity/{name}": tensor for name, tensor in self.velocity.items()}

    def state_scalars(self) -> dict[str, Any]:
        return {"server_momentum": self.server_momentum}

    def load_state(self, tensors: Mapping[str, torch.Tensor], scalars: Mapping[str, Any]) -> None:
        self.velocity = {name.removeprefix("velocity/"): tensor.clone() for name, tensor in tensors.items() if name.startswith("velocity/")}
