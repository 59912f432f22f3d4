"""Tests of the update codecs against independent references (torch, numpy casts, loops)."""

from __future__ import annotations

import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmq.errors import CheckpointError, CodecError, ConfigError
from schemas.codecs import (
    BFLOAT16_MAX,
    CODEC_NAMES,
    CodecSpec,
    EncodedTensor,
    ErrorFeedback,
    bf16_from_float32,
    decode,
    encode,
    float32_from_bf16,
    index_dtype,
    part_layout,
    topk_count,
)

SHAPES = [(), (0,), (1,), (1000,), (3, 5, 7, 11), (2, 0, 3), (17,)]
LEVELS = {"q8": 127, "q4": 7, "topk_q8": 127}


def _values(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Magnitudes that differ by orders of magnitude between entries exercise per-block scales.
    return np.asarray(rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 3, size=shape), dtype=np.float32)


def _round_trip(values: np.ndarray, spec: CodecSpec, seed: int = 1) -> tuple[EncodedTensor, np.ndarray]:
    encoded = encode(values, spec, rng=np.random.default_rng(seed))
    return encoded, decode(encoded.codec, encoded.params, encoded.shape, encoded.arrays)


def _block_bound_violations(original: np.ndarray, decoded: np.ndarray, block_size: int, levels: int) -> list[int]:
    """Return the blocks whose maximum error exceeds max|x| / levels, checked one block at a time."""
    violations = []
    for block, start in enumerate(range(0, original.size, block_size)):
        chunk = original[start : start + block_size].astype(np.float64)
        error = np.abs(decoded[start : start + block_size].astype(np.float64) - chunk).max()
        bound = np.abs(chunk).max() / levels
        if error > bound * (1 + 1e-5) + 1e-30:
            violations.append(block)
    return violations


def _topk_reference(flat: np.ndarray, k: int) -> np.ndarray:
    """Return the k largest magnitudes, sorted in descending order, by a full sort."""
    return np.sort(np.abs(flat).astype(np.float64))[::-1][:k]


# Round trips


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_round_trip_every_codec_and_shape(codec: str, shape: tuple[int, ...]) -> None:
    values = _values(shape)
    spec = CodecSpec(codec, block_size=16, topk_fraction=0.1)

    encoded, decoded = _round_trip(values, spec)

    assert decoded.shape == shape
    assert decoded.dtype == np.float32
    assert encoded.shape == shape
    assert encoded.dtype == "float32"
    for part in encoded.arrays.values():
        assert part.ndim == 1
        assert part.flags.c_contiguous

    flat, result = values.reshape(-1), decoded.reshape(-1)
    if codec == "float32":
        np.testing.assert_array_equal(result, flat)
    elif codec == "float16":
        np.testing.assert_array_equal(result, flat.astype(np.float16).astype(np.float32))
    elif codec == "bfloat16":
        expected = torch.from_numpy(flat.copy()).to(torch.bfloat16).to(torch.float32).numpy()
        np.testing.assert_array_equal(result, expected)
    elif codec in ("q8", "q4"):
        assert _block_bound_violations(flat, result, 16, LEVELS[codec]) == []
    else:
        k = topk_count(flat.size, 0.1)
        indices = encoded.arrays["indices"]
        assert indices.size == k
        np.testing.assert_array_equal(np.sort(np.abs(flat[indices]))[::-1], _topk_reference(flat, k))
        dropped = np.ones(flat.size, dtype=bool)
        dropped[indices] = False
        assert not result[dropped].any()
        if codec == "topk":
            np.testing.assert_array_equal(result[indices], flat[indices])
        else:
            assert _block_bound_violations(flat[indices], result[indices], 16, 127) == []


def test_encode_float64_records_dtype() -> None:
    values = np.linspace(-1.0, 1.0, 300)

    encoded, decoded = _round_trip(values, CodecSpec("q8"))

    assert encoded.dtype == "float64"
    assert decoded.dtype == np.float32
    assert np.abs(decoded - values).max() <= 1.0 / 127 * (1 + 1e-5)


def test_encode_records_declared_dtype() -> None:
    encoded = encode(np.ones(4, dtype=np.float32), CodecSpec("bfloat16"), rng=np.random.default_rng(0), dtype="bfloat16")

    assert encoded.dtype == "bfloat16"


# Quantization error and bias


