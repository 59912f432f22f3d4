"""Top-k selection by sampled threshold against a full sort, on every path it can take."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedmq.errors import CodecError
from schemas import top_k as top_k_module
from schemas.codecs import index_dtype, topk_count
from schemas.top_k import top_k


def _check_exact(values: np.ndarray, k: int, indices: np.ndarray, kept: np.ndarray) -> None:
    assert indices.size == k
    assert kept.dtype == np.float32
    assert (np.diff(indices.astype(np.int64)) > 0).all()
    np.testing.assert_array_equal(kept, values[indices])
    expected = np.sort(np.abs(values))[::-1][:k]
    np.testing.assert_array_equal(np.sort(np.abs(kept))[::-1], expected)


def _distributions(count: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(count)
    ties = (rng.integers(-3, 4, size=count) * 0.5).astype(np.float32)
    sparse = np.zeros(count, dtype=np.float32)
    sparse[rng.choice(count, size=max(1, count // 500), replace=False)] = rng.standard_normal(max(1, count // 500))
    return {
        "normal": rng.standard_normal(count).astype(np.float32),
        "heavy_tailed": rng.standard_cauchy(count).astype(np.float32),
        "ties": ties,
        "sparse": sparse,
        "zeros": np.zeros(count, dtype=np.float32),
        # A periodic spike every 1,024 values, the pattern of a weight matrix with one hot column.
        "periodic": np.where(np.arange(count) % 1024 == 0, 10.0, 0.001).astype(np.float32),
    }


@pytest.mark.parametrize("count", [4096, 4097, 65536, 65537, 300_001])
@pytest.mark.parametrize("fraction", [1e-6, 0.01, 0.1, 0.12])
@pytest.mark.parametrize("distribution", ["normal", "heavy_tailed", "ties", "sparse", "zeros", "periodic"])
def test_top_k_exact_on_every_distribution(count: int, fraction: float, distribution: str) -> None:
    values = _distributions(count)[distribution]
    k = topk_count(count, fraction)

    indices, kept = top_k(values, k, index_dtype(count))

    assert indices.dtype == index_dtype(count)
    _check_exact(values, k, indices, kept)


@pytest.fixture
def full_method_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the k of every call of the full method."""
    calls: list[int] = []
    original = top_k_module._top_k_full

    def recording(flat: np.ndarray, k: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        calls.append(k)
        return original(flat, k, dtype)

    monkeypatch.setattr(top_k_module, "_top_k_full", recording)
    return calls


def _magnitude_bits(values: np.ndarray, rank: int) -> int:
    """Return the float32 bits of the magnitude of the given rank, 1 for the largest."""
    return int(np.sort(np.abs(values))[::-1][rank - 1].view(np.uint32))


def test_sampled_path_avoids_full_method(full_method_calls: list[int]) -> None:
    values = np.random.default_rng(1).standard_normal(200_000).astype(np.float32)

    indices, kept = top_k(values, 2000, np.dtype(np.uint32))

    _check_exact(values, 2000, indices, kept)
    assert full_method_calls == []


def test_threshold_above_kth_falls_back(full_method_calls: list[int]) -> None:
    values = np.random.default_rng(2).standard_normal(100_000).astype(np.float32)

    indices, kept = top_k(values, 1000, np.dtype(np.uint32), threshold=_magnitude_bits(values, 500))

    _check_exact(values, 1000, indices, kept)
    assert full_method_calls == [1000]


def test_threshold_far_below_kth_falls_back(full_method_calls: list[int]) -> None:
    values = np.random.default_rng(3).standard_normal(100_000).astype(np.float32)

    indices, kept = top_k(values, 1000, np.dtype(np.uint32), threshold=_magnitude_bits(values, 90_000))

    _check_exact(values, 1000, indices, kept)
    assert full_method_calls == [1000]


def test_threshold_below_capacity_rescans(full_method_calls: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    values = np.random.default_rng(4).standard_normal(100_000).astype(np.float32)
    scans: list[int] = []
    original = top_k_module.codec_kernels.collect_candidates

    def counting(*arguments: object) -> object:
        scans.append(1)
        return original(*arguments)

    monkeypatch.setattr(top_k_module.codec_kernels, "collect_candidates", counting)

    # 1000 expected values give room for 3,024 candidates; the threshold admits 5,000.
    indices, kept = top_k(values, 1000, np.dtype(np.uint32), threshold=_magnitude_bits(values, 5000))

    _check_exact(values, 1000, indices, kept)
    assert full_method_calls == []
    assert len(scans) == 2


def test_threshold_equal_to_kth_keeps_exact_k(full_method_calls: list[int]) -> None:
    values = np.array([1.0, -1.0, 1.0, 0.5, -1.0, 1.0] * 1000, dtype=np.float32)

    indices, kept = top_k(values, 3001, np.dtype(np.uint16), threshold=_magnitude_bits(values, 3001))

    assert indices.size == 3001
    assert np.abs(kept).tolist().count(1.0) == 3001
    assert (np.diff(indices.astype(np.int64)) > 0).all()
    assert full_method_calls == []


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.uint64])
def test_top_k_every_index_dtype(dtype: type) -> None:
    values = np.random.default_rng(5).standard_normal(60_000).astype(np.float32)

    indices, kept = top_k(values, 600, np.dtype(dtype))

    assert indices.dtype == dtype
    _check_exact(values, 600, indices, kept)


@pytest.mark.parametrize("count", [0, 1, 5])
def test_top_k_small_and_empty(count: int) -> None:
    values = np.arange(count, dtype=np.float32) - 2

    indices, kept = top_k(values, min(count, 2), np.dtype(np.uint16))

    _check_exact(values, min(count, 2), indices, kept)


@pytest.mark.parametrize("position", [0, 77_777, 199_999])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_top_k_rejects_non_finite_on_sampled_path(bad: float, position: int) -> None:
    values = np.random.default_rng(6).standard_normal(200_000).astype(np.float32)
    values[position] = bad

    with pytest.raises(CodecError) as caught:
        top_k(values, 2000, np.dtype(np.uint32))

    assert caught.value.field == "values"


def test_sample_threshold_keeps_enough_values() -> None:
    values = np.random.default_rng(7).standard_normal(1_000_000).astype(np.float32)
    k = 10_000

    threshold, expected = top_k_module._sample_threshold(values.view(np.uint32), k)

    reaching = int((np.abs(values).view(np.uint32) >= threshold).sum())
    assert k <= reaching <= 2 * k
    assert math.isclose(expected, reaching, rel_tol=0.25)
