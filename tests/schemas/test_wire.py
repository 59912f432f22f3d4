"""The frame: its layout, its one-copy build, and malformed frames, each of which raises MessageError naming the field."""

from __future__ import annotations

import pickle
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmq.errors import CodecError, MessageError
from schemas import codecs
from schemas import tensors as wire_tensors
from schemas.messages import DecodeLimits, Leave, Update, decode_message, encode_message
from schemas.wire import (
    ALIGNMENT,
    FORMAT_VERSION,
    HEADER_ENTRIES,
    MAGIC,
    MIN_ALIGNED_BYTES,
    PREFIX,
    RECORD_ENTRIES,
    REGION_ALIGNMENT,
    WireTensor,
    pack_frame,
    unpack_frame,
)

HEADER = {name: position for position, name in enumerate(HEADER_ENTRIES)}
RECORD = {name: position for position, name in enumerate(RECORD_ENTRIES)}
LIMITS = DecodeLimits(max_raw_bytes=1 << 20, max_elements=1 << 16)


def _write_marker(path: str) -> None:
    Path(path).write_text("unpickled")


class _Exploit:
    """Pickles into a payload that writes a marker file when unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
        return _write_marker, (str(self.path),)


def _update(deltas: dict[str, WireTensor] | None = None) -> Update:
    return Update(
        run_id="run-wire",
        round=1,
        attempt=0,
        model_version=0,
        worker_id="worker-1",
        num_samples=10,
        num_steps=1,
        metrics={"loss": 1.0},
        deltas=deltas
        or {
            "w": wire_tensors.encode_raw(np.arange(12, dtype=np.float32).reshape(3, 4), "float32"),
            "steps": wire_tensors.encode_raw(np.array([4, 5, 6], dtype=np.int64), "int64"),
        },
        sent_unix=1.0,
    )


def _update_body(lossless_method: str = "none") -> bytes:
    return encode_message(_update(), lossless_method=lossless_method)


def _header_end(body: bytes) -> int:
    return PREFIX.size + int(PREFIX.unpack_from(body)[2])


def _region_start(header_end: int, raw_bytes: Any) -> int:
    alignment = ALIGNMENT if isinstance(raw_bytes, int) and raw_bytes >= MIN_ALIGNED_BYTES else REGION_ALIGNMENT
    return -(-header_end // alignment) * alignment


def _split(body: bytes) -> tuple[list[Any], bytes]:
    """Return a frame's header as a list and its data region."""
    header_end = _header_end(body)
    header = msgpack.unpackb(body[PREFIX.size : header_end], raw=False)
    return header, body[_region_start(header_end, header[HEADER["raw_bytes"]]) :]


def _join(header: list[Any] | bytes, data: bytes, *, magic: bytes = MAGIC, version: int = FORMAT_VERSION) -> bytes:
    """Build a frame around a header and a data region, with the zero padding that the header implies."""
    header_bytes = header if isinstance(header, bytes) else msgpack.packb(header, use_bin_type=True)
    raw_bytes = None if isinstance(header, bytes) or len(header) <= HEADER["raw_bytes"] else header[HEADER["raw_bytes"]]
    header_end = PREFIX.size + len(header_bytes)
    padding = bytes(_region_start(header_end, raw_bytes) - header_end)
    return PREFIX.pack(magic, version, len(header_bytes)) + header_bytes + padding + data


def _record(header: list[Any], name: str) -> list[Any]:
    return next(record for record in header[HEADER["tensors"]] if record[RECORD["name"]] == name)


def _decode_error(body: bytes, limits: DecodeLimits = DecodeLimits()) -> MessageError:
    with pytest.raises(MessageError) as caught:
        decode_message(body, limits)
    return caught.value


def _address(array: np.ndarray) -> int:
    return int(array.__array_interface__["data"][0])


# Layout


