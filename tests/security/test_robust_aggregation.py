"""Robust aggregation rules against independent references, and against Byzantine workers on digits."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import stats

from benchmarks.privacy import byzantine_comparison
from coordinator.strategies import ClientUpdate, load_strategy
from coordinator.strategies.robust import CoordinateMedian, Krum, MultiKrum, NormBounding, NotEnoughUpdatesError, TrimmedMean, krum_scores
from fedmq.errors import ConfigError
from fedmq.tasks import PartitionSpec

SHAPES = {"w": (6, 5), "b": (6,)}


def _template() -> dict[str, torch.Tensor]:
    template = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    template["count"] = torch.tensor(0, dtype=torch.int64)
    template["flag"] = torch.tensor(False)
    return template


def _updates(count: int, seed: int = 0) -> list[ClientUpdate]:
    rng = np.random.default_rng(seed)
    updates = []
    for index in range(count):
        values: dict[str, np.ndarray] = {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()}
        values["count"] = np.array(index * 10, dtype=np.int64)
        values["flag"] = np.array(index % 3 == 0)
        updates.append(ClientUpdate(f"w{index}", int(rng.integers(1, 100)), 1, values))
    return updates


def _run(strategy: object, updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
    template = _template()
    strategy.begin_round(template)  # type: ignore[attr-defined]
    for update in updates:
        strategy.add_update(update)  # type: ignore[attr-defined]
    return strategy.finish_round(template)  # type: ignore[attr-defined,no-any-return]


def _stack(updates: list[ClientUpdate], name: str) -> np.ndarray:
    return np.stack([np.asarray(update.values[name], dtype=np.float64) for update in updates])


@pytest.mark.parametrize("count", [1, 4, 7])
def test_median_matches_numpy(count: int) -> None:
    updates = _updates(count)

    new_state = _run(CoordinateMedian(), updates)

    for name in SHAPES:
        np.testing.assert_allclose(new_state[name].numpy(), np.median(_stack(updates, name), axis=0), rtol=1e-6, atol=1e-7)
    assert int(new_state["count"]) == int(np.round(np.median([10 * index for index in range(count)])))
    assert bool(new_state["flag"]) == (np.median([index % 3 == 0 for index in range(count)]) > 0.5)


@pytest.mark.parametrize("count, fraction", [(5, 0.2), (10, 0.1), (10, 0.45), (3, 0.0)])
def test_trimmed_mean_matches_scipy(count: int, fraction: float) -> None:
    updates = _updates(count, seed=1)

    new_state = _run(TrimmedMean(trim_fraction=fraction), updates)

    for name in SHAPES:
        expected = stats.trim_mean(_stack(updates, name), fraction, axis=0)
        np.testing.assert_allclose(new_state[name].numpy(), expected, rtol=1e-5, atol=1e-7)


def test_krum_scores_match_pairwise_reference() -> None:
    rng = np.random.default_rng(2)
    matrix = rng.normal(size=(7, 40)).astype(np.float32)
    faulty = 2

    scores = krum_scores(matrix, faulty)

    for row in range(7):
        distances = sorted(float(np.sum((matrix[row].astype(np.float64) - matrix[other]) ** 2)) for other in range(7) if other != row)
        assert scores[row] == pytest.approx(sum(distances[: 7 - faulty - 2]), rel=1e-6)


def test_krum_picks_update_inside_honest_cluster() -> None:
    rng = np.random.default_rng(3)
    honest = [rng.normal(scale=0.01, size=8).astype(np.float32) + 1.0 for _ in range(6)]
    byzantine = [np.full(8, -50.0, dtype=np.float32), np.full(8, 80.0, dtype=np.float32)]
    updates = [ClientUpdate(f"h{index}", 10, 1, {"w": value}) for index, value in enumerate(honest)]
    updates += [ClientUpdate(f"b{index}", 10, 1, {"w": value}) for index, value in enumerate(byzantine)]
    template = {"w": torch.zeros(8)}

    krum = Krum(byzantine_workers=2)
    krum.begin_round(template)
    for update in updates:
        krum.add_update(update)
    chosen = krum.finish_round(template)["w"].numpy()
    multi = MultiKrum(byzantine_workers=2)
    multi.begin_round(template)
    for update in updates:
        multi.add_update(update)
    averaged = multi.finish_round(template)["w"].numpy()

    assert any(np.allclose(chosen, value, rtol=1e-6, atol=0) for value in honest)
    assert all(worker.startswith("h") for worker in multi.round_summary()["selected"])
    np.testing.assert_allclose(averaged, np.mean(honest, axis=0), rtol=1e-5)


def test_krum_needs_enough_updates() -> None:
    strategy = Krum(byzantine_workers=2)

    with pytest.raises(NotEnoughUpdatesError, match="at least 7 updates"):
        _run(strategy, _updates(6))


def test_norm_bounding_matches_reference() -> None:
    updates = _updates(5, seed=4)
    bound = 2.0

    new_state = _run(NormBounding(max_norm=bound), updates)

    flats = [np.concatenate([_stack([update], name).reshape(-1) for name in SHAPES]) for update in updates]
    scales = [min(1.0, bound / float(np.linalg.norm(flat))) for flat in flats]
    weights = np.array([update.num_samples for update in updates], dtype=np.float64)
    for name in SHAPES:
        scaled = np.stack([scale * _stack([update], name)[0] for scale, update in zip(scales, updates)])
        np.testing.assert_allclose(new_state[name].numpy(), np.average(scaled, axis=0, weights=weights), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "name, options",
    [
        ("trimmed-mean", {"trim_fraction": 0.5}),
        ("krum", {"byzantine_workers": -1}),
        ("multi-krum", {"selected": 0}),
        ("norm-bounding", {"max_norm": 0.0}),
        ("median", {"trim_fraction": 0.1}),
    ],
)
def test_invalid_options_raise_config_error(name: str, options: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        load_strategy(name, **options)


def test_strategies_are_registered() -> None:
    for name, cls in zip(("norm-bounding", "median", "trimmed-mean", "krum", "multi-krum"), (NormBounding, CoordinateMedian, TrimmedMean, Krum, MultiKrum)):
        assert isinstance(load_strategy(name, **({"max_norm": 1.0} if name == "norm-bounding" else {})), cls)


@pytest.mark.slow
def test_byzantine_workers_break_fedavg_only() -> None:
    # In-process digits run (see benchmarks.privacy): 2 of 10 IID workers send -100 times their update.
    results = {result.label: result.final_accuracy for result in byzantine_comparison(rounds=15, partition=PartitionSpec(scheme="iid", seed=0))}

    clean = results.pop("fedavg, no attack")
    attacked = results.pop("fedavg")
    assert clean > 0.9
    assert attacked < 0.3
    for label, accuracy in results.items():
        assert accuracy >= clean - 0.05, f"{label}: {accuracy:.4f} against {clean:.4f} without attackers"
    assert set(itertools.chain(results)) == {"norm-bounding", "median", "trimmed-mean", "krum", "multi-krum"}
