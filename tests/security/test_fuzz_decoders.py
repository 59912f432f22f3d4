"""Fuzzing of every decoder that a hostile message reaches, with bounded examples and deadlines.

Properties:

- ``decode_message`` and the tensor decoders raise nothing but MessageError (and its
  subclass CodecError), and allocate at most the configured limits plus the body.
- The consumer's chunk reassembly and blob fetch never raise, hold at most the
  declared payload size, which is itself checked against ``max_payload_bytes``.

Memory is measured with tracemalloc, which records numpy's, msgpack's and
zstandard's allocations through Python's allocator hooks.
"""

from __future__ import annotations

import hashlib
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pika.spec import Basic, BasicProperties

from fedmq.broker import (
    HEADER_BLOB_QUEUE,
    HEADER_CHUNK_COUNT,
    HEADER_CHUNK_INDEX,
    HEADER_PAYLOAD_BYTES,
    HEADER_PAYLOAD_ID,
    HEADER_SHA256,
    BrokerClient,
    BrokerSettings,
    Delivery,
)
from fedmq.errors import MessageError
from schemas import codecs
from schemas import tensors as wire_tensors
from schemas.messages import MESSAGE_TYPES, DecodeLimits, Join, RoundStart, Update, decode_message, encode_message
from schemas.wire import ALIGNMENT, FORMAT_VERSION, MAGIC, MIN_ALIGNED_BYTES, PREFIX, REGION_ALIGNMENT, WireTensor

MAX_RAW_BYTES = 64 * 1024
MAX_ELEMENTS = 16 * 1024
LIMITS = DecodeLimits(max_raw_bytes=MAX_RAW_BYTES, max_elements=MAX_ELEMENTS)
# Interpreter bookkeeping (frames, small objects, exception objects) on top of the limits.
SLACK_BYTES = 256 * 1024

FUZZ = settings(
    max_examples=300,
    deadline=timedelta(milliseconds=2000),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@contextmanager
def peak_allocation() -> Iterator[list[int]]:
    """Yield a list that holds, after the block, the peak bytes allocated inside it."""
    result: list[int] = []
    tracemalloc.start()
    tracemalloc.reset_peak()
    baseline = tracemalloc.get_traced_memory()[0]
    try:
        yield result
    finally:
        result.append(tracemalloc.get_traced_memory()[1] - baseline)
        tracemalloc.stop()


def _valid_messages() -> list[bytes]:
    rng = np.random.default_rng(0)
    values = rng.normal(size=(40, 30)).astype(np.float32)
    deltas: dict[str, WireTensor] = {}
    for name in ("float16", "q8", "q4", "topk", "topk_q8", "bfloat16"):
        encoded = codecs.encode(values, codecs.CodecSpec(name), rng=rng)
        deltas[name] = WireTensor(encoded.codec, tuple(encoded.shape), encoded.dtype, encoded.arrays, dict(encoded.params))
    deltas["steps"] = wire_tensors.encode_raw(np.array([3], dtype=np.int64), "int64")
    update = Update(
        run_id="run", round=1, attempt=0, model_version=0, worker_id="w1", num_samples=5, num_steps=2,
        metrics={"loss": 0.5}, deltas=deltas, codec="mixed",
    )
    start = RoundStart(
        run_id="run", round=1, attempt=0, model_version=0, task="digits", deadline_unix=1.0, config={"codec": "q8"},
        weights={"w": wire_tensors.encode_raw(values, "float32")},
    )
    return [
        encode_message(update),
        encode_message(update, lossless_method="zstd"),
        encode_message(start, lossless_method="zstd"),
        encode_message(Join(worker_id="w1", task="digits", num_samples=3)),
    ]


VALID = _valid_messages()


def decode_everything(body: bytes) -> None:
    """Decode a message and every tensor in it, as the coordinator and the workers do."""
    message = decode_message(body, LIMITS)
    for group in ("deltas", "weights", "aux"):
        for name, tensor in getattr(message, group, {}).items():
            wire_tensors.decode(tensor, name=name)


def check_decoder(body: bytes) -> None:
    with peak_allocation() as peak:
        try:
            decode_everything(body)
        except MessageError:
            pass
    # Decoded tensors are float32 (4 bytes), or raw parts viewed in place.
    assert peak[0] <= MAX_RAW_BYTES + 4 * MAX_ELEMENTS + len(body) + SLACK_BYTES


# decode_message


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_raise_only_message_error(body: bytes) -> None:
    check_decoder(body)


@FUZZ
@given(
    st.sampled_from(range(len(VALID))),
    st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)), min_size=1, max_size=8),
    st.integers(min_value=0),
)
def test_mutated_frames_raise_only_message_error(which: int, flips: list[tuple[int, int]], cut: int) -> None:
    body = bytearray(VALID[which])
    for position, value in flips:
        body[position % len(body)] = value
    check_decoder(bytes(body[: len(body) - cut % 64]))


