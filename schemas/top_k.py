"""Exact top-k selection by magnitude that neither sorts nor partitions the whole tensor.

The selection takes four steps:

1. Estimate a threshold: the magnitude of rank ``r`` in a sample of runs of
   consecutive values spread evenly over the tensor. ``r`` is the expected rank of the
   k-th largest value in the sample plus four standard deviations and four.
2. Collect candidates: one pass, split over the codec threads, stores the index and
   value of every magnitude at or above the threshold, in index order, and finds the
   largest magnitude, which is the finiteness check. A chunk that finds more
   candidates than its buffer has room for is scanned again with a buffer of the
   exact size.
3. Find the k-th largest candidate magnitude by radix selection over the candidates.
4. Emit, in index order, the candidates above it and as many equal to it as k needs.

When fewer than k values reach the threshold, or more than both four times the
buffers and a quarter of the tensor, the selection falls back to the full method:
``numpy.argpartition`` over all magnitudes. Either way exactly k indices come out,
strictly increasing, with ties at the k-th magnitude broken arbitrarily.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from fedmq.errors import CodecError
from schemas import codec_kernels
from schemas.codec_threads import chunk_bounds, run_chunks

# Tensors smaller than this go straight to the full method, which costs little there.
MIN_SAMPLED_VALUES = 1 << 12
# So do selections of more than 1/8 of the values, whose candidates would take about
# as much memory as the full method.
MAX_SAMPLED_DIVISOR = 8
# The sample: 256 runs of 64 consecutive values (one 256-byte read each), 16,384 values.
SAMPLE_RUNS = 256
SAMPLE_RUN_LENGTH = 64
# Standard deviations of margin between the expected sample rank and the threshold's rank.
SAMPLE_MARGIN = 4.0


def top_k(
    flat: np.ndarray, k: int, index_dtype: np.dtype, *, threshold: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return the ascending indices of the ``k`` float32 values of largest magnitude, and those values.

    ``threshold`` replaces the sampled threshold (float32 magnitude bits); tests use it
    to force each path. Raises CodecError (field ``values``) when a value is infinite
    or NaN.
    """
    count = flat.size
    bits = flat.view(np.uint32)
    if threshold is None:
        if k >= count or count < MIN_SAMPLED_VALUES or k > count // MAX_SAMPLED_DIVISOR:
            return _top_k_full(flat, k, index_dtype)
        threshold, expected = _sample_threshold(bits, k)
    else:
        expected = k

    if 0 < k <= count and threshold > 0:
        selected = _top_k_above(bits, k, threshold, expected, index_dtype)
        if selected is not None:
            return selected
    return _top_k_full(flat, k, index_dtype)


def _top_k_full(flat: np.ndarray, k: int, index_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    if not np.isfinite(flat).all():
        _raise_non_finite(flat)
    count = flat.size
    if k >= count:
        return np.arange(count, dtype=index_dtype), flat.copy()
    if k == 0:
        return np.zeros(0, dtype=index_dtype), np.zeros(0, dtype=np.float32)
    kept = np.argpartition(np.abs(flat), count - k)[count - k :]
    kept.sort()
    return kept.astype(index_dtype), flat[kept]


def _sample_threshold(bits: np.ndarray, k: int) -> tuple[int, int]:
    """Return a magnitude threshold that about ``k`` values reach, and how many are expected to."""
    count = bits.size
    runs = max(1, min(SAMPLE_RUNS, count // (4 * SAMPLE_RUN_LENGTH)))
    sample = codec_kernels.sample_magnitudes(bits, runs, SAMPLE_RUN_LENGTH)
    expected_in_sample = sample.size * k / count
    rank = math.ceil(expected_in_sample + SAMPLE_MARGIN * math.sqrt(expected_in_sample) + SAMPLE_MARGIN)
    rank = min(sample.size, rank)
    threshold, _ = codec_kernels.kth_largest_magnitude(sample, rank)
    return int(threshold), math.ceil(count * rank / sample.size)


def _top_k_above(
    bits: np.ndarray, k: int, threshold: int, expected: int, index_dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray] | None:
    """Select the top k among the values whose magnitude bits reach ``threshold``.

    Returns None when fewer than k values reach it, or so many that the full method
    costs less memory.
    """
    count = bits.size
    capacity = 2 * expected + 1024
    bounds = chunk_bounds(count)
    capacities = [min(stop - start, math.ceil(capacity * (stop - start) / count) + 64) for start, stop in bounds]
    indices = [np.empty(size, dtype=np.int64) for size in capacities]
    values = [np.empty(size, dtype=np.uint32) for size in capacities]

    # Candidates, with a second scan of any chunk that found more than its buffer holds.
    def collect(chunk: int) -> tuple[int, int]:
        start, stop = bounds[chunk]
        found, largest = codec_kernels.collect_candidates(bits[start:stop], threshold, start, indices[chunk], values[chunk])
        return int(found), int(largest)

    results = run_chunks([functools.partial(collect, chunk) for chunk in range(len(bounds))])
    if max(largest for _, largest in results) >= codec_kernels.FLOAT32_EXPONENT_MASK:
        _raise_non_finite(bits.view(np.float32))
    found = [number for number, _ in results]
    total = sum(found)
    if total < k or total > max(4 * capacity, count // 4):
        return None
    for chunk, number in enumerate(found):
        if number > capacities[chunk]:
            indices[chunk] = np.empty(number, dtype=np.int64)
            values[chunk] = np.empty(number, dtype=np.uint32)
            collect(chunk)
    candidate_indices = np.concatenate([part[:number] for part, number in zip(indices, found)])
    candidate_bits = np.concatenate([part[:number] for part, number in zip(values, found)])

    # Exact selection among the candidates.
    kth, ties = codec_kernels.kth_largest_magnitude(candidate_bits, k)
    out_indices = np.empty(k, dtype=index_dtype)
    out_values = np.empty(k, dtype=np.float32)
    written = codec_kernels.emit_top_k(candidate_indices, candidate_bits, kth, ties, out_indices, out_values)
    if written != k:
        raise AssertionError(f"top-k selection wrote {written} of {k} values")
    return out_indices, out_values


def _raise_non_finite(flat: np.ndarray) -> None:
    bad = np.count_nonzero(~np.isfinite(flat))
    raise CodecError("values", "finite values within the float32 range", f"{bad} non-finite values")
