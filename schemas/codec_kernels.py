"""Compiled loops behind the update codecs, each one pass over its input.

Every loop here fuses the value checks of a codec into its conversion, so encoding and
decoding read each value once. numba compiles them, for the argument types listed at
each one, when this module is imported; ``schemas.codecs`` imports it on its first
encode or decode. The loops release the interpreter lock (``nogil``) and trust their
callers: lengths, block sizes and top-k indices are validated in ``schemas.codecs``
before any loop runs, because numba does not check array bounds.

Element operations are written as LLVM intrinsics below instead of numpy scalar
arithmetic. numba types arithmetic on 32-bit integers as 64-bit, which halves the
values per vector instruction in the loops that LLVM vectorizes.

Compiled code is cached in ``NUMBA_CACHE_DIR`` when set, else next to this file in
``__pycache__``, else in numba's user-wide cache folder. Where none can be written,
each process compiles the loops again (about 4 s on a 2-core x86-64 VM), without a
warning.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic as numba_intrinsic

# Typed as Any: numba's own annotations describe the decorator, not the functions it returns.
intrinsic: Any = numba_intrinsic

_INT32 = ir.IntType(32)
_INT16 = ir.IntType(16)
_INT8 = ir.IntType(8)
_FLOAT32 = ir.FloatType()

# Bit patterns of float32 values.
_SIGN_MASK = 0x80000000
_MAGNITUDE_MASK = 0x7FFFFFFF
FLOAT32_EXPONENT_MASK = 0x7F800000
FLOAT16_EXPONENT_MASK = 0x7C00
BFLOAT16_EXPONENT_MASK = 0x7F80
_FLOAT16_MAX_BITS = 0x477FE000  # 65504.0, the largest finite float16, as float32
_FLOAT16_MIN_NORMAL_BITS = 0x38800000  # 2**-14 as float32

# The uniform variates of stochastic rounding have 24 bits: u = h / 2**24 for an integer h.
UNIFORM_BITS = 24
# Values per tile of the quantization loops. A tile shares one scale when the block size
# is at least this long, which lets LLVM vectorize the loop over the tile.
_TILE = 64
# Values per step of the scale-then-quantize loop. The scale pass leaves this many
# values in the L1 or L2 cache for the code pass that follows.
_SPAN = 8192
# Values per block of the top-k candidate scan, whose byte flags stay in the L1 cache.
_SCAN = 4096
_RADIX_BITS = 11


def _jit(*signatures: Any) -> Callable[[Callable[..., Any]], Any]:
    """Compile a function with numba: no interpreter lock, numpy's error model, cached where possible.

    With signatures, every one of them compiles (or loads from the cache) when this
    module is imported, and calls with other argument types raise TypeError. Without,
    the function compiles for the types of the kernels that call it.
    """

    def compile_function(function: Callable[..., Any]) -> Any:
        options: dict[str, Any] = {"nogil": True, "error_model": "numpy"}
        compile_list = list(signatures) or None
        try:
            return numba.njit(compile_list, cache=True, **options)(function)
        except RuntimeError:
            # numba raises RuntimeError ("no locator available") when neither the
            # __pycache__ folder beside this file nor its user-wide cache can be written.
            return numba.njit(compile_list, cache=False, **options)(function)

    return compile_function


def _reads(dtype: types.Type) -> types.Array:
    """Return the numba type of a 1-D C-contiguous array argument that is only read; writable arrays pass too."""
    return types.Array(dtype, 1, "C", readonly=True)


def _writes(dtype: types.Type) -> types.Array:
    return types.Array(dtype, 1, "C")


_UNSIGNED_TYPES = (types.uint16, types.uint32, types.uint64)


def _const32(value: int) -> ir.Constant:
    return ir.Constant(_INT32, value & 0xFFFFFFFF)


# Element operations


@intrinsic
def _and_bits(typingctx: Any, value: types.Type, mask: types.Type) -> Any:
    """Return ``value & mask`` in the width of ``value``."""
    if not isinstance(value, types.Integer) or not isinstance(mask, types.Integer):
        return None
    signature = value(value, mask)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        return builder.and_(args[0], context.cast(builder, args[1], sig.args[1], sig.args[0]))

    return signature, codegen


@intrinsic
def _float_from_bits(typingctx: Any, bits: types.Type) -> Any:
    """Return the float32 whose bit pattern is the uint32 ``bits``."""
    signature = types.float32(types.uint32)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        return builder.bitcast(args[0], _FLOAT32)

    return signature, codegen


@intrinsic
def _float16_bits(typingctx: Any, bits: types.Type) -> Any:
    """Round float32 ``bits`` to float16 bits, to nearest even, clipped to +-65504.

    Magnitudes below 2**-14 become float16 subnormals through a float32 addition:
    ``0.5 + x`` rounds x to a multiple of 2**-24, the float16 subnormal step, and the
    difference of the bit patterns is that multiple. Larger ones drop 13 mantissa bits
    with the exponent rebiased from 127 to 15, rounding to nearest even. Infinity and
    NaN come out as +-65504, so callers check the exponents of the input.
    """
    signature = types.uint16(types.uint32)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        value = args[0]
        magnitude = builder.and_(value, _const32(_MAGNITUDE_MASK))
        below_max = builder.icmp_unsigned("<", magnitude, _const32(_FLOAT16_MAX_BITS))
        magnitude = builder.select(below_max, magnitude, _const32(_FLOAT16_MAX_BITS))
        sign = builder.and_(builder.lshr(value, _const32(16)), _const32(0x8000))

        shifted = builder.fadd(builder.bitcast(magnitude, _FLOAT32), ir.Constant(_FLOAT32, 0.5))
        subnormal = builder.sub(builder.bitcast(shifted, _INT32), _const32(0x3F000000))

        odd = builder.and_(builder.lshr(magnitude, _const32(13)), _const32(1))
        rebiased = builder.add(magnitude, _const32(0xFFF - ((127 - 15) << 23)))
        normal = builder.lshr(builder.add(rebiased, odd), _const32(13))

        is_subnormal = builder.icmp_unsigned("<", magnitude, _const32(_FLOAT16_MIN_NORMAL_BITS))
        half = builder.select(is_subnormal, subnormal, normal)
        return builder.trunc(builder.or_(half, sign), _INT16)

    return signature, codegen


@intrinsic
def _float_from_float16_bits(typingctx: Any, half: types.Type) -> Any:
    """Return the float32 value of float16 bits, exactly.

    Subnormals convert through an integer to float conversion, so the result does not
    depend on the denormals-are-zero flag of the thread. Infinity and NaN patterns,
    which callers reject by their exponents, give finite values.
    """
    signature = types.float32(types.uint16)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        value = builder.zext(args[0], _INT32)
        magnitude = builder.and_(value, _const32(0x7FFF))
        sign = builder.shl(builder.and_(value, _const32(0x8000)), _const32(16))
        normal = builder.add(builder.shl(magnitude, _const32(13)), _const32((127 - 15) << 23))
        scaled = builder.fmul(builder.sitofp(magnitude, _FLOAT32), ir.Constant(_FLOAT32, 2.0**-24))
        subnormal = builder.bitcast(scaled, _INT32)
        is_subnormal = builder.icmp_unsigned("<", magnitude, _const32(0x0400))
        bits = builder.or_(builder.select(is_subnormal, subnormal, normal), sign)
        return builder.bitcast(bits, _FLOAT32)

    return signature, codegen


@intrinsic
def _bfloat16_bits(typingctx: Any, bits: types.Type) -> Any:
    """Round float32 ``bits`` to bfloat16 bits, to nearest even, clipped to the largest finite bfloat16.

    Adding 0x7FFF plus the lowest kept bit carries into bit 16 exactly when the dropped
    half-word is above one half, or equal to one half with an odd kept part. A result
    with an all-ones exponent comes from a finite value that rounded up, or from
    infinity or NaN, which callers reject by the exponents of the input.
    """
    signature = types.uint16(types.uint32)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        value = args[0]
        odd = builder.and_(builder.lshr(value, _const32(16)), _const32(1))
        rounded = builder.lshr(builder.add(builder.add(value, _const32(0x7FFF)), odd), _const32(16))
        exponent = builder.and_(rounded, _const32(BFLOAT16_EXPONENT_MASK))
        overflow = builder.icmp_unsigned("==", exponent, _const32(BFLOAT16_EXPONENT_MASK))
        largest = builder.or_(builder.and_(rounded, _const32(0x8000)), _const32(0x7F7F))
        return builder.trunc(builder.select(overflow, largest, rounded), _INT16)

    return signature, codegen


@intrinsic
def _float_from_bfloat16_bits(typingctx: Any, half: types.Type) -> Any:
    """Return the float32 value of bfloat16 bits, which are its upper half-word."""
    signature = types.float32(types.uint16)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        return builder.bitcast(builder.shl(builder.zext(args[0], _INT32), _const32(16)), _FLOAT32)

    return signature, codegen


def _mix32(builder: ir.IRBuilder, value: ir.Value) -> ir.Value:
    """Apply fmix32, the 32-bit finalizer of MurmurHash3 (Appleby, smhasher): a bijection that mixes every input bit."""
    value = builder.xor(value, builder.lshr(value, _const32(16)))
    value = builder.mul(value, _const32(0x85EBCA6B))
    value = builder.xor(value, builder.lshr(value, _const32(13)))
    value = builder.mul(value, _const32(0xC2B2AE35))
    return builder.xor(value, builder.lshr(value, _const32(16)))


@intrinsic
def _stochastic_code(
    typingctx: Any, bits: types.Type, scale: types.Type, levels: types.Type, index: types.Type, seed: types.Type
) -> Any:
    """Quantize one float32 (as ``bits``) to ``sign(x) * floor(|x| / scale * levels + u)``.

    ``u`` is ``h / 2**24`` where h is the top 24 bits of a hash of the value's index in
    its tensor (its low 32 bits) and the per-call ``seed``. The index, times the 32-bit
    golden ratio, plus the seed goes through a bijective mix, so over a uniformly drawn
    seed h is uniform for every index. Rounding up when ``u < frac`` then happens with probability
    ``ceil(frac * 2**24) / 2**24``: exactly ``frac`` when ``|x| / scale * levels`` is at
    least 1 (its fraction is then a multiple of 2**-23), and at most 2**-24 more below 1.

    Requires ``0 <= |x| <= scale`` with ``scale > 0``; the code is then in [-levels, levels],
    because ``|x| / scale`` rounds to at most 1.
    """
    signature = types.int32(types.uint32, types.float32, types.float32, types.int64, types.uint32)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        value, scale_value, levels_value, index_value, seed_value = args
        magnitude = builder.bitcast(builder.and_(value, _const32(_MAGNITUDE_MASK)), _FLOAT32)
        scaled = builder.fmul(builder.fdiv(magnitude, scale_value), levels_value)
        floor = builder.module.declare_intrinsic("llvm.floor", [_FLOAT32])
        whole = builder.call(floor, [scaled])
        fraction = builder.fsub(scaled, whole)

        counter = builder.add(builder.mul(builder.trunc(index_value, _INT32), _const32(0x9E3779B9)), seed_value)
        hashed = _mix32(builder, counter)
        variate = builder.fmul(
            builder.sitofp(builder.lshr(hashed, _const32(32 - UNIFORM_BITS)), _FLOAT32),
            ir.Constant(_FLOAT32, 2.0**-UNIFORM_BITS),
        )
        round_up = builder.zext(builder.fcmp_ordered("<", variate, fraction), _INT32)
        code = builder.add(builder.fptosi(whole, _INT32), round_up)
        negative = builder.icmp_unsigned(">=", value, _const32(_SIGN_MASK))
        return builder.select(negative, builder.neg(code), code)

    return signature, codegen


@intrinsic
def _pack_nibbles(typingctx: Any, low: types.Type, high: types.Type) -> Any:
    """Return one byte of two 4-bit two's complement codes, ``low`` in the low nibble."""
    signature = types.uint8(types.int32, types.int32)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        low_bits = builder.and_(args[0], _const32(0x0F))
        high_bits = builder.shl(builder.and_(args[1], _const32(0x0F)), _const32(4))
        return builder.trunc(builder.or_(low_bits, high_bits), _INT8)

    return signature, codegen