def test_valid_frame_layout() -> None:
    body = _update_body()
    header, data = _split(body)

    assert body[:3] == MAGIC
    assert body[3] == FORMAT_VERSION == 2
    assert len(header) == len(HEADER_ENTRIES)
    assert header[HEADER["kind"]] == "update"
    assert header[HEADER["fields"]][:2] == ["run-wire", 1]
    assert header[HEADER["encodings"]] == [["raw", {}, "float32"], ["raw", {}, "int64"]]
    assert header[HEADER["tensors"]] == [["deltas/w", 0, [3, 4], None], ["deltas/steps", 1, [3], None]]
    assert header[HEADER["lossless"]] == "none"
    # The int64 part comes first, being of the larger element size, then the float32 one.
    assert header[HEADER["raw_bytes"]] == header[HEADER["data_bytes"]] == len(data) == 72
    assert np.array_equal(np.frombuffer(data[:24], np.int64), [4, 5, 6])
    assert np.array_equal(np.frombuffer(data[24:], np.float32), np.arange(12))


def test_small_region_parts_by_size_without_padding() -> None:
    deltas = {
        "a": wire_tensors.encode_raw(np.arange(3, dtype=np.int8), "int8"),
        "b": wire_tensors.encode_raw(np.arange(3, dtype=np.float16), "float16"),
        "c": wire_tensors.encode_raw(np.arange(1, dtype=np.float32), "float32"),
        "d": wire_tensors.encode_raw(np.arange(2, dtype=np.int64), "int64"),
        "e": wire_tensors.encode_raw(np.array([True]), "bool"),
    }
    body = encode_message(_update(deltas))
    header, data = _split(body)

    # int64 at 0, float32 at 16, float16 at 20, then int8 and bool in record order.
    assert header[HEADER["raw_bytes"]] == len(data) == 30
    assert (len(body) - len(data)) % REGION_ALIGNMENT == 0
    assert body[_header_end(body) : len(body) - len(data)] == bytes(len(body) - len(data) - _header_end(body))
    decoded = decode_message(body)
    assert isinstance(decoded, Update)
    start = _address(np.frombuffer(body, np.uint8))
    for name, offset in {"d": 0, "c": 16, "b": 20, "a": 26, "e": 29}.items():
        part = decoded.deltas[name].arrays["values"]
        assert _address(part) - start == len(body) - len(data) + offset, name
        assert np.array_equal(part, deltas[name].arrays["values"]), name


