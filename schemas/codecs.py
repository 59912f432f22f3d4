"""Codecs that turn update tensors into compact numpy parts, as pure functions.

Every codec turns an array into named 1-D parts of a fixed dtype, which is what travels
in an update message. Values are flattened in C order before encoding.

    codec     parts (dtype, length for n values)                     bytes per value
    float32   values (float32, n)                                     4
    float16   values (float16, n)                                     2
    bfloat16  values (uint16 bfloat16 bit patterns, n)                2
    q8        scales (float32, ceil(n/B)), codes (int8, n)            about 1
    q4        scales (float32, ceil(n/B)), codes (uint8, ceil(n/2))   about 0.5
    topk      indices (uint32, k), values (float32, k)                8 per kept value
    topk_q8   indices (uint32, k), scales (float32, ceil(k/B)),       about 5 per kept value
              codes (int8, k)

B is ``block_size``. q4 packs two 4-bit two's complement codes per byte, the first in
the low nibble. The top-k codecs keep ``k = max(1, ceil(fraction * n))`` values (none
when n is 0) and decode to zero elsewhere. Their indices are strictly increasing, and
uint32 when n < 2**32, uint64 otherwise.

q8 and q4 use stochastic rounding with one scale per block, as in QSGD (Alistarh et al.,
"QSGD: Communication-Efficient SGD via Gradient Quantization and Encoding", NeurIPS 2017):
the scale is the block's maximum magnitude, a value x maps to
``sign(x) * floor(|x| / scale * s + u)`` with u uniform on [0, 1), and decodes to
``code * scale / s``, where s is 127 for q8 and 7 for q4. The decoded value is then
unbiased, and it differs from x by at most ``scale / s`` (both up to float32 rounding).

Encoding rejects non-finite input with CodecError, so that a diverged update is never
sent. Decoding validates the codec, its parameters, the shape and every part before it
allocates anything, and raises CodecError naming the invalid field.
"""

from __future__ import annotations

import math
import numbers
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy
import torch

from fedmq.errors import CheckpointError, CodecError, ConfigError

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
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise CodecError(field, "an integer power of two", value)
    size = int(value)
    if not MIN_BLOCK_SIZE <= size <= MAX_BLOCK_SIZE or size & (size - 1):
        raise CodecError(field, f"a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}", value)
    return size


def _check_fraction(value: object, field: str) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise CodecError(field, "a number with 0 < fraction <= 1", value)
    fraction = float(value)
    if not 0.0 < fraction <= 1.0:  # also rejects NaN
        raise CodecError(field, "a number with 0 < fraction <= 1", value)
    return fraction


def _check_params(codec: str, params: object) -> dict[str, int | float]:
    if not isinstance(params, Mapping):
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
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
        raise CodecError("shape", "a sequence of non-negative integers", shape)
    if len(shape) > MAX_NDIM:
        raise CodecError("shape", f"at most {MAX_NDIM} dimensions", shape)
    dims = []
    for dim in shape:
        if not isinstance(dim, numbers.Integral) or isinstance(dim, bool) or dim < 0:
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
    """Return the dtype of top-k indices into a tensor of ``count`` values."""
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
        parts[key] = part
    return parts


# Content checks on parts whose dtype and length are already valid


def all_finite(values: np.ndarray) -> bool:
    """Return whether every value of a float16, float32 or float64 array is finite.

    float32 and float64 take one BLAS pass: a dot product of the values with themselves
    is finite only if every value is, because each term is a square and NaN and
    infinity propagate. When the squares of large finite values overflow, the exact
    elementwise check decides. float16 values are checked on their exponent bits.
    """
    flat = values.reshape(-1)
    if flat.size == 0:
        return True
    if flat.dtype == np.float16:
        exponents = np.bitwise_and(flat.view(np.uint16), np.uint16(0x7C00))
        return int(exponents.max()) != 0x7C00
    if flat.dtype in (np.float32, np.float64):
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(np.dot(flat, flat)):
                return True
    return bool(np.isfinite(flat).all())


def _check_finite(part: np.ndarray, field: str) -> None:
    if not all_finite(part):
        raise CodecError(field, "finite values", f"{np.count_nonzero(~np.isfinite(part))} non-finite values")


def _check_scales(scales: np.ndarray, field: str) -> None:
    _check_finite(scales, field)
    if (scales < 0).any():
        raise CodecError(field, "non-negative scales", f"minimum {scales.min()}")


def _check_q8_codes(codes: np.ndarray, field: str) -> None:
    # encode() emits codes in [-127, 127], so -128 can only come from a corrupt message.
    if codes.size and codes.min() < -127:
        raise CodecError(field, "codes from -127 to 127", "code -128")


def _check_q4_codes(codes: np.ndarray, count: int, field: str) -> None:
    low = codes & 0x0F
    high = codes >> 4
    if count % 2:
        if high[-1] != 0:
            raise CodecError(field, "a zero padding nibble after an odd number of codes", f"nibble {high[-1]}")
        high = high[:-1]
    # 4-bit two's complement codes lie in [-7, 7], so the nibble 0x8 (-8) is invalid.
    if (low == 8).any() or (high == 8).any():
        raise CodecError(field, "4-bit codes from -7 to 7", "code -8")