@pytest.mark.parametrize("codec", ["q8", "q4"])
@pytest.mark.parametrize("block_size", [16, 256, 4096])
def test_quantization_error_within_bound(codec: str, block_size: int) -> None:
    values = _values((10_000 + 3,), seed=block_size)

    _, decoded = _round_trip(values, CodecSpec(codec, block_size=block_size))

    assert _block_bound_violations(values, decoded, block_size, LEVELS[codec]) == []


@pytest.mark.parametrize("codec", ["q8", "q4", "topk_q8"])
def test_quantization_unbiased(codec: str) -> None:
    values = _values((48,), seed=7)
    spec = CodecSpec(codec, block_size=16, topk_fraction=1.0)
    rng = np.random.default_rng(11)
    draws = 4000

    total = np.zeros(values.size, dtype=np.float64)
    for _ in range(draws):
        encoded = encode(values, spec, rng=rng)
        total += decode(encoded.codec, encoded.params, encoded.shape, encoded.arrays)
    mean = total / draws

    # One decode lies in an interval of width scale / levels around x, so its standard
    # deviation is at most half of that. Six standard errors of the mean bound the bias.
    scales = np.repeat(np.abs(values).reshape(-1, 16).max(axis=1), 16)
    tolerance = 6 * scales / LEVELS[codec] / 2 / math.sqrt(draws) + 1e-6 * scales
    assert (np.abs(mean - values) <= tolerance).all()


def test_quantization_of_zero_block_is_zero() -> None:
    values = np.concatenate([np.zeros(16), np.ones(16)]).astype(np.float32)

    for codec in ("q8", "q4"):
        encoded, decoded = _round_trip(values, CodecSpec(codec, block_size=16))

        assert encoded.arrays["scales"][0] == 0.0
        np.testing.assert_array_equal(decoded, values)


def test_quantization_handles_subnormal_scale() -> None:
    values = np.array([1e-45, -1e-45, 0.0] * 6, dtype=np.float32)

    _, decoded = _round_trip(values, CodecSpec("q8", block_size=16))

    assert np.isfinite(decoded).all()
    assert _block_bound_violations(values, decoded, 16, 127) == []


# bfloat16


def _special_float32() -> np.ndarray:
    rng = np.random.default_rng(3)
    random_bits = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    # Exact halfway cases with even and odd kept parts test round-to-nearest-even.
    halfway = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000, 0x7F7F8000, 0x00008000], dtype=np.uint32)
    specials = np.array(
        [0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 1e-39, 3.4028235e38, -3.4028235e38, 1.0, -2.5],
        dtype=np.float32,
    )
    return np.concatenate([random_bits.view(np.float32), halfway.view(np.float32), specials])


def test_bf16_from_float32_matches_torch() -> None:
    values = _special_float32()

    bits = bf16_from_float32(values)
    expected = torch.from_numpy(values.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)

    assert bits.dtype == np.uint16
    finite_or_inf = ~np.isnan(values)
    np.testing.assert_array_equal(bits[finite_or_inf], expected[finite_or_inf])
    assert np.isnan(float32_from_bf16(bits[~finite_or_inf])).all()


def test_float32_from_bf16_matches_torch() -> None:
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)

    values = float32_from_bf16(bits)
    expected = torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16).to(torch.float32).numpy()

    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(values), nan)
    np.testing.assert_array_equal(values[~nan], expected[~nan])


def test_bfloat16_codec_clips_to_finite() -> None:
    values = np.array([3.4e38, -3.4e38, 1.0], dtype=np.float32)

    _, decoded = _round_trip(values, CodecSpec("bfloat16"))

    np.testing.assert_array_equal(decoded, [BFLOAT16_MAX, -BFLOAT16_MAX, 1.0])


def test_float16_codec_clips_to_65504() -> None:
    values = np.array([1e6, -1e6, 0.5], dtype=np.float32)

    _, decoded = _round_trip(values, CodecSpec("float16"))

    np.testing.assert_array_equal(decoded, [65504.0, -65504.0, 0.5])


# Top-k


@pytest.mark.parametrize("fraction", [1e-6, 0.01, 0.1, 0.5, 1.0])
def test_topk_keeps_largest_magnitudes(fraction: float) -> None:
    values = _values((5000,), seed=5)
    expected_k = max(1, math.ceil(fraction * 5000))

    encoded, decoded = _round_trip(values, CodecSpec("topk", topk_fraction=fraction))

    indices = encoded.arrays["indices"]
    assert indices.dtype == np.uint16
    assert indices.size == expected_k
    assert (np.diff(indices.astype(np.int64)) > 0).all()
    np.testing.assert_array_equal(np.sort(np.abs(values[indices]))[::-1], _topk_reference(values, expected_k))
    assert np.count_nonzero(decoded) == np.count_nonzero(values[indices])