def test_large_region_parts_at_64_bytes() -> None:
    deltas = {
        "small": wire_tensors.encode_raw(np.arange(3, dtype=np.int8), "int8"),
        "big": wire_tensors.encode_raw(np.arange(MIN_ALIGNED_BYTES // 4, dtype=np.float32), "float32"),
        "last": wire_tensors.encode_raw(np.arange(5, dtype=np.int16), "int16"),
    }
    body = encode_message(_update(deltas))
    header, data = _split(body)

    assert (len(body) - len(data)) % ALIGNMENT == 0
    # float32 at 0, int16 right after it at a multiple of 64, int8 at the next multiple.
    assert header[HEADER["raw_bytes"]] == len(data) == MIN_ALIGNED_BYTES + 64 + 3
    decoded = decode_message(body)
    assert isinstance(decoded, Update)
    region = _address(np.frombuffer(body, np.uint8)) + len(body) - len(data)
    for name in deltas:
        part = decoded.deltas[name].arrays["values"]
        assert (_address(part) - region) % ALIGNMENT == 0, name
        assert np.array_equal(part, deltas[name].arrays["values"]), name


def test_region_alignment_switches_at_min_aligned_bytes() -> None:
    for size, aligned in ((MIN_ALIGNED_BYTES - 2, False), (MIN_ALIGNED_BYTES - 1, True)):
        deltas = {
            "a": wire_tensors.encode_raw(np.zeros(1, dtype=np.int8), "int8"),
            "b": wire_tensors.encode_raw(np.zeros(size, dtype=np.uint8), "uint8"),
        }
        header, data = _split(encode_message(_update(deltas)))

        assert header[HEADER["raw_bytes"]] == len(data) == (ALIGNMENT + size if aligned else 1 + size)


def test_update_codecs_list_no_parts() -> None:
    rng = np.random.default_rng(0)
    deltas = {}
    for name in codecs.CODEC_NAMES:
        encoded = codecs.encode(rng.normal(size=(30, 20)).astype(np.float32), codecs.CodecSpec(name), rng=rng)
        deltas[name] = WireTensor(encoded.codec, encoded.shape, encoded.dtype, encoded.arrays, encoded.params)
    body = encode_message(_update(deltas))
    header, data = _split(body)

    assert all(record[RECORD["parts"]] is None for record in header[HEADER["tensors"]])
    decoded = decode_message(body)
    assert isinstance(decoded, Update)
    for name, tensor in deltas.items():
        assert list(decoded.deltas[name].arrays) == list(codecs.part_layout(name, tensor.params, tensor.shape)), name
        for part_name, part in tensor.arrays.items():
            assert np.array_equal(decoded.deltas[name].arrays[part_name], part), (name, part_name)


def test_shared_encoding_listed_once() -> None:
    rng = np.random.default_rng(0)
    deltas = {}
    for index, block_size in enumerate((64, 64, 64, 32)):
        spec = codecs.CodecSpec("topk_q8", block_size=block_size)
        encoded = codecs.encode(rng.normal(size=(100 + index,)).astype(np.float32), spec, rng=rng)
        deltas[f"t{index}"] = WireTensor(encoded.codec, encoded.shape, encoded.dtype, encoded.arrays, encoded.params)
    header, _ = _split(encode_message(_update(deltas)))

    assert header[HEADER["encodings"]] == [
        ["topk_q8", {"topk_fraction": 0.01, "block_size": 64}, "float32"],
        ["topk_q8", {"topk_fraction": 0.01, "block_size": 32}, "float32"],
    ]
    assert [record[RECORD["encoding"]] for record in header[HEADER["tensors"]]] == [0, 0, 0, 1]


def test_parts_not_implied_are_listed() -> None:
    tensor = WireTensor("raw", (3,), "float32", {"values": np.arange(3, dtype=np.float64)})
    body = encode_message(_update({"w": tensor}))
    header, _ = _split(body)

    assert _record(header, "deltas/w")[RECORD["parts"]] == [["values", "float64", 3]]
    error = _decode_error(body)
    assert isinstance(error, CodecError)
    assert error.field == "tensors.deltas/w.parts.values.dtype"


def test_listed_parts_of_unknown_codec_travel() -> None:
    parts = {"b": np.arange(3, dtype=np.uint8), "a": np.arange(2, dtype=np.float64)}
    body = pack_frame("update", 1, [], {"deltas/w": WireTensor("zip", (5,), "float32", parts, {"level": 3})})

    frame = unpack_frame(body, max_raw_bytes=1024, max_elements=16)

    tensor = frame.tensors["deltas/w"]
    assert (tensor.codec, tensor.params, tensor.shape) == ("zip", {"level": 3}, (5,))
    assert list(tensor.arrays) == ["b", "a"]
    assert np.array_equal(tensor.arrays["b"], parts["b"])
    assert np.array_equal(tensor.arrays["a"], parts["a"])


def test_big_endian_part_travels_little_endian() -> None:
    values = np.arange(6, dtype=">f4")
    tensor = WireTensor("raw", (6,), "float32", {"values": values})
    body = encode_message(_update({"w": tensor}))
    _, data = _split(body)

    assert data == np.arange(6, dtype="<f4").tobytes()
    decoded = decode_message(body)
    assert isinstance(decoded, Update)
    assert np.array_equal(wire_tensors.decode(decoded.deltas["w"]), values)


def test_decoded_params_not_shared_between_tensors() -> None:
    rng = np.random.default_rng(0)
    deltas = {}
    for name in ("a", "b"):
        encoded = codecs.encode(rng.normal(size=64).astype(np.float32), codecs.CodecSpec("q8", block_size=16), rng=rng)
        deltas[name] = WireTensor(encoded.codec, encoded.shape, encoded.dtype, encoded.arrays, encoded.params)
    decoded = decode_message(encode_message(_update(deltas)))
    assert isinstance(decoded, Update)

    decoded.deltas["a"].params["block_size"] = 32

    assert decoded.deltas["b"].params == {"block_size": 16}


def test_encode_rejects_unsupported_part_dtype() -> None:
    tensor = WireTensor("raw", (2,), "float32", {"values": np.zeros(2, np.complex64)})

    with pytest.raises(MessageError) as caught:
        pack_frame("update", 1, [], {"deltas/w": tensor})

    assert caught.value.field == "tensors.deltas/w.parts.values.dtype"


def test_encode_rejects_params_msgpack_cannot_carry() -> None:
    tensor = WireTensor("raw", (2,), "float32", {"values": np.zeros(2, np.float32)}, {"block_size": object()})

    with pytest.raises(MessageError) as caught:
        pack_frame("update", 1, [], {"deltas/w": tensor})

    assert caught.value.field == "tensors.deltas/w.params"


# One copy per frame


def _peak_bytes(build: Callable[[], bytes]) -> tuple[int, bytes]:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        baseline = tracemalloc.get_traced_memory()[0]
        body = build()
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    return peak, body


@pytest.mark.parametrize("lossless_method", ["none", "auto"])
def test_frame_built_with_one_copy(lossless_method: str) -> None:
    # Random bytes do not compress, so "auto" sends them as they are.
    values = np.random.default_rng(0).integers(0, 256, size=32 * 1024 * 1024, dtype=np.uint8)
    weights = {"w": wire_tensors.encode_raw(values[: 16 * 1024 * 1024].view(np.float32), "float32")}
    weights["v"] = wire_tensors.encode_raw(values[16 * 1024 * 1024 :].view(np.int64), "int64")
    message = _update(weights)

    peak, body = _peak_bytes(lambda: encode_message(message, lossless_method=lossless_method))

    assert type(body) is bytes
    assert len(body) > values.nbytes
    # The frame itself plus at most the compression probe and interpreter bookkeeping.
    assert peak < len(body) + 2 * 256 * 1024 + 64 * 1024
    header, data = _split(body)
    assert header[HEADER["lossless"]] == "none"
    # The int64 part comes first, being of the larger element size.
    assert data == values[16 * 1024 * 1024 :].tobytes() + values[: 16 * 1024 * 1024].tobytes()


def test_zstd_frame_round_trip() -> None:
    values = np.zeros(100_000, dtype=np.float32)
    values[::7] = 1.5
    body = encode_message(_update({"w": wire_tensors.encode_raw(values, "float32")}), lossless_method="auto")
    header, data = _split(body)

    assert header[HEADER["lossless"]] == "zstd"
    assert header[HEADER["raw_bytes"]] == values.nbytes
    assert header[HEADER["data_bytes"]] == len(data) < values.nbytes // 10
    decoded = decode_message(body)
    assert isinstance(decoded, Update)
    assert np.array_equal(decoded.deltas["w"].arrays["values"], values)


# The prefix


def test_bad_magic_rejected() -> None:
    body = b"XYZ" + _update_body()[3:]

    error = _decode_error(body)

    assert error.field == "frame.magic"
    assert "XYZ" in str(error)


@pytest.mark.parametrize("version", [1, FORMAT_VERSION + 1, 255])
def test_other_format_version_rejected(version: int) -> None:
    header, data = _split(_update_body())

    error = _decode_error(_join(header, data, version=version))

    assert error.field == "frame.format"
    assert f"format version {FORMAT_VERSION}" in str(error)


def _padded_body() -> bytes:
    """Return an update frame whose header does not end at a multiple of REGION_ALIGNMENT."""
    for length in range(1, REGION_ALIGNMENT + 1):
        message = _update()
        message.worker_id = "w" * length
        body = encode_message(message)
        if _header_end(body) % REGION_ALIGNMENT:
            return body
    raise AssertionError("every worker id length gave an aligned header")


def test_every_truncation_rejected() -> None:
    body = _padded_body()
    header_end = _header_end(body)
    _, data = _split(body)
    region_start = len(body) - len(data)
    assert region_start > header_end

    for length in range(len(body)):
        error = _decode_error(body[:length])
        if length < PREFIX.size:
            assert error.field == "frame", length
        elif length < header_end:
            assert error.field == "frame.header_length", length
        elif length < region_start:
            assert error.field == "frame.padding", length
        else:
            assert error.field == "data_bytes", length


def test_trailing_bytes_rejected() -> None:
    error = _decode_error(_update_body() + b"\x00")

    assert error.field == "data_bytes"


def test_nonzero_padding_rejected() -> None:
    body = bytearray(_padded_body())
    body[_header_end(bytes(body))] = 1

    error = _decode_error(bytes(body))

    assert error.field == "frame.padding"


# The header


@pytest.mark.parametrize(
    "header_bytes",
    [b"\xc1", b"\x98\xa6update", b"not msgpack at all", msgpack.packb({"kind": "update"}), msgpack.packb("update"), msgpack.packb([1, 2]) + b"\x00"],
    ids=["reserved-byte", "truncated-array", "text", "map", "string", "trailing-bytes"],
)
def test_header_that_is_not_msgpack_array_rejected(header_bytes: bytes) -> None:
    error = _decode_error(_join(header_bytes, b""))

    assert error.field == "header"


def test_header_with_msgpack_extension_rejected() -> None:
    header, data = _split(_update_body())
    header[HEADER["fields"]][7] = {"loss": msgpack.ExtType(42, b"payload")}

    error = _decode_error(_join(header, data))

    assert error.field == "header"


def test_header_with_integer_map_key_rejected() -> None:
    header, data = _split(_update_body())
    header[HEADER["fields"]][7] = {1: 0.5}

    error = _decode_error(_join(header, data))

    assert error.field == "header"


@pytest.mark.parametrize("entry", HEADER_ENTRIES)
def test_header_cut_short_rejected(entry: str) -> None:
    header, data = _split(_update_body())

    error = _decode_error(_join(header[: HEADER[entry]], data))

    assert error.field == entry
    assert "ends before it" in str(error)


def test_header_with_extra_entry_rejected() -> None:
    header, data = _split(_update_body())

    error = _decode_error(_join([*header, b""], data))

    assert error.field == "header"
    assert f"{len(HEADER_ENTRIES)} entries" in str(error)


@pytest.mark.parametrize(
    ("entry", "value"),
    [("kind", 1), ("schema", "1"), ("fields", {}), ("encodings", None), ("tensors", {}), ("lossless", 0), ("raw_bytes", 1.5), ("data_bytes", True)],
)
def test_header_entry_of_wrong_type_rejected(entry: str, value: Any) -> None:
    header, data = _split(_update_body())
    header[HEADER[entry]] = value

    error = _decode_error(_join(header, data))

    assert error.field == entry


def test_unknown_lossless_method_rejected() -> None:
    header, data = _split(_update_body())
    header[HEADER["lossless"]] = "gzip"

    error = _decode_error(_join(header, data))

    assert error.field == "lossless"


# Encodings


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ("not an array", "encodings[0]"),
        (["raw", {}], "encodings[0].dtype"),
        (["raw", {}, "float32", 1], "encodings[0]"),
        ([b"raw", {}, "float32"], "encodings[0].codec"),
        (["raw", [], "float32"], "encodings[0].params"),
        (["raw", {}, 4], "encodings[0].dtype"),
    ],
)
def test_malformed_encoding_rejected(entry: Any, field: str) -> None:
    header, data = _split(_update_body())
    header[HEADER["encodings"]][0] = entry

    error = _decode_error(_join(header, data))

    assert error.field == field


