"""Adaptive server optimizers over the mean update: the FedOpt family of Reddi et al.,
"Adaptive Federated Optimization", ICLR 2021 (their Algorithm 2).

Each round, for every trainable parameter with sample-weighted mean delta D:

1. m = beta1 * m + (1 - beta1) * D
2. v is updated by the optimizer's rule (``second_moment``):

   - FedAdagrad: v = v + D**2
   - FedYogi:    v = v - (1 - beta2) * D**2 * sign(v - D**2)
   - FedAdam:    v = beta2 * v + (1 - beta2) * D**2

3. x = x + server_learning_rate * m / (sqrt(v) + tau)

m starts at 0 and v at tau**2. There is no bias correction, as in the paper. The
default server learning rates (0.03 for FedAdam and FedYogi, 0.1 for FedAdagrad,
with tau = 1e-3) come from a short sweep on the digits and MNIST benchmarks of
``docs/strategies.md``; 0.01 left FedAdagrad far behind FedAvg there.
Floating buffers move by D, and integer and bool tensors take the mean value. The
moments m and v are saved in the checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from coordinator.strategies.base import MeanDeltaStrategy, apply_steps
from fedmq.errors import CheckpointError

SECOND_MOMENT_RULES = ("adagrad", "yogi", "adam")


def second_moment(rule: str, v: torch.Tensor, delta: torch.Tensor, *, beta2: float) -> torch.Tensor:
    """Return the new second moment of ``rule`` (one of SECOND_MOMENT_RULES)."""
    squared = delta * delta
    if rule == "adagrad":
        return v + squared
    if rule == "yogi":
        return v - (1.0 - beta2) * squared * torch.sign(v - squared)
    if rule == "adam":
        return beta2 * v + (1.0 - beta2) * squared
    raise ValueError(f"rule must be one of {SECOND_MOMENT_RULES}, but got {rule!r}")


def adaptive_step(
    rule: str,
    m: torch.Tensor,
    v: torch.Tensor,
    delta: torch.Tensor,
    *,
    learning_rate: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(step, new_m, new_v)`` for one tensor (steps 1 to 3 of the module docstring)."""
    new_m = beta1 * m + (1.0 - beta1) * delta
    new_v = second_moment(rule, v, delta, beta2=beta2)
    step = learning_rate * new_m / (torch.sqrt(new_v) + tau)
    return step, new_m, new_v


class FedOpt(MeanDeltaStrategy):
    """A server optimizer of the FedOpt family; subclasses set ``rule`` (see the module docstring)."""

    rule: ClassVar[str]
    default_server_learning_rate: ClassVar[float]

    def __init__(
        self,
        *,
        server_learning_rate: float | None = None,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        super().__init__()
        if server_learning_rate is None:
            server_learning_rate = self.default_server_learning_rate
        if server_learning_rate <= 0:
            raise ValueError(f"server_learning_rate must be > 0, but got {server_learning_rate}")
        if not 0.0 <= beta1 < 1.0:
            raise ValueError(f"beta1 must be in [0, 1), but got {beta1}")
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"beta2 must be in [0, 1), but got {beta2}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, but got {tau}")
        self.server_learning_rate = server_learning_rate
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    def apply_mean(self, global_state: Mapping[str, torch.Tensor], mean: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        steps = {}
        for name, delta in mean.items():
            if not self.is_optimized(name, self._template):
                continue
            m = self.m.get(name, torch.zeros_like(delta))
            v = self.v.get(name, torch.full_like(delta, self.tau**2))
            steps[name], self.m[name], self.v[name] = adaptive_step(
                self.rule, m, v, delta,
                learning_rate=self.server_learning_rate, beta1=self.beta1, beta2=self.beta2, tau=self.tau,
            )
        return apply_steps(global_state, mean, steps)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"m/{name}": tensor for name, tensor in self.m.items()}
        tensors.update({f"v/{name}": tensor for name, tensor in self.v.items()})
        return tensors

    def state_scalars(self) -> dict[str, Any]:
        return {"rule": self.rule}

    def load_state(self, tensors: Mapping[str, torch.Tensor], scalars: Mapping[str, Any]) -> None:
        saved_rule = scalars.get("rule", self.rule)
        if saved_rule != self.rule:
            raise CheckpointError(
                f"the checkpoint contains {saved_rule} moments, but this run uses {self.name}; "
                "resume with the strategy the run started with"
            )
        self.m = {name.removeprefix("m/"): tensor.clone() for name, tensor in tensors.items() if name.startswith("m/")}
        self.v = {name.removeprefix("v/"): tensor.clone() for name, tensor in tensors.items() if name.startswith("v/")}
