"""The frame that carries every fedmq message: a msgpack header and a raw data region.

Layout of one frame::

    b"FMQ" | format byte | header length (uint32, big-endian) | msgpack header | data region

The header is a msgpack map with the message kind, the schema version, the kind's
fields, and one record per tensor. A tensor record names its codec and lists its
parts, and each part is ``[dtype, offset, count]`` into the data region. Parts start
at 64-byte-aligned offsets of the region. Decoding builds each part with
``numpy.frombuffer`` over the received bytes, so no tensor byte is copied unless the
data region was compressed with a lossless stage. Nothing in a frame is ever
unpickled.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from fedmq.errors import MessageError
from schemas import lossless

MAGIC = b"FMQ"
FORMAT_VERSION = 1
PREFIX = struct.Struct(">3sBI")
ALIGNMENT = 64

# Element types that may travel in a part. bfloat16 travels as uint16 bit patterns.
PART_DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(name)
    for name in (
        "float64",
        "float32",
        "float16",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint64",
        "uint32",
        "uint16",
        "uint8",
        "bool",
    )
}

# Limits on the msgpack header, checked by the unpacker before it allocates.
MAX_HEADER_BYTES = 16 * 1024 * 1024
# Data regions from this size on start at an ALIGNMENT boundary of the frame.
MIN_ALIGNED_BYTES = 64 * 1024
MAX_TENSORS = 100_000
MAX_NDIM = 32


@dataclass
class WireTensor:
    """One tensor as it travels: codec name and parameters, shape, dtype and raw parts."""

    codec: str
    shape: tuple[int, ...]
    dtype: str
    arrays: dict[str, np.ndarray]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(int(part.nbytes) for part in self.arrays.values())


@dataclass
class Frame:
    """A decoded frame: the message kind, schema version, fields and tensors by name."""

    kind: str
    schema: int
    fields: dict[str, Any]
    tensors: dict[str, WireTensor]


def _aligned(offset: int) -> int:
    return (offset + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def pack_frame(
    kind: str,
    schema: int,
    fields: Mapping[str, Any],
    tensors: Mapping[str, WireTensor],
    *,
    lossless_method: str = "none",
) -> bytes:
    """Serialize a message into one frame.

    ``lossless_method`` is ``"none"``, ``"zstd"`` or ``"auto"``. ``"auto"`` probes a
    sample of the data region and compresses only when that saves at least 10%.
    """
    records = []
    layout: list[tuple[int, np.ndarray]] = []
    offset = 0
    for name, tensor in tensors.items():
        parts = {}
        for part_name, array in tensor.arrays.items():
            flat = np.ascontiguousarray(array).reshape(-1)
            dtype_name = flat.dtype.name
            if dtype_name not in PART_DTYPES:
                raise MessageError(f"tensors.{name}.{part_name}.dtype", f"one of {sorted(PART_DTYPES)}", dtype_name)
            offset = _aligned(offset)
            parts[part_name] = [dtype_name, offset, int(flat.size)]
            layout.append((offset, flat))
            offset += flat.nbytes
        records.append(
            {
                "name": name,
                "codec": tensor.codec,
                "params": dict(tensor.params),
                "shape": [int(dim) for dim in tensor.shape],
                "dtype": tensor.dtype,
                "parts": parts,
            }
        )
    raw_size = offset

    # Data region: each part copied once into its aligned slot.
    region = bytearray(raw_size)
    region_view = memoryview(region)
    for part_offset, flat in layout:
        region_view[part_offset : part_offset + flat.nbytes] = flat.view(np.uint8).data
    payload: bytes | bytearray = region
    method = lossless_method
    if method == "auto":
        method = "zstd" if raw_size and lossless.pays_off(region_view) else "none"
    if method != "none":
        payload = lossless.compress(region_view, method)

    header = {
        "kind": kind,
        "schema": schema,
        "fields": dict(fields),
        "tensors": records,
        "lossless": method,
        "raw_bytes": raw_size,
        "data_bytes": len(payload),
    }
    # Small messages skip the alignment pad: their few bytes decode fast either way.
    header_bytes = _aligned_header(header) if raw_size >= MIN_ALIGNED_BYTES else msgpack.packb(header, use_bin_type=True)
    return b"".join((PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes)), header_bytes, payload))


def _aligned_header(header: dict[str, Any]) -> bytes:
    """Pack the header with a ``pad`` entry that makes the data region start at a multiple of ALIGNMENT.

    Message bodies start at 16-byte-aligned addresses in CPython, so parts decoded in
    place are then aligned for their dtype. Misaligned parts still decode, but numpy
    copies them before BLAS calls and vector loops run slower on them. Decoders ignore
    the ``pad`` entry.
    """
    unpadded: bytes = msgpack.packb({**header, "pad": b""}, use_bin_type=True)
    # msgpack writes a bin of up to 255 bytes with the same 2-byte prefix as an empty one,
    # so the pad adds exactly its own length.
    missing = -(PREFIX.size + len(unpadded)) % ALIGNMENT
    padded: bytes = msgpack.packb({**header, "pad": bytes(missing)}, use_bin_type=True)
    return padded


def unpack_frame(body: bytes | bytearray | memoryview, *, max_raw_bytes: int, max_elements: int) -> Frame:
    """Parse a frame and return views of its parts, checking every declared size.

    ``max_raw_bytes`` bounds the uncompressed data region and ``max_elements`` the
    elements of any one decoded tensor, so a hostile frame can neither make the
    decoder allocate more than that nor reach outside the body. Raises MessageError
    naming the field that is wrong.
    """
    view = memoryview(body).cast("B")
    if len(view) < PREFIX.size:
        raise MessageError("frame", f"at least {PREFIX.size} bytes", f"{len(view)} bytes")
    magic, version, header_length = PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise MessageError("frame.magic", repr(MAGIC), bytes(magic))
    if version != FORMAT_VERSION:
        raise MessageError("frame.format", f"format version {FORMAT_VERSION}", version)
    if header_length > min(MAX_HEADER_BYTES, len(view) - PREFIX.size):
        raise MessageError(
            "frame.header_length",
            f"at most {min(MAX_HEADER_BYTES, len(view) - PREFIX.size)} bytes",
            header_length,
        )
    header_end = PREFIX.size + header_length
    header = _unpack_header(view[PREFIX.size : header_end])

    kind = _require(header, "kind", str)
    schema = _require(header, "schema", int)
    fields = _require(header, "fields", dict)
    records = _require(header, "tensors", list)
    method = _require(header, "lossless", str)
    raw_bytes = _require(header, "raw_bytes", int)
    data_bytes = _require(header, "data_bytes", int)
    if len(records) > MAX_TENSORS:
        raise MessageError("tensors", f"at most {MAX_TENSORS} tensors", len(records))
    if method not in lossless.LOSSLESS_NAMES:
        raise MessageError("lossless", f"one of {list(lossless.LOSSLESS_NAMES)}", method)
    if data_bytes != len(view) - header_end:
        raise MessageError("data_bytes", f"the {len(view) - header_end} bytes after the header", data_bytes)
    if not 0 <= raw_bytes <= max_raw_bytes:
        raise MessageError("raw_bytes", f"between 0 and the limit of {max_raw_bytes} bytes", raw_bytes)

    data: bytes | memoryview = view[header_end:]
    if method == "none":
        if raw_bytes != data_bytes:
            raise MessageError("raw_bytes", f"{data_bytes} (equal to data_bytes without compression)", raw_bytes)
    else:
        data = lossless.decompress(data, method, expected_size=raw_bytes, max_size=max_raw_bytes)

    tensors: dict[str, WireTensor] = {}
    for index, record in enumerate(records):
        tensor_name, tensor = _parse_tensor(record, index, data, max_elements)
        if tensor_name in tensors:
            raise MessageError(f"tensors.{tensor_name}", "a name used once", "a duplicate name")
        tensors[tensor_name] = tensor
    return Frame(kind=kind, schema=schema, fields=fields, tensors=tensors)


def _unpack_header(raw: memoryview) -> dict[str, Any]:
    limit = len(raw)
    try:
        header = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            max_str_len=limit,
            max_bin_len=limit,
            max_array_len=limit,
            max_map_len=limit,
            max_ext_len=0,
        )
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as exc:
        raise MessageError("header", "a msgpack map", f"undecodable bytes ({exc})") from exc
    if not isinstance(header, dict):
        raise MessageError("header", "a msgpack map", header)
    return header


def _require(mapping: Mapping[str, Any], key: str, kind: type, prefix: str = "") -> Any:
    name = f"{prefix}{key}"
    if key not in mapping:
        raise MessageError(name, f"a {kind.__name__}", "nothing (the field is missing)")
    value = mapping[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise MessageError(name, "an int", value)
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise MessageError(name, "a number", value)
    if kind not in (int, float) and not isinstance(value, kind):
        raise MessageError(name, f"a {kind.__name__}", value)
    return value


def _parse_tensor(
    record: Any, index: int, data: bytes | memoryview, max_elements: int
) -> tuple[str, WireTensor]:
    if not isinstance(record, dict):
        raise MessageError(f"tensors[{index}]", "a map", record)
    name = _require(record, "name", str, f"tensors[{index}].")
    prefix = f"tensors.{name}."
    codec = _require(record, "codec", str, prefix)
    params = _require(record, "params", dict, prefix)
    shape_list = _require(record, "shape", list, prefix)
    dtype = _require(record, "dtype", str, prefix)
    parts = _require(record, "parts", dict, prefix)

    if len(shape_list) > MAX_NDIM:
        raise MessageError(prefix + "shape", f"at most {MAX_NDIM} dimensions", len(shape_list))
    for dim in shape_list:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise MessageError(prefix + "shape", "a list of non-negative ints", shape_list)
    shape = tuple(shape_list)
    if math.prod(shape) > max_elements:
        raise MessageError(prefix + "shape", f"at most {max_elements} elements", shape)

    arrays: dict[str, np.ndarray] = {}
    for part_name, spec in parts.items():
        part_field = f"{prefix}parts.{part_name}"
        if not isinstance(spec, list) or len(spec) != 3:
            raise MessageError(part_field, "[dtype, offset, count]", spec)
        dtype_name, offset, count = spec
        if not isinstance(dtype_name, str) or dtype_name not in PART_DTYPES:
            raise MessageError(part_field + ".dtype", f"one of {sorted(PART_DTYPES)}", dtype_name)
        for label, value in (("offset", offset), ("count", count)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise MessageError(f"{part_field}.{label}", "a non-negative int", value)
        part_dtype = PART_DTYPES[dtype_name]
        end = offset + count * part_dtype.itemsize
        if end > len(data):
            raise MessageError(part_field, f"bytes inside the {len(data)}-byte data region", f"bytes {offset} to {end}")
        arrays[part_name] = np.frombuffer(data, dtype=part_dtype, count=count, offset=offset)
    return name, WireTensor(codec=codec, shape=shape, dtype=dtype, arrays=arrays, params=params)