@pytest.mark.parametrize("index", [-1, 2, True, "0", None])
def test_encoding_index_out_of_range_rejected(index: Any) -> None:
    header, data = _split(_update_body())
    _record(header, "deltas/w")[RECORD["encoding"]] = index

    error = _decode_error(_join(header, data))

    assert error.field == "tensors.deltas/w.encoding"


def test_unknown_codec_without_parts_rejected() -> None:
    header, data = _split(_update_body())
    header[HEADER["encodings"]][0][0] = "zip"

    error = _decode_error(_join(header, data))

    assert error.field == "tensors.deltas/w.codec"


def test_raw_dtype_without_part_dtype_rejected() -> None:
    header, data = _split(_update_body())
    header[HEADER["encodings"]][0][2] = "complex64"

    error = _decode_error(_join(header, data))

    assert error.field == "tensors.deltas/w.dtype"


def test_invalid_codec_params_without_parts_rejected() -> None:
    encoded = codecs.encode(np.ones(64, np.float32), codecs.CodecSpec("q8", block_size=16), rng=np.random.default_rng(0))
    header, data = _split(encode_message(_update({"w": WireTensor("q8", (64,), "float32", encoded.arrays, encoded.params)})))
    header[HEADER["encodings"]][0][1] = {"block_size": 17}

    error = _decode_error(_join(header, data))

    assert isinstance(error, CodecError)
    assert error.field == "tensors.deltas/w.params.block_size"