_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1), st.floats(allow_nan=True), st.text(max_size=8), st.binary(max_size=8)
)
_NUMBERS = st.one_of(st.integers(min_value=-(2**40), max_value=2**62), st.sampled_from([0, 1, 7, 4096, MAX_ELEMENTS, MAX_ELEMENTS + 1, 2**31, 2**62]))


def _frame(header: list[Any], data: bytes) -> bytes:
    """Build a frame around a header and a data region, with the padding that the header's raw_bytes implies."""
    header_bytes = msgpack.packb(header, use_bin_type=True)
    raw_bytes = header[6]
    alignment = ALIGNMENT if isinstance(raw_bytes, int) and raw_bytes >= MIN_ALIGNED_BYTES else REGION_ALIGNMENT
    header_end = PREFIX.size + len(header_bytes)
    padding = bytes(-header_end % alignment)
    return PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes)) + header_bytes + padding + data


_PART_DTYPES = st.sampled_from(["float32", "float16", "int8", "uint8", "uint16", "uint32", "uint64", "bool", "object", "complex64"])


@st.composite
def hostile_headers(draw: st.DrawFn) -> tuple[list[Any], bytes]:
    """A well-formed msgpack header whose declared sizes, shapes, encodings and parts are arbitrary."""
    data = draw(st.binary(max_size=2048))
    encodings = [
        [
            draw(st.sampled_from(["raw", "float32", "float16", "bfloat16", "q8", "q4", "topk", "topk_q8", "zip"])),
            draw(st.dictionaries(st.sampled_from(["block_size", "topk_fraction", "x"]), _SCALARS | _NUMBERS, max_size=3)),
            draw(st.sampled_from(["float32", "float16", "bfloat16", "int64", "bool", "uint16", "str"])),
        ]
        for _ in range(draw(st.integers(min_value=0, max_value=3)))
    ]
    tensors = []
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        names = st.sampled_from(["values", "scales", "codes", "indices", "x"])
        listed = draw(st.one_of(st.none(), st.lists(st.tuples(names, _PART_DTYPES, _NUMBERS).map(list), max_size=3)))
        tensors.append(
            [
                draw(st.sampled_from(["deltas/a", "deltas/b", "weights/a", "aux/x", "bad"])),
                draw(st.one_of(st.integers(min_value=-1, max_value=3), _NUMBERS)),
                draw(st.lists(_NUMBERS, max_size=4)),
                listed,
            ]
        )
    kind = draw(st.sampled_from(["update", "round_start", "join", "leave", "train_failed", "other"]))
    values = {
        "run_id": "run", "round": draw(_NUMBERS), "attempt": 0, "model_version": draw(_NUMBERS), "worker_id": draw(st.text(max_size=4)),
        "num_samples": draw(_NUMBERS), "num_steps": 1, "metrics": draw(st.dictionaries(st.text(max_size=3), _SCALARS, max_size=2)),
        "codec": "q8", "sent_unix": 1.0, "task": "digits", "deadline_unix": 1.0, "config": {}, "weights_kind": "full", "base_version": -1,
    }
    table = MESSAGE_TYPES[kind].FIELDS if kind in MESSAGE_TYPES else values
    fields = [values.get(name, 0) for name in table][: draw(st.integers(min_value=0, max_value=len(table) + 1))]
    lossless = draw(st.sampled_from(["none", "zstd", "lz4"]))
    header = [
        kind,
        draw(st.sampled_from([1, 2])),
        fields,
        encodings,
        tensors,
        lossless,
        draw(st.one_of(st.just(len(data)), _NUMBERS)),
        draw(st.one_of(st.just(len(data)), _NUMBERS)),
    ]
    return header, data


@FUZZ
@given(hostile_headers())
def test_hostile_headers_raise_only_message_error(frame: tuple[list[Any], bytes]) -> None:
    header, data = frame
    check_decoder(_frame(header, data))