def test_topk_with_ties_keeps_k_entries() -> None:
    values = np.array([1.0, -1.0, 1.0, 0.5, -1.0, 1.0], dtype=np.float32)

    encoded, _ = _round_trip(values, CodecSpec("topk", topk_fraction=0.5))

    np.testing.assert_array_equal(np.abs(values[encoded.arrays["indices"]]), [1.0, 1.0, 1.0])


def test_topk_compresses_32x_over_float32() -> None:
    values = _values((100_000,), seed=9)
    dense_bytes = values.astype(np.float32).nbytes

    for codec in ("topk", "topk_q8"):
        encoded, _ = _round_trip(values, CodecSpec(codec, topk_fraction=0.01))

        assert dense_bytes / encoded.nbytes >= 32, codec


# Encode input checks


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_encode_rejects_non_finite(codec: str, bad: float) -> None:
    values = np.ones(40, dtype=np.float32)
    values[17] = bad

    with pytest.raises(CodecError) as caught:
        encode(values, CodecSpec(codec), rng=np.random.default_rng(0))

    assert caught.value.field == "values"


def test_encode_rejects_float64_beyond_float32_range() -> None:
    with pytest.raises(CodecError) as caught:
        encode(np.array([1e300]), CodecSpec("float32"), rng=np.random.default_rng(0))

    assert caught.value.field == "values"


@pytest.mark.parametrize("position", [0, 1_234_567, -1])
@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_encode_rejects_non_finite_in_large_tensor(codec: str, position: int) -> None:
    # Large enough to be split over the codec threads: the check is part of every chunk.
    values = np.ones(2**21 + 77, dtype=np.float32)
    values[position] = np.nan

    with pytest.raises(CodecError) as caught:
        encode(values, CodecSpec(codec), rng=np.random.default_rng(0))

    assert caught.value.field == "values"
    assert "1 non-finite values" in str(caught.value)


@pytest.mark.parametrize("codec", ["q8", "topk_q8"])
def test_encode_rejects_values_that_decode_to_infinity(codec: str) -> None:
    # 127 * (3.4028235e38 / 127) rounds to infinity in float32.
    values = np.array([3.4028235e38, 1.0, 2.0], dtype=np.float32)

    with pytest.raises(CodecError) as caught:
        encode(values, CodecSpec(codec, topk_fraction=1.0), rng=np.random.default_rng(0))

    assert caught.value.field == "values"


def test_q4_encodes_largest_float32() -> None:
    values = np.array([3.4028235e38, -3.4028235e38, 0.0], dtype=np.float32)

    _, decoded = _round_trip(values, CodecSpec("q4", block_size=16))

    np.testing.assert_array_equal(decoded, values)


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_round_trip_large_tensor(codec: str) -> None:
    values = _values((2**21 + 99,), seed=12)
    spec = CodecSpec(codec, block_size=256, topk_fraction=0.01)

    encoded, decoded = _round_trip(values, spec)

    if codec == "float32":
        np.testing.assert_array_equal(decoded, values)
    elif codec == "float16":
        np.testing.assert_array_equal(decoded, values.astype(np.float16).astype(np.float32))
    elif codec == "bfloat16":
        expected = torch.from_numpy(values.copy()).to(torch.bfloat16).to(torch.float32).numpy()
        np.testing.assert_array_equal(decoded, expected)
    elif codec in ("q8", "q4"):
        assert _block_bound_violations(values, decoded, 256, LEVELS[codec]) == []
    else:
        k = topk_count(values.size, 0.01)
        indices = encoded.arrays["indices"]
        assert indices.size == k
        assert (np.diff(indices.astype(np.int64)) > 0).all()
        np.testing.assert_array_equal(np.sort(np.abs(values[indices]))[::-1], _topk_reference(values, k))
        dropped = np.ones(values.size, dtype=bool)
        dropped[indices] = False
        assert not decoded[dropped].any()


def test_encode_rejects_integer_values() -> None:
    with pytest.raises(CodecError) as caught:
        encode(np.arange(4), CodecSpec("float32"), rng=np.random.default_rng(0))

    assert caught.value.field == "values"


def test_encode_rejects_unknown_dtype_name() -> None:
    with pytest.raises(CodecError) as caught:
        encode(np.ones(4, dtype=np.float32), CodecSpec("float32"), rng=np.random.default_rng(0), dtype="int8")

    assert caught.value.field == "dtype"


