"""Byzantine-robust aggregation rules, selected with ``--strategy``.

- ``norm-bounding``: scale every update to L2 norm at most ``max_norm``, then take the
  sample-weighted mean (Sun, Kairouz, Suresh and McMahan, "Can You Really Backdoor
  Federated Learning?", 2019). It streams like FedAvg.
- ``median``: the coordinate-wise median of the updates (Yin, Chen, Ramchandran and
  Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
  Rates", ICML 2018).
- ``trimmed-mean``: per coordinate, drop the ``trim_fraction`` largest and smallest
  values and average the rest (Yin et al., 2018).
- ``krum`` and ``multi-krum``: score each update by the sum of squared distances to
  its n - f - 2 nearest neighbours, where f is ``byzantine_workers``. Krum keeps the
  lowest-scored update, and Multi-Krum the ``selected`` lowest-scored ones, averaged
  with sample weights (Blanchard, El Mhamdi, Guerraoui and Stainer,
  "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent",
  NeurIPS 2017).

The median, trimmed mean and (Multi-)Krum keep every update of the round in memory
until ``finish_round``, so the coordinator holds n updates at once, and Krum also
holds an n x n distance matrix. The median and the trimmed mean ignore sample counts,
because a worker could claim any count to gain weight.

Integer and bool tensors: the median and trimmed mean apply the same rule and round
half to even (bool: a value above one half is True). Krum and Multi-Krum take the
sample-weighted mean of the selected updates, rounded as in
``coordinator.aggregation``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from coordinator.aggregation import WeightedSum, ZeroWeightError, apply_mean_delta
from coordinator.privacy import l2_norm
from coordinator.strategies.base import ClientUpdate, Strategy


class NotEnoughUpdatesError(ZeroWeightError):
    """The round has too few updates for the rule's Byzantine bound; the global model stays unchanged."""


