"""Client-level differential privacy: the maths of DP-FedAvg and its privacy accountant.

DP-FedAvg (McMahan, Ramage, Talwar and Zhang, "Learning Differentially Private
Recurrent Language Models", ICLR 2018) clips every update to an L2 bound C and sums
the clipped updates with weight 1 each. It then adds Gaussian noise N(0, (z * C)^2)
to the sum, where z is the noise multiplier. The strategy that runs it round by round is
``coordinator.strategies.dpfedavg.DPFedAvg``. This module holds its pure functions
(clipping, noise, the adaptive clipping rule of Andrew, Thakkar, McMahan and
Ramaswamy, "Differentially Private Learning with Adaptive Clipping", NeurIPS 2021)
and the accountant, which turns the rounds run so far into (epsilon, delta) with
the Renyi-DP analysis of Opacus.

The worker side (``worker.privacy``) reads the round-start config keys and writes
the update metrics named here.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

PLACEMENTS = ("server", "worker")
ACCOUNTANTS = ("rdp",)

# Round-start config keys that tell workers to clip and add their noise share.
CONFIG_CLIP_NORM = "dp_clip_norm"
CONFIG_NOISE_STD = "dp_noise_std"
CONFIG_COUNT_NOISE_STD = "dp_count_noise_std"

# Update metrics that a worker sends with worker placement.
METRIC_NOISE_STD = "dp_noise_std"
METRIC_UNCLIPPED_SHARE = "dp_unclipped_share"

# An honest noisy update of d values has norm above C + sigma * (sqrt(d) + t) with
# probability at most exp(-t^2 / 2) (Gaussian concentration of the norm, which is
# 1-Lipschitz); t = 6 gives 1.5e-8.
NOISE_TAIL = 6.0


# Pure maths


def l2_norm(values: Mapping[str, np.ndarray], names: Iterable[str]) -> float:
    """Return the L2 norm of the arrays ``names`` of ``values`` taken together, summed in float64."""
    total = 0.0
    for name in names:
        flat = np.asarray(values[name]).reshape(-1).astype(np.float64, copy=False)
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


@dataclass(frozen=True)
class ClippedUpdate:
    """An update scaled to a norm bound: the scaled arrays, the norm before scaling and the factor."""

    values: dict[str, np.ndarray]
    norm: float
    scale: float

    @property
    def clipped(self) -> bool:
        return self.scale < 1.0


def clip_update(values: Mapping[str, np.ndarray], names: Iterable[str], clip_norm: float) -> ClippedUpdate:
    """Scale the arrays ``names`` together to L2 norm at most ``clip_norm``.

    Returns float32 copies scaled by ``min(1, clip_norm / norm)``. Arrays not in
    ``names`` are left out of the result.
    """
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, but got {clip_norm}")
    names = list(names)
    norm = l2_norm(values, names)
    scale = 1.0 if norm <= clip_norm else clip_norm / norm
    clipped = {name: (np.asarray(values[name], dtype=np.float32) * np.float32(scale)).astype(np.float32, copy=False) for name in names}
    return ClippedUpdate(clipped, norm, scale)


def gaussian_noise(shapes: Mapping[str, tuple[int, ...]], std: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Draw float64 noise N(0, std^2) of each shape; ``std`` 0 gives zeros."""
    if not std >= 0:
        raise ValueError(f"std must be >= 0, but got {std}")
    return {name: rng.standard_normal(shape) * std for name, shape in shapes.items()}


def split_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """Return the multiplier left for the sum when the unclipped count gets noise ``count_noise_std``.

    The count sums terms b - 1/2 with b in {0, 1}, so its sensitivity is 1/2 and its
    multiplier is 2 * count_noise_std. Two Gaussian mechanisms with multipliers z1
    and z2 compose, in RDP, into one with z^-2 = z1^-2 + z2^-2, so the sum gets
    z1 = (z^-2 - (2 * count_noise_std)^-2)^(-1/2) (Andrew et al., 2021).
    """
    count_multiplier = 2.0 * count_noise_std
    if not count_multiplier > noise_multiplier:
        raise ValueError(
            f"count_noise_std must exceed noise_multiplier / 2 = {noise_multiplier / 2:.4g} for adaptive clipping, "
            f"but got {count_noise_std:.4g}; raise count_noise_std or lower noise_multiplier"
        )
    return (noise_multiplier**-2 - count_multiplier**-2) ** -0.5