# CodecSpec


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("q8", CodecSpec("q8")),
        ("q8:block=128", CodecSpec("q8", block_size=128)),
        ("topk:fraction=0.01", CodecSpec("topk", topk_fraction=0.01)),
        ("topk_q8:fraction=0.05,block=256", CodecSpec("topk_q8", topk_fraction=0.05, block_size=256)),
        (" q4 : block = 64 ", CodecSpec("q4", block_size=64)),
        ("float32", CodecSpec("float32")),
    ],
)
def test_codec_spec_parse(text: str, expected: CodecSpec) -> None:
    spec = CodecSpec.parse(text)

    assert spec == expected
    assert CodecSpec.parse(spec.to_text()) == spec


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("q16", "q8, q4"),
        ("q8:fraction=0.1", "block"),
        ("float16:block=64", "no parameters"),
        ("topk:frac=0.1", "fraction"),
        ("q8:block", "block"),
    ],
)
def test_codec_spec_parse_rejects_unknown_names(text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        CodecSpec.parse(text)


@pytest.mark.parametrize("text", ["q8:block=100", "q8:block=8", "q8:block=x", "topk:fraction=0", "topk:fraction=1.5"])
def test_codec_spec_parse_rejects_invalid_values(text: str) -> None:
    with pytest.raises(ConfigError):
        CodecSpec.parse(text)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "gzip"}, "name"),
        ({"name": "q8", "block_size": 300}, "block_size"),
        ({"name": "q8", "block_size": 2**17}, "block_size"),
        ({"name": "q8", "block_size": True}, "block_size"),
        ({"name": "q8", "block_size": 256.0}, "block_size"),
        ({"name": "topk", "topk_fraction": 0.0}, "topk_fraction"),
        ({"name": "topk", "topk_fraction": float("nan")}, "topk_fraction"),
        ({"name": "topk", "topk_fraction": "0.1"}, "topk_fraction"),
    ],
)
def test_codec_spec_rejects_invalid_fields(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(CodecError) as caught:
        CodecSpec(**kwargs)  # type: ignore[arg-type]

    assert caught.value.field == field


def test_codec_spec_params_only_used_fields() -> None:
    assert CodecSpec("float16").params() == {}
    assert CodecSpec("q4", block_size=64).params() == {"block_size": 64}
    assert CodecSpec("topk", topk_fraction=0.2).params() == {"topk_fraction": 0.2}
    assert CodecSpec("topk_q8").params() == {"topk_fraction": 0.01, "block_size": 256}
    assert CodecSpec("float32", block_size=64) == CodecSpec("float32")


# Decode validation


def _valid(codec: str, size: int = 100) -> tuple[dict[str, int | float], tuple[int, ...], dict[str, np.ndarray]]:
    encoded = encode(_values((size,), seed=2), CodecSpec(codec, block_size=16, topk_fraction=0.1), rng=np.random.default_rng(0))
    return dict(encoded.params), encoded.shape, {name: part.copy() for name, part in encoded.arrays.items()}


def _assert_rejected(field: str, codec: str, params: object, shape: object, arrays: object) -> None:
    with pytest.raises(CodecError) as caught:
        decode(codec, params, shape, arrays)  # type: ignore[arg-type]
    assert caught.value.field == field


def test_decode_rejects_unknown_codec() -> None:
    params, shape, arrays = _valid("float32")

    _assert_rejected("codec", "float64", params, shape, arrays)


@pytest.mark.parametrize(
    ("codec", "params", "field"),
    [
        ("q8", {}, "params.block_size"),
        ("q8", {"block_size": 100}, "params.block_size"),
        ("q8", {"block_size": "16"}, "params.block_size"),
        ("q8", {"block_size": 16, "topk_fraction": 0.1}, "params"),
        ("float16", {"block_size": 16}, "params"),
        ("topk", {"topk_fraction": 0}, "params.topk_fraction"),
        ("topk", {"topk_fraction": 2.0}, "params.topk_fraction"),
        ("topk", {"topk_fraction": True}, "params.topk_fraction"),
        ("topk_q8", {"topk_fraction": 0.1}, "params.block_size"),
    ],
)
def test_decode_rejects_bad_params(codec: str, params: dict[str, object], field: str) -> None:
    _, shape, arrays = _valid(codec)

    _assert_rejected(field, codec, params, shape, arrays)


def test_decode_rejects_params_not_mapping() -> None:
    _, shape, arrays = _valid("q8")

    _assert_rejected("params", "q8", [16], shape, arrays)


@pytest.mark.parametrize("shape", [(-1,), (2.0, 50), "100", (2**40,), (1,) * 33, (True,)])
def test_decode_rejects_bad_shape(shape: object) -> None:
    params, _, arrays = _valid("float32")

    _assert_rejected("shape", "float32", params, shape, arrays)


@pytest.mark.parametrize("codec", ["q8", "q4", "topk", "topk_q8"])
def test_decode_rejects_missing_part(codec: str) -> None:
    params, shape, arrays = _valid(codec)

    for name in list(arrays):
        incomplete = {key: part for key, part in arrays.items() if key != name}
        _assert_rejected(f"arrays.{name}", codec, params, shape, incomplete)


def test_decode_rejects_extra_part() -> None:
    params, shape, arrays = _valid("q8")
    arrays["values"] = np.zeros(100, dtype=np.float32)

    _assert_rejected("arrays", "q8", params, shape, arrays)


@pytest.mark.parametrize(
    ("codec", "name", "dtype"),
    [
        ("q8", "codes", np.int16),
        ("q8", "scales", np.float64),
        ("q4", "codes", np.int8),
        ("float32", "values", np.dtype(">f4")),
        ("bfloat16", "values", np.int16),
        ("topk", "indices", np.int64),
        ("topk_q8", "indices", np.uint64),
    ],
)
def test_decode_rejects_wrong_dtype(codec: str, name: str, dtype: type) -> None:
    params, shape, arrays = _valid(codec)
    arrays[name] = arrays[name].astype(dtype)

    _assert_rejected(f"arrays.{name}", codec, params, shape, arrays)


@pytest.mark.parametrize(("codec", "name"), [("q8", "scales"), ("q8", "codes"), ("q4", "codes"), ("float16", "values"), ("topk", "values"), ("topk_q8", "scales")])
def test_decode_rejects_wrong_length(codec: str, name: str) -> None:
    params, shape, arrays = _valid(codec)

    for part in (arrays[name][:-1], np.concatenate([arrays[name], arrays[name][:1]]), arrays[name].reshape(1, -1)):
        _assert_rejected(f"arrays.{name}", codec, params, shape, {**arrays, name: part})


def test_decode_rejects_part_not_array() -> None:
    params, shape, arrays = _valid("float32")

    _assert_rejected("arrays.values", "float32", params, shape, {"values": arrays["values"].tobytes()})


def test_decode_rejects_topk_count_mismatch() -> None:
    params, shape, arrays = _valid("topk")
    params["topk_fraction"] = 0.2

    _assert_rejected("arrays.indices", "topk", params, shape, arrays)


@pytest.mark.parametrize("codec", ["topk", "topk_q8"])
def test_decode_rejects_bad_indices(codec: str) -> None:
    params, shape, arrays = _valid(codec)
    indices = arrays["indices"]

    out_of_range = indices.copy()
    out_of_range[-1] = 100
    unsorted = indices[::-1].copy()
    repeated = indices.copy()
    repeated[1] = repeated[0]
    for bad in (out_of_range, unsorted, repeated):
        _assert_rejected("arrays.indices", codec, params, shape, {**arrays, "indices": bad})


def test_decode_rejects_bad_contents() -> None:
    params, shape, arrays = _valid("q8")
    negative_scale = arrays["scales"].copy()
    negative_scale[0] = -1.0
    nan_scale = arrays["scales"].copy()
    nan_scale[-1] = np.nan
    low_code = arrays["codes"].copy()
    low_code[3] = -128
    _assert_rejected("arrays.scales", "q8", params, shape, {**arrays, "scales": negative_scale})
    _assert_rejected("arrays.scales", "q8", params, shape, {**arrays, "scales": nan_scale})
    _assert_rejected("arrays.codes", "q8", params, shape, {**arrays, "codes": low_code})

    params, shape, arrays = _valid("float32")
    infinite = arrays["values"].copy()
    infinite[0] = np.inf
    _assert_rejected("arrays.values", "float32", params, shape, {"values": infinite})

    params, shape, arrays = _valid("bfloat16")
    nan_pattern = arrays["values"].copy()
    nan_pattern[0] = 0x7FC0
    _assert_rejected("arrays.values", "bfloat16", params, shape, {"values": nan_pattern})


def test_decode_rejects_bad_q4_nibbles() -> None:
    params, shape, arrays = _valid("q4", size=99)
    minus_eight_low = arrays["codes"].copy()
    minus_eight_low[0] = (minus_eight_low[0] & 0xF0) | 0x08
    minus_eight_high = arrays["codes"].copy()
    minus_eight_high[0] = (minus_eight_high[0] & 0x0F) | 0x80
    padding = arrays["codes"].copy()
    padding[-1] |= 0x10

    for bad in (minus_eight_low, minus_eight_high, padding):
        _assert_rejected("arrays.codes", "q4", params, shape, {**arrays, "codes": bad})


def _large_valid(codec: str) -> tuple[dict[str, int | float], tuple[int, ...], dict[str, np.ndarray]]:
    encoded = encode(_values((2**21 + 3,), seed=13), CodecSpec(codec, block_size=256), rng=np.random.default_rng(0))
    return dict(encoded.params), encoded.shape, {name: part.copy() for name, part in encoded.arrays.items()}


@pytest.mark.parametrize("position", [0, 2**20 + 5, -1])
def test_decode_checks_dense_parts_while_converting(position: int) -> None:
    params, shape, arrays = _large_valid("float16")
    arrays["values"][position] = np.inf
    _assert_rejected("arrays.values", "float16", params, shape, arrays)

    params, shape, arrays = _large_valid("bfloat16")
    arrays["values"][position] = 0xFF80
    _assert_rejected("arrays.values", "bfloat16", params, shape, arrays)

    params, shape, arrays = _large_valid("q8")
    arrays["codes"][position] = -128
    _assert_rejected("arrays.codes", "q8", params, shape, arrays)

    params, shape, arrays = _large_valid("q4")
    if position == -1:
        # The last byte contains one code and the zero padding nibble, so -8 goes in its low nibble.
        arrays["codes"][-1] = 0x08
    else:
        arrays["codes"][position // 2] = 0x80
    _assert_rejected("arrays.codes", "q4", params, shape, arrays)


@pytest.mark.parametrize("codec", ["q8", "q4", "topk_q8"])
def test_decode_rejects_scales_that_decode_to_infinity(codec: str) -> None:
    params, shape, arrays = _valid(codec)
    arrays["scales"][0] = np.float32(3.4028235e38) if codec != "q4" else np.inf

    _assert_rejected("arrays.scales", codec, params, shape, arrays)


def test_decode_rejects_shape_over_max_elements() -> None:
    params, shape, arrays = _valid("float32")

    with pytest.raises(CodecError) as caught:
        decode("float32", params, shape, arrays, max_elements=99)

    assert caught.value.field == "shape"


def test_decode_sparse_huge_shape_allocates_nothing() -> None:
    # One index with a tiny fraction is consistent with 2**40 values, which the element cap rejects.
    arrays = {"indices": np.zeros(1, dtype=np.uint64), "values": np.ones(1, dtype=np.float32)}

    tracemalloc.start()
    try:
        with pytest.raises(CodecError) as caught:
            decode("topk", {"topk_fraction": 1e-15}, (2**40,), arrays)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert caught.value.field == "shape"
    assert peak < 64 * 1024


# Part layout


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_part_layout_matches_encode(codec: str, shape: tuple[int, ...]) -> None:
    spec = CodecSpec(codec, block_size=16, topk_fraction=0.1)
    encoded = encode(_values(shape), spec, rng=np.random.default_rng(0))

    layout = part_layout(codec, spec.params(), shape)

    assert {name: (part.dtype, part.size) for name, part in encoded.arrays.items()} == layout


@pytest.mark.parametrize(
    ("count", "dtype"),
    [(0, np.uint16), (2**16, np.uint16), (2**16 + 1, np.uint32), (2**32 - 1, np.uint32), (2**32, np.uint64)],
)
def test_index_dtype_boundaries(count: int, dtype: type) -> None:
    assert index_dtype(count) == np.dtype(dtype)


def test_topk_uint16_indices_reach_last_value() -> None:
    values = np.zeros(2**16, dtype=np.float32)
    values[-1] = 1.0

    encoded, decoded = _round_trip(values, CodecSpec("topk", topk_fraction=1e-9))

    assert encoded.arrays["indices"].dtype == np.uint16
    assert encoded.arrays["indices"].tolist() == [2**16 - 1]
    assert decoded[-1] == 1.0


def test_part_layout_uint64_indices() -> None:
    layout = part_layout("topk", {"topk_fraction": 1e-9}, (2**32,), max_elements=2**33)

    assert layout["indices"] == (np.dtype(np.uint64), 5)


def test_part_layout_rejects_invalid_input() -> None:
    for codec, params, shape, field in [
        ("q2", {}, (4,), "codec"),
        ("q8", {"block_size": 15}, (4,), "params.block_size"),
        ("q8", {"block_size": 16}, (2**29,), "shape"),
    ]:
        with pytest.raises(CodecError) as caught:
            part_layout(codec, params, shape)
        assert caught.value.field == field


# Decode output


def test_float32_decode_is_zero_copy_view() -> None:
    params, shape, arrays = _valid("float32")

    decoded = decode("float32", params, (10, 10), arrays)

    assert np.shares_memory(decoded, arrays["values"])
    assert decoded.shape == (10, 10)


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_decode_into_out(codec: str) -> None:
    params, shape, arrays = _valid(codec)
    out = np.full(shape, 7.0, dtype=np.float32)

    result = decode(codec, params, shape, arrays, out=out)

    assert result is out
    np.testing.assert_array_equal(out, decode(codec, params, shape, arrays))


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_decode_misaligned_and_strided_parts(codec: str) -> None:
    params, shape, arrays = _valid(codec)
    expected = decode(codec, params, shape, arrays)
    misaligned = {}
    strided = {}
    for name, part in arrays.items():
        buffer = bytes(1) + part.tobytes()
        misaligned[name] = np.frombuffer(buffer, dtype=part.dtype, offset=1)
        doubled = np.repeat(part, 2)
        strided[name] = doubled[::2]

    np.testing.assert_array_equal(decode(codec, params, shape, misaligned), expected)
    np.testing.assert_array_equal(decode(codec, params, shape, strided), expected)


def test_decode_rejects_wrong_out() -> None:
    params, shape, arrays = _valid("q8")

    for out in (np.zeros(99, dtype=np.float32), np.zeros(100, dtype=np.float64), np.zeros((2, 100), dtype=np.float32)[:, 0]):
        with pytest.raises(ValueError, match="out must be"):
            decode("q8", params, shape, arrays, out=out)


# Decode on arbitrary input

_PART_DTYPES = [np.float32, np.float16, np.float64, np.int8, np.uint8, np.uint16, np.int16, np.uint32, np.int64, np.uint64]
_PART_NAMES = ["values", "scales", "codes", "indices", "junk"]


@st.composite
def _arbitrary_part(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(_PART_DTYPES)))
    length = draw(st.integers(0, 40))
    raw = draw(st.binary(min_size=length * dtype.itemsize, max_size=length * dtype.itemsize))
    part = np.frombuffer(raw, dtype=dtype)
    return part.reshape(2, -1) if draw(st.booleans()) and length % 2 == 0 else part


_params = st.dictionaries(
    st.sampled_from(["block_size", "topk_fraction", "other"]),
    st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.booleans(), st.text(max_size=3), st.none()),
    max_size=3,
)
_shapes = st.one_of(
    st.lists(st.integers(-2, 2**45), max_size=4),
    st.lists(st.integers(0, 20), max_size=3),
    st.text(max_size=3),
    st.integers(),
)