def _check_indices(indices: np.ndarray, count: int, field: str) -> None:
    if indices.size == 0:
        return
    if not (indices[1:] > indices[:-1]).all():
        raise CodecError(field, "strictly increasing indices", "indices out of order or repeated")
    if int(indices[-1]) >= count:
        raise CodecError(field, f"indices below {count}", f"index {int(indices[-1])}")


def _check_contents(codec: str, parts: Mapping[str, np.ndarray], count: int) -> None:
    if codec in ("float32", "float16", "topk"):
        _check_finite(parts["values"], "arrays.values")
    elif codec == "bfloat16":
        # An all-ones exponent is an infinity or NaN, which encode() never emits.
        if ((parts["values"] & 0x7F80) == 0x7F80).any():
            raise CodecError("arrays.values", "finite bfloat16 values", "infinity or NaN bit patterns")
    if "scales" in parts:
        _check_scales(parts["scales"], "arrays.scales")
    if codec in ("q8", "topk_q8"):
        _check_q8_codes(parts["codes"], "arrays.codes")
    elif codec == "q4":
        _check_q4_codes(parts["codes"], count, "arrays.codes")
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
    supplies the stochastic rounding of q8, q4 and topk_q8.

    float16 clips values to +-65504 and bfloat16 to its largest finite value, so a finite
    input never turns into infinity. Values below their smallest subnormal become zero.
    The float32 part may share memory with ``values``. Raises CodecError when the values
    are not float16, float32 or float64, or when any value is NaN, infinite or beyond
    the float32 range.
    """
    if not isinstance(values, np.ndarray) or values.dtype not in (np.float16, np.float32, np.float64):
        got = f"dtype {values.dtype}" if isinstance(values, np.ndarray) else values
        raise CodecError("values", "a float16, float32 or float64 array", got)
    source_dtype = values.dtype.name if dtype is None else dtype
    if source_dtype not in SOURCE_DTYPES:
        raise CodecError("dtype", f"one of {', '.join(SOURCE_DTYPES)}", source_dtype)

    # Float64 values beyond the float32 range become infinite here and are rejected below.
    with np.errstate(over="ignore"):
        flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    if not all_finite(flat):
        bad = np.count_nonzero(~np.isfinite(flat))
        raise CodecError("values", "finite values within the float32 range", f"{bad} non-finite values")

    parts = _encode_flat(flat, spec, rng)
    return EncodedTensor(spec.name, spec.params(), tuple(values.shape), source_dtype, parts)


def _encode_flat(flat: np.ndarray, spec: CodecSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if spec.name == "float32":
        return {"values": flat}
    if spec.name == "float16":
        return {"values": _to_float16(flat)}
    if spec.name == "bfloat16":
        return {"values": _to_bfloat16_bits(flat)}
    if spec.name == "q8":
        scales, codes = quantize(flat, levels=_LEVELS["q8"], block_size=spec.block_size, rng=rng)
        return {"scales": scales, "codes": codes}
    if spec.name == "q4":
        scales, codes = quantize(flat, levels=_LEVELS["q4"], block_size=spec.block_size, rng=rng)
        return {"scales": scales, "codes": pack_nibbles(codes)}

    indices = top_k_indices(flat, topk_count(flat.size, spec.topk_fraction))
    kept = flat[indices]
    if spec.name == "topk":
        return {"indices": indices, "values": kept}
    scales, codes = quantize(kept, levels=_LEVELS["q8"], block_size=spec.block_size, rng=rng)
    return {"indices": indices, "scales": scales, "codes": codes}


def _to_float16(flat: np.ndarray) -> np.ndarray:
    # torch converts with the CPU's vector instructions, several times faster than numpy.
    # Finite values beyond +-65504 become infinite there, so those inputs are clipped first.
    half = _read_only_torch(flat).to(torch.float16).numpy()
    if all_finite(half):
        return half
    return torch.from_numpy(np.clip(flat, -FLOAT16_MAX, FLOAT16_MAX)).to(torch.float16).numpy()


def _to_bfloat16_bits(flat: np.ndarray) -> np.ndarray:
    # torch rounds float32 to bfloat16 to nearest even, as bf16_from_float32 does for
    # finite values. Values that round beyond the largest bfloat16 are clipped first.
    bits = _read_only_torch(flat).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    exponents = np.bitwise_and(bits, np.uint16(0x7F80))
    if bits.size == 0 or int(exponents.max()) != 0x7F80:
        return bits
    return bf16_from_float32(np.clip(flat, -BFLOAT16_MAX, BFLOAT16_MAX))


def quantize(
    flat: np.ndarray, *, levels: int, block_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Quantize finite float32 values to int8 codes in [-levels, levels] with one scale per block.

    Returns ``(scales, codes)``: the float32 maximum magnitude of each block of
    ``block_size`` values (the last block may be shorter) and the stochastically rounded
    codes, whose expected value is ``x / scale * levels``.
    """
    count = flat.size
    if count == 0:
        return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int8)

    magnitude = np.abs(flat)
    scales = np.maximum.reduceat(magnitude, np.arange(0, count, block_size))
    per_value = np.repeat(scales, block_size)[:count]

    # In a block whose scale is zero every magnitude is zero already, so the division
    # is skipped there. Elsewhere magnitude / scale <= 1 exactly, so codes never exceed levels.
    np.divide(magnitude, per_value, out=magnitude, where=per_value > 0)
    del per_value
    magnitude *= np.float32(levels)

    # Round up with probability equal to the fractional part, which makes the code unbiased.
    codes = np.floor(magnitude)
    magnitude -= codes
    codes += rng.random(count, dtype=np.float32) < magnitude
    del magnitude

    result = codes.astype(np.int8)
    np.negative(result, out=result, where=np.signbit(flat))
    return scales, result


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Pack int8 codes in [-8, 7] two per byte as 4-bit two's complement.

    Code ``2i`` goes to the low nibble of byte ``i`` and code ``2i + 1`` to its high
    nibble. After an odd number of codes, the last high nibble is zero.
    """
    nibbles = codes.view(np.uint8) & np.uint8(0x0F)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    pairs = nibbles.reshape(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << np.uint8(4))


def unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    """Unpack ``count`` int8 codes from bytes written by pack_nibbles()."""
    signed = packed.view(np.int8)
    codes = np.empty(2 * packed.size, dtype=np.int8)
    # Shifting the low nibble to the top and back sign-extends it, as does the
    # arithmetic right shift of the high nibble.
    codes[0::2] = (signed << np.int8(4)) >> np.int8(4)
    codes[1::2] = signed >> np.int8(4)
    return codes[:count]


def top_k_indices(flat: np.ndarray, k: int) -> np.ndarray:
    """Return the ascending indices of the ``k`` values of largest magnitude.

    Ties at the boundary are broken arbitrarily. The dtype is index_dtype(flat.size).
    """
    dtype = index_dtype(flat.size)
    if k >= flat.size:
        return np.arange(flat.size, dtype=dtype)
    if k == 0:
        return np.zeros(0, dtype=dtype)
    partitioned = np.argpartition(np.abs(flat), flat.size - k)
    kept = partitioned[flat.size - k :]
    kept.sort()
    return kept.astype(dtype)


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

    Everything that arrived in the message is validated before the output is allocated.
    The codec name must be known and the params must be exactly those it uses. The shape
    may have at most ``max_elements`` values. Each part must have its dtype and exact
    length, finite values and scales, and codes in range. Top-k indices must be strictly
    increasing and below the size. An invalid input raises CodecError naming the field,
    such as ``arrays.scales``.

    With ``out`` (a writable C-contiguous float32 array of ``shape``) the result is
    written there and ``out`` is returned. Without it, the float32 codec returns a view
    that shares memory with ``arrays["values"]``, so copy it before changing it in place.
    """
    codec = _check_name(codec, "codec")
    checked = _check_params(codec, params)
    dims, count = _check_shape(shape, max_elements)
    parts = _check_parts(arrays, _layout(codec, checked, count), codec)
    _check_contents(codec, parts, count)
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
    elif codec == "float16":
        # torch converts float16 with vector instructions, about twice as fast as numpy.
        torch.from_numpy(result).copy_(_read_only_torch(parts["values"]))
    elif codec == "bfloat16":
        bits = _read_only_torch(parts["values"].view(np.int16)).view(torch.bfloat16)
        torch.from_numpy(result).copy_(bits)
    elif codec in ("q8", "q4"):
        codes = parts["codes"] if codec == "q8" else unpack_nibbles(parts["codes"], result.size)
        dequantize(parts["scales"], codes, levels=_LEVELS[codec], block_size=int(params["block_size"]), out=result)
    else:
        result[...] = 0.0
        if codec == "topk":
            result[parts["indices"]] = parts["values"]
        else:
            kept = dequantize(parts["scales"], parts["codes"], levels=_LEVELS["q8"], block_size=int(params["block_size"]))
            result[parts["indices"]] = kept


def dequantize(
    scales: np.ndarray,
    codes: np.ndarray,
    *,
    levels: int,
    block_size: int,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Return ``code * scale / levels`` as float32, the inverse of quantize()."""
    count = codes.size
    result = np.empty(count, dtype=np.float32) if out is None else out
    steps = scales / np.float32(levels)
    # Whole blocks multiply against one step per row in a single pass, without
    # expanding the steps to one per value.
    whole = count // block_size * block_size
    if whole:
        np.multiply(
            codes[:whole].reshape(-1, block_size),
            steps[: whole // block_size, None],
            out=result[:whole].reshape(-1, block_size),
            dtype=np.float32,
        )
    if whole < count:
        np.multiply(codes[whole:], steps[-1], out=result[whole:], dtype=np.float32)
    return result


def _read_only_torch(array: np.ndarray) -> torch.Tensor:
    """Wrap an array, possibly read-only, as a torch tensor that is only ever read."""
    if array.flags.writeable:
        return torch.from_numpy(array)
    # torch warns on non-writable buffers because writes would be undefined; this one is an operand only.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


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