# Tensor records


def test_part_outside_data_region_rejected() -> None:
    header, data = _split(_update_body())
    _record(header, "deltas/w")[RECORD["shape"]] = [3, 8]

    error = _decode_error(_join(header, data))

    assert error.field == "tensors.deltas/w.parts.values"
    assert f"{len(data)}-byte data region" in str(error)


def test_parts_short_of_data_region_rejected() -> None:
    header, data = _split(_update_body())
    _record(header, "deltas/steps")[RECORD["shape"]] = [2]

    error = _decode_error(_join(header, data))

    assert error.field == "raw_bytes"
    assert "the end of the last part" in str(error)


def test_listed_part_outside_data_region_rejected() -> None:
    header, data = _split(_update_body())
    _record(header, "deltas/w")[RECORD["parts"]] = [["values", "float32", 20]]

    error = _decode_error(_join(header, data))

    assert error.field == "tensors.deltas/w.parts.values"


@pytest.mark.parametrize("count", [-1, 1.5, True, None])
def test_listed_part_count_invalid_rejected(count: Any) -> None:
    header, data = _split(_update_body())
    _record(header, "deltas/w")[RECORD["parts"]] = [["values", "float32", count]]

    error = _decode_error(_join(header, data))

    assert error.field == "tensors.deltas/w.parts.values.count"


