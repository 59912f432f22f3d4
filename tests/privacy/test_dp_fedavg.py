"""DP-FedAvg's clipping, noise and accounting against independent references.

The references are written out with numpy (clipping, averaging, the adaptive rule)
or taken from Opacus's RDP analysis functions directly (epsilon), never from the
code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.accountants.analysis import rdp as opacus_rdp

from coordinator.aggregation import ZeroWeightError
from coordinator.privacy import (
    CONFIG_CLIP_NORM,
    CONFIG_COUNT_NOISE_STD,
    CONFIG_NOISE_STD,
    METRIC_NOISE_STD,
    PrivacyAccountant,
    adapt_clip_norm,
    clip_update,
    l2_norm,
    noisy_update_bound,
    split_noise_multiplier,
)
from coordinator.strategies import ClientUpdate, load_strategy
from coordinator.strategies.dpfedavg import DPFedAvg
from coordinator.validation import RejectedUpdate
from fedmq.errors import ConfigError

SHAPES = {"fc.weight": (30, 20), "fc.bias": (30,), "out.weight": (4, 30)}
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def _template() -> dict[str, torch.Tensor]:
    template = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    template["steps"] = torch.tensor(7, dtype=torch.int64)
    return template


def _update(rng: np.random.Generator, worker_id: str, scale: float, num_samples: int = 10) -> ClientUpdate:
    values: dict[str, np.ndarray] = {name: (rng.normal(size=shape) * scale).astype(np.float32) for name, shape in SHAPES.items()}
    values["steps"] = np.array(99, dtype=np.int64)
    return ClientUpdate(worker_id, num_samples, 5, values)


def _flat(values: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(values[name], dtype=np.float64).reshape(-1) for name in SHAPES])


def _reference_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    rdp = opacus_rdp.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=steps, orders=ORDERS)
    epsilon, _ = opacus_rdp.get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
    return float(epsilon)


# Clipping


@pytest.mark.parametrize("scale, clip_norm", [(1.0, 0.5), (0.001, 0.5), (3.0, 10.0)])
def test_clip_update_matches_numpy_reference(scale: float, clip_norm: float) -> None:
    rng = np.random.default_rng(0)
    values = _update(rng, "w", scale).values

    clipped = clip_update(values, SHAPES, clip_norm)

    flat = _flat(values)
    norm = float(np.linalg.norm(flat))
    expected = flat * min(1.0, clip_norm / norm)
    assert clipped.norm == pytest.approx(norm, rel=1e-9)
    np.testing.assert_allclose(_flat(clipped.values), expected, rtol=1e-6, atol=1e-9)
    assert float(np.linalg.norm(_flat(clipped.values))) <= clip_norm * (1 + 1e-6)
    assert clipped.clipped == (norm > clip_norm)
    assert "steps" not in clipped.values


def test_clip_update_spans_all_tensors_together() -> None:
    # Each tensor alone is under the bound, all of them together are not.
    values = {"a": np.full(4, 0.4, dtype=np.float32), "b": np.full(4, 0.4, dtype=np.float32)}

    clipped = clip_update(values, ["a", "b"], 1.0)

    assert clipped.norm == pytest.approx(math.sqrt(8 * 0.16))
    assert l2_norm(clipped.values, ["a", "b"]) == pytest.approx(1.0, rel=1e-6)


def test_dp_mean_uniform_over_clipped() -> None:
    rng = np.random.default_rng(1)
    updates = [_update(rng, f"w{index}", scale, num_samples) for index, (scale, num_samples) in enumerate([(0.01, 1), (1.0, 500), (5.0, 20)])]
    # A negligible noise multiplier leaves the clipping and averaging to check.
    strategy = DPFedAvg(noise_multiplier=1e-9, clip_norm=0.5, seed=0)
    template = _template()
    strategy.begin_round(template)
    for update in updates:
        strategy.add_update(update)
    new_state = strategy.finish_round(template)

    clipped = [_flat(update.values) * min(1.0, 0.5 / np.linalg.norm(_flat(update.values))) for update in updates]
    expected = np.mean(clipped, axis=0)
    got = np.concatenate([new_state[name].numpy().reshape(-1) for name in SHAPES]).astype(np.float64)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert strategy.round_summary()["clipped"] == 2


def test_dp_round_keeps_integer_tensors() -> None:
    rng = np.random.default_rng(2)
    strategy = DPFedAvg(noise_multiplier=1.0, clip_norm=1.0, seed=0)
    template = _template()
    strategy.begin_round(template)
    strategy.add_update(_update(rng, "w", 1.0))

    new_state = strategy.finish_round(template)

    assert int(new_state["steps"]) == 7


def test_dp_round_without_updates_raises() -> None:
    strategy = DPFedAvg(noise_multiplier=1.0, clip_norm=1.0)
    strategy.begin_round(_template())

    with pytest.raises(ZeroWeightError):
        strategy.finish_round(_template())


# Noise


@pytest.mark.parametrize("noise_multiplier, clip_norm, count", [(1.0, 0.5, 4), (2.5, 1.0, 10)])
def test_server_noise_std_matches_formula(noise_multiplier: float, clip_norm: float, count: int) -> None:
    size = 200_000
    template = {"w": torch.zeros(size)}
    strategy = DPFedAvg(noise_multiplier=noise_multiplier, clip_norm=clip_norm, seed=3)
    strategy.begin_round(template)
    for index in range(count):
        strategy.add_update(ClientUpdate(f"w{index}", 1, 1, {"w": np.zeros(size, dtype=np.float32)}))

    noise = strategy.finish_round(template)["w"].numpy().astype(np.float64)

    expected_std = noise_multiplier * clip_norm / count
    # The sample std of 200,000 normal values is within 1% of the true one with
    # probability far above 1 - 1e-6 (its relative error has std 1/sqrt(2n) = 0.16%).
    assert float(noise.std()) == pytest.approx(expected_std, rel=0.01)
    assert abs(float(noise.mean())) < 6 * expected_std / math.sqrt(size)
    assert strategy.round_summary()["mean_noise_std"] == pytest.approx(expected_std)


def test_worker_placement_adds_missing_shares() -> None:
    size = 200_000
    noise_multiplier, clip_norm, expected_updates = 1.5, 0.8, 10
    template = {"w": torch.zeros(size)}
    strategy = DPFedAvg(noise_multiplier=noise_multiplier, clip_norm=clip_norm, placement="worker", expected_updates=expected_updates, seed=4)
    config = strategy.round_config(1)
    share_std = config[CONFIG_NOISE_STD]
    assert config[CONFIG_CLIP_NORM] == clip_norm
    assert share_std == pytest.approx(noise_multiplier * clip_norm / math.sqrt(expected_updates))

    # Four of ten workers reply, each with its noise share on a zero update.
    rng = np.random.default_rng(5)
    strategy.begin_round(template)
    for index in range(4):
        share = (rng.standard_normal(size) * share_std).astype(np.float32)
        strategy.add_update(ClientUpdate(f"w{index}", 1, 1, {"w": share}, metrics={METRIC_NOISE_STD: share_std}))
    noise = strategy.finish_round(template)["w"].numpy().astype(np.float64)

    # Four shares plus six added by the coordinator: the full z * C on the sum.
    assert float(noise.std()) == pytest.approx(noise_multiplier * clip_norm / 4, rel=0.01)


def test_worker_placement_rejects_update_without_noise() -> None:
    strategy = DPFedAvg(noise_multiplier=1.0, clip_norm=1.0, placement="worker", expected_updates=5)
    strategy.begin_round({"w": torch.zeros(3)})
    required = strategy.round_config(1)[CONFIG_NOISE_STD]

    for metrics in ({}, {METRIC_NOISE_STD: required / 2}):
        with pytest.raises(RejectedUpdate) as raised:
            strategy.check_update(ClientUpdate("w", 1, 1, {"w": np.zeros(3, dtype=np.float32)}, metrics=metrics))
        assert raised.value.reason == "privacy_mismatch"
    strategy.check_update(ClientUpdate("w", 1, 1, {"w": np.zeros(3, dtype=np.float32)}, metrics={METRIC_NOISE_STD: required}))


def test_worker_placement_clips_at_noisy_bound() -> None:
    size = 1000
    # One expected update, so the coordinator adds no noise and the mean is the clipped update.
    strategy = DPFedAvg(noise_multiplier=1.0, clip_norm=1.0, placement="worker", expected_updates=1, seed=0)
    share_std = strategy.round_config(1)[CONFIG_NOISE_STD]
    template = {"w": torch.zeros(size)}
    strategy.begin_round(template)
    # A worker that sends a huge update and claims a huge noise std is still clipped at the required one's bound.
    strategy.add_update(ClientUpdate("evil", 1, 1, {"w": np.full(size, 1e3, dtype=np.float32)}, metrics={METRIC_NOISE_STD: 1e6}))

    mean = strategy.finish_round(template)["w"].numpy()

    assert float(np.linalg.norm(mean.astype(np.float64))) == pytest.approx(noisy_update_bound(1.0, share_std, size), rel=1e-5)


# Adaptive clipping


def test_split_noise_multiplier_preserves_total() -> None:
    z = 1.1
    count_noise_std = 2.0
    sum_multiplier = split_noise_multiplier(z, count_noise_std)

    assert sum_multiplier**-2 + (2 * count_noise_std) ** -2 == pytest.approx(z**-2)
    with pytest.raises(ValueError):
        split_noise_multiplier(2.0, 0.9)


def test_adaptive_clip_norm_moves_toward_quantile() -> None:
    assert adapt_clip_norm(1.0, 1.0, target_quantile=0.5, learning_rate=0.2) == pytest.approx(math.exp(-0.1))
    assert adapt_clip_norm(1.0, 0.0, target_quantile=0.5, learning_rate=0.2) == pytest.approx(math.exp(0.1))
    assert adapt_clip_norm(2.0, 0.5, target_quantile=0.5, learning_rate=0.2) == pytest.approx(2.0)


def test_adaptive_round_shrinks_bound_when_all_unclipped() -> None:
    rng = np.random.default_rng(6)
    # Small multipliers keep the count noise (std 0.01 on a sum of 2) negligible.
    strategy = DPFedAvg(noise_multiplier=0.01, clip_norm=100.0, expected_updates=4, adaptive_clipping=True, count_noise_std=0.01, seed=1)
    template = _template()
    strategy.begin_round(template)
    for index in range(4):
        strategy.add_update(_update(rng, f"w{index}", 0.01))
    strategy.finish_round(template)

    fraction = strategy.round_summary()["noisy_unclipped_fraction"]
    assert fraction == pytest.approx(1.0, abs=0.05)
    assert strategy.clip_norm == pytest.approx(100.0 * math.exp(-0.2 * (fraction - 0.5)))
    assert strategy.clip_norm < 100.0
    assert strategy.sum_noise_multiplier == pytest.approx(split_noise_multiplier(0.01, 0.01))


# Accounting


@pytest.mark.parametrize("noise_multiplier, sample_rate, steps", [(1.0, 1.0, 1), (1.1, 0.01, 1000), (0.7, 0.2, 50)])
def test_accountant_matches_opacus_analysis(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    accountant = PrivacyAccountant(delta=1e-5)
    accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)

    assert accountant.epsilon() == pytest.approx(_reference_epsilon(noise_multiplier, sample_rate, steps, 1e-5), rel=1e-9)
    assert accountant.history == [(noise_multiplier, sample_rate, steps)]


def test_accountant_projection_equals_next_step() -> None:
    accountant = PrivacyAccountant(delta=1e-6)
    accountant.step(noise_multiplier=0.9, sample_rate=0.1, steps=10)
    projected = accountant.epsilon_after(noise_multiplier=0.9, sample_rate=0.1)

    accountant.step(noise_multiplier=0.9, sample_rate=0.1)

    assert projected == pytest.approx(accountant.epsilon(), rel=1e-12)
    assert projected == pytest.approx(_reference_epsilon(0.9, 0.1, 11, 1e-6), rel=1e-9)
    assert PrivacyAccountant(delta=1e-6).epsilon() == 0.0


def test_strategy_epsilon_matches_opacus_per_round() -> None:
    rng = np.random.default_rng(7)
    strategy = DPFedAvg(noise_multiplier=1.3, clip_norm=1.0, expected_updates=3, population=30, delta=1e-5, seed=0)
    template = _template()
    for round_number in range(1, 6):
        assert strategy.projected_epsilon() == pytest.approx(_reference_epsilon(1.3, 0.1, round_number, 1e-5), rel=1e-9)
        strategy.begin_round(template)
        for index in range(3):
            strategy.add_update(_update(rng, f"w{index}", 1.0))
        strategy.finish_round(template)
        record = strategy.privacy_record()
        assert record["epsilon"] == pytest.approx(_reference_epsilon(1.3, 0.1, round_number, 1e-5), rel=1e-9)
        assert record["rounds"] == round_number
        assert record["sample_rate"] == pytest.approx(0.1)


def test_accounting_survives_checkpoint() -> None:
    rng = np.random.default_rng(8)
    first = DPFedAvg(noise_multiplier=1.0, clip_norm=2.0, placement="worker", expected_updates=2, adaptive_clipping=True, count_noise_std=5.0, seed=0)
    template = _template()
    for _ in range(3):
        first.begin_round(template)
        for index in range(2):
            update = _update(rng, f"w{index}", 0.1)
            update.metrics = {METRIC_NOISE_STD: first.round_config(1)[CONFIG_NOISE_STD], "dp_unclipped_share": 0.5}
            first.add_update(update)
        first.finish_round(template)

    second = DPFedAvg(noise_multiplier=1.0, clip_norm=2.0, placement="worker", expected_updates=2, adaptive_clipping=True, count_noise_std=5.0)
    second.load_state({}, first.state_scalars())

    assert second.privacy_record()["epsilon"] == pytest.approx(first.privacy_record()["epsilon"])
    assert second.privacy_record()["local_epsilon"] == pytest.approx(first.privacy_record()["local_epsilon"])
    assert second.clip_norm == pytest.approx(first.clip_norm)
    assert second.round_config(4)[CONFIG_COUNT_NOISE_STD] == pytest.approx(first.round_config(4)[CONFIG_COUNT_NOISE_STD])


@pytest.mark.parametrize(
    "options",
    [
        {"noise_multiplier": 0.0, "clip_norm": 1.0},
        {"noise_multiplier": 1.0, "clip_norm": -1.0},
        {"noise_multiplier": 1.0, "clip_norm": 1.0, "placement": "worker"},
        {"noise_multiplier": 1.0, "clip_norm": 1.0, "population": 10},
        {"noise_multiplier": 1.0, "clip_norm": 1.0, "expected_updates": 20, "population": 10},
        {"noise_multiplier": 1.0, "clip_norm": 1.0, "delta": 1.0},
        {"noise_multiplier": 3.0, "clip_norm": 1.0, "expected_updates": 10, "adaptive_clipping": True},
    ],
)
def test_invalid_options_raise_config_error(options: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        load_strategy("dp-fedavg", **options)
