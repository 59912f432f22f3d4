"""The server-side strategy interface: what a round sends and how updates become the next model.

The coordinator calls, in order, for every round:

1. ``round_config`` and ``round_aux``: extra training settings and tensors for the
   round start (for example FedProx's ``proximal_mu`` or SCAFFOLD's server control
   variate).
2. ``begin_round`` once, then ``add_update`` for every update that passed
   validation, as it arrives.
3. ``finish_round``, which returns the new global state.

A strategy keeps its own state between rounds (server optimizer moments, control
variates) and exposes it through ``state_tensors`` and ``state_scalars``, which the
checkpoint stores, so a restarted coordinator continues with the same state.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch


@dataclass
class ClientUpdate:
    """One validated update as a strategy sees it.

    ``values`` holds float32 deltas for floating tensors and new values for integer
    and bool tensors. ``aux`` holds the update's decoded strategy tensors.
    """

    worker_id: str
    num_samples: int
    num_steps: int
    values: Mapping[str, np.ndarray]
    aux: Mapping[str, np.ndarray] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)


class Strategy(abc.ABC):
    """Server-side aggregation rule of a federated run (see the module docstring)."""

    name: ClassVar[str]

    def round_config(self, round_number: int) -> dict[str, Any]:
        """Return extra training settings that the round start carries to the workers."""
        return {}

    def round_aux(self, round_number: int, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return extra tensors that the round start carries to the workers."""
        return {}

    @abc.abstractmethod
    def begin_round(self, template: Mapping[str, torch.Tensor]) -> None:
        """Reset the per-round accumulators; ``template`` holds the tensors updates change."""

    @abc.abstractmethod
    def add_update(self, update: ClientUpdate) -> None:
        """Fold one validated update into the round."""

    @abc.abstractmethod
    def finish_round(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return the new global state. Raises ZeroWeightError when no update carried weight."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def state_scalars(self) -> dict[str, Any]:
        return {}

    def load_state(self, tensors: Mapping[str, torch.Tensor], scalars: Mapping[str, Any]) -> None:
        """Restore what ``state_tensors`` and ``state_scalars`` returned."""