def test_declared_sizes_are_checked_before_allocation() -> None:
    # A zstd frame that declares a gigabyte of content, and a top-k tensor that
    # declares 2**40 values, each in a message of under 1 KiB.
    header: list[Any] = ["update", 1, [], [], [], "zstd", 1 << 30, 16]
    zstd_bomb = _frame(header, b"\x28\xb5\x2f\xfd" + bytes(12))
    indices = np.array([0], dtype=np.uint64)
    topk = WireTensor("topk", (2**40,), "float32", {"indices": indices, "values": np.ones(1, dtype=np.float32)}, {"topk_fraction": 1e-12})
    update = Update(run_id="r", round=1, attempt=0, model_version=0, worker_id="w", num_samples=1, num_steps=1, metrics={}, deltas={"w": topk})
    sparse_bomb = encode_message(update)

    for body in (zstd_bomb, sparse_bomb):
        assert len(body) < 1024
        with peak_allocation() as peak:
            with pytest.raises(MessageError):
                decode_everything(body)
        assert peak[0] < SLACK_BYTES


# Chunk reassembly and blob fetch


class _Method:
    def __init__(self, tag: int) -> None:
        self.delivery_tag = tag


class FakeChannel:
    """The channel calls that the consumer path makes, recorded instead of sent."""

    is_open = True

    def __init__(self) -> None:
        self.blobs: dict[str, list[bytes]] = {}
        self.dead_lettered: list[str] = []
        self.on_message: Callable[..., None] | None = None
        self._tag = 10_000

    def basic_qos(self, prefetch_count: int) -> None:
        pass

    def basic_consume(self, queue: str, on_message: Callable[..., None], auto_ack: bool) -> str:
        self.on_message = on_message
        return "consumer-1"

    def basic_ack(self, tag: int, multiple: bool = False) -> None:
        pass

    def basic_nack(self, tag: int, multiple: bool = False, requeue: bool = True) -> None:
        pass

    def basic_publish(self, exchange: str, routing_key: str, body: bytes, properties: BasicProperties, mandatory: bool = False) -> None:
        self.dead_lettered.append(str((properties.headers or {}).get("fedmq-reject-reason")))

    def basic_get(self, queue: str, auto_ack: bool = False) -> tuple[Any, Any, Any]:
        pieces = self.blobs.get(queue, [])
        if not pieces:
            return None, None, None
        self._tag += 1
        return _Method(self._tag), BasicProperties(), pieces.pop(0)

    def queue_delete(self, queue: str) -> None:
        self.blobs.pop(queue, None)


class FakeConnection:
    is_open = True

    def __init__(self, channel: FakeChannel) -> None:
        self._channel = channel

    def channel(self) -> FakeChannel:
        return self._channel


MAX_PAYLOAD_BYTES = 64 * 1024


def _consumer() -> tuple[FakeChannel, list[Delivery]]:
    client = BrokerClient(
        BrokerSettings(federation="fuzz", max_message_bytes=4096, max_payload_bytes=MAX_PAYLOAD_BYTES), client_name="fuzz"
    )
    channel = FakeChannel()
    client._connection = FakeConnection(channel)  # type: ignore[assignment]
    client._channel = channel  # type: ignore[assignment]
    delivered: list[Delivery] = []
    client.consume("fuzz.results", delivered.append)
    return channel, delivered


_HEADER_VALUES = st.one_of(_NUMBERS, st.text(max_size=6), st.none(), st.binary(max_size=4), st.floats(allow_nan=True))


@st.composite
def chunk_messages(draw: st.DrawFn) -> list[tuple[dict[str, Any], bytes]]:
    """Chunks of up to two payloads with arbitrary, sometimes consistent, headers."""
    messages = []
    for _ in range(draw(st.integers(min_value=1, max_value=12))):
        body = draw(st.binary(max_size=6000))
        headers = {
            HEADER_PAYLOAD_ID: draw(st.sampled_from(["p1", "p2", 3])),
            HEADER_CHUNK_INDEX: draw(st.one_of(st.integers(min_value=-2, max_value=5), _HEADER_VALUES)),
            HEADER_CHUNK_COUNT: draw(st.one_of(st.integers(min_value=0, max_value=5), _HEADER_VALUES)),
            HEADER_PAYLOAD_BYTES: draw(st.one_of(st.integers(min_value=0, max_value=3 * MAX_PAYLOAD_BYTES), _HEADER_VALUES)),
            HEADER_SHA256: draw(st.sampled_from(["", hashlib.sha256(body).hexdigest(), "0" * 64])),
        }
        for key in draw(st.lists(st.sampled_from(list(headers)), max_size=2)):
            headers.pop(key, None)
        messages.append((headers, body))
    return messages