def adapt_clip_norm(clip_norm: float, unclipped_fraction: float, *, target_quantile: float, learning_rate: float) -> float:
    """Return the next clip norm: ``clip_norm * exp(-learning_rate * (unclipped_fraction - target_quantile))``.

    Too many unclipped updates shrink the bound and too few grow it, so it tracks the
    ``target_quantile`` of the update norms (the geometric rule of Andrew et al., 2021).
    """
    return clip_norm * math.exp(-learning_rate * (unclipped_fraction - target_quantile))


def worker_noise_std(noise_multiplier: float, clip_norm: float, expected_updates: int) -> float:
    """Return the noise standard deviation each of ``expected_updates`` workers adds: z * C / sqrt(m)."""
    return noise_multiplier * clip_norm / math.sqrt(expected_updates)


def noisy_update_bound(clip_norm: float, noise_std: float, num_values: int) -> float:
    """Return a norm that an update clipped to ``clip_norm`` plus N(0, noise_std^2) noise per value stays under.

    The bound is C + noise_std * (sqrt(num_values) + 6), exceeded with probability
    below 1.5e-8.
    """
    return clip_norm + noise_std * (math.sqrt(num_values) + NOISE_TAIL)


# Accounting


class PrivacyAccountant:
    """(epsilon, delta) spent by a sequence of Poisson-subsampled Gaussian mechanisms.

    Uses the Renyi-DP analysis of Opacus (``opacus.accountants.RDPAccountant``); this
    class only keeps the history and computes projections with it. ``history`` lists
    ``(noise_multiplier, sample_rate, steps)`` entries, with consecutive equal
    mechanisms merged.
    """

    def __init__(self, *, delta: float, kind: str = "rdp") -> None:
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), but got {delta}")
        if kind not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, but got {kind!r}")
        from opacus.accountants import RDPAccountant

        self.delta = delta
        self.kind = kind
        self._accountant = RDPAccountant()

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return [(float(z), float(q), int(steps)) for z, q, steps in self._accountant.history]

    @property
    def steps(self) -> int:
        return sum(steps for _, _, steps in self._accountant.history)

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` applications of the mechanism with these parameters."""
        _check_mechanism(noise_multiplier, sample_rate)
        for _ in range(steps):
            self._accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def epsilon(self) -> float:
        """Return the epsilon spent so far at ``delta``; 0 before the first step."""
        if not self._accountant.history:
            return 0.0
        return float(self._accountant.get_epsilon(delta=self.delta))

    def epsilon_after(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> float:
        """Return the epsilon that ``steps`` more applications of the mechanism would bring the total to."""
        _check_mechanism(noise_multiplier, sample_rate)
        projected = copy.deepcopy(self._accountant)
        for _ in range(steps):
            projected.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
        return float(projected.get_epsilon(delta=self.delta))

    def load_history(self, history: Iterable[Iterable[float]]) -> None:
        """Replace the history with ``(noise_multiplier, sample_rate, steps)`` entries, as ``history`` returns them."""
        entries = []
        for entry in history:
            z, q, steps = entry
            _check_mechanism(float(z), float(q))
            entries.append((float(z), float(q), int(steps)))
        self._accountant.history = entries


def _check_mechanism(noise_multiplier: float, sample_rate: float) -> None:
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0, but got {noise_multiplier}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], but got {sample_rate}")


@runtime_checkable
class PrivateStrategy(Protocol):
    """A strategy that accounts the privacy its rounds spend."""

    def privacy_record(self) -> dict[str, Any]:
        """Return the (epsilon, delta) spent so far and the mechanism's parameters."""

    def projected_epsilon(self) -> float:
        """Return the epsilon that one more round would bring the total to."""