class NormBounding(Strategy):
    """Sample-weighted mean of updates whose floating deltas are scaled to L2 norm at most ``max_norm``."""

    name = "norm-bounding"

    def __init__(self, *, max_norm: float, server_learning_rate: float = 1.0) -> None:
        _require(max_norm > 0, "max_norm", "a number > 0", max_norm)
        _require(server_learning_rate > 0, "server_learning_rate", "a number > 0", server_learning_rate)
        super().__init__()
        self.max_norm = float(max_norm)
        self.server_learning_rate = float(server_learning_rate)
        self._sum: WeightedSum | None = None
        self._floating: list[str] = []
        self.clipped = 0

    def begin_round(self, template: Mapping[str, torch.Tensor]) -> None:
        self._sum = WeightedSum(template)
        self._floating = [name for name, tensor in template.items() if tensor.is_floating_point()]
        self.clipped = 0

    def add_update(self, update: ClientUpdate) -> None:
        assert self._sum is not None, "begin_round must come first"
        norm = l2_norm(update.values, self._floating)
        values = dict(update.values)
        if norm > self.max_norm:
            scale = np.float32(self.max_norm / norm)
            for name in self._floating:
                values[name] = np.asarray(update.values[name], dtype=np.float32) * scale
            self.clipped += 1
        self._sum.add(values, float(update.num_samples))

    def finish_round(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert self._sum is not None, "begin_round must come first"
        return apply_mean_delta(global_state, self._sum.mean(), learning_rate=self.server_learning_rate)

    def round_summary(self) -> dict[str, Any]:
        return {"clipped": self.clipped}


class _BufferedStrategy(Strategy):
    """Keeps the round's updates in memory until ``finish_round``."""

    def __init__(self, *, server_learning_rate: float) -> None:
        _require(server_learning_rate > 0, "server_learning_rate", "a number > 0", server_learning_rate)
        super().__init__()
        self.server_learning_rate = float(server_learning_rate)
        self._template: dict[str, torch.Tensor] = {}
        self._updates: list[ClientUpdate] = []

    def begin_round(self, template: Mapping[str, torch.Tensor]) -> None:
        self._template = dict(template)
        self._updates = []

    def add_update(self, update: ClientUpdate) -> None:
        self._updates.append(update)

    @property
    def _floating(self) -> list[str]:
        return [name for name, tensor in self._template.items() if tensor.is_floating_point()]

    def _stack(self, name: str) -> np.ndarray:
        """Return the updates' values of tensor ``name`` stacked along a new first axis, as float64."""
        shape = tuple(self._template[name].shape)
        return np.stack([np.asarray(update.values[name], dtype=np.float64).reshape(shape) for update in self._updates])


class CoordinateMedian(_BufferedStrategy):
    """The coordinate-wise median of the round's updates (buffers the round; see the module docstring)."""

    name = "median"

    def __init__(self, *, server_learning_rate: float = 1.0) -> None:
        super().__init__(server_learning_rate=server_learning_rate)

    def finish_round(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self._updates:
            raise ZeroWeightError("no update arrived, so there is no median")
        mean = {name: _to_dtype(np.median(self._stack(name), axis=0), self._template[name].dtype) for name in self._template}
        return apply_mean_delta(global_state, mean, learning_rate=self.server_learning_rate)


class TrimmedMean(_BufferedStrategy):
    """Per coordinate, the mean after dropping the ``trim_fraction`` largest and smallest values (buffers the round).

    floor(trim_fraction * n) values are dropped at each end, so at least one value
    remains for every n because ``trim_fraction`` < 0.5.
    """

    name = "trimmed-mean"

    def __init__(self, *, trim_fraction: float = 0.2, server_learning_rate: float = 1.0) -> None:
        super().__init__(server_learning_rate=server_learning_rate)
        _require(0.0 <= trim_fraction < 0.5, "trim_fraction", "a number in [0, 0.5)", trim_fraction)
        self.trim_fraction = float(trim_fraction)

    def finish_round(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        count = len(self._updates)
        if count == 0:
            raise ZeroWeightError("no update arrived, so there is no trimmed mean")
        trimmed = math.floor(self.trim_fraction * count)
        mean = {}
        for name, tensor in self._template.items():
            ordered = np.sort(self._stack(name), axis=0)
            mean[name] = _to_dtype(ordered[trimmed : count - trimmed].mean(axis=0), tensor.dtype)
        return apply_mean_delta(global_state, mean, learning_rate=self.server_learning_rate)


class MultiKrum(_BufferedStrategy):
    """Average of the ``selected`` updates with the lowest Krum scores, weighted by sample count (buffers the round).

    The score of update i is the sum of squared L2 distances, over all floating
    tensors together, to its n - f - 2 nearest other updates. The rule needs
    n >= 2f + 3 updates; a round with fewer raises NotEnoughUpdatesError and the
    global model stays unchanged. ``selected`` None keeps n - f updates.
    """

    name = "multi-krum"

    def __init__(self, *, byzantine_workers: int = 1, selected: int | None = None, server_learning_rate: float = 1.0) -> None:
        super().__init__(server_learning_rate=server_learning_rate)
        _require(_is_int(byzantine_workers) and byzantine_workers >= 0, "byzantine_workers", "an int >= 0", byzantine_workers)
        _require(selected is None or (_is_int(selected) and selected >= 1), "selected", "an int >= 1 or None", selected)
        self.byzantine_workers = byzantine_workers
        self.selected = selected
        self.last_selected: list[str] = []

    def finish_round(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        count = len(self._updates)
        needed = 2 * self.byzantine_workers + 3
        if count < needed:
            raise NotEnoughUpdatesError(
                f"{self.name} with byzantine_workers={self.byzantine_workers} needs at least {needed} updates, but the round has {count}"
            )
        keep = self.selected if self.selected is not None else count - self.byzantine_workers
        keep = min(keep, count)
        scores = krum_scores(self._flat_matrix(), self.byzantine_workers)
        chosen = np.argsort(scores, kind="stable")[:keep]
        self.last_selected = [self._updates[index].worker_id for index in chosen]

        total = WeightedSum(self._template)
        for index in chosen:
            update = self._updates[int(index)]
            # Equal weights when every chosen update reports zero samples.
            total.add(update.values, float(update.num_samples))
        if total.total_weight <= 0:
            total = WeightedSum(self._template)
            for index in chosen:
                total.add(self._updates[int(index)].values, 1.0)
        return apply_mean_delta(global_state, total.mean(), learning_rate=self.server_learning_rate)

    def round_summary(self) -> dict[str, Any]:
        return {"selected": list(self.last_selected)}

    def _flat_matrix(self) -> np.ndarray:
        names = self._floating
        size = sum(int(self._template[name].numel()) for name in names)
        matrix = np.empty((len(self._updates), size), dtype=np.float32)
        for row, update in enumerate(self._updates):
            offset = 0
            for name in names:
                flat = np.asarray(update.values[name], dtype=np.float32).reshape(-1)
                matrix[row, offset : offset + flat.size] = flat
                offset += flat.size
        return matrix


class Krum(MultiKrum):
    """The single update with the lowest Krum score (buffers the round; see MultiKrum)."""

    name = "krum"

    def __init__(self, *, byzantine_workers: int = 1, server_learning_rate: float = 1.0) -> None:
        super().__init__(byzantine_workers=byzantine_workers, selected=1, server_learning_rate=server_learning_rate)


def krum_scores(matrix: np.ndarray, byzantine_workers: int) -> np.ndarray:
    """Return the Krum score of each row of ``matrix`` (n updates by d values).

    The score of row i is the sum of its squared distances to the n - f - 2 nearest
    other rows, computed in float64 from the Gram matrix.
    """
    count = matrix.shape[0]
    neighbours = count - byzantine_workers - 2
    if neighbours < 1:
        raise ValueError(f"Krum needs n - f - 2 >= 1, but got n={count} and f={byzantine_workers}")
    rows = matrix.astype(np.float64, copy=False)
    squared = np.einsum("ij,ij->i", rows, rows)
    distances = squared[:, None] + squared[None, :] - 2.0 * (rows @ rows.T)
    np.maximum(distances, 0.0, out=distances)
    np.fill_diagonal(distances, np.inf)
    nearest = np.partition(distances, neighbours - 1, axis=1)[:, :neighbours]
    return nearest.sum(axis=1)


def _to_dtype(values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    # torch.as_tensor also takes the numpy scalars that reductions of 0-d tensors return.
    tensor = torch.as_tensor(values, dtype=torch.float64)
    if dtype == torch.bool:
        return tensor > 0.5
    if not dtype.is_floating_point:
        return torch.round(tensor).to(dtype)
    return tensor.to(torch.float32)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(ok: bool, name: str, expected: str, got: object) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, but got {got!r}")
