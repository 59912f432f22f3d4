"""DP-FedAvg: federated averaging with client-level differential privacy.

DP-FedAvg (McMahan, Ramage, Talwar and Zhang, "Learning Differentially Private
Recurrent Language Models", ICLR 2018) makes the released global model
(epsilon, delta)-differentially private with respect to adding or removing all the
data of one worker. ``DPFedAvg`` runs these steps every round:

1. Clip each update: its floating deltas, all tensors together, are scaled down to
   L2 norm at most ``clip_norm`` (C).
2. Sum the clipped updates with weight 1 each. Sample counts are ignored, because
   with sample-count weights one worker's influence on the mean is no longer bounded
   by C; this is the uniform-weight estimator of the paper.
3. Add Gaussian noise N(0, (z * C)^2) to every coordinate of the sum, where z is
   ``noise_multiplier``. With ``placement="server"`` the coordinator adds all of it
   (the coordinator is trusted). With ``placement="worker"`` each worker adds its
   share N(0, (z * C)^2 / m) before sending (m is ``expected_updates``), so the sum of
   m shares has the full variance. The coordinator adds the shares of the workers
   that did not reply, and still clips every update, at a bound that an honest noisy
   update exceeds with probability below 1.5e-8.
4. Divide by the number n of updates in the round, so the mean carries noise of
   standard deviation z * C / n. n is treated as public.
5. Move the global model by ``server_learning_rate`` times the noisy mean.
6. Account the round as one Poisson-subsampled Gaussian mechanism with sampling rate
   q = expected_updates / population (1 without a population) and multiplier z.
7. With ``adaptive_clipping``, move C toward the ``target_quantile`` of the update
   norms with the geometric rule of Andrew, Thakkar, McMahan and Ramaswamy
   ("Differentially Private Learning with Adaptive Clipping", NeurIPS 2021). The
   fraction of unclipped updates is released with Gaussian noise of std
   ``count_noise_std``, and the sum's multiplier is raised so that both releases
   together cost what one Gaussian mechanism with multiplier z costs.

fedmq does not sample workers: every known worker receives the round start. A
sampling rate below 1 is valid only where the workers taking part in a round are a
Poisson sample of ``population``; without ``population`` the accountant assumes q = 1,
which gives no amplification.

Integer and bool tensors (such as BatchNorm's ``num_batches_tracked``) are not
covered by clipping and noise, so a DP round keeps their global values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from coordinator.aggregation import ZeroWeightError, apply_mean_delta
from coordinator.privacy import (
    CONFIG_CLIP_NORM,
    CONFIG_COUNT_NOISE_STD,
    CONFIG_NOISE_STD,
    METRIC_NOISE_STD,
    METRIC_UNCLIPPED_SHARE,
    PLACEMENTS,
    PrivacyAccountant,
    adapt_clip_norm,
    clip_update,
    gaussian_noise,
    noisy_update_bound,
    split_noise_multiplier,
    worker_noise_std,
)
from coordinator.strategies.base import ClientUpdate, Strategy
from coordinator.validation import RejectedUpdate


class DPFedAvg(Strategy):
    """Federated averaging with client-level differential privacy (see the module docstring for the steps).

    The round's sum streams into one float64 accumulator per floating tensor, so
    memory grows with the model, not with the number of workers. ``seed`` makes the
    noise reproducible for tests only, because anyone with the seed can subtract the noise.
    """

    name = "dp-fedavg"

    def __init__(
        self,
        *,
        noise_multiplier: float,
        clip_norm: float,
        placement: str = "server",
        expected_updates: int | None = None,
        population: int | None = None,
        delta: float = 1e-5,
        adaptive_clipping: bool = False,
        target_quantile: float = 0.5,
        clip_learning_rate: float = 0.2,
        count_noise_std: float | None = None,
        server_learning_rate: float = 1.0,
        accountant: str = "rdp",
        seed: int | None = None,
    ) -> None:
        _require(noise_multiplier > 0, "noise_multiplier", "a number > 0", noise_multiplier)
        _require(clip_norm > 0, "clip_norm", "a number > 0", clip_norm)
        _require(placement in PLACEMENTS, "placement", f"one of {', '.join(PLACEMENTS)}", placement)
        _require(expected_updates is None or expected_updates >= 1, "expected_updates", "an int >= 1 or None", expected_updates)
        _require(population is None or population >= 1, "population", "an int >= 1 or None", population)
        _require(0.0 < delta < 1.0, "delta", "a number in (0, 1)", delta)
        _require(0.0 < target_quantile < 1.0, "target_quantile", "a number in (0, 1)", target_quantile)
        _require(clip_learning_rate > 0, "clip_learning_rate", "a number > 0", clip_learning_rate)
        _require(server_learning_rate > 0, "server_learning_rate", "a number > 0", server_learning_rate)
        if placement == "worker" and expected_updates is None:
            raise ValueError("expected_updates must be set with placement='worker', because each worker's noise share depends on it")
        if population is not None:
            if expected_updates is None:
                raise ValueError("expected_updates must be set with population, because the sampling rate is expected_updates / population")
            _require(expected_updates <= population, "expected_updates", f"at most population ({population})", expected_updates)
        if adaptive_clipping and expected_updates is None:
            raise ValueError("expected_updates must be set with adaptive_clipping, because the default count noise is expected_updates / 20")

        super().__init__()
        self.noise_multiplier = float(noise_multiplier)
        self.clip_norm = float(clip_norm)
        self.placement = placement
        self.expected_updates = expected_updates
        self.population = population
        self.sample_rate = 1.0 if population is None else expected_updates / population  # type: ignore[operator]
        self.adaptive_clipping = adaptive_clipping
        self.target_quantile = float(target_quantile)
        self.clip_learning_rate = float(clip_learning_rate)
        self.count_noise_std = 0.0
        self.sum_noise_multiplier = self.noise_multiplier
        if adaptive_clipping:
            self.count_noise_std = float(count_noise_std if count_noise_std is not None else expected_updates / 20)  # type: ignore[operator]
            self.sum_noise_multiplier = split_noise_multiplier(self.noise_multiplier, self.count_noise_std)
        self.server_learning_rate = float(server_learning_rate)
        self.accountant = PrivacyAccountant(delta=delta, kind=accountant)
        # Worker placement: what one update reveals to the coordinator, which receives it
        # before the other shares are added. Each worker's share has multiplier z / sqrt(m),
        # and the coordinator knows who took part, so there is no sampling amplification.
        self.local_accountant = PrivacyAccountant(delta=delta, kind=accountant) if placement == "worker" else None
        # NOTE: numpy's PCG64 is not a cryptographic generator, and floating-point
        # Gaussian samples are not exactly Gaussian in their lowest bits.
        self._rng = np.random.default_rng(seed)

        self._floating: list[str] = []
        self._sums: dict[str, np.ndarray] = {}
        self._count = 0
        self._clipped = 0
        self._unclipped_sum = 0.0
        self._num_values = 0
        self.last_round: dict[str, Any] = {}

    # Round

    def round_config(self, round_number: int) -> dict[str, Any]:
        config = super().round_config(round_number)
        if self.placement != "worker":
            return config
        assert self.expected_updates is not None
        return {
            **config,
            CONFIG_CLIP_NORM: self.clip_norm,
            CONFIG_NOISE_STD: self._share_noise_std(),
            CONFIG_COUNT_NOISE_STD: self.count_noise_std / math.sqrt(self.expected_updates),
        }

    def begin_round(self, template: Mapping[str, torch.Tensor]) -> None:
        self._floating = [name for name, tensor in template.items() if tensor.is_floating_point()]
        self._sums = {name: np.zeros(tuple(template[name].shape), dtype=np.float64) for name in self._floating}
        self._num_values = sum(int(template[name].numel()) for name in self._floating)
        self._count = 0
        self._clipped = 0
        self._unclipped_sum = 0.0

    def check_update(self, update: ClientUpdate) -> None:
        """Reject a worker-placement update that reports less noise than its share, or lacks its unclipped share."""
        if self.placement == "worker":
            self._check_worker_update(update)

    def add_update(self, update: ClientUpdate) -> None:
        """Clip one update and add it to the round's sum."""
        if self.placement == "worker":
            bound, unclipped_share = self._check_worker_update(update)
        else:
            bound, unclipped_share = self.clip_norm, 0.0

        clipped = clip_update(update.values, self._floating, bound)
        for name in self._floating:
            self._sums[name] += clipped.values[name]
        self._count += 1
        self._clipped += int(clipped.clipped)
        if self.placement == "server":
            self._unclipped_sum += (1.0 if clipped.norm <= self.clip_norm else 0.0) - 0.5
        else:
            self._unclipped_sum += unclipped_share

    def finish_round(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add the noise, apply the noisy mean, account the round and adapt the clip norm."""
        count = self._count
        if count == 0:
            raise ZeroWeightError("no update arrived, so the DP round has no mean")

        # Noise on the sum: all of it on the server, or the missing workers' shares.
        if self.placement == "server":
            sum_noise_std = self.sum_noise_multiplier * self.clip_norm
            count_noise_std = self.count_noise_std
            total_noise_std = sum_noise_std
        else:
            assert self.expected_updates is not None
            missing = max(0, self.expected_updates - count)
            sum_noise_std = self._share_noise_std() * math.sqrt(missing)
            count_noise_std = self.count_noise_std * math.sqrt(missing / self.expected_updates)
            total_noise_std = self._share_noise_std() * math.sqrt(count + missing)
        noise = gaussian_noise({name: total.shape for name, total in self._sums.items()}, sum_noise_std, self._rng)
        mean = {name: torch.from_numpy(((self._sums[name] + noise[name]) / count).astype(np.float32)) for name in self._floating}
        new_state = apply_mean_delta(global_state, mean, learning_rate=self.server_learning_rate)

        # Account the round, then adapt the bound for the next one.
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        if self.local_accountant is not None:
            assert self.expected_updates is not None
            self.local_accountant.step(noise_multiplier=self.noise_multiplier / math.sqrt(self.expected_updates), sample_rate=1.0)
        used_clip_norm = self.clip_norm
        unclipped_fraction = None
        if self.adaptive_clipping:
            noisy_unclipped = self._unclipped_sum + float(self._rng.standard_normal()) * count_noise_std
            unclipped_fraction = min(1.0, max(0.0, noisy_unclipped / count + 0.5))
            self.clip_norm = adapt_clip_norm(
                self.clip_norm, unclipped_fraction, target_quantile=self.target_quantile, learning_rate=self.clip_learning_rate
            )
        self.last_round = {
            "updates": count,
            "clipped": self._clipped,
            "clip_norm": used_clip_norm,
            "mean_noise_std": total_noise_std / count,
            "noisy_unclipped_fraction": unclipped_fraction,
        }
        return new_state

    def _share_noise_std(self) -> float:
        assert self.expected_updates is not None
        return worker_noise_std(self.sum_noise_multiplier, self.clip_norm, self.expected_updates)

    def _check_worker_update(self, update: ClientUpdate) -> tuple[float, float]:
        required = self._share_noise_std()
        sent = update.metrics.get(METRIC_NOISE_STD)
        if sent is None or not sent >= required * (1 - 1e-6):
            raise RejectedUpdate(
                "privacy_mismatch",
                f"worker placement needs noise of std >= {required:.6g} added by the worker, but the update reports {sent!r}; "
                "the worker may run an older fedmq",
            )
        unclipped_share = 0.0
        if self.adaptive_clipping:
            share = update.metrics.get(METRIC_UNCLIPPED_SHARE)
            if share is None or not math.isfinite(share):
                raise RejectedUpdate("privacy_mismatch", f"adaptive clipping needs the metric {METRIC_UNCLIPPED_SHARE!r}, but the update lacks it")
            unclipped_share = float(share)
        # The bound uses the required noise, not the reported one, so a worker cannot
        # widen its own bound by claiming more noise than it added.
        return noisy_update_bound(self.clip_norm, required, self._num_values), unclipped_share

    # Privacy reporting

    def round_summary(self) -> dict[str, Any]:
        return dict(self.last_round)

    def privacy_record(self) -> dict[str, Any]:
        """Return the (epsilon, delta) spent so far and the mechanism's parameters, for metrics and logs."""
        record: dict[str, Any] = {
            "epsilon": self.accountant.epsilon(),
            "delta": self.accountant.delta,
            "rounds": self.accountant.steps,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "clip_norm": self.clip_norm,
            "placement": self.placement,
            "accountant": self.accountant.kind,
        }
        if self.local_accountant is not None:
            record["local_epsilon"] = self.local_accountant.epsilon()
        if self.last_round:
            record["last_round"] = dict(self.last_round)
        return record

    def projected_epsilon(self) -> float:
        return self.accountant.epsilon_after(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    # Checkpointed state

    def state_scalars(self) -> dict[str, Any]:
        scalars: dict[str, Any] = {
            "clip_norm": self.clip_norm,
            "accountant_history": [list(entry) for entry in self.accountant.history],
        }
        if self.local_accountant is not None:
            scalars["local_accountant_history"] = [list(entry) for entry in self.local_accountant.history]
        return scalars

    def load_state(self, tensors: Mapping[str, torch.Tensor], scalars: Mapping[str, Any]) -> None:
        if "clip_norm" in scalars:
            self.clip_norm = float(scalars["clip_norm"])
        self.accountant.load_history(scalars.get("accountant_history", []))
        if self.local_accountant is not None:
            self.local_accountant.load_history(scalars.get("local_accountant_history", []))


def _require(ok: bool, name: str, expected: str, got: object) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, but got {got!r}")
