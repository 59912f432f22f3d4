"""Conversions between torch tensors, numpy arrays and the tensors that travel.

A tensor travels either exactly, with the ``raw`` codec (every dtype of a state dict,
bfloat16 as uint16 bit patterns), or lossily with one of the update codecs in
``schemas.codecs``, which decode to float32.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import numpy as np
import torch

from fedmq.errors import CodecError
from schemas import codecs
from schemas.wire import RAW, RAW_PART_DTYPES, WireTensor

# torch dtype -> (wire dtype name, numpy dtype of the travelling part)
_TORCH_TO_WIRE: dict[torch.dtype, tuple[str, np.dtype]] = {
    dtype: (name, RAW_PART_DTYPES[name])
    for dtype, name in (
        (torch.float32, "float32"),
        (torch.float64, "float64"),
        (torch.float16, "float16"),
        (torch.bfloat16, "bfloat16"),
        (torch.int64, "int64"),
        (torch.int32, "int32"),
        (torch.int16, "int16"),
        (torch.int8, "int8"),
        (torch.uint8, "uint8"),
        (torch.bool, "bool"),
    )
}
WIRE_DTYPES: dict[str, np.dtype] = {name: part for name, part in _TORCH_TO_WIRE.values()}
_WIRE_TO_TORCH: dict[str, torch.dtype] = {name: dtype for dtype, (name, _) in _TORCH_TO_WIRE.items()}
FLOAT_DTYPES = frozenset({"float32", "float64", "float16", "bfloat16"})


def wire_dtype(tensor: torch.Tensor) -> str:
    """Return the wire name of a tensor's dtype, raising CodecError for dtypes that cannot travel."""
    try:
        return _TORCH_TO_WIRE[tensor.dtype][0]
    except KeyError:
        raise CodecError("dtype", f"one of {sorted(WIRE_DTYPES)}", str(tensor.dtype)) from None


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """Return a numpy view of a CPU tensor's data, bfloat16 as uint16 bit patterns."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    wire_dtype(tensor)
    return tensor.numpy()


def to_torch(array: np.ndarray, dtype: str) -> torch.Tensor:
    """Return a new torch tensor of wire dtype ``dtype`` holding a copy of ``array``.

    The copy makes the tensor writable and independent of the received message body.
    """
    if dtype not in _WIRE_TO_TORCH:
        raise CodecError("dtype", f"one of {sorted(WIRE_DTYPES)}", dtype)
    copied = np.array(array, dtype=WIRE_DTYPES[dtype], copy=True)
    if dtype == "bfloat16":
        return torch.from_numpy(copied.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(copied)


def as_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    """Return values of wire dtype ``dtype`` as float32, viewing instead of copying where possible."""
    if dtype == "bfloat16":
        return codecs.float32_from_bf16(array)
    if array.dtype == np.float32:
        return array
    return array.astype(np.float32)


def encode_raw(array: np.ndarray, dtype: str) -> WireTensor:
    """Wrap an array for exact transport; ``array`` must already hold the part dtype of ``dtype``."""
    if dtype not in WIRE_DTYPES:
        raise CodecError("dtype", f"one of {sorted(WIRE_DTYPES)}", dtype)
    if array.dtype != WIRE_DTYPES[dtype]:
        raise CodecError("values", f"a {WIRE_DTYPES[dtype]} array for dtype {dtype}", str(array.dtype))
    return WireTensor(codec=RAW, shape=tuple(array.shape), dtype=dtype, arrays={"values": array.reshape(-1)})


def check_layout(tensor: WireTensor, *, name: str = "tensor") -> None:
    """Check that a travelling tensor's parts have the dtypes and lengths its codec and shape imply.

    Reads no tensor values, so it costs nothing per element. ``raw`` tensors need one
    part ``values`` of the dtype's part dtype with one element per entry of the shape.
    Update codecs need a floating ``dtype``, valid params and exactly the parts that
    ``codecs.part_layout`` lists. Raises CodecError naming the tensor and the field.
    """
    prefix = f"tensors.{name}."
    if tensor.codec == RAW:
        if tensor.dtype not in WIRE_DTYPES:
            raise CodecError(prefix + "dtype", f"one of {sorted(WIRE_DTYPES)}", tensor.dtype)
        layout = {"values": (WIRE_DTYPES[tensor.dtype], math.prod(tensor.shape))}
    else:
        if tensor.dtype not in FLOAT_DTYPES:
            raise CodecError(prefix + "dtype", f"one of {sorted(FLOAT_DTYPES)} for codec {tensor.codec!r}", tensor.dtype)
        try:
            layout = codecs.part_layout(tensor.codec, tensor.params, tensor.shape)
        except CodecError as exc:
            raise CodecError(prefix + exc.field, exc.expected, exc.got) from exc

    if set(tensor.arrays) != set(layout):
        raise CodecError(prefix + "parts", f"the parts {sorted(layout)}", sorted(tensor.arrays))
    for part_name, (part_dtype, count) in layout.items():
        part = tensor.arrays[part_name]
        if part.dtype != part_dtype:
            raise CodecError(f"{prefix}parts.{part_name}.dtype", part_dtype.name, part.dtype.name)
        if part.size != count:
            raise CodecError(
                f"{prefix}parts.{part_name}.count", f"{count} elements for shape {list(tensor.shape)}", part.size
            )


def decode(tensor: WireTensor, *, name: str = "tensor") -> np.ndarray:
    """Decode a travelling tensor into an array of its shape.

    ``raw`` tensors come back in their part dtype as a view of the received bytes.
    Every other codec comes back as float32. Raises CodecError naming the tensor.
    """
    if tensor.codec != RAW:
        try:
            return codecs.decode(tensor.codec, tensor.params, tensor.shape, tensor.arrays)
        except CodecError as exc:
            raise CodecError(f"tensors.{name}.{exc.field}", exc.expected, exc.got) from exc

    check_layout(tensor, name=name)
    return tensor.arrays["values"].reshape(tensor.shape)


def encode_state(state: Mapping[str, torch.Tensor]) -> dict[str, WireTensor]:
    """Encode a state dict exactly, every dtype kept."""
    return {name: encode_raw(to_numpy(tensor), wire_dtype(tensor)) for name, tensor in state.items()}


def decode_state(tensors: Mapping[str, WireTensor]) -> dict[str, torch.Tensor]:
    """Decode exactly encoded tensors into a state dict of new torch tensors."""
    state = {}
    for name, tensor in tensors.items():
        array = decode(tensor, name=name)
        dtype = tensor.dtype if tensor.codec == RAW else "float32"
        state[name] = to_torch(array, dtype)
    return state


def read_only_torch(array: np.ndarray) -> torch.Tensor:
    """Return a torch tensor that shares memory with a read-only array, for reading only.

    torch warns when it wraps a non-writable buffer, because writes would be
    undefined. Callers use the result only as an operand, never as an output.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)
