"""FedNova: normalized averaging for workers that run different amounts of local work
(Wang et al., "Tackling the Objective Inconsistency Problem in Heterogeneous Federated
Optimization", NeurIPS 2020).

With plain FedAvg, a worker that runs more local steps moves the model further, so
the global model drifts toward the optimum of the workers with the most steps. FedNova
divides each worker's delta by its normalizer a_i, which counts the local steps it
ran, and rescales the mean by the weighted mean normalizer tau_eff:

1. For each update i with n_i samples and tau_i = ``num_steps`` local steps:
   a_i = tau_i for plain SGD, ``effective_steps(tau_i, momentum)`` for momentum SGD,
   and (1 - (1 - lr * mu)**tau_i) / (lr * mu) for FedProx's term mu without momentum.
2. p_i = n_i / sum_j n_j, d_i = delta_i / a_i and tau_eff = sum_i p_i * a_i.
3. x = x + server_learning_rate * tau_eff * sum_i p_i * d_i

Only trainable parameters are normalized. Floating buffers take the sample-weighted
mean delta and integer and bool tensors the mean value, as in FedAvg. An update with
zero local steps has no normalized direction and adds nothing to the parameters.
The momentum, learning rate and mu come from the run's training config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from coordinator.aggregation import WeightedSum
from coordinator.strategies.base import ClientUpdate, Strategy, apply_steps
from coordinator.strategies.common import effective_steps
from schemas.tensors import read_only_torch


def normalizer(num_steps: int, *, momentum: float = 0.0, learning_rate: float = 0.0, proximal_mu: float = 0.0) -> float:
    """Return FedNova's a_i for ``num_steps`` local steps (step 1 of the module docstring)."""
    if momentum == 0.0 and proximal_mu > 0.0:
        shrink = learning_rate * proximal_mu
        if not 0.0 < shrink < 1.0:
            raise ValueError(f"learning_rate * proximal_mu must be in (0, 1), but got {shrink}")
        return (1.0 - (1.0 - shrink) ** num_steps) / shrink
    return effective_steps(num_steps, momentum)


class FedNova(Strategy):
    """Normalized averaging over the local step counts (see the module docstring)."""

    name = "fednova"

    def __init__(self, *, server_learning_rate: float = 1.0) -> None:
        super().__init__()
        if server_learning_rate <= 0:
            raise ValueError(f"server_learning_rate must be > 0, but got {server_learning_rate}")
        self.server_learning_rate = server_learning_rate
        self._template: dict[str, torch.Tensor] = {}
        self._parameters: list[str] = []
        self._normalized: dict[str, torch.Tensor] = {}
        self._others: WeightedSum | None = None
        self._samples = 0.0
        self._weighted_normalizers = 0.0
        self._normalizers: list[float] = []

    def begin_round(self, template: Mapping[str, torch.Tensor]) -> None:
        self._template = dict(template)
        self._parameters = [name for name in template if self.is_optimized(name, template)]
        self._normalized = {name: torch.zeros(template[name].shape, dtype=torch.float32) for name in self._parameters}
        self._others = WeightedSum({name: tensor for name, tensor in template.items() if name not in self._normalized})
        self._samples = 0.0
        self._weighted_normalizers = 0.0
        self._normalizers = []

    def add_update(self, update: ClientUpdate) -> None:
        if self._others is None:
            raise RuntimeError("strategy fednova: add_update came before begin_round")
        weight = float(update.num_samples)
        self._others.add(update.values, weight)
        a_i = self._normalizer(update.num_steps)
        self._normalizers.append(a_i)
        if weight == 0.0 or a_i == 0.0:
            return
        for name, total in self._normalized.items():
            delta = read_only_torch(np.asarray(update.values[name], dtype=np.float32))
            total.add_(delta.reshape(total.shape), alpha=weight / a_i)
        self._samples += weight
        self._weighted_normalizers += weight * a_i

    def finish_round(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._others is None:
            raise RuntimeError("strategy fednova: finish_round came before begin_round")
        # Raises ZeroWeightError when every update had zero samples, as FedAvg does.
        mean = self._others.mean()
        steps: dict[str, torch.Tensor] = {}
        if self._samples > 0:
            tau_eff = self._weighted_normalizers / self._samples
            scale = self.server_learning_rate * tau_eff / self._samples
            steps = {name: scale * total for name, total in self._normalized.items()}
        return apply_steps(global_state, mean, steps)

    def round_summary(self) -> dict[str, Any]:
        tau_eff = self._weighted_normalizers / self._samples if self._samples else 0.0
        return {"tau_eff": tau_eff, "normalizers": [round(a, 4) for a in self._normalizers]}

    def _normalizer(self, num_steps: int) -> float:
        config = self.context.train_config
        return normalizer(
            num_steps,
            momentum=float(config.get("momentum", 0.0) or 0.0),
            learning_rate=float(config.get("learning_rate", 0.0) or 0.0),
            proximal_mu=float(config.get("proximal_mu", 0.0) or 0.0),
        )