@pytest.mark.parametrize("dtype", ["object", "O", "float128", "<f4", "complex64", "V8", "", ["float32"], {"name": "float32"}, 4])
def test_unknown_part_dtype_rejected(dtype: Any) -> None:
    header, data = _split(_update_body())
    _record(header, "deltas/w")[RECORD["parts"]] = [["values", dtype, 12]]

    error = _decode_error(_join(header, data))

    assert error.field == "tensors.deltas/w.parts.values.dtype"


@pytest.mark.parametrize("parts", [[["values", "float32"]], [[0, "float32", 12]], ["values"], {"values": ["float32", 0, 12]}, 0])
def test_malformed_listed_parts_rejected(parts: Any) -> None:
    header, data = _split(_update_body())
    _record(header, "deltas/w")[RECORD["parts"]] = parts

    error = _decode_error(_join(header, data))

    assert error.field == "tensors.deltas/w.parts"


def test_duplicate_part_names_rejected() -> None:
    header, data = _split(_update_body())
    _record(header, "deltas/w")[RECORD["parts"]] = [["values", "float32", 6], ["values", "float32", 6]]

    error = _decode_error(_join(header, data))

    assert error.field == "tensors.deltas/w.parts.values"
    assert "duplicate" in str(error)


def test_listed_part_count_not_matching_shape_rejected() -> None:
    header, data = _split(_update_body())
    _record(header, "deltas/w")[RECORD["parts"]] = [["values", "float32", 11]]
    header[HEADER["raw_bytes"]] = header[HEADER["data_bytes"]] = len(data) - 4

    error = _decode_error(_join(header, data[:-4]))

    assert isinstance(error, CodecError)
    assert error.field == "tensors.deltas/w.parts.values.count"
    assert "12 elements for shape [3, 4]" in str(error)


def test_listed_part_dtype_not_matching_declared_dtype_rejected() -> None:
    header, data = _split(_update_body())
    _record(header, "deltas/steps")[RECORD["parts"]] = [["values", "float64", 3]]

    error = _decode_error(_join(header, data))

    assert error.field == "tensors.deltas/steps.parts.values.dtype"


