"""FedProx: FedAvg whose workers add a proximal term to their local objective (Li et al.,
"Federated Optimization in Heterogeneous Networks", MLSys 2020)."""

from __future__ import annotations

from typing import Any

from coordinator.strategies.fedavg import FedAvg

DEFAULT_PROXIMAL_MU = 0.01


class FedProx(FedAvg):
    """FedAvg aggregation; every round start sets ``proximal_mu``.

    Each worker minimises its loss plus ``proximal_mu / 2 * ||w - w_global||**2``
    (``fedmq.tasks.Task.train``), which keeps local models near the global one when
    local data differ. Without the option, mu is the run's ``proximal_mu`` training
    setting when that is above 0, else 0.01.
    """

    name = "fedprox"

    def __init__(self, *, server_learning_rate: float = 1.0, proximal_mu: float | None = None) -> None:
        super().__init__(server_learning_rate=server_learning_rate)
        if proximal_mu is not None and proximal_mu <= 0:
            raise ValueError(f"proximal_mu must be > 0, but got {proximal_mu}")
        self.proximal_mu = proximal_mu

    @property
    def mu(self) -> float:
        """The proximal weight the round starts carry."""
        if self.proximal_mu is not None:
            return self.proximal_mu
        configured = float(self.context.train_config.get("proximal_mu", 0.0) or 0.0)
        return configured if configured > 0 else DEFAULT_PROXIMAL_MU

    def round_config(self, round_number: int) -> dict[str, Any]:
        return {**super().round_config(round_number), "proximal_mu": self.mu}
