"""Codecs that turn update tensors into compact numpy parts, as pure functions.

Every codec turns an array into named 1-D parts of a fixed dtype, which is what travels
in an update message. Values are flattened in C order before encoding.

    codec     parts (dtype, length for n values)                     bytes per value
    float32   values (float32, n)                                     4
    float16   values (float16, n)                                     2
    bfloat16  values (uint16 bfloat16 bit patterns, n)                2
    q8        scales (float32, ceil(n/B)), codes (int8, n)            about 1
    q4        scales (float32, ceil(n/B)), codes (uint8, ceil(n/2))   about 0.5
    topk      indices (uint16/32/64, k), values (float32, k)          6 to 12 per kept value
    topk_q8   indices (uint16/32/64, k), scales (float32, ceil(k/B)), about 3 to 9 per kept value
              codes (int8, k)

B is ``block_size``. q4 packs two 4-bit two's complement codes per byte, the first in
the low nibble. The top-k codecs keep ``k = max(1, ceil(fraction * n))`` values (none
when n is 0) and decode to zero elsewhere. Their indices are strictly increasing, and
uint16 when n <= 2**16, uint32 when n < 2**32, uint64 otherwise.

q8 and q4 use stochastic rounding with one scale per block, as in QSGD (Alistarh et al.,
"QSGD: Communication-Efficient SGD via Gradient Quantization and Encoding", NeurIPS 2017):
the scale is the block's maximum magnitude, a value x maps to
``sign(x) * floor(|x| / scale * s + u)`` with u uniform on [0, 1), and decodes to
``code * scale / s``, where s is 127 for q8 and 7 for q4. The decoded value is then
unbiased, and it differs from x by at most ``scale / s`` (both up to float32 rounding).
u has 24 bits: it is a hash of the value's index and of a seed drawn once per encode()
call from its ``rng``, divided by 2**24. Over the seed, a code rounds up with
probability exactly the fraction of ``|x| / scale * s`` when that is at least 1, and
with at most 2**-24 more below 1 (see ``schemas.codec_kernels``).

The top-k codecs select by a sampled threshold and an exact selection among the values
above it (see ``schemas.top_k``), which gives the same k magnitudes as a full sort.

Encoding rejects non-finite input with CodecError, so that a diverged update is never
sent. Decoding validates the codec, its parameters, the shape, the dtype and length of
every part, and the contents of every part except the dense values and codes of
float16, bfloat16, q8 and q4, before it allocates anything. Those dense parts are
checked in the one pass that converts them into the output, whose size the validated
shape fixes. Every invalid input raises CodecError naming the invalid field.

Encoding and decoding run compiled loops (``schemas.codec_kernels``), which import
numba on first use, and split tensors of 2**21 values or more over a few threads
(``schemas.codec_threads``).
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

from fedmq.errors import CheckpointError, CodecError, ConfigError
from schemas.codec_threads import chunk_bounds, run_chunks

CODEC_NAMES = ("float32", "float16", "bfloat16", "q8", "q4", "topk", "topk_q8")
SOURCE_DTYPES = ("float32", "float64", "float16", "bfloat16")

MIN_BLOCK_SIZE = 16
MAX_BLOCK_SIZE = 65536
DEFAULT_BLOCK_SIZE = 256
DEFAULT_TOPK_FRACTION = 0.01

# Largest tensor that decode() expands by default: 2**28 float32 values are 1 GiB.
# The top-k codecs send about fraction * n values, so without a cap a tiny declared
# fraction would let a small message request an arbitrarily large output array.
DEFAULT_MAX_ELEMENTS = 2**28

# decode() accepts at most this many dimensions, the limit of numpy 1.x arrays.
MAX_NDIM = 32

FLOAT16_MAX = float(np.finfo(np.float16).max)
# Largest finite bfloat16 value: exponent 254, all seven mantissa bits set.
BFLOAT16_MAX = float(np.array(0x7F7F0000, dtype=np.uint32).view(np.float32))

_LEVELS = {"q8": 127, "q4": 7}
# CodecSpec fields that each codec uses, which are also the keys of its message params.
_CODEC_PARAMS: dict[str, tuple[str, ...]] = {
    "float32": (),
    "float16": (),
    "bfloat16": (),
    "q8": ("block_size",),
    "q4": ("block_size",),
    "topk": ("topk_fraction",),
    "topk_q8": ("topk_fraction", "block_size"),
}
# Keys of the text form accepted by CodecSpec.parse, mapped to CodecSpec fields.
_TEXT_KEYS = {"block": "block_size", "fraction": "topk_fraction"}


@dataclass(frozen=True)
class CodecSpec:
    """A codec name with its parameters, validated on construction.

    ``block_size`` is the number of values that share one scale in q8, q4 and topk_q8
    (a power of two from 16 to 65536). ``topk_fraction`` is the fraction of entries
    that topk and topk_q8 keep (0 < fraction <= 1). Invalid values raise CodecError.
    A field that the codec does not use is validated and then reset to its default, so
    specs that encode alike compare equal.
    """

    name: str = "float16"
    block_size: int = DEFAULT_BLOCK_SIZE
    topk_fraction: float = DEFAULT_TOPK_FRACTION

    def __post_init__(self) -> None:
        _check_name(self.name, "name")
        _check_block_size(self.block_size, "block_size")
        fraction = _check_fraction(self.topk_fraction, "topk_fraction")
        used = _CODEC_PARAMS[self.name]
        object.__setattr__(self, "block_size", int(self.block_size) if "block_size" in used else DEFAULT_BLOCK_SIZE)
        object.__setattr__(self, "topk_fraction", fraction if "topk_fraction" in used else DEFAULT_TOPK_FRACTION)

    @classmethod
    def parse(cls, text: str) -> CodecSpec:
        """Parse ``NAME[:KEY=VALUE,...]``, such as ``q8:block=128`` or ``topk:fraction=0.01``.

        Raises ConfigError for an unknown codec, a key that the codec does not use,
        or an invalid value.
        """
        name, _, options = text.strip().partition(":")
        name = name.strip()
        if name not in CODEC_NAMES:
            raise ConfigError(f"unknown codec {name!r} in {text!r}: expected one of {', '.join(CODEC_NAMES)}")

        allowed = [key for key, field in _TEXT_KEYS.items() if field in _CODEC_PARAMS[name]]
        block_size, fraction = DEFAULT_BLOCK_SIZE, DEFAULT_TOPK_FRACTION
        for item in filter(None, (part.strip() for part in options.split(","))):
            key, sep, raw = (piece.strip() for piece in item.partition("="))
            if key not in allowed or not sep:
                expected = f"keys {', '.join(allowed)}" if allowed else "no parameters"
                raise ConfigError(f"invalid codec option {item!r} in {text!r}: codec {name} takes {expected}")
            try:
                if key == "block":
                    block_size = int(raw)
                else:
                    fraction = float(raw)
            except ValueError:
                kind = "an integer" if key == "block" else "a number"
                raise ConfigError(f"invalid value {raw!r} for {key} in codec {text!r}: expected {kind}") from None

        try:
            return cls(name, block_size=block_size, topk_fraction=fraction)
        except CodecError as error:
            raise ConfigError(f"invalid codec {text!r}: {error}") from error

    def to_text(self) -> str:
        """Return the text form that parse() reads back into an equal spec."""
        options = []
        for key, field in _TEXT_KEYS.items():
            if field in _CODEC_PARAMS[self.name]:
                options.append(f"{key}={getattr(self, field)!r}")
        return f"{self.name}:{','.join(options)}" if options else self.name

    def params(self) -> dict[str, int | float]:
        """Return the parameters that travel with an encoded tensor (only those the codec uses)."""
        return {field: getattr(self, field) for field in _CODEC_PARAMS[self.name]}


@dataclass
class EncodedTensor:
    """One encoded tensor: codec, message params, original shape and dtype, and the parts."""

    codec: str
    params: dict[str, int | float]
    shape: tuple[int, ...]
    dtype: str
    arrays: dict[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        """Total size of the parts in bytes."""
        return sum(part.nbytes for part in self.arrays.values())


# Parameter and layout validation


def _check_name(name: object, field: str) -> str:
    if not isinstance(name, str) or name not in CODEC_NAMES:
        raise CodecError(field, f"one of {', '.join(CODEC_NAMES)}", name)
    return name


def _check_block_size(value: object, field: str) -> int:
    if type(value) is not int and (not isinstance(value, numbers.Integral) or isinstance(value, bool)):
        raise CodecError(field, "an integer power of two", value)
    size = int(value)
    if not MIN_BLOCK_SIZE <= size <= MAX_BLOCK_SIZE or size & (size - 1):
        raise CodecError(field, f"a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}", value)
    return size


def _check_fraction(value: object, field: str) -> float:
    if type(value) is not float and (not isinstance(value, numbers.Real) or isinstance(value, bool)):
        raise CodecError(field, "a number with 0 < fraction <= 1", value)
    fraction = float(value)
    if not 0.0 < fraction <= 1.0:  # also rejects NaN
        raise CodecError(field, "a number with 0 < fraction <= 1", value)
    return fraction


def _check_params(codec: str, params: object) -> dict[str, int | float]:
    # Here and in the checks below, concrete types are tested before the ABCs (Mapping,
    # Integral, Real), whose isinstance checks are slower.
    if not isinstance(params, (dict, Mapping)):
        raise CodecError("params", "a mapping of parameter names to numbers", params)
    expected = _CODEC_PARAMS[codec]
    extra = sorted(str(key) for key in params if key not in expected)
    if extra:
        allowed = ", ".join(expected) if expected else "no parameters"
        raise CodecError("params", f"{allowed} for codec {codec}", f"unexpected keys {', '.join(extra)}")

    checked: dict[str, int | float] = {}
    for key in expected:
        if key not in params:
            raise CodecError(f"params.{key}", f"a value for codec {codec}", None)
        if key == "block_size":
            checked[key] = _check_block_size(params[key], f"params.{key}")
        else:
            checked[key] = _check_fraction(params[key], f"params.{key}")
    return checked


def _check_shape(shape: object, max_elements: int) -> tuple[tuple[int, ...], int]:
    if not isinstance(shape, (tuple, list)) and (isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence)):
        raise CodecError("shape", "a sequence of non-negative integers", shape)
    if len(shape) > MAX_NDIM:
        raise CodecError("shape", f"at most {MAX_NDIM} dimensions", shape)
    dims = []
    for dim in shape:
        if type(dim) is not int and (not isinstance(dim, numbers.Integral) or isinstance(dim, bool)):
            raise CodecError("shape", "a sequence of non-negative integers", shape)
        if dim < 0:
            raise CodecError("shape", "a sequence of non-negative integers", shape)
        dims.append(int(dim))
    # numpy rejects shapes whose nonzero dimensions multiply beyond its index range even
    # when another dimension is zero, so the cap applies to that product too.
    spanned = math.prod(dim for dim in dims if dim)
    if spanned > max_elements:
        raise CodecError("shape", f"at most {max_elements} elements", f"shape {tuple(dims)}")
    return tuple(dims), math.prod(dims)


def topk_count(count: int, fraction: float) -> int:
    """Return how many of ``count`` values the top-k codecs keep: ``max(1, ceil(fraction * count))``."""
    return 0 if count == 0 else min(count, max(1, math.ceil(fraction * count)))


def index_dtype(count: int) -> np.dtype:
    """Return the dtype of top-k indices into a tensor of ``count`` values.

    uint16 when count <= 2**16 (every index fits), uint32 when count < 2**32, else uint64.
    """
    if count <= 2**16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32) if count < 2**32 else np.dtype(np.uint64)


def part_layout(
    codec: str,
    params: Mapping[str, object],
    shape: Sequence[int],
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> dict[str, tuple[np.dtype, int]]:
    """Return the dtype and length of every part of a tensor of ``shape`` encoded with ``codec``.

    Validates the codec, params and shape as decode() does and raises CodecError for
    invalid ones, so a reader can check part sizes before it slices a payload.
    """
    codec = _check_name(codec, "codec")
    checked = _check_params(codec, params)
    _, count = _check_shape(shape, max_elements)
    return _layout(codec, checked, count)


def _layout(codec: str, params: Mapping[str, int | float], count: int) -> dict[str, tuple[np.dtype, int]]:
    if codec in ("float32", "float16"):
        return {"values": (np.dtype(codec), count)}
    if codec == "bfloat16":
        return {"values": (np.dtype(np.uint16), count)}
    if codec in ("q8", "q4"):
        block_size = int(params["block_size"])
        codes = (np.dtype(np.int8), count) if codec == "q8" else (np.dtype(np.uint8), -(-count // 2))
        return {"scales": (np.dtype(np.float32), -(-count // block_size)), "codes": codes}

    kept = topk_count(count, float(params["topk_fraction"]))
    if codec == "topk":
        return {"indices": (index_dtype(count), kept), "values": (np.dtype(np.float32), kept)}
    block_size = int(params["block_size"])
    return {
        "indices": (index_dtype(count), kept),
        "scales": (np.dtype(np.float32), -(-kept // block_size)),
        "codes": (np.dtype(np.int8), kept),
    }


def _check_parts(arrays: object, layout: Mapping[str, tuple[np.dtype, int]], codec: str) -> dict[str, np.ndarray]:
    if not isinstance(arrays, Mapping):
        raise CodecError("arrays", f"a mapping with parts {', '.join(layout)}", arrays)
    extra = sorted(str(key) for key in arrays if key not in layout)
    if extra:
        raise CodecError("arrays", f"only parts {', '.join(layout)} for codec {codec}", f"extra parts {', '.join(extra)}")

    parts = {}
    for key, (dtype, length) in layout.items():
        field = f"arrays.{key}"
        part = arrays.get(key)
        if part is None:
            raise CodecError(field, f"a {dtype.name} array for codec {codec}", None)
        if not isinstance(part, np.ndarray):
            raise CodecError(field, f"a numpy array of {dtype.name}", part)
        if part.dtype != dtype:
            raise CodecError(field, f"dtype {dtype.str} ({dtype.name})", f"dtype {part.dtype.str}")
        if part.shape != (length,):
            raise CodecError(field, f"a 1-D array of length {length}", f"shape {part.shape}")
        # The compiled loops take contiguous arrays; a strided view is copied.
        parts[key] = np.ascontiguousarray(part)
    return parts


# Content checks on parts whose dtype and length are already valid

# Exponent fields of the float formats: all ones means infinity or NaN.
_EXPONENT_MASKS: dict[np.dtype, tuple[np.dtype, int]] = {
    np.dtype(np.float16): (np.dtype(np.uint16), 0x7C00),
    np.dtype(np.float32): (np.dtype(np.uint32), 0x7F800000),
    np.dtype(np.float64): (np.dtype(np.uint64), 0x7FF0000000000000),
}


def all_finite(values: np.ndarray) -> bool:
    """Return whether every value of a float array is finite.

    float16, float32 and float64 arrays in native byte order take one pass over their
    exponent bits, which large arrays split over the codec threads. Other arrays go
    through ``numpy.isfinite``.
    """
    flat = values.reshape(-1)
    if flat.size == 0:
        return True
    masks = _EXPONENT_MASKS.get(flat.dtype)
    if masks is None:
        return bool(np.isfinite(flat).all())
    bits_dtype, mask = masks
    return _largest_masked(np.ascontiguousarray(flat).view(bits_dtype), mask) != mask


def _largest_masked(bits: np.ndarray, mask: int) -> int:
    """Return the largest ``bits & mask`` of an unsigned integer array, split over the codec threads."""
    kernels = _kernels()
    typed_mask = bits.dtype.type(mask)
    bounds = chunk_bounds(bits.size)
    if len(bounds) == 1:
        return int(kernels.max_masked(bits, typed_mask))
    tasks = [functools.partial(kernels.max_masked, bits[start:stop], typed_mask) for start, stop in bounds]
    return max(int(largest) for largest in run_chunks(tasks))


def _check_finite(part: np.ndarray, field: str) -> None:
    if not all_finite(part):
        raise CodecError(field, "finite values", f"{np.count_nonzero(~np.isfinite(part))} non-finite values")


def _check_scales(scales: np.ndarray, levels: int, field: str) -> None:
    _check_finite(scales, field)
    if scales.size == 0:
        return
    if (scales < 0).any():
        raise CodecError(field, "non-negative scales", f"minimum {scales.min()}")
    if not _decodes_finite(scales, levels):
        raise CodecError(field, "scales whose largest code decodes to a finite float32", f"scale {scales.max()}")


def _decodes_finite(scales: np.ndarray, levels: int) -> bool:
    """Return whether ``levels * (scale / levels)`` is finite in float32 for every scale.

    It rounds to infinity for scales within a few ulps of the float32 maximum. Both
    roundings are monotonic, so the largest scale decides.
    """
    if scales.size == 0:
        return True
    with np.errstate(over="ignore"):
        decoded = np.float32(levels) * (scales.max() / np.float32(levels))
    return bool(np.isfinite(decoded))


def _check_q8_codes(codes: np.ndarray, field: str) -> None:
    # encode() emits codes in [-127, 127], so -128 can only come from a corrupt message.
    if codes.size and codes.min() < -127:
        raise CodecError(field, "codes from -127 to 127", "code -128")


def _check_q4_padding(codes: np.ndarray, count: int, field: str) -> None:
    if count % 2 and codes[-1] >> 4:
        raise CodecError(field, "a zero padding nibble after an odd number of codes", f"nibble {codes[-1] >> 4}")


def _check_indices(indices: np.ndarray, count: int, field: str) -> None:
    if indices.size == 0:
        return
    if not (indices[1:] > indices[:-1]).all():
        raise CodecError(field, "strictly increasing indices", "indices out of order or repeated")
    if int(indices[-1]) >= count:
        raise CodecError(field, f"indices below {count}", f"index {int(indices[-1])}")


def _check_parts_before_decoding(codec: str, parts: Mapping[str, np.ndarray], count: int) -> None:
    """Check every part except the dense values and codes that decoding checks as it converts them.

    Of the parts checked here only float32 values are as long as the tensor, and
    decode() allocates nothing for those.
    """
    if codec in ("float32", "topk"):
        _check_finite(parts["values"], "arrays.values")
    elif codec == "topk_q8":
        _check_q8_codes(parts["codes"], "arrays.codes")
    elif codec == "q4":
        _check_q4_padding(parts["codes"], count, "arrays.codes")
    if "scales" in parts:
        _check_scales(parts["scales"], _LEVELS["q4" if codec == "q4" else "q8"], "arrays.scales")
    if "indices" in parts:
        _check_indices(parts["indices"], count, "arrays.indices")


# bfloat16 conversion


def bf16_from_float32(x: np.ndarray) -> np.ndarray:
    """Convert float32 values to bfloat16 bit patterns (uint16), rounding to nearest even.

    Values beyond the bfloat16 range round to infinity, and NaN stays NaN (a quiet NaN
    with the sign and upper payload bits of the input).
    """
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit carries into bit 16 exactly when the dropped
    # half-word is above one half, or equal to one half with an odd kept part.
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    result = (rounded >> np.uint32(16)).astype(np.uint16)

    # Truncating a NaN whose payload lies only in the dropped bits gives infinity, and
    # rounding can carry out of its exponent, so NaNs keep their upper half-word with
    # the quiet bit set.
    nan = np.isnan(x)
    if nan.any():
        result[nan] = (bits[nan] >> np.uint32(16)).astype(np.uint16) | np.uint16(0x0040)
    return result


def float32_from_bf16(bits: np.ndarray) -> np.ndarray:
    """Convert bfloat16 bit patterns (uint16) to float32 values; the conversion is exact."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