@FUZZ
@given(chunk_messages())
def test_chunk_reassembly_never_raises(messages: list[tuple[dict[str, Any], bytes]]) -> None:
    channel, delivered = _consumer()
    assert channel.on_message is not None
    with peak_allocation() as peak:
        for tag, (headers, body) in enumerate(messages, start=1):
            method = Basic.Deliver(delivery_tag=tag, redelivered=False, routing_key="fuzz.results")
            channel.on_message(channel, method, BasicProperties(headers=headers, message_id=f"m{tag}"), body)
        for delivery in delivered:
            assert len(delivery.body) <= MAX_PAYLOAD_BYTES
            try:
                decode_everything(bytes(delivery.body))
            except MessageError:
                pass
    # The pieces are the received bodies themselves; assembly adds at most one payload.
    assert peak[0] <= MAX_PAYLOAD_BYTES + sum(len(body) for _, body in messages) + MAX_RAW_BYTES + 4 * MAX_ELEMENTS + SLACK_BYTES


@FUZZ
@given(
    st.sampled_from(["fuzz.blob.w1.abc", "fuzz.results", "fuzz.worker.w2", "other.blob.x"]),
    st.one_of(st.integers(min_value=-1, max_value=6), _HEADER_VALUES),
    st.one_of(st.integers(min_value=-1, max_value=2 * MAX_PAYLOAD_BYTES), _HEADER_VALUES),
    st.lists(st.binary(max_size=20_000), max_size=6),
    st.booleans(),
)
def test_blob_fetch_never_raises(queue: str, count: Any, total: Any, pieces: list[bytes], honest_digest: bool) -> None:
    channel, delivered = _consumer()
    assert channel.on_message is not None
    channel.blobs[queue] = list(pieces)
    digest = hashlib.sha256(b"".join(pieces)).hexdigest() if honest_digest else "0" * 64
    headers = {HEADER_BLOB_QUEUE: queue, HEADER_CHUNK_COUNT: count, HEADER_PAYLOAD_BYTES: total, HEADER_SHA256: digest}
    method = Basic.Deliver(delivery_tag=1, redelivered=False, routing_key="fuzz.results")

    with peak_allocation() as peak:
        channel.on_message(channel, method, BasicProperties(headers=headers, message_id="ref"), b"")

    if delivered:
        assert queue.startswith("fuzz.blob.")
        assert bytes(delivered[0].body) == b"".join(pieces)[: len(delivered[0].body)]
        assert len(delivered[0].body) <= MAX_PAYLOAD_BYTES
    else:
        assert channel.dead_lettered
    # The body grows with the chunks read, never to a declared size that did not arrive.
    assert peak[0] <= 2 * sum(len(piece) for piece in pieces) + SLACK_BYTES


def test_blob_reference_to_foreign_queue_is_dead_lettered() -> None:
    channel, delivered = _consumer()
    assert channel.on_message is not None
    channel.blobs["fuzz.results"] = [b"x" * 10]
    headers = {HEADER_BLOB_QUEUE: "fuzz.results", HEADER_CHUNK_COUNT: 1, HEADER_PAYLOAD_BYTES: 10, HEADER_SHA256: hashlib.sha256(b"x" * 10).hexdigest()}

    channel.on_message(channel, Basic.Deliver(delivery_tag=1, routing_key="r"), BasicProperties(headers=headers), b"")

    assert delivered == []
    assert channel.blobs["fuzz.results"] == [b"x" * 10]
    assert "not a blob queue" in channel.dead_lettered[0]


def test_chunks_beyond_declared_total_are_dropped() -> None:
    channel, delivered = _consumer()
    assert channel.on_message is not None
    # A sender that declares 10 bytes in a million chunks, then sends 200 chunks of 5,000 bytes.
    tracemalloc.start()
    try:
        for tag in range(200):
            headers = {HEADER_PAYLOAD_ID: "p", HEADER_CHUNK_INDEX: tag, HEADER_CHUNK_COUNT: 10**6, HEADER_PAYLOAD_BYTES: 10, HEADER_SHA256: "0" * 64}
            channel.on_message(channel, Basic.Deliver(delivery_tag=tag + 1, routing_key="r"), BasicProperties(headers=headers), bytes(5000))
        # The chunk bodies were allocated on the line above; count those still held.
        snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, __file__)])
    finally:
        tracemalloc.stop()

    assert delivered == []
    assert sum(trace.size for trace in snapshot.traces) < 20_000