@intrinsic
def _low_nibble(typingctx: Any, packed: types.Type) -> Any:
    """Return the sign-extended code in the low nibble of a byte."""
    signature = types.int32(types.uint8)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        shifted = builder.ashr(builder.shl(args[0], ir.Constant(_INT8, 4)), ir.Constant(_INT8, 4))
        return builder.sext(shifted, _INT32)

    return signature, codegen


@intrinsic
def _high_nibble(typingctx: Any, packed: types.Type) -> Any:
    """Return the sign-extended code in the high nibble of a byte."""
    signature = types.int32(types.uint8)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        return builder.sext(builder.ashr(args[0], ir.Constant(_INT8, 4)), _INT32)

    return signature, codegen


@intrinsic
def _trailing_zeros(typingctx: Any, word: types.Type) -> Any:
    """Return the number of trailing zero bits of a nonzero uint64."""
    signature = types.int64(types.uint64)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        int64 = ir.IntType(64)
        function_type = ir.FunctionType(int64, [int64, ir.IntType(1)])
        function = builder.module.globals.get("llvm.cttz.i64") or ir.Function(builder.module, function_type, "llvm.cttz.i64")
        return builder.call(function, [args[0], ir.Constant(ir.IntType(1), 1)])

    return signature, codegen


# Loops index arrays from 0 and slice where a loop starts elsewhere. LLVM cannot prove
# that an index such as start + i is non-negative, so it keeps numba's wraparound of
# negative indices, which turns vector loads and stores into gathers and scatters.