def _decode_traced(codec: object, params: object, shape: object, arrays: object) -> tuple[np.ndarray | None, int]:
    tracemalloc.start()
    try:
        try:
            result = decode(codec, params, shape, arrays, max_elements=2**20)  # type: ignore[arg-type]
        except CodecError:
            result = None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


def _allocation_limit(arrays: object, result: np.ndarray | None) -> int:
    input_bytes = sum(part.nbytes for part in arrays.values() if isinstance(part, np.ndarray)) if isinstance(arrays, dict) else 0
    output_bytes = 0 if result is None else result.nbytes
    return 64 * 1024 + 8 * input_bytes + 2 * output_bytes


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    codec=st.one_of(st.sampled_from(CODEC_NAMES), st.text(max_size=8), st.integers()),
    params=_params,
    shape=_shapes,
    arrays=st.dictionaries(st.sampled_from(_PART_NAMES), _arbitrary_part(), max_size=4),
)
def test_decode_fuzz_raises_codec_error(codec: object, params: object, shape: object, arrays: object) -> None:
    result, peak = _decode_traced(codec, params, shape, arrays)

    if result is not None:
        assert result.dtype == np.float32
    assert peak <= _allocation_limit(arrays, result)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    codec=st.sampled_from(CODEC_NAMES),
    size=st.integers(0, 70),
    target=st.sampled_from(["params", "shape", "part", "bytes"]),
    data=st.data(),
)
def test_decode_mutated_raises_codec_error(codec: str, size: int, target: str, data: st.DataObject) -> None:
    params, shape, arrays = _valid(codec, size=size)
    if target == "params":
        params = data.draw(_params)
    elif target == "shape":
        shape = data.draw(_shapes)
    elif target == "part":
        arrays[data.draw(st.sampled_from(sorted(arrays)))] = data.draw(_arbitrary_part())
    else:
        # Same dtype and length with random bytes: only the content checks stand in the way.
        name = data.draw(st.sampled_from(sorted(arrays)))
        raw = data.draw(st.binary(min_size=arrays[name].nbytes, max_size=arrays[name].nbytes))
        arrays[name] = np.frombuffer(raw, dtype=arrays[name].dtype)

    result, peak = _decode_traced(codec, params, shape, arrays)

    if result is not None:
        assert result.dtype == np.float32
        assert np.isfinite(result).all()
    assert peak <= _allocation_limit(arrays, result)