# Encoding

# The dtypes that encode() accepts, in native byte order, by their names.
_ENCODABLE_DTYPES = {np.dtype(name): name for name in ("float16", "float32", "float64")}


def encode(
    values: np.ndarray,
    spec: CodecSpec,
    *,
    rng: np.random.Generator,
    dtype: str | None = None,
) -> EncodedTensor:
    """Encode an array of any shape with ``spec``.

    ``dtype`` names the dtype that the values had before conversion to numpy, such as
    "bfloat16" for a torch bfloat16 tensor, and defaults to ``values.dtype``. ``rng``
    seeds the stochastic rounding of q8, q4 and topk_q8: one draw per call.

    float16 clips values to +-65504 and bfloat16 to its largest finite value, so a finite
    input never turns into infinity. Values below their smallest subnormal become zero.
    The float32 part may share memory with ``values``. Raises CodecError when the values
    are not float16, float32 or float64, or when any value is NaN, infinite or beyond
    the float32 range. Large tensors are split over the codec threads; the result does
    not depend on how.
    """
    if not isinstance(values, np.ndarray) or values.dtype not in _ENCODABLE_DTYPES:
        got = f"dtype {values.dtype}" if isinstance(values, np.ndarray) else values
        raise CodecError("values", "a float16, float32 or float64 array", got)
    source_dtype = _ENCODABLE_DTYPES[values.dtype] if dtype is None else dtype
    if source_dtype not in SOURCE_DTYPES:
        raise CodecError("dtype", f"one of {', '.join(SOURCE_DTYPES)}", source_dtype)

    if values.dtype == np.float64:
        # Float64 values beyond the float32 range become infinite here and are rejected below.
        with np.errstate(over="ignore"):
            flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    else:
        flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    parts = _encode_flat(flat, spec, rng)
    return EncodedTensor(spec.name, spec.params(), tuple(values.shape), source_dtype, parts)