@_jit(*[dtype(_reads(dtype), dtype) for dtype in _UNSIGNED_TYPES])
def max_masked(bits: np.ndarray, mask: Any) -> Any:
    """Return the largest ``bits & mask`` of an unsigned integer array (0 when empty).

    ``mask`` is a numpy scalar of the dtype of ``bits``, which is also the result's dtype.
    """
    largest = _and_bits(mask, 0)
    for i in range(bits.size):
        largest = max(largest, _and_bits(bits[i], mask))
    return largest


@_jit(types.uint32(_reads(types.uint32), _writes(types.uint16)))
def float16_from_float32(bits: np.ndarray, out: np.ndarray) -> Any:
    """Write float16 bits of float32 ``bits`` to ``out``; return the largest input exponent field."""
    largest = np.uint32(0)
    for i in range(bits.size):
        out[i] = _float16_bits(bits[i])
        largest = max(largest, _and_bits(bits[i], FLOAT32_EXPONENT_MASK))
    return largest


@_jit(types.uint32(_reads(types.uint32), _writes(types.uint16)))
def bfloat16_from_float32(bits: np.ndarray, out: np.ndarray) -> Any:
    """Write bfloat16 bits of float32 ``bits`` to ``out``; return the largest input exponent field."""
    largest = np.uint32(0)
    for i in range(bits.size):
        out[i] = _bfloat16_bits(bits[i])
        largest = max(largest, _and_bits(bits[i], FLOAT32_EXPONENT_MASK))
    return largest