@pytest.mark.parametrize("shape", [[-1, 4], [3.0, 4], "3x4", [True, 12], list(range(33))])
def test_invalid_shape_rejected(shape: Any) -> None:
    header, data = _split(_update_body())
    _record(header, "deltas/w")[RECORD["shape"]] = shape

    error = _decode_error(_join(header, data))

    assert error.field == "tensors.deltas/w.shape"


def test_shape_above_element_limit_rejected() -> None:
    error = _decode_error(_update_body(), DecodeLimits(max_elements=11))

    assert error.field == "tensors.deltas/w.shape"
    assert "at most 11 elements" in str(error)


def test_duplicate_tensor_names_rejected() -> None:
    header, data = _split(_update_body())
    header[HEADER["tensors"]].append(list(_record(header, "deltas/w")))

    error = _decode_error(_join(header, data))

    assert error.field == "tensors.deltas/w"
    assert "duplicate" in str(error)


@pytest.mark.parametrize("entry", RECORD_ENTRIES)
def test_tensor_record_cut_short_rejected(entry: str) -> None:
    header, data = _split(_update_body())
    record = _record(header, "deltas/w")
    del record[RECORD[entry] :]

    error = _decode_error(_join(header, data))

    assert error.field == ("tensors[0].name" if entry == "name" else f"tensors.deltas/w.{entry}")


@pytest.mark.parametrize(("record", "field"), [({"name": "deltas/w"}, "tensors[0]"), ([1, 0, [3, 4], None], "tensors[0].name")])
def test_malformed_tensor_record_rejected(record: Any, field: str) -> None:
    header, data = _split(_update_body())
    header[HEADER["tensors"]][0] = record

    error = _decode_error(_join(header, data))

    assert error.field == field


# Declared sizes


def test_raw_size_above_limit_rejected() -> None:
    body = _update_body()
    raw_bytes = _split(body)[0][HEADER["raw_bytes"]]

    error = _decode_error(body, DecodeLimits(max_raw_bytes=raw_bytes - 1))

    assert error.field == "raw_bytes"
    assert f"limit of {raw_bytes - 1} bytes" in str(error)


def test_zstd_size_above_limit_rejected() -> None:
    region = bytes(64 * 1024 * 1024)
    compressed = zstandard.ZstdCompressor(level=1).compress(region)
    header, _ = _split(_update_body())
    header[HEADER["lossless"]] = "zstd"
    header[HEADER["raw_bytes"]], header[HEADER["data_bytes"]] = len(region), len(compressed)
    header[HEADER["tensors"]] = []

    error = _decode_error(_join(header, compressed), DecodeLimits(max_raw_bytes=1024 * 1024))

    assert len(compressed) < 10_000
    assert error.field == "raw_bytes"


