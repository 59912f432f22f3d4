"""The compiled codec loops against numpy and torch references, on odd sizes and every index dtype."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from schemas import codec_kernels as kernels
from schemas.codecs import BFLOAT16_MAX, float32_from_bf16

UNSIGNED = [np.uint16, np.uint32, np.uint64]
# Sizes around the 64-value tiles, the 8192-value spans and the 4096-value scan blocks.
ODD_SIZES = [0, 1, 2, 15, 17, 63, 64, 65, 127, 4095, 4097, 8191, 8193, 8192 + 64 * 3 + 5, 3 * 8192 + 1]


def _finite_float32_patterns(count: int, seed: int = 0) -> np.ndarray:
    bits = np.random.default_rng(seed).integers(0, 2**32, size=count, dtype=np.uint64).astype(np.uint32)
    values = bits.view(np.float32)
    specials = np.array(
        [0.0, -0.0, 1e-45, -1e-45, 2.9802322e-08, 2.9802326e-08, 5.9604645e-08, 6.097555e-05, 6.1035156e-05,
         65504.0, 65519.996, 65520.0, -65520.0, 1e30, 3.4028235e38, 0.5, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11],
        dtype=np.float32,
    )
    return np.concatenate([values[np.isfinite(values)], specials])


def _quantize_q8(values: np.ndarray, block_size: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    scales = np.empty(-(-values.size // block_size), dtype=np.float32)
    codes = np.empty(values.size, dtype=np.int8)
    largest = kernels.quantize_q8(values.view(np.uint32), block_size.bit_length() - 1, 127, np.uint32(seed), 0, scales, codes)
    assert largest < kernels.FLOAT32_EXPONENT_MASK
    return scales, codes


def _reference_scales(values: np.ndarray, block_size: int) -> np.ndarray:
    if values.size == 0:
        return np.zeros(0, dtype=np.float32)
    return np.maximum.reduceat(np.abs(values), np.arange(0, values.size, block_size))


def _unpack_reference(packed: np.ndarray, count: int) -> np.ndarray:
    """Unpack two 4-bit two's complement codes per byte, low nibble first, with plain integer arithmetic."""
    low = (packed & 0x0F).astype(np.int16)
    high = (packed >> 4).astype(np.int16)
    codes = np.empty(2 * packed.size, dtype=np.int16)
    codes[0::2] = np.where(low >= 8, low - 16, low)
    codes[1::2] = np.where(high >= 8, high - 16, high)
    return codes[:count]


# float16 and bfloat16


def test_float16_encode_matches_numpy_with_clipping() -> None:
    values = _finite_float32_patterns(1_000_000)
    out = np.empty(values.size, dtype=np.uint16)

    largest = kernels.float16_from_float32(values.view(np.uint32), out)

    expected = np.clip(values, -65504.0, 65504.0).astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(out, expected)
    assert largest < kernels.FLOAT32_EXPONENT_MASK


def test_float16_decode_matches_numpy_for_every_pattern() -> None:
    patterns = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    finite = patterns[(patterns & 0x7C00) != 0x7C00]
    out = np.empty(finite.size, dtype=np.float32)

    largest = kernels.float32_from_float16(finite, out)

    expected = finite.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(out.view(np.uint32), expected.view(np.uint32))
    assert largest < kernels.FLOAT16_EXPONENT_MASK


def test_bfloat16_encode_matches_torch_with_clipping() -> None:
    values = _finite_float32_patterns(1_000_000, seed=1)
    out = np.empty(values.size, dtype=np.uint16)

    kernels.bfloat16_from_float32(values.view(np.uint32), out)

    clipped = np.clip(values, -BFLOAT16_MAX, BFLOAT16_MAX)
    expected = torch.from_numpy(clipped).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(out, expected)


def test_bfloat16_decode_matches_numpy_for_every_pattern() -> None:
    patterns = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    out = np.empty(patterns.size, dtype=np.float32)

    kernels.float32_from_bfloat16(patterns, out)

    np.testing.assert_array_equal(out.view(np.uint32), float32_from_bf16(patterns).view(np.uint32))