@_jit(types.uint16(_reads(types.uint16), _writes(types.float32)))
def float32_from_float16(half: np.ndarray, out: np.ndarray) -> Any:
    """Write float32 values of float16 bits to ``out``; return the largest input exponent field."""
    largest = np.uint16(0)
    for i in range(half.size):
        out[i] = _float_from_float16_bits(half[i])
        largest = max(largest, _and_bits(half[i], FLOAT16_EXPONENT_MASK))
    return largest


@_jit(types.uint16(_reads(types.uint16), _writes(types.float32)))
def float32_from_bfloat16(half: np.ndarray, out: np.ndarray) -> Any:
    """Write float32 values of bfloat16 bits to ``out``; return the largest input exponent field."""
    largest = np.uint16(0)
    for i in range(half.size):
        out[i] = _float_from_bfloat16_bits(half[i])
        largest = max(largest, _and_bits(half[i], BFLOAT16_EXPONENT_MASK))
    return largest


# Quantization


@_jit()
def _block_scales(bits: np.ndarray, shift: int, scales: np.ndarray) -> Any:
    """Store the largest magnitude of each block of ``bits`` as its scale; return the largest magnitude bits."""
    block = 1 << shift
    count = bits.size
    largest = np.uint32(0)
    for block_index in range((count + block - 1) >> shift):
        block_bits = bits[block_index * block : min(count, (block_index + 1) * block)]
        magnitude = np.uint32(0)
        for i in range(block_bits.size):
            magnitude = max(magnitude, _and_bits(block_bits[i], _MAGNITUDE_MASK))
        scales[block_index] = _float_from_bits(magnitude)
        largest = max(largest, magnitude)
    return largest