def test_parts_checked_before_decompression() -> None:
    region = bytes(32 * 1024 * 1024)
    compressed = zstandard.ZstdCompressor(level=1).compress(region)
    header, _ = _split(_update_body())
    header[HEADER["lossless"]] = "zstd"
    header[HEADER["raw_bytes"]], header[HEADER["data_bytes"]] = len(region), len(compressed)
    body = _join(header, compressed)

    tracemalloc.start()
    try:
        error = _decode_error(body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert error.field == "raw_bytes"
    assert peak < 1024 * 1024


def test_zstd_size_not_matching_declared_rejected() -> None:
    header, data = _split(_update_body())
    compressed = zstandard.ZstdCompressor(level=1, write_content_size=True).compress(data + bytes(64))
    header[HEADER["lossless"]] = "zstd"
    header[HEADER["data_bytes"]] = len(compressed)

    error = _decode_error(_join(header, compressed))

    assert error.field == "lossless"


def test_raw_size_not_matching_data_rejected() -> None:
    header, data = _split(_update_body())
    header[HEADER["raw_bytes"]] = header[HEADER["data_bytes"]] + 64

    error = _decode_error(_join(header, data))

    assert error.field == "raw_bytes"


# Pickle


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_payload_rejected(protocol: int) -> None:
    body = pickle.dumps({"kind": "update", "weights": np.zeros(3)}, protocol=protocol)

    error = _decode_error(body)

    assert error.field in ("frame", "frame.magic")


def test_pickle_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled.txt"
    payload = pickle.dumps(_Exploit(marker))
    header, data = _split(_update_body())

    # The same payload in every place a frame carries bytes.
    as_field = list(header)
    as_field[HEADER["fields"]] = [*header[HEADER["fields"]][:7], {"loss": payload}, *header[HEADER["fields"]][8:]]
    as_tensor = list(header)
    as_tensor[HEADER["encodings"]] = [*header[HEADER["encodings"]], ["raw", {}, "uint8"]]
    as_tensor[HEADER["tensors"]] = [*header[HEADER["tensors"]], ["deltas/p", 2, [len(payload)], None]]
    as_tensor[HEADER["raw_bytes"]] = as_tensor[HEADER["data_bytes"]] = len(data) + len(payload)
    as_params = list(header)
    as_params[HEADER["encodings"]] = [[codec, {"pickle": payload}, dtype] for codec, _, dtype in header[HEADER["encodings"]]]
    bodies = [
        payload,
        _join(payload, b""),
        _join(as_field, data),
        _join(as_tensor, data + payload),
        _join(as_params, data),
        MAGIC + payload,
    ]
    for body in bodies:
        try:
            message = decode_message(body)
        except MessageError:
            continue
        # A frame that decodes carries the payload only as inert bytes.
        if isinstance(message, Update):
            for name, tensor in message.deltas.items():
                wire_tensors.decode(tensor, name=name)

    assert not marker.exists()

    # The payload is live: unpickling it does write the marker.
    control = tmp_path / "control.txt"
    pickle.loads(pickle.dumps(_Exploit(control)))
    assert control.exists()


# Fuzzing


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_frames_rejected(data: st.DataObject) -> None:
    body = bytearray(_update_body(lossless_method=data.draw(st.sampled_from(["none", "zstd"]))))
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(body) - 1))
        body[position] = data.draw(st.integers(0, 255))

    try:
        message = decode_message(bytes(body), LIMITS)
    except MessageError:
        return
    if isinstance(message, Update):
        for name, tensor in message.deltas.items():
            try:
                wire_tensors.decode(tensor, name=name)
            except MessageError:
                pass


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside a header of nested maps and lists."""
    children: list[tuple[Any, Any]] = []
    if isinstance(node, dict):
        children = list(node.items())
    elif isinstance(node, list):
        children = list(enumerate(node))
    paths = []
    for key, child in children:
        paths.append((*prefix, key))
        paths.extend(_paths(child, (*prefix, key)))
    return paths


_ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.sampled_from(["float32", "uint64", "bool", "raw", "q8", "topk", "bfloat16", "deltas/w"]),
    st.lists(st.integers(-2, 2**40), max_size=3),
    st.lists(st.sampled_from(["values", "float32", "int64", 0, 3, 12, None]), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(-(2**63), 2**64 - 1), max_size=2),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_odd_header_values_rejected(data: st.DataObject) -> None:
    header, region = _split(_update_body())
    paths = _paths(header)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        parent = header
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = data.draw(_ODD_VALUES)
        paths = _paths(header)

    try:
        message = decode_message(_join(header, region), LIMITS)
    except MessageError:
        return
    if isinstance(message, Update):
        for name, tensor in message.deltas.items():
            try:
                wire_tensors.decode(tensor, name=name)
            except MessageError:
                pass


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=512))
def test_random_bytes_raise_message_error(body: bytes) -> None:
    with pytest.raises(MessageError):
        decode_message(body)


@settings(max_examples=200, deadline=None)
@given(header=st.binary(max_size=256), data=st.binary(max_size=256))
def test_random_header_rejected(header: bytes, data: bytes) -> None:
    body = struct.pack(">3sBI", MAGIC, FORMAT_VERSION, len(header)) + header + data

    with pytest.raises(MessageError):
        unpack_frame(body, max_raw_bytes=1 << 20, max_elements=1 << 16)


def test_decode_accepts_bytearray_and_memoryview() -> None:
    body = encode_message(Leave(worker_id="worker-1", reason="shutdown", sent_unix=2.0))

    for form in (bytearray(body), memoryview(body)):
        decoded = decode_message(form)
        assert isinstance(decoded, Leave)
        assert decoded.reason == "shutdown"
