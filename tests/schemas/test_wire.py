"""Malformed frames: every one raises MessageError naming the field, and nothing is ever unpickled."""

from __future__ import annotations

import pickle
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmq.errors import MessageError
from schemas import tensors as wire_tensors
from schemas.messages import DecodeLimits, Leave, Update, decode_message, encode_message
from schemas.wire import ALIGNMENT, FORMAT_VERSION, MAGIC, PREFIX, unpack_frame


def _write_marker(path: str) -> None:
    Path(path).write_text("unpickled")


class _Exploit:
    """Pickles into a payload that writes a marker file when unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
        return _write_marker, (str(self.path),)


def _update_body(lossless_method: str = "none") -> bytes:
    update = Update(
        run_id="run-wire",
        round=1,
        attempt=0,
        model_version=0,
        worker_id="worker-1",
        num_samples=10,
        num_steps=1,
        metrics={"loss": 1.0},
        deltas={
            "w": wire_tensors.encode_raw(np.arange(12, dtype=np.float32).reshape(3, 4), "float32"),
            "steps": wire_tensors.encode_raw(np.array([4, 5, 6], dtype=np.int64), "int64"),
        },
        sent_unix=1.0,
    )
    return encode_message(update, lossless_method=lossless_method)


def _split(body: bytes) -> tuple[dict[str, Any], bytes]:
    _, _, header_length = PREFIX.unpack_from(body)
    header = msgpack.unpackb(body[PREFIX.size : PREFIX.size + header_length], raw=False)
    return header, body[PREFIX.size + header_length :]


def _join(header: dict[str, Any] | bytes, data: bytes, *, magic: bytes = MAGIC, version: int = FORMAT_VERSION) -> bytes:
    header_bytes = header if isinstance(header, bytes) else msgpack.packb(header, use_bin_type=True)
    return PREFIX.pack(magic, version, len(header_bytes)) + header_bytes + data


def _record(header: dict[str, Any], name: str) -> dict[str, Any]:
    return next(record for record in header["tensors"] if record["name"] == name)


def _decode_error(body: bytes, limits: DecodeLimits = DecodeLimits()) -> MessageError:
    with pytest.raises(MessageError) as caught:
        decode_message(body, limits)
    return caught.value


def test_valid_frame_layout() -> None:
    body = _update_body()
    header, data = _split(body)

    assert body[:3] == MAGIC
    assert header["kind"] == "update"
    assert header["lossless"] == "none"
    assert header["raw_bytes"] == header["data_bytes"] == len(data)
    for record in header["tensors"]:
        for _, offset, _ in record["parts"].values():
            assert offset % ALIGNMENT == 0


# The prefix


def test_bad_magic_rejected() -> None:
    body = b"XYZ" + _update_body()[3:]

    error = _decode_error(body)

    assert error.field == "frame.magic"
    assert "XYZ" in str(error)


def test_unknown_format_version_rejected() -> None:
    header, data = _split(_update_body())

    error = _decode_error(_join(header, data, version=FORMAT_VERSION + 1))

    assert error.field == "frame.format"


def test_every_truncation_rejected() -> None:
    body = _update_body()
    header_end = PREFIX.size + PREFIX.unpack_from(body)[2]

    for length in range(len(body)):
        error = _decode_error(body[:length])
        if length < PREFIX.size:
            assert error.field == "frame", length
        elif length < header_end:
            assert error.field == "frame.header_length", length
        else:
            assert error.field == "data_bytes", length


def test_trailing_bytes_rejected() -> None:
    error = _decode_error(_update_body() + b"\x00")

    assert error.field == "data_bytes"


# The header


@pytest.mark.parametrize(
    "header_bytes",
    [b"\xc1", b"\x81\xa4kind", b"not msgpack at all", msgpack.packb([1, 2, 3]), msgpack.packb("update"), msgpack.packb({"kind": "update"}) + b"\x00"],
    ids=["reserved-byte", "truncated-map", "text", "array", "string", "trailing-bytes"],
)
def test_header_that_is_not_msgpack_map_rejected(header_bytes: bytes) -> None:
    error = _decode_error(_join(header_bytes, b""))

    assert error.field == "header"


def test_header_with_msgpack_extension_rejected() -> None:
    header, data = _split(_update_body())
    header["fields"]["metrics"] = {"loss": msgpack.ExtType(42, b"payload")}

    error = _decode_error(_join(header, data))

    assert error.field == "header"


@pytest.mark.parametrize("key", ["kind", "schema", "fields", "tensors", "lossless", "raw_bytes", "data_bytes"])
def test_header_missing_key_rejected(key: str) -> None:
    header, data = _split(_update_body())
    del header[key]

    error = _decode_error(_join(header, data))

    assert error.field == key
    assert "missing" in str(error)


@pytest.mark.parametrize(("key", "value"), [("schema", "1"), ("tensors", {}), ("raw_bytes", 1.5), ("data_bytes", True)])
def test_header_key_of_wrong_type_rejected(key: str, value: Any) -> None:
    header, data = _split(_update_body())
    header[key] = value

    error = _decode_error(_join(header, data))

    assert error.field == key


def test_unknown_lossless_method_rejected() -> None:
    header, data = _split(_update_body())
    header["lossless"] = "gzip"

    error = _decode_error(_join(header, data))

    assert error.field == "lossless"


# Tensor records


def test_part_outside_data_region_rejected() -> None:
    header, data = _split(_update_body())
    _record(header, "deltas/w")["parts"]["values"][1] = len(data) - 8

    error = _decode_error(_join(header, data))

    assert error.field == "tensors.deltas/w.parts.values"
    assert f"{len(data)}-byte data region" in str(error)


@pytest.mark.parametrize(("index", "label"), [(1, "offset"), (2, "count")])
def test_negative_part_offset_or_count_rejected(index: int, label: str) -> None:
    header, data = _split(_update_body())
    _record(header, "deltas/w")["parts"]["values"][index] = -1

    error = _decode_error(_join(header, data))

    assert error.field == f"tensors.deltas/w.parts.values.{label}"


@pytest.mark.parametrize("dtype", ["object", "O", "float128", "<f4", "complex64", "V8", "", ["float32"], {"name": "float32"}, 4])
def test_unknown_part_dtype_rejected(dtype: Any) -> None:
    header, data = _split(_update_body())
    _record(header, "deltas/w")["parts"]["values"][0] = dtype

    error = _decode_error(_join(header, data))

    assert error.field == "tensors.deltas/w.parts.values.dtype"


def test_part_spec_not_triple_rejected() -> None:
    header, data = _split(_update_body())
    _record(header, "deltas/w")["parts"]["values"] = ["float32", 0]

    error = _decode_error(_join(header, data))

    assert error.field == "tensors.deltas/w.parts.values"


def test_part_count_not_matching_shape_rejected() -> None:
    header, data = _split(_update_body())
    _record(header, "deltas/w")["parts"]["values"][2] = 11

    error = _decode_error(_join(header, data))

    assert error.field == "tensors.deltas/w.parts.values.count"
    assert "12 elements for shape [3, 4]" in str(error)


def test_part_dtype_not_matching_declared_dtype_rejected() -> None:
    header, data = _split(_update_body())
    _record(header, "deltas/steps")["parts"]["values"][0] = "float64"

    error = _decode_error(_join(header, data))

    assert error.field == "tensors.deltas/steps.parts.values.dtype"


@pytest.mark.parametrize("shape", [[-1, 4], [3.0, 4], "3x4", [True, 12]])
def test_invalid_shape_rejected(shape: Any) -> None:
    header, data = _split(_update_body())
    _record(header, "deltas/w")["shape"] = shape

    error = _decode_error(_join(header, data))

    assert error.field == "tensors.deltas/w.shape"


def test_shape_above_element_limit_rejected() -> None:
    body = _update_body()

    error = _decode_error(body, DecodeLimits(max_elements=11))

    assert error.field == "tensors.deltas/w.shape"
    assert "at most 11 elements" in str(error)


def test_duplicate_tensor_names_rejected() -> None:
    header, data = _split(_update_body())
    header["tensors"].append(dict(_record(header, "deltas/w")))

    error = _decode_error(_join(header, data))

    assert error.field == "tensors.deltas/w"
    assert "duplicate" in str(error)


def test_tensor_record_missing_key_rejected() -> None:
    header, data = _split(_update_body())
    del _record(header, "deltas/w")["codec"]

    error = _decode_error(_join(header, data))

    assert error.field == "tensors.deltas/w.codec"


# Declared sizes


def test_raw_size_above_limit_rejected() -> None:
    body = _update_body()
    raw_bytes = _split(body)[0]["raw_bytes"]

    error = _decode_error(body, DecodeLimits(max_raw_bytes=raw_bytes - 1))

    assert error.field == "raw_bytes"
    assert f"limit of {raw_bytes - 1} bytes" in str(error)


def test_zstd_size_above_limit_rejected() -> None:
    region = bytes(64 * 1024 * 1024)
    compressed = zstandard.ZstdCompressor(level=1).compress(region)
    header, _ = _split(_update_body())
    header.update(lossless="zstd", raw_bytes=len(region), data_bytes=len(compressed), tensors=[])

    error = _decode_error(_join(header, compressed), DecodeLimits(max_raw_bytes=1024 * 1024))

    assert len(compressed) < 10_000
    assert error.field == "raw_bytes"


def test_zstd_size_not_matching_declared_rejected() -> None:
    body = _update_body(lossless_method="zstd")
    header, data = _split(body)
    assert header["lossless"] == "zstd"
    header["raw_bytes"] += 64

    error = _decode_error(_join(header, data))

    assert error.field == "lossless"


def test_raw_size_not_matching_data_rejected() -> None:
    header, data = _split(_update_body())
    header["raw_bytes"] = header["data_bytes"] + 64

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
    as_field = dict(header, fields=dict(header["fields"], metrics={"loss": payload}))
    as_tensor = dict(header, tensors=header["tensors"] + [{"name": "deltas/p", "codec": "raw", "params": {}, "shape": [len(payload)], "dtype": "uint8", "parts": {"values": ["uint8", len(data), len(payload)]}}], raw_bytes=len(data) + len(payload), data_bytes=len(data) + len(payload))
    as_params = dict(header, tensors=[dict(record, params={"pickle": payload}) for record in header["tensors"]])
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
        message = decode_message(bytes(body), DecodeLimits(max_raw_bytes=1 << 20, max_elements=1 << 16))
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
        message = decode_message(_join(header, region), DecodeLimits(max_raw_bytes=1 << 20, max_elements=1 << 16))
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