@_jit()
def _code_at(bits: np.ndarray, i: int, scales: np.ndarray, shift: int, levels: Any, offset: int, seed: Any) -> Any:
    scale = scales[i >> shift]
    code = _stochastic_code(bits[i], scale, levels, offset + i, seed)
    return code if scale > 0 else np.int32(0)


@_jit(
    types.uint32(
        _reads(types.uint32), types.int64, types.int64, types.uint32, types.int64, _writes(types.float32), _writes(types.int8)
    )
)
def quantize_q8(
    bits: np.ndarray, shift: int, levels: int, seed: Any, offset: int, scales: np.ndarray, codes: np.ndarray
) -> Any:
    """Quantize float32 ``bits`` in blocks of ``2**shift`` to int8 ``codes`` and float32 ``scales``.

    ``offset`` is the index of ``bits[0]`` in its tensor, the counter of the hash that
    draws each value's uniform variate. Returns the largest magnitude bits, at or
    above 0x7F800000 when a value is infinite or NaN.
    """
    count = bits.size
    block = 1 << shift
    span = max(block, _SPAN)
    level = np.float32(levels)
    largest = np.uint32(0)
    for span_index in range((count + span - 1) // span):
        start = span_index * span
        stop = min(count, start + span)
        span_bits = bits[start:stop]
        span_codes = codes[start:stop]
        span_scales = scales[start >> shift : (stop + block - 1) >> shift]
        largest = max(largest, _block_scales(span_bits, shift, span_scales))

        done = 0
        if block >= _TILE:
            done = span_bits.size // _TILE * _TILE
            for tile in range(span_bits.size // _TILE):
                base = tile * _TILE
                scale = span_scales[base >> shift]
                positive = scale > 0
                for j in range(_TILE):
                    code = _stochastic_code(span_bits[base + j], scale, level, offset + start + base + j, seed)
                    span_codes[base + j] = code if positive else np.int32(0)
        for i in range(span_bits.size - done):
            span_codes[done + i] = _code_at(span_bits, done + i, span_scales, shift, level, offset + start, seed)
    return largest


@_jit(
    types.uint32(_reads(types.uint32), types.int64, types.uint32, types.int64, _writes(types.float32), _writes(types.uint8))
)
def quantize_q4(bits: np.ndarray, shift: int, seed: Any, offset: int, scales: np.ndarray, packed: np.ndarray) -> Any:
    """Quantize float32 ``bits`` like quantize_q8 with 7 levels, two codes per byte of ``packed``.

    Code ``2i`` goes to the low nibble of byte ``i``. After an odd count the last high
    nibble is zero.
    """
    count = bits.size
    block = 1 << shift
    span = max(block, _SPAN)
    level = np.float32(7)
    largest = np.uint32(0)
    for span_index in range((count + span - 1) // span):
        start = span_index * span
        stop = min(count, start + span)
        span_bits = bits[start:stop]
        span_packed = packed[start >> 1 : (stop + 1) >> 1]
        span_scales = scales[start >> shift : (stop + block - 1) >> shift]
        largest = max(largest, _block_scales(span_bits, shift, span_scales))

        done = 0
        if block >= _TILE:
            done = span_bits.size // _TILE * _TILE
            for tile in range(span_bits.size // _TILE):
                base = tile * _TILE
                scale = span_scales[base >> shift]
                positive = scale > 0
                for j in range(_TILE // 2):
                    first = base + 2 * j
                    low = _stochastic_code(span_bits[first], scale, level, offset + start + first, seed)
                    high = _stochastic_code(span_bits[first + 1], scale, level, offset + start + first + 1, seed)
                    span_packed[(base >> 1) + j] = _pack_nibbles(low, high) if positive else np.uint8(0)
        key = offset + start
        for pair in range((span_bits.size - done) // 2):
            first = done + 2 * pair
            low = _code_at(span_bits, first, span_scales, shift, level, key, seed)
            high = _code_at(span_bits, first + 1, span_scales, shift, level, key, seed)
            span_packed[first >> 1] = _pack_nibbles(low, high)
        if (span_bits.size - done) % 2:
            last = span_bits.size - 1
            span_packed[last >> 1] = _pack_nibbles(_code_at(span_bits, last, span_scales, shift, level, key, seed), np.int32(0))
    return largest


@_jit(
    types.int8(_reads(types.int8), _reads(types.float32), types.int64, types.int64, _writes(types.float32))
)
def dequantize_q8(codes: np.ndarray, scales: np.ndarray, shift: int, levels: int, out: np.ndarray) -> Any:
    """Write ``code * (scale / levels)`` as float32 to ``out``; return the smallest code (0 when empty)."""
    count = codes.size
    block = 1 << shift
    level = np.float32(levels)
    smallest = np.int8(0)
    done = 0
    if block >= _TILE:
        for tile in range(count // _TILE):
            base = tile * _TILE
            step = scales[base >> shift] / level
            for j in range(_TILE):
                code = codes[base + j]
                smallest = min(smallest, code)
                out[base + j] = np.float32(code) * step
        done = count // _TILE * _TILE
    for i in range(count - done):
        code = codes[done + i]
        smallest = min(smallest, code)
        out[done + i] = np.float32(code) * (scales[(done + i) >> shift] / level)
    return smallest


@_jit(
    types.int32(_reads(types.uint8), _reads(types.float32), types.int64, _writes(types.float32))
)
def dequantize_q4(packed: np.ndarray, scales: np.ndarray, shift: int, out: np.ndarray) -> Any:
    """Write the codes packed two per byte times ``scale / 7`` to ``out``; return the smallest code.

    ``out.size`` is the number of codes. With an odd count the last high nibble is not
    read. The smallest code is -8 exactly when a nibble contains 0x8.
    """
    count = out.size
    block = 1 << shift
    level = np.float32(7)
    smallest = np.int32(0)
    done = 0
    if block >= _TILE:
        for tile in range(count // _TILE):
            base = tile * _TILE
            step = scales[base >> shift] / level
            for j in range(_TILE // 2):
                byte = packed[(base >> 1) + j]
                low = _low_nibble(byte)
                high = _high_nibble(byte)
                smallest = min(smallest, min(low, high))
                out[base + 2 * j] = np.float32(low) * step
                out[base + 2 * j + 1] = np.float32(high) * step
        done = count // _TILE * _TILE
    for i in range(count - done):
        index = done + i
        byte = packed[index >> 1]
        code = _high_nibble(byte) if index & 1 else _low_nibble(byte)
        smallest = min(smallest, code)
        out[index] = np.float32(code) * (scales[index >> shift] / level)
    return smallest


# Top-k selection and expansion


@_jit(_writes(types.uint32)(_reads(types.uint32), types.int64, types.int64))
def sample_magnitudes(bits: np.ndarray, runs: int, run_length: int) -> Any:
    """Return the magnitude bits of ``runs`` runs of consecutive values spread evenly over ``bits``."""
    count = bits.size
    sample = np.empty(runs * run_length, dtype=np.uint32)
    for run in range(runs):
        first = run * (count - run_length) // max(1, runs - 1) if runs > 1 else 0
        for j in range(run_length):
            sample[run * run_length + j] = _and_bits(bits[first + j], _MAGNITUDE_MASK)
    return sample


@_jit(
    types.Tuple((types.int64, types.uint32))(
        _reads(types.uint32), types.int64, types.int64, _writes(types.int64), _writes(types.uint32)
    )
)
def collect_candidates(
    bits: np.ndarray, threshold: int, offset: int, candidate_indices: np.ndarray, candidate_bits: np.ndarray
) -> Any:
    """Store, in order, the index and bits of every value whose magnitude bits reach ``threshold``.

    Stores at most ``candidate_indices.size`` of them. Returns the number found, which
    may exceed that capacity, and the largest magnitude bits of all values.

    One vectorized loop compares each block of values and writes a byte flag per value.
    The flags are then read eight at a time, so only the blocks and words with a
    candidate cost more than the comparison.
    """
    count = bits.size
    capacity = candidate_indices.size
    limit = np.uint32(threshold)
    flags = np.zeros(_SCAN, dtype=np.uint8)
    words = flags.view(np.uint64)
    found = 0
    largest = np.uint32(0)
    for block in range((count + _SCAN - 1) // _SCAN):
        start = block * _SCAN
        block_bits = bits[start : min(count, start + _SCAN)]
        block_largest = np.uint32(0)
        for i in range(block_bits.size):
            magnitude = _and_bits(block_bits[i], _MAGNITUDE_MASK)
            block_largest = max(block_largest, magnitude)
            flags[i] = magnitude >= limit
        largest = max(largest, block_largest)
        if block_largest < limit:
            continue

        # A short last block leaves stale flags after its end, which must not count.
        for i in range(-block_bits.size % 8):
            flags[block_bits.size + i] = 0
        for word_index in range((block_bits.size + 7) // 8):
            word = words[word_index]
            while word:
                position = word_index * 8 + (_trailing_zeros(word) >> 3)
                if found < capacity:
                    candidate_indices[found] = offset + start + position
                    candidate_bits[found] = block_bits[position]
                found += 1
                word &= word - np.uint64(1)
    return found, largest


@_jit(types.Tuple((types.uint32, types.int64))(_reads(types.uint32), types.int64))
def kth_largest_magnitude(candidate_bits: np.ndarray, k: int) -> Any:
    """Return the k-th largest magnitude bits among ``candidate_bits`` and how many equal ones rank within k.

    A radix selection, 11 bits at a time from the top, so it never sorts.
    Requires ``1 <= k <= candidate_bits.size``.
    """
    digits = 1 << _RADIX_BITS
    prefix = np.uint32(0)
    known_bits = 0
    remaining = k
    counts = np.zeros(digits, dtype=np.int64)
    for shift in (32 - _RADIX_BITS, 32 - 2 * _RADIX_BITS, 0):
        width = 32 - shift - known_bits
        counts[:] = 0
        for i in range(candidate_bits.size):
            magnitude = _and_bits(candidate_bits[i], _MAGNITUDE_MASK)
            if known_bits == 0 or (magnitude >> (32 - known_bits)) == prefix:
                counts[(magnitude >> shift) & ((1 << width) - 1)] += 1
        digit = (1 << width) - 1
        while counts[digit] < remaining:
            remaining -= counts[digit]
            digit -= 1
        prefix = np.uint32((prefix << width) | digit)
        known_bits += width
    return prefix, remaining


@_jit(
    *[types.int64(_reads(types.int64), _reads(types.uint32), types.int64, types.int64, _writes(dtype), _writes(types.float32)) for dtype in _UNSIGNED_TYPES]
)
def emit_top_k(
    candidate_indices: np.ndarray,
    candidate_bits: np.ndarray,
    kth: int,
    ties: int,
    out_indices: np.ndarray,
    out_values: np.ndarray,
) -> Any:
    """Write, in candidate order, every candidate above ``kth`` and the first ``ties`` equal to it; return how many."""
    written = 0
    limit = np.uint32(kth)
    left = ties
    for i in range(candidate_bits.size):
        value = candidate_bits[i]
        magnitude = _and_bits(value, _MAGNITUDE_MASK)
        if magnitude > limit or (magnitude == limit and left > 0):
            if magnitude == limit:
                left -= 1
            out_indices[written] = candidate_indices[i]
            out_values[written] = _float_from_bits(value)
            written += 1
    return written


@_jit(*[types.none(_reads(dtype), _reads(types.float32), types.int64, _writes(types.float32)) for dtype in _UNSIGNED_TYPES])
def expand_sparse(indices: np.ndarray, values: np.ndarray, offset: int, out: np.ndarray) -> None:
    """Write zeros to ``out``, then ``values`` at ``indices - offset``.

    ``indices`` must lie within ``[offset, offset + out.size)``.
    """
    for i in range(out.size):
        out[i] = 0.0
    for j in range(indices.size):
        out[np.int64(indices[j]) - offset] = values[j]