# Error feedback


@pytest.mark.parametrize("codec", ["topk", "topk_q8", "q4"])
def test_error_feedback_conserves_sum(codec: str) -> None:
    rng = np.random.default_rng(4)
    spec = CodecSpec(codec, topk_fraction=0.05, block_size=16)
    feedback = ErrorFeedback()
    inputs_total = np.zeros((20, 30))
    transmitted_total = np.zeros((20, 30))

    for _ in range(25):
        update = rng.standard_normal((20, 30)).astype(np.float32)
        compensated = feedback.compensate("fc.weight", update)
        encoded = encode(compensated, spec, rng=rng)
        transmitted = decode(encoded.codec, encoded.params, encoded.shape, encoded.arrays)
        feedback.record("fc.weight", compensated, transmitted)
        inputs_total += update
        transmitted_total += transmitted

    residual = feedback.state()["fc.weight"]
    assert residual.dtype == np.float32
    assert np.abs(transmitted_total + residual - inputs_total).max() < 1e-4
    assert np.abs(residual).max() > 0.0


def test_compensate_without_residual_copies() -> None:
    values = np.arange(6, dtype=np.float64).reshape(2, 3)
    feedback = ErrorFeedback()

    compensated = feedback.compensate("bias", values)

    assert compensated.dtype == np.float32
    assert not np.shares_memory(compensated, values)
    np.testing.assert_array_equal(compensated, values)


