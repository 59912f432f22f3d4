"""The frame that carries every fedmq message: a msgpack header and a raw data region.

Layout of one frame::

    b"FMQ" | format byte | header length (uint32, big-endian) | msgpack header | zero padding | data region

The header is one msgpack array whose entries sit at fixed positions (HEADER_ENTRIES):
the message kind, the schema version, the kind's fields in the order of its field
table, a table of encodings, one record per tensor, the lossless method and the sizes
of the data region. An encoding is ``[codec, params, dtype]`` and is listed once
however many tensors share it. A tensor record is ``[name, encoding, shape, parts]``,
where ``encoding`` indexes the encodings.

A record's parts are nil when the codec and shape imply them: ``raw`` has one part
``values`` of the dtype's part dtype, and every codec of ``schemas.codecs`` has the
parts that ``codecs.part_layout`` returns. Otherwise the record lists them as
``[name, part dtype, count]`` entries. Offsets are never sent. The parts of all tensors
are placed by element size, largest first, and in record order among equal sizes. In
a region of under MIN_ALIGNED_BYTES each part starts at the next multiple of its
element size, which that order makes the end of the previous part. In a larger region
each part starts at the next multiple of ALIGNMENT. The region itself starts at the
next multiple of REGION_ALIGNMENT (ALIGNMENT for a large region) after the header, and
the bytes skipped there are zero.

Decoding builds each part with ``numpy.frombuffer`` over the received bytes, so no
tensor byte is copied unless the data region was compressed with a lossless stage.
Nothing in a frame is ever unpickled.
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from fedmq.errors import CodecError, MessageError
from schemas import codecs, lossless

MAGIC = b"FMQ"
FORMAT_VERSION = 2
PREFIX = struct.Struct(">3sBI")
ALIGNMENT = 64
# A small data region starts at a multiple of the largest part element size.
REGION_ALIGNMENT = 8

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

# The codec that carries a tensor exactly, and the part dtype of each dtype it carries.
RAW = "raw"
RAW_PART_DTYPES: dict[str, np.dtype[Any]] = {
    "float32": PART_DTYPES["float32"],
    "float64": PART_DTYPES["float64"],
    "float16": PART_DTYPES["float16"],
    "bfloat16": PART_DTYPES["uint16"],
    "int64": PART_DTYPES["int64"],
    "int32": PART_DTYPES["int32"],
    "int16": PART_DTYPES["int16"],
    "int8": PART_DTYPES["int8"],
    "uint8": PART_DTYPES["uint8"],
    "bool": PART_DTYPES["bool"],
}

# Positions of the header array, of an encoding, of a tensor record and of a listed part.
HEADER_ENTRIES = ("kind", "schema", "fields", "encodings", "tensors", "lossless", "raw_bytes", "data_bytes")
ENCODING_ENTRIES = ("codec", "params", "dtype")
RECORD_ENTRIES = ("name", "encoding", "shape", "parts")
PART_ENTRIES = ("name", "dtype", "count")

# Limits on the msgpack header, checked by the unpacker before it allocates.
MAX_HEADER_BYTES = 16 * 1024 * 1024
# Data regions from this size on align every part, and the region, to ALIGNMENT bytes.
MIN_ALIGNED_BYTES = 64 * 1024
MAX_TENSORS = 100_000
MAX_NDIM = 32

_ZEROS = bytes(ALIGNMENT)


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
    """A decoded frame: the message kind, schema version, field values in table order, and tensors by name."""

    kind: str
    schema: int
    fields: list[Any]
    tensors: dict[str, WireTensor]


def implied_layout(
    codec: str, params: Mapping[str, Any], shape: Sequence[int], dtype: str, *, max_elements: int
) -> dict[str, tuple[np.dtype[Any], int]]:
    """Return the part dtypes and lengths that a tensor's codec, params, shape and dtype imply, in region order.

    ``raw`` implies one part ``values`` of the dtype's part dtype with one element per
    entry. Each codec of ``schemas.codecs`` implies the parts of ``codecs.part_layout``.
    Raises MessageError (CodecError for invalid codec params) naming the field, such as
    ``params.block_size``, when no layout is implied.
    """
    if codec == RAW:
        if dtype not in RAW_PART_DTYPES:
            raise MessageError("dtype", f"one of {sorted(RAW_PART_DTYPES)} for codec {RAW!r}", dtype)
        return {"values": (RAW_PART_DTYPES[dtype], math.prod(shape))}
    if codec not in codecs.CODEC_NAMES:
        raise MessageError("codec", f"{RAW!r} or one of {list(codecs.CODEC_NAMES)} for a record without parts", codec)
    return codecs.part_layout(codec, params, shape, max_elements=max_elements)


def _aligned(offset: int, alignment: int) -> int:
    return -(-offset // alignment) * alignment


def _place_parts(sizes: Sequence[tuple[int, int]], *, aligned: bool) -> tuple[list[int], list[int], int]:
    """Place parts given as ``(itemsize, nbytes)`` in record order.

    Returns the placement order (largest element size first, record order among equal
    sizes), the offset of each part in record order, and the end of the region.
    """
    order = sorted(range(len(sizes)), key=lambda position: -sizes[position][0])
    offsets = [0] * len(sizes)
    end = 0
    for position in order:
        itemsize, nbytes = sizes[position]
        offsets[position] = _aligned(end, ALIGNMENT if aligned else itemsize)
        end = offsets[position] + nbytes
    return order, offsets, end


def _region_start(header_end: int, raw_bytes: int) -> int:
    return _aligned(header_end, ALIGNMENT if raw_bytes >= MIN_ALIGNED_BYTES else REGION_ALIGNMENT)


# Encoding


def pack_frame(
    kind: str,
    schema: int,
    fields: Sequence[Any],
    tensors: Mapping[str, WireTensor],
    *,
    lossless_method: str = "none",
) -> bytes:
    """Serialize a message into one frame.

    ``fields`` holds the kind's field values in the order of its field table.
    ``lossless_method`` is ``"none"``, ``"zstd"`` or ``"auto"``. ``"auto"`` probes a
    sample of the data region and compresses only when that saves at least 10%.
    Without compression, every part is copied exactly once, into the returned frame.
    """
    encodings: list[list[Any]] = []
    encoding_indices: dict[bytes, int] = {}
    records: list[list[Any]] = []
    flats: list[np.ndarray] = []
    for name, tensor in tensors.items():
        entry = [tensor.codec, dict(tensor.params), tensor.dtype]
        try:
            key = msgpack.packb(entry, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise MessageError(f"tensors.{name}.params", "values that msgpack can carry", repr(tensor.params)) from exc
        index = encoding_indices.setdefault(key, len(encodings))
        if index == len(encodings):
            encodings.append(entry)

        shape = [int(dim) for dim in tensor.shape]
        ordered, parts = _tensor_parts(name, tensor, shape)
        records.append([name, index, shape, parts])
        flats.extend(ordered)

    # Data region: natural alignment first, ALIGNMENT for a region that comes out large.
    sizes = [(flat.itemsize, flat.nbytes) for flat in flats]
    order, offsets, raw_size = _place_parts(sizes, aligned=False)
    if raw_size >= MIN_ALIGNED_BYTES:
        order, offsets, raw_size = _place_parts(sizes, aligned=True)
    region: list[Any] = []
    end = 0
    for position in order:
        if offsets[position] > end:
            region.append(_ZEROS[: offsets[position] - end])
        region.append(flats[position])
        end = offsets[position] + flats[position].nbytes

    method = lossless_method
    payload: bytes | None = None
    if method == "auto":
        probe = _leading_bytes(region, lossless.PROBE_BYTES)
        method = "zstd" if raw_size and lossless.pays_off(probe) else "none"
        if method == "zstd" and len(probe) == raw_size:
            payload = lossless.compress(probe, method)
    if method != "none" and payload is None:
        payload = lossless.compress(b"".join(region), method)
    data_size = raw_size if payload is None else len(payload)

    header = msgpack.packb(
        [kind, schema, list(fields), encodings, records, method, raw_size, data_size], use_bin_type=True
    )
    header_end = PREFIX.size + len(header)
    pieces: list[Any] = [PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)), header]
    pieces.append(_ZEROS[: _region_start(header_end, raw_size) - header_end])
    # bytes.join sums the lengths, allocates the frame once and copies each buffer into
    # it, so the parts (numpy arrays, through the buffer protocol) are copied only there.
    if payload is None:
        pieces.extend(region)
    else:
        pieces.append(payload)
    return b"".join(pieces)


def _tensor_parts(name: str, tensor: WireTensor, shape: list[int]) -> tuple[list[np.ndarray], list[list[Any]] | None]:
    """Return a tensor's flat parts in region order, and its listed parts, or None when its layout is implied."""
    flats: dict[str, np.ndarray] = {}
    for part_name, array in tensor.arrays.items():
        flat = np.ascontiguousarray(array).reshape(-1)
        if not flat.dtype.isnative:
            flat = flat.astype(flat.dtype.newbyteorder("="))
        if flat.dtype.name not in PART_DTYPES:
            raise MessageError(f"tensors.{name}.parts.{part_name}.dtype", f"one of {sorted(PART_DTYPES)}", flat.dtype.name)
        flats[part_name] = flat

    try:
        layout = implied_layout(tensor.codec, tensor.params, shape, tensor.dtype, max_elements=sys.maxsize)
    except MessageError:
        layout = None
    if layout is not None and set(layout) == set(flats):
        if all(flats[part].dtype == dtype and flats[part].size == count for part, (dtype, count) in layout.items()):
            return [flats[part] for part in layout], None
    listed = [[part_name, flat.dtype.name, int(flat.size)] for part_name, flat in flats.items()]
    return list(flats.values()), listed