def _encode_flat(flat: np.ndarray, spec: CodecSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Encode float32 values, checking that they are finite in the same pass."""
    if spec.name == "float32":
        if not all_finite(flat):
            _raise_non_finite(flat)
        return {"values": flat}
    if spec.name in ("float16", "bfloat16"):
        return {"values": _to_half(flat, spec.name)}
    if spec.name in ("q8", "q4"):
        scales, codes = quantize(flat, codec=spec.name, block_size=spec.block_size, rng=rng)
        return {"scales": scales, "codes": codes}

    indices, kept = _top_k_module().top_k(flat, topk_count(flat.size, spec.topk_fraction), index_dtype(flat.size))
    if spec.name == "topk":
        return {"indices": indices, "values": kept}
    scales, codes = quantize(kept, codec="q8", block_size=spec.block_size, rng=rng)
    return {"indices": indices, "scales": scales, "codes": codes}


def _raise_non_finite(flat: np.ndarray) -> None:
    bad = np.count_nonzero(~np.isfinite(flat))
    raise CodecError("values", "finite values within the float32 range", f"{bad} non-finite values")


def _to_half(flat: np.ndarray, codec: str) -> np.ndarray:
    """Convert finite float32 values to float16 (as float16) or bfloat16 (as uint16 bits), rounding to nearest even."""
    kernels = _kernels()
    kernel = kernels.float16_from_float32 if codec == "float16" else kernels.bfloat16_from_float32
    bits = flat.view(np.uint32)
    out = np.empty(flat.size, dtype=np.uint16)
    tasks = [functools.partial(kernel, bits[start:stop], out[start:stop]) for start, stop in chunk_bounds(flat.size)]
    if max(int(largest) for largest in run_chunks(tasks)) == kernels.FLOAT32_EXPONENT_MASK:
        _raise_non_finite(flat)
    return out.view(np.float16) if codec == "float16" else out


def quantize(
    flat: np.ndarray, *, codec: str, block_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Quantize float32 values with the q8 or q4 codec; return its parts ``(scales, codes)``.

    The scales are the float32 maximum magnitude of each block of ``block_size`` values
    (the last block may be shorter). q8 codes are int8 in [-127, 127]; q4 codes are in
    [-7, 7], packed two per byte. The expected value of a code is ``x / scale * levels``,
    as the module docstring details. Raises CodecError when a value is not finite.
    """
    kernels = _kernels()
    count = flat.size
    shift = block_size.bit_length() - 1
    scales = np.empty(-(-count // block_size), dtype=np.float32)
    codes = np.empty(count, dtype=np.int8) if codec == "q8" else np.empty(-(-count // 2), dtype=np.uint8)
    seed = np.uint32(rng.integers(0, 2**32, dtype=np.uint32))
    bits = flat.view(np.uint32)

    # Chunks start on block boundaries, so each chunk owns whole blocks and scales.
    tasks = []
    for start, stop in chunk_bounds(count, align=max(block_size, 64)):
        chunk_scales = scales[start // block_size : -(-stop // block_size)]
        arguments: tuple[Any, ...]
        if codec == "q8":
            arguments = (bits[start:stop], shift, _LEVELS["q8"], seed, start, chunk_scales, codes[start:stop])
            tasks.append(functools.partial(kernels.quantize_q8, *arguments))
        else:
            arguments = (bits[start:stop], shift, seed, start, chunk_scales, codes[start // 2 : -(-stop // 2)])
            tasks.append(functools.partial(kernels.quantize_q4, *arguments))
    if max(int(largest) for largest in run_chunks(tasks)) >= kernels.FLOAT32_EXPONENT_MASK:
        _raise_non_finite(flat)
    if not _decodes_finite(scales, _LEVELS[codec]):
        raise CodecError("values", f"magnitudes that {codec} decodes to finite float32 values", f"maximum {scales.max()}")
    return scales, codes


def top_k_indices(flat: np.ndarray, k: int) -> np.ndarray:
    """Return the ascending indices of the ``k`` finite float32 values of largest magnitude.

    Ties at the boundary are broken arbitrarily. The dtype is index_dtype(flat.size).
    Raises CodecError when a value is not finite.
    """
    indices, _ = _top_k_module().top_k(np.ascontiguousarray(flat, dtype=np.float32), k, index_dtype(flat.size))
    return indices


# Decoding


def decode(
    codec: str,
    params: Mapping[str, object],
    shape: Sequence[int],
    arrays: Mapping[str, np.ndarray],
    *,
    out: np.ndarray | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> np.ndarray:
    """Decode parts into a float32 array of ``shape``.

    The codec name must be known and the params must be exactly those it uses. The shape
    may have at most ``max_elements`` values. Each part must have its dtype and exact
    length, finite values and scales, and codes in range. Top-k indices must be strictly
    increasing and below the size. An invalid input raises CodecError naming the field,
    such as ``arrays.scales``.

    Everything but the dense values and codes of float16, bfloat16, q8 and q4 is
    validated before the output is allocated. Those are checked in the same pass that
    converts them into the output, whose size the validated shape fixes.

    With ``out`` (a writable C-contiguous float32 array of ``shape``) the result is
    written there and ``out`` is returned; when decoding then raises CodecError, ``out``
    may hold part of the result. Without it, the float32 codec returns a view that
    shares memory with ``arrays["values"]``, so copy it before changing it in place.
    """
    codec = _check_name(codec, "codec")
    checked = _check_params(codec, params)
    dims, count = _check_shape(shape, max_elements)
    parts = _check_parts(arrays, _layout(codec, checked, count), codec)
    _check_parts_before_decoding(codec, parts, count)
    if out is not None and (
        not isinstance(out, np.ndarray)
        or out.dtype != np.float32
        or out.shape != dims
        or not out.flags.c_contiguous
        or not out.flags.writeable
    ):
        got = f"{out.dtype} array of shape {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
        raise ValueError(f"out must be a writable C-contiguous float32 array of shape {dims}, but got {got}")

    if codec == "float32" and out is None:
        return parts["values"].reshape(dims)

    result = np.empty(count, dtype=np.float32) if out is None else out.reshape(-1)
    _decode_into(codec, checked, parts, result)
    return result.reshape(dims) if out is None else out


def _decode_into(
    codec: str, params: Mapping[str, int | float], parts: Mapping[str, np.ndarray], result: np.ndarray
) -> None:
    if codec == "float32":
        result[...] = parts["values"]
    elif codec in ("float16", "bfloat16"):
        _from_half(parts["values"], codec, result)
    elif codec in ("q8", "q4"):
        dequantize(parts["scales"], parts["codes"], codec=codec, block_size=int(params["block_size"]), out=result)
    elif codec == "topk":
        _expand_sparse(parts["indices"], parts["values"], result)
    else:
        kept = dequantize(parts["scales"], parts["codes"], codec="q8", block_size=int(params["block_size"]))
        _expand_sparse(parts["indices"], kept, result)


def _from_half(values: np.ndarray, codec: str, result: np.ndarray) -> None:
    """Convert float16 or bfloat16 bits to float32, rejecting infinity and NaN patterns."""
    kernels = _kernels()
    if codec == "float16":
        kernel, mask, expected = kernels.float32_from_float16, kernels.FLOAT16_EXPONENT_MASK, "finite float16 values"
    else:
        kernel, mask, expected = kernels.float32_from_bfloat16, kernels.BFLOAT16_EXPONENT_MASK, "finite bfloat16 values"
    bits = values.view(np.uint16)
    tasks = [functools.partial(kernel, bits[start:stop], result[start:stop]) for start, stop in chunk_bounds(bits.size)]
    if max(int(largest) for largest in run_chunks(tasks)) == mask:
        bad = np.count_nonzero((bits & mask) == mask)
        raise CodecError("arrays.values", expected, f"{bad} infinity or NaN bit patterns")


def dequantize(
    scales: np.ndarray,
    codes: np.ndarray,
    *,
    codec: str,
    block_size: int,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Return ``code * (scale / levels)`` as float32, the inverse of quantize().

    ``codes`` are int8 for q8 and packed bytes for q4, whose code count is ``out.size``
    or, without ``out``, twice the bytes. Raises CodecError (field ``arrays.codes``) for
    a code that quantize() never writes: -128 for q8, -8 for q4.
    """
    kernels = _kernels()
    if out is not None:
        count = out.size
    elif codec == "q8":
        count = codes.size
    else:
        count = 2 * codes.size
    result = np.empty(count, dtype=np.float32) if out is None else out
    shift = block_size.bit_length() - 1

    tasks = []
    for start, stop in chunk_bounds(count, align=max(block_size, 64)):
        chunk_scales = scales[start // block_size : -(-stop // block_size)]
        arguments: tuple[Any, ...]
        if codec == "q8":
            arguments = (codes[start:stop], chunk_scales, shift, _LEVELS["q8"], result[start:stop])
            tasks.append(functools.partial(kernels.dequantize_q8, *arguments))
        else:
            arguments = (codes[start // 2 : -(-stop // 2)], chunk_scales, shift, result[start:stop])
            tasks.append(functools.partial(kernels.dequantize_q4, *arguments))
    smallest = min(int(code) for code in run_chunks(tasks))
    if codec == "q8" and smallest < -127:
        raise CodecError("arrays.codes", "codes from -127 to 127", "code -128")
    if codec == "q4" and smallest < -7:
        raise CodecError("arrays.codes", "4-bit codes from -7 to 7", "code -8")
    return result


def _expand_sparse(indices: np.ndarray, values: np.ndarray, result: np.ndarray) -> None:
    """Write ``values`` at ``indices`` of ``result`` and zeros elsewhere, in one pass split over the codec threads."""
    kernels = _kernels()
    bounds = chunk_bounds(result.size)
    firsts = [0, indices.size]
    if len(bounds) > 1:
        # Several chunks mean at least MIN_PARALLEL_VALUES values, so every edge fits the index dtype.
        edges = np.array([start for start, _ in bounds] + [result.size], dtype=indices.dtype)
        firsts = np.searchsorted(indices, edges).tolist()
    tasks = []
    for chunk, (start, stop) in enumerate(bounds):
        first, last = firsts[chunk], firsts[chunk + 1]
        arguments = (indices[first:last], values[first:last], start, result[start:stop])
        tasks.append(functools.partial(kernels.expand_sparse, *arguments))
    run_chunks(tasks)


def load_kernels() -> None:
    """Load the compiled codec kernels now rather than at the first encode or decode.

    The first load imports numba and reads the kernels from numba's cache, about 0.5 s
    (or compiles them, about 4 s, when the cache is empty). Services call this at start,
    so the cost does not land in their first round.
    """
    _kernels()


def _kernels() -> ModuleType:
    """Return schemas.codec_kernels, which imports numba, on first use."""
    from schemas import codec_kernels

    return codec_kernels


def _top_k_module() -> ModuleType:
    from schemas import top_k

    return top_k


# Error feedback


class ErrorFeedback:
    """Per-tensor residuals of lossy encoding, added back to the next round's update.

    Error feedback (Stich, Cordonnier and Jaggi, "Sparsified SGD with Memory", NeurIPS
    2018; Karimireddy et al., "Error Feedback Fixes SignSGD and other Gradient
    Compression Schemes", ICML 2019) makes biased compressors such as top-k converge:

    1. compensate(): add the stored residual to this round's update.
    2. Encode the compensated update and decode it again, as the receiver will.
    3. record(): store ``compensated - transmitted`` as the residual for the next round.

    Over any number of rounds, the transmitted values plus the final residual add up to
    the sum of the updates, up to float32 rounding. Residuals are float32.
    """

    def __init__(self) -> None:
        self._residuals: dict[str, np.ndarray] = {}

    def compensate(self, name: str, values: np.ndarray) -> np.ndarray:
        """Return ``values`` plus the residual stored for ``name`` (zero if none), as float32."""
        compensated = np.array(values, dtype=np.float32)
        residual = self._residuals.get(name)
        if residual is None:
            return compensated
        if residual.shape != compensated.shape:
            raise CheckpointError(
                f"error-feedback residual for {name!r} has shape {residual.shape}, but the update has shape "
                f"{compensated.shape}; the residuals belong to another model, so delete the error-feedback file"
            )
        compensated += residual
        return compensated

    def record(self, name: str, compensated: np.ndarray, transmitted: np.ndarray) -> None:
        """Store ``compensated - transmitted`` as the residual for ``name``.

        ``transmitted`` is the decoded value of what was sent, with the same shape.
        """
        if np.shape(compensated) != np.shape(transmitted):
            raise ValueError(
                f"compensated and transmitted values for {name!r} must have the same shape, "
                f"but got {np.shape(compensated)} and {np.shape(transmitted)}"
            )
        residual = np.empty(np.shape(compensated), dtype=np.float32)
        np.subtract(compensated, transmitted, out=residual, casting="same_kind")
        self._residuals[name] = residual

    def state(self) -> dict[str, np.ndarray]:
        """Return a copy of the residuals by tensor name."""
        return {name: residual.copy() for name, residual in self._residuals.items()}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace the residuals with float32 copies of ``state``."""
        residuals = {}
        for name, residual in state.items():
            if not isinstance(residual, np.ndarray) or residual.dtype.kind != "f":
                got = residual.dtype if isinstance(residual, np.ndarray) else type(residual).__name__
                raise CheckpointError(f"error-feedback residual {name!r} must be a float array, but got {got}")
            residuals[name] = np.array(residual, dtype=np.float32)
        self._residuals = residuals

    def save(self, path: Path) -> None:
        """Write the residuals to a safetensors file, replacing ``path`` atomically."""
        path = Path(path)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(handle)
        try:
            safetensors.numpy.save_file(self._residuals, temporary)
            with open(temporary, "rb") as written:
                os.fsync(written.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> ErrorFeedback:
        """Read residuals written by save(); a missing file gives empty residuals."""
        feedback = cls()
        path = Path(path)
        if not path.exists():
            return feedback
        try:
            state = safetensors.numpy.load_file(path)
        except (safetensors.SafetensorError, OSError) as error:
            raise CheckpointError(
                f"cannot read error-feedback residuals from {path}: {error}; "
                "delete the file to start again with empty residuals"
            ) from error
        feedback.load_state(state)
        return feedback