def test_error_feedback_rejects_shape_change() -> None:
    feedback = ErrorFeedback()
    feedback.record("w", np.ones(4), np.zeros(4))

    with pytest.raises(CheckpointError, match="shape"):
        feedback.compensate("w", np.ones(5))
    with pytest.raises(ValueError, match="same shape"):
        feedback.record("w", np.ones(4), np.zeros(5))


def test_error_feedback_save_and_load(tmp_path: Path) -> None:
    feedback = ErrorFeedback()
    feedback.record("layer.0.weight", np.full((3, 2), 0.5), np.zeros((3, 2)))
    feedback.record("scalar", np.array(2.0), np.array(0.5))
    feedback.record("empty", np.zeros(0), np.zeros(0))
    path = tmp_path / "feedback.safetensors"

    feedback.save(path)
    feedback.save(path)
    loaded = ErrorFeedback.load(path)

    assert sorted(loaded.state()) == ["empty", "layer.0.weight", "scalar"]
    np.testing.assert_array_equal(loaded.state()["layer.0.weight"], np.full((3, 2), 0.5))
    assert loaded.state()["scalar"].shape == ()
    assert loaded.state()["scalar"] == 1.5
    assert [entry.name for entry in tmp_path.iterdir()] == ["feedback.safetensors"]


def test_error_feedback_load_missing_is_empty(tmp_path: Path) -> None:
    assert ErrorFeedback.load(tmp_path / "absent.safetensors").state() == {}


def test_error_feedback_load_corrupt_raises(tmp_path: Path) -> None:
    path = tmp_path / "feedback.safetensors"
    path.write_bytes(b"not a safetensors file")

    with pytest.raises(CheckpointError, match="feedback.safetensors"):
        ErrorFeedback.load(path)


def test_error_feedback_load_state_rejects_integers() -> None:
    with pytest.raises(CheckpointError, match="float"):
        ErrorFeedback().load_state({"w": np.zeros(3, dtype=np.int32)})