def _leading_bytes(region: Sequence[Any], limit: int) -> bytes:
    """Return the first ``limit`` bytes of a region given as consecutive buffers."""
    pieces = []
    remaining = limit
    for piece in region:
        if remaining <= 0:
            break
        view = memoryview(piece).cast("B")[:remaining]
        pieces.append(view)
        remaining -= len(view)
    return b"".join(pieces)


# Decoding


@dataclass
class _PlannedTensor:
    name: str
    codec: str
    params: dict[str, Any]
    shape: tuple[int, ...]
    dtype: str
    parts: list[tuple[str, np.dtype[Any], int]]


def unpack_frame(body: bytes | bytearray | memoryview, *, max_raw_bytes: int, max_elements: int) -> Frame:
    """Parse a frame and return views of its parts, checking every declared size.

    ``max_raw_bytes`` bounds the uncompressed data region and ``max_elements`` the
    elements of any one decoded tensor, so a hostile frame can neither make the
    decoder allocate more than that nor reach outside the body. Every part is placed
    and checked against the region before the region is decompressed or viewed.
    Raises MessageError naming the field that is wrong.
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
    header = _entries(_unpack_header(view[PREFIX.size : header_end]), HEADER_ENTRIES, "header", "")

    kind = _require(header, "kind", str)
    schema = _require(header, "schema", int)
    fields = _require(header, "fields", list)
    encoding_list = _require(header, "encodings", list)
    records = _require(header, "tensors", list)
    method = _require(header, "lossless", str)
    raw_bytes = _require(header, "raw_bytes", int)
    data_bytes = _require(header, "data_bytes", int)
    if len(records) > MAX_TENSORS:
        raise MessageError("tensors", f"at most {MAX_TENSORS} tensors", len(records))
    if len(encoding_list) > MAX_TENSORS:
        raise MessageError("encodings", f"at most {MAX_TENSORS} encodings", len(encoding_list))
    if method not in lossless.LOSSLESS_NAMES:
        raise MessageError("lossless", f"one of {list(lossless.LOSSLESS_NAMES)}", method)
    if not 0 <= raw_bytes <= max_raw_bytes:
        raise MessageError("raw_bytes", f"between 0 and the limit of {max_raw_bytes} bytes", raw_bytes)
    region_start = _region_start(header_end, raw_bytes)
    if len(view) < region_start:
        raise MessageError("frame.padding", f"{region_start - header_end} zero bytes after the header", f"{len(view) - header_end} bytes")
    if data_bytes != len(view) - region_start:
        raise MessageError("data_bytes", f"the {len(view) - region_start} bytes after the header and its padding", data_bytes)
    if any(view[header_end:region_start]):
        raise MessageError("frame.padding", "zero bytes between the header and the data region", bytes(view[header_end:region_start]))
    if method == "none" and raw_bytes != data_bytes:
        raise MessageError("raw_bytes", f"{data_bytes} (equal to data_bytes without compression)", raw_bytes)

    # Place every part before the region is decompressed or any view is made.
    encodings = [_parse_encoding(entry, index) for index, entry in enumerate(encoding_list)]
    planned: dict[str, _PlannedTensor] = {}
    for index, record in enumerate(records):
        tensor = _parse_record(record, index, encodings, max_elements)
        if tensor.name in planned:
            raise MessageError(f"tensors.{tensor.name}", "a name used once", "a duplicate name")
        planned[tensor.name] = tensor
    offsets = _check_placement(planned.values(), raw_bytes)

    data: bytes | memoryview = view[region_start:]
    if method != "none":
        data = lossless.decompress(data, method, expected_size=raw_bytes, max_size=max_raw_bytes)

    tensors: dict[str, WireTensor] = {}
    position = 0
    for tensor in planned.values():
        arrays = {}
        for part_name, part_dtype, count in tensor.parts:
            arrays[part_name] = np.frombuffer(data, dtype=part_dtype, count=count, offset=offsets[position])
            position += 1
        tensors[tensor.name] = WireTensor(tensor.codec, tensor.shape, tensor.dtype, arrays, dict(tensor.params))
    return Frame(kind=kind, schema=schema, fields=fields, tensors=tensors)


def _unpack_header(raw: memoryview) -> list[Any]:
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
        raise MessageError("header", "a msgpack array", f"undecodable bytes ({exc})") from exc
    if not isinstance(header, list):
        raise MessageError("header", "a msgpack array", header)
    return header


def _entries(values: Any, names: Sequence[str], path: str, prefix: str) -> dict[str, Any]:
    """Map the entries of a positional array to ``prefix`` plus their name in ``names``.

    An array cut short leaves its missing names out of the result. An array longer
    than ``names``, or a value that is no array, raises MessageError naming ``path``.
    """
    if not isinstance(values, list):
        raise MessageError(path, f"an array of {', '.join(names)}", values)
    if len(values) > len(names):
        raise MessageError(path, f"{len(names)} entries ({', '.join(names)})", f"{len(values)} entries")
    return {f"{prefix}{name}": value for name, value in zip(names, values)}


def _require(mapping: Mapping[str, Any], key: str, kind: type) -> Any:
    if key not in mapping:
        raise MessageError(key, f"a {kind.__name__}", "nothing (the array ends before it)")
    value = mapping[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise MessageError(key, "an int", value)
    if kind is not int and not isinstance(value, kind):
        raise MessageError(key, f"a {kind.__name__}", value)
    return value


def _parse_encoding(entry: Any, index: int) -> tuple[str, dict[str, Any], str]:
    prefix = f"encodings[{index}]."
    values = _entries(entry, ENCODING_ENTRIES, f"encodings[{index}]", prefix)
    return _require(values, prefix + "codec", str), _require(values, prefix + "params", dict), _require(values, prefix + "dtype", str)


def _parse_record(
    record: Any, index: int, encodings: Sequence[tuple[str, dict[str, Any], str]], max_elements: int
) -> _PlannedTensor:
    position = f"tensors[{index}]"
    values = _entries(record, RECORD_ENTRIES, position, position + ".")
    name = _require(values, position + ".name", str)
    prefix = f"tensors.{name}."
    values = _entries(record, RECORD_ENTRIES, position, prefix)
    encoding = _require(values, prefix + "encoding", int)
    shape_list = _require(values, prefix + "shape", list)
    if prefix + "parts" not in values:
        raise MessageError(prefix + "parts", "nil or an array of parts", "nothing (the array ends before it)")
    listed = values[prefix + "parts"]

    if not 0 <= encoding < len(encodings):
        raise MessageError(prefix + "encoding", f"an index below {len(encodings)}", encoding)
    codec, params, dtype = encodings[encoding]
    if len(shape_list) > MAX_NDIM:
        raise MessageError(prefix + "shape", f"at most {MAX_NDIM} dimensions", len(shape_list))
    for dim in shape_list:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise MessageError(prefix + "shape", "a list of non-negative ints", shape_list)
    shape = tuple(shape_list)
    if math.prod(shape) > max_elements:
        raise MessageError(prefix + "shape", f"at most {max_elements} elements", shape)

    if listed is None:
        try:
            layout = implied_layout(codec, params, shape, dtype, max_elements=max_elements)
        except CodecError as exc:
            raise CodecError(prefix + exc.field, exc.expected, exc.got) from exc
        except MessageError as exc:
            raise MessageError(prefix + exc.field, exc.expected, exc.got) from exc
        parts = [(part_name, part_dtype, count) for part_name, (part_dtype, count) in layout.items()]
    else:
        parts = _parse_parts(listed, prefix + "parts")
    return _PlannedTensor(name, codec, params, shape, dtype, parts)


def _parse_parts(listed: Any, path: str) -> list[tuple[str, np.dtype[Any], int]]:
    if not isinstance(listed, list):
        raise MessageError(path, "nil or an array of [name, dtype, count] parts", listed)
    parts: list[tuple[str, np.dtype[Any], int]] = []
    for spec in listed:
        if not isinstance(spec, list) or len(spec) != len(PART_ENTRIES) or not isinstance(spec[0], str):
            raise MessageError(path, "[name, dtype, count] with a string name", spec)
        part_name, dtype_name, count = spec
        part_path = f"{path}.{part_name}"
        if any(part_name == seen for seen, _, _ in parts):
            raise MessageError(part_path, "a part name used once", "a duplicate name")
        if not isinstance(dtype_name, str) or dtype_name not in PART_DTYPES:
            raise MessageError(part_path + ".dtype", f"one of {sorted(PART_DTYPES)}", dtype_name)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise MessageError(part_path + ".count", "a non-negative int", count)
        parts.append((part_name, PART_DTYPES[dtype_name], count))
    return parts


def _check_placement(tensors: Any, raw_bytes: int) -> list[int]:
    """Return the offset of every part in record order, checking that the parts fill exactly ``raw_bytes``."""
    named = [(f"tensors.{tensor.name}.parts.{part_name}", dtype, count) for tensor in tensors for part_name, dtype, count in tensor.parts]
    sizes = [(dtype.itemsize, count * dtype.itemsize) for _, dtype, count in named]
    order, offsets, end = _place_parts(sizes, aligned=raw_bytes >= MIN_ALIGNED_BYTES)
    for position in order:
        part_end = offsets[position] + sizes[position][1]
        if part_end > raw_bytes:
            path = named[position][0]
            raise MessageError(path, f"bytes inside the {raw_bytes}-byte data region", f"bytes {offsets[position]} to {part_end}")
    if end != raw_bytes:
        raise MessageError("raw_bytes", f"{end}, the end of the last part", raw_bytes)
    return offsets