@pytest.mark.parametrize("position", [0, 1000, 2**16 - 1])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_half_kernels_report_non_finite(bad: float, position: int) -> None:
    values = np.ones(2**16, dtype=np.float32)
    values[position] = bad
    half = np.empty(values.size, dtype=np.uint16)

    assert kernels.float16_from_float32(values.view(np.uint32), half) == kernels.FLOAT32_EXPONENT_MASK
    assert kernels.bfloat16_from_float32(values.view(np.uint32), half) == kernels.FLOAT32_EXPONENT_MASK

    decoded = np.empty(values.size, dtype=np.float32)
    assert kernels.float32_from_float16(values.astype(np.float16).view(np.uint16), decoded) == kernels.FLOAT16_EXPONENT_MASK
    bfloat_bits = (values.view(np.uint32) >> 16).astype(np.uint16)
    assert kernels.float32_from_bfloat16(bfloat_bits, decoded) == kernels.BFLOAT16_EXPONENT_MASK


@pytest.mark.parametrize("dtype", UNSIGNED)
def test_max_masked_every_width(dtype: type) -> None:
    info = np.iinfo(dtype)
    bits = np.array([0, 5, info.max, 12], dtype=dtype)

    assert kernels.max_masked(bits, dtype(0x0F)) == 15
    assert kernels.max_masked(bits[:0], dtype(0x0F)) == 0
    assert kernels.max_masked(bits[:2], dtype(0xF0)) == 0


# Stochastic rounding


@pytest.mark.parametrize("fraction", [0.003, 0.1, 0.25, 0.5, 0.9])
def test_stochastic_rounding_frequency_matches_fraction(fraction: float) -> None:
    # One value of 1.0 per block fixes the scale at 1.0, so |x| * 127 has the fraction given.
    block_size = 256
    count = 256 * 1024
    values = np.full(count, (63 + fraction) / 127, dtype=np.float32)
    values[::block_size] = 1.0
    scaled = values / np.float32(1.0) * np.float32(127)
    exact_fraction = float((scaled - np.floor(scaled))[1])
    # The variate has 24 bits, so the chance of rounding up is the fraction rounded up to 2**-24.
    probability = math.ceil(exact_fraction * 2**24) / 2**24

    _, codes = _quantize_q8(values, block_size)

    rounded = codes.reshape(-1, block_size)[:, 1:].astype(np.int64)
    assert set(np.unique(rounded).tolist()) <= {63, 64}
    frequency = float((rounded == 64).mean())
    # Fixed seeds make the outcome deterministic; six standard errors bound it.
    tolerance = 6 * math.sqrt(probability * (1 - probability) / rounded.size)
    assert abs(frequency - probability) <= tolerance


def test_stochastic_rounding_neighbours_uncorrelated() -> None:
    values = np.full(2**20, 0.5 / 127 + 10 / 127, dtype=np.float32)
    values[::256] = 1.0
    keep = np.ones(values.size, dtype=bool)
    keep[::256] = False

    _, codes = _quantize_q8(values, 256, seed=3)

    up = (codes[keep] == 11).astype(np.float64)
    centered = up - up.mean()
    correlation = float(np.dot(centered[:-1], centered[1:]) / np.dot(centered, centered))
    assert abs(correlation) <= 6 / math.sqrt(up.size)


def test_stochastic_rounding_differs_by_seed() -> None:
    values = np.linspace(-1.0, 1.0, 4096, dtype=np.float32)

    _, first = _quantize_q8(values, 256, seed=1)
    _, second = _quantize_q8(values, 256, seed=2)

    assert not np.array_equal(first, second)


# Quantization on odd sizes


@pytest.mark.parametrize("block_size", [16, 32, 64, 256])
@pytest.mark.parametrize("count", ODD_SIZES)
def test_quantize_q8_odd_sizes(count: int, block_size: int) -> None:
    values = np.random.default_rng(count).standard_normal(count).astype(np.float32)

    scales, codes = _quantize_q8(values, block_size)
    out = np.empty(count, dtype=np.float32)
    smallest = kernels.dequantize_q8(codes, scales, block_size.bit_length() - 1, 127, out)

    np.testing.assert_array_equal(scales, _reference_scales(values, block_size))
    assert codes.size == 0 or (np.abs(codes.astype(np.int16)) <= 127).all()
    assert smallest >= -127
    steps = np.repeat(scales / np.float32(127), block_size)[:count]
    np.testing.assert_array_equal(out, codes.astype(np.float32) * steps)
    assert (np.abs(out.astype(np.float64) - values) <= steps.astype(np.float64) * (1 + 1e-5) + 1e-30).all()


