"""Δ-SGD: per-worker adaptive local learning rates (Kim, Toghani, Uribe and Kyrillidis,
"Adaptive Federated Learning with Auto-Tuned Clients", ICLR 2024, arXiv:2306.11201).

Each worker picks its own step size at every local step from the local smoothness
it observes, so workers whose data give steep or flat losses need no separate
tuning. The rule builds on the adaptive gradient descent of Malitsky and Mishchenko
("Adaptive Gradient Descent without Descent", ICML 2020). For local step k >= 1,
with x_k the parameters and g_k the stochastic gradient at x_k:

    eta_k = min( sqrt(1 + delta * theta_{k-1}) * eta_{k-1},
                 ||x_k - x_{k-1}|| / (2 * ||g_k - g_{k-1}||) )
    theta_k = eta_k / eta_{k-1}

Step 0 of every round uses the round's ``learning_rate`` and theta_0 = 1, and
``delta`` (the amplifier) bounds how fast the step size may grow. The rule is
defined for plain SGD, so round starts set the local ``momentum`` to 0 whatever the
run's setting. The worker side is ``worker.strategies.DeltaSgdHook``. The server
aggregates like FedAvg.
"""

from __future__ import annotations

from typing import Any

from coordinator.strategies.common import DELTA_SGD_AMPLIFIER_KEY
from coordinator.strategies.fedavg import FedAvg


class DeltaSgd(FedAvg):
    """FedAvg aggregation; round starts tell the workers to run the Δ-SGD step size rule."""

    name = "deltasgd"

    def __init__(self, *, server_learning_rate: float = 1.0, amplifier: float = 0.1) -> None:
        super().__init__(server_learning_rate=server_learning_rate)
        if amplifier <= 0:
            raise ValueError(f"amplifier must be > 0, but got {amplifier}")
        self.amplifier = amplifier

    def round_config(self, round_number: int) -> dict[str, Any]:
        return {**super().round_config(round_number), DELTA_SGD_AMPLIFIER_KEY: self.amplifier, "momentum": 0.0}
