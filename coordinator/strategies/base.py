"""The server-side strategy interface: what a round sends and how updates become the next model.

The coordinator calls ``setup`` once with a StrategyContext, then, for every round:

1. ``round_config`` and ``round_aux``: extra training settings and tensors for the
   round start (for example FedProx's ``proximal_mu`` or SCAFFOLD's server control
   variate).
2. ``begin_round`` once, then, for every update that passed validation as it
   arrives, ``check_update`` (which may reject it) and ``add_update``.
3. ``finish_round``, which returns the new global state, and ``round_summary`` for
   the round's metrics record.

A strategy keeps its own state between rounds (server optimizer moments, control
variates, cluster models) and exposes it through ``state_tensors`` and
``state_scalars``, which the checkpoint stores, so a restarted coordinator continues
with the same state. ``load_state`` runs after ``setup``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from coordinator.aggregation import WeightedSum
from coordinator.strategies.common import STRATEGY_KEY

if TYPE_CHECKING:
    from fedmq.tasks import Task


@dataclass
class ClientUpdate:
    """One validated update as a strategy receives it.

    ``values`` holds float32 deltas for floating tensors and new values for integer
    and bool tensors. ``aux`` holds the update's decoded strategy tensors.
    """

    worker_id: str
    num_samples: int
    num_steps: int
    values: Mapping[str, np.ndarray]
    aux: Mapping[str, np.ndarray] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StrategyContext:
    """Facts about the run that a strategy receives before its first round.

    ``train_config`` is the local training config that every round start carries
    (learning rate, momentum, local epochs). ``parameter_names`` are the state dict
    names of the model's trainable parameters, as opposed to buffers such as
    BatchNorm's running statistics. ``build_state(seed)`` returns the state dict of
    a freshly initialised model built under ``torch.manual_seed(seed)``.
    """

    train_config: Mapping[str, Any] = field(default_factory=dict)
    parameter_names: frozenset[str] = frozenset()
    seed: int = 0
    build_state: Callable[[int], dict[str, torch.Tensor]] | None = None

    @classmethod
    def from_task(cls, task: Task, *, train_config: Mapping[str, Any], seed: int) -> StrategyContext:
        """Return the context of a run of ``task``; building it leaves torch's global generator untouched."""

        def build_state(model_seed: int) -> dict[str, torch.Tensor]:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(model_seed)
                model = task.build_model()
            return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}

        with torch.random.fork_rng(devices=[]):
            model = task.build_model()
        parameter_names = frozenset(name for name, parameter in model.named_parameters() if parameter.requires_grad)
        return cls(train_config=dict(train_config), parameter_names=parameter_names, seed=seed, build_state=build_state)


class Strategy(abc.ABC):
    """Server-side aggregation rule of a federated run (see the module docstring)."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self.context = StrategyContext()

    def setup(self, context: StrategyContext) -> None:
        """Store what the strategy needs to know about the run; called once before any round."""
        self.context = context

    def round_config(self, round_number: int) -> dict[str, Any]:
        """Return extra training settings that the round start carries to the workers."""
        return {STRATEGY_KEY: self.name}

    def round_aux(self, round_number: int, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return extra tensors that the round start carries to the workers."""
        return {}

    @abc.abstractmethod
    def begin_round(self, template: Mapping[str, torch.Tensor]) -> None:
        """Reset the per-round accumulators; ``template`` contains the tensors that updates change."""

    def check_update(self, update: ClientUpdate) -> None:
        """Raise coordinator.validation.RejectedUpdate when the update lacks what the strategy needs."""

    @abc.abstractmethod
    def add_update(self, update: ClientUpdate) -> None:
        """Fold one validated update into the round."""

    @abc.abstractmethod
    def finish_round(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return the new global state. Raises ZeroWeightError when no update carried weight."""

    def round_summary(self) -> dict[str, Any]:
        """Return JSON-serializable facts about the finished round for the metrics record."""
        return {}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def state_scalars(self) -> dict[str, Any]:
        return {}

    def load_state(self, tensors: Mapping[str, torch.Tensor], scalars: Mapping[str, Any]) -> None:
        """Restore what ``state_tensors`` and ``state_scalars`` returned."""

    # Helpers for subclasses

    def is_optimized(self, name: str, template: Mapping[str, torch.Tensor]) -> bool:
        """Return whether a server optimizer steps tensor ``name``: a floating trainable parameter.

        Floating buffers such as BatchNorm's running statistics take the plain mean,
        because momentum or adaptive scaling has no meaning for them. Without
        parameter names in the context, every floating tensor counts as a parameter.
        """
        if not template[name].is_floating_point():
            return False
        names = self.context.parameter_names
        return not names or name in names


class MeanDeltaStrategy(Strategy):
    """A strategy whose round is the sample-weighted mean delta, then ``apply_mean``.

    The sum streams into one accumulator per tensor, so memory does not grow with the
    number of workers.
    """

    def __init__(self) -> None:
        super().__init__()
        self._sum: WeightedSum | None = None
        self._template: dict[str, torch.Tensor] = {}

    def begin_round(self, template: Mapping[str, torch.Tensor]) -> None:
        self._template = dict(template)
        self._sum = WeightedSum(template)

    def add_update(self, update: ClientUpdate) -> None:
        if self._sum is None:
            raise RuntimeError(f"strategy {self.name}: add_update came before begin_round")
        self._sum.add(update.values, float(update.num_samples))

    def finish_round(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._sum is None:
            raise RuntimeError(f"strategy {self.name}: finish_round came before begin_round")
        # The sum is not used after the round, so its accumulators become the mean.
        mean = self._sum.mean(in_place=True)
        return self.apply_mean(global_state, mean)

    @abc.abstractmethod
    def apply_mean(self, global_state: Mapping[str, torch.Tensor], mean: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return the new global state from the round's mean update (see coordinator.aggregation)."""


def apply_steps(
    global_state: Mapping[str, torch.Tensor],
    mean: Mapping[str, torch.Tensor],
    steps: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Return the new global state when a server optimizer computed ``steps`` for some tensors.

    A tensor in ``steps`` moves by its step. Any other floating tensor in ``mean``
    moves by the mean delta, an integer or bool tensor in ``mean`` takes the mean
    value, and a tensor absent from both (a personal layer) is copied unchanged.
    """
    new_state = {}
    for name, tensor in global_state.items():
        if name in steps:
            new_state[name] = (tensor.to(torch.float32) + steps[name]).to(tensor.dtype)
        elif name not in mean:
            new_state[name] = tensor.clone()
        elif tensor.is_floating_point():
            new_state[name] = (tensor.to(torch.float32) + mean[name]).to(tensor.dtype)
        else:
            new_state[name] = mean[name].to(tensor.dtype).clone()
    return new_state