@pytest.mark.parametrize("block_size", [16, 32, 64, 256])
@pytest.mark.parametrize("count", ODD_SIZES)
def test_quantize_q4_odd_sizes(count: int, block_size: int) -> None:
    values = np.random.default_rng(count + 1).standard_normal(count).astype(np.float32)
    scales = np.empty(-(-count // block_size), dtype=np.float32)
    packed = np.full(-(-count // 2), 0xFF, dtype=np.uint8)
    shift = block_size.bit_length() - 1

    largest = kernels.quantize_q4(values.view(np.uint32), shift, np.uint32(5), 0, scales, packed)
    out = np.empty(count, dtype=np.float32)
    smallest = kernels.dequantize_q4(packed, scales, shift, out)

    assert largest < kernels.FLOAT32_EXPONENT_MASK
    np.testing.assert_array_equal(scales, _reference_scales(values, block_size))
    codes = _unpack_reference(packed, count)
    assert codes.size == 0 or (np.abs(codes) <= 7).all()
    assert smallest >= -7
    if count % 2:
        assert packed[-1] >> 4 == 0
    steps = np.repeat(scales / np.float32(7), block_size)[:count]
    np.testing.assert_array_equal(out, codes.astype(np.float32) * steps)
    assert (np.abs(out.astype(np.float64) - values) <= steps.astype(np.float64) * (1 + 1e-5) + 1e-30).all()


def test_quantize_zero_block_gives_zero_codes() -> None:
    values = np.zeros(300, dtype=np.float32)
    values[256:] = -0.0

    scales, codes = _quantize_q8(values, 256)

    assert scales.tolist() == [0.0, 0.0]
    assert not codes.any()


def test_quantize_reports_non_finite_in_any_block() -> None:
    for position in (0, 8191, 8192, 20_000):
        values = np.ones(20_001, dtype=np.float32)
        values[position] = np.nan
        scales = np.empty(-(-values.size // 256), dtype=np.float32)

        largest = kernels.quantize_q8(values.view(np.uint32), 8, 127, np.uint32(1), 0, scales, np.empty(values.size, np.int8))

        assert largest >= kernels.FLOAT32_EXPONENT_MASK, position


def test_dequantize_reports_invalid_codes() -> None:
    codes = np.zeros(1000, dtype=np.int8)
    codes[999] = -128
    scales = np.ones(4, dtype=np.float32)
    out = np.empty(1000, dtype=np.float32)
    assert kernels.dequantize_q8(codes, scales, 8, 127, out) == -128

    packed = np.zeros(500, dtype=np.uint8)
    packed[-1] = 0x80
    assert kernels.dequantize_q4(packed, scales, 8, out) == -8
    # With an odd count the last high nibble is padding and is not read.
    assert kernels.dequantize_q4(packed, scales, 8, out[:999]) == 0


# Top-k building blocks


def test_collect_candidates_reports_count_beyond_capacity() -> None:
    values = np.random.default_rng(2).standard_normal(3 * 4096 + 5).astype(np.float32)
    threshold = int(np.float32(1.5).view(np.uint32))
    expected = np.flatnonzero(np.abs(values) >= 1.5)
    indices = np.empty(expected.size - 3, dtype=np.int64)
    bits = np.empty(expected.size - 3, dtype=np.uint32)

    found, largest = kernels.collect_candidates(values.view(np.uint32), threshold, 100, indices, bits)

    assert found == expected.size
    np.testing.assert_array_equal(indices, expected[: indices.size] + 100)
    np.testing.assert_array_equal(bits, values[expected[: indices.size]].view(np.uint32))
    assert largest == int(np.abs(values).max().view(np.uint32))


def test_collect_candidates_ignores_stale_flags_of_short_block() -> None:
    values = np.zeros(4096 + 3, dtype=np.float32)
    values[4095] = 2.0
    values[4096 + 1] = 3.0
    indices = np.empty(10, dtype=np.int64)
    bits = np.empty(10, dtype=np.uint32)

    found, _ = kernels.collect_candidates(values.view(np.uint32), int(np.float32(1.0).view(np.uint32)), 0, indices, bits)

    assert found == 2
    assert indices[:2].tolist() == [4095, 4097]


@pytest.mark.parametrize("k", [1, 2, 50, 999, 1000])
def test_kth_largest_magnitude_matches_sort(k: int) -> None:
    rng = np.random.default_rng(k)
    # Few distinct magnitudes, so ties at the k-th value are common.
    values = (rng.integers(-20, 20, size=1000) * 0.125).astype(np.float32)
    bits = values.view(np.uint32)

    kth, ties = kernels.kth_largest_magnitude(bits, k)

    magnitudes = np.sort(np.abs(values))[::-1]
    assert np.float32(np.uint32(kth).view(np.float32)) == magnitudes[k - 1]
    assert ties == k - int((magnitudes > magnitudes[k - 1]).sum())


@pytest.mark.parametrize("dtype", UNSIGNED)
def test_emit_top_k_every_index_dtype(dtype: type) -> None:
    values = np.array([0.5, -3.0, 2.0, -2.0, 2.0, 1.0], dtype=np.float32)
    candidate_indices = np.array([10, 20, 30, 40, 50, 60], dtype=np.int64)
    out_indices = np.empty(3, dtype=dtype)
    out_values = np.empty(3, dtype=np.float32)

    written = kernels.emit_top_k(
        candidate_indices, values.view(np.uint32), int(np.float32(2.0).view(np.uint32)), 2, out_indices, out_values
    )

    assert written == 3
    assert out_indices.tolist() == [20, 30, 40]
    assert out_values.tolist() == [-3.0, 2.0, -2.0]


@pytest.mark.parametrize("dtype", UNSIGNED)
def test_expand_sparse_every_index_dtype(dtype: type) -> None:
    out = np.full(10, 7.0, dtype=np.float32)
    indices = np.array([100, 103, 109], dtype=dtype)

    kernels.expand_sparse(indices, np.array([1.0, 2.0, 3.0], dtype=np.float32), 100, out)

    assert out.tolist() == [1.0, 0, 0, 2.0, 0, 0, 0, 0, 0, 3.0]


def test_kernels_reject_unexpected_types() -> None:
    with pytest.raises(TypeError):
        kernels.max_masked(np.zeros(4, dtype=np.int32), np.int32(1))
    with pytest.raises(TypeError):
        kernels.float16_from_float32(np.zeros(8, dtype=np.uint32)[::2], np.zeros(4, dtype=np.uint16))


# Compilation without a writable cache


def test_kernels_compile_without_writable_cache(tmp_path: Path) -> None:
    # A regular file where numba wants its cache folders makes every cache locator fail,
    # which is what a read-only install without a writable home looks like to numba.
    package = tmp_path / "package"
    (package / "schemas").mkdir(parents=True)
    shutil.copy(Path(kernels.__file__), package / "schemas" / "codec_kernels.py")
    (package / "schemas" / "__init__.py").write_text("")
    (package / "schemas" / "__pycache__").write_text("not a folder")
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    script = (
        "import numpy as np\n"
        "from schemas import codec_kernels as k\n"
        "out = np.empty(3, np.uint16)\n"
        "k.float16_from_float32(np.array([1.0, 2.0, 3.0], np.float32).view(np.uint32), out)\n"
        "assert out.view(np.float16).tolist() == [1.0, 2.0, 3.0]\n"
        "print(k.__file__)\n"
    )
    environment = {
        **os.environ,
        "PYTHONPATH": str(package),
        "NUMBA_CACHE_DIR": str(blocker / "numba"),
        "XDG_CACHE_HOME": str(blocker / "xdg"),
        "HOME": str(blocker / "home"),
    }

    completed = subprocess.run(
        [sys.executable, "-W", "error", "-c", script],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stderr == ""
    assert completed.stdout.strip() == str(package / "schemas" / "codec_kernels.py")
    assert not (package / "schemas" / "__pycache__").is_dir()
