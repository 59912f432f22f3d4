"""BrokerClient under faults: oversize payloads, small broker limits, nacks, bad references, cancelled consumers."""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from collections.abc import Callable

import pytest

from fedmq.broker import (
    CONNECTION_ERRORS,
    HEADER_BLOB_QUEUE,
    HEADER_CHUNK_COUNT,
    HEADER_PAYLOAD_BYTES,
    HEADER_REJECT_REASON,
    HEADER_SHA256,
    NACK_ATTEMPTS,
    BrokerClient,
    BrokerSettings,
    ConsumerCancelledError,
    Delivery,
)
from fedmq.errors import PayloadTooLargeError, PublishError
from fedmq.rabbitmq_node import RabbitMQNode
from tests.faults.helpers import consumer_counts, dead_letters, queue_table


def make_client(url: str, federation: str, name: str, **settings: int) -> BrokerClient:
    client = BrokerClient(BrokerSettings(url=url, federation=federation, **settings), client_name=name)
    client.connect()
    return client


def collect(client: BrokerClient, queue_name: str, *, prefetch: int = 16) -> list[Delivery]:
    """Consume ``queue_name`` into a list, acking each delivery."""
    received: list[Delivery] = []

    def on_delivery(delivery: Delivery) -> None:
        received.append(delivery)
        client.ack(delivery)

    client.consume(queue_name, on_delivery, prefetch=prefetch)
    return received


def pump_until(clients: list[BrokerClient], condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"condition not met within {timeout_s} s"
        for client in clients:
            client.process_events(0.05)


def test_oversize_payload_fails_fast_and_channel_stays_usable(broker_url: str) -> None:
    federation = f"faults-oversize-{uuid.uuid4().hex[:6]}"
    client = make_client(broker_url, federation, "oversize", max_message_bytes=4096, max_payload_bytes=65536)
    try:
        queue_name = client.declare_worker_queue("w1")
        received = collect(client, queue_name)
        epoch = client.epoch

        with pytest.raises(PayloadTooLargeError) as round_error:
            client.publish(client.topology.rounds_exchange, client.topology.ROUTING_ALL, b"x" * 100_000)
        with pytest.raises(PayloadTooLargeError) as update_error:
            client.publish_result("w1", b"y" * 70_000)

        assert "100000 bytes" in str(round_error.value)
        assert "65536 bytes" in str(round_error.value)
        assert update_error.value.size_bytes == 70_000
        assert update_error.value.limit_bytes == 65536

        # The same channel and consumer still carry a chunked payload under the limit.
        body = os.urandom(60_000)
        client.publish(client.topology.rounds_exchange, client.topology.ROUTING_ALL, body)
        pump_until([client], lambda: len(received) == 1)
        assert bytes(received[0].body) == body
        assert client.epoch == epoch
        assert client.connected
    finally:
        client.close()


def test_chunks_beyond_prefetch_window_reassemble(broker_url: str) -> None:
    federation = f"faults-prefetch-{uuid.uuid4().hex[:6]}"
    client = make_client(broker_url, federation, "prefetch", max_message_bytes=4096)
    try:
        queue_name = client.declare_worker_queue("w1")
        received = collect(client, queue_name, prefetch=2)
        body = os.urandom(50_000)

        client.publish(client.topology.rounds_exchange, client.topology.ROUTING_ALL, body)
        pump_until([client], lambda: len(received) == 1)

        assert bytes(received[0].body) == body
        assert received[0].delivery_tags == []
        assert client.queue_depth(queue_name) == 0
    finally:
        client.close()


def publish_reconnecting(client: BrokerClient, publish: Callable[[], str]) -> None:
    """Publish once, and once more after a reconnect, as the services do; the first attempt must fail."""
    with pytest.raises(CONNECTION_ERRORS):
        publish()
    client.reconnect()
    publish()


def test_client_adopts_smaller_broker_message_limit(
    make_rabbitmq: Callable[..., RabbitMQNode], caplog: pytest.LogCaptureFixture
) -> None:
    node = make_rabbitmq(max_message_size=8192)
    federation = f"faults-limit-{uuid.uuid4().hex[:6]}"
    # Both clients believe that bodies up to 15 MiB pass in one piece.
    worker = make_client(node.url, federation, "limit-worker")
    coordinator = make_client(node.url, federation, "limit-coordinator")
    try:
        round_starts = collect(worker, worker.declare_worker_queue("w1"))
        updates = collect(coordinator, coordinator.topology.results_queue)
        round_start = os.urandom(40_000)
        update = os.urandom(30_000)

        # The first publish of each fails and teaches the client the broker's limit.
        # The services reconnect on that error, and the publish after it goes out in chunks.
        with caplog.at_level(logging.WARNING, logger="fedmq.broker"):
            publish_reconnecting(
                coordinator,
                lambda: coordinator.publish(coordinator.topology.rounds_exchange, coordinator.topology.ROUTING_ALL, round_start),
            )
            publish_reconnecting(worker, lambda: worker.publish_result("w1", update))
        pump_until([worker, coordinator], lambda: len(round_starts) == 1 and len(updates) == 1)

        assert bytes(round_starts[0].body) == round_start
        assert bytes(updates[0].body) == update
        assert updates[0].blob_queue is not None
        assert coordinator.max_message_bytes == 8192
        assert worker.max_message_bytes == 8192
        assert sum("lowering max_message_bytes" in record.getMessage() for record in caplog.records) == 2
        counts = consumer_counts(node, federation)
        assert counts[coordinator.topology.results_queue] == 1
        assert counts[worker.topology.worker_queue("w1")] == 1
    finally:
        worker.close()
        coordinator.close()


def test_nacked_publish_retries_then_raises(broker_url: str, caplog: pytest.LogCaptureFixture) -> None:
    federation = f"faults-nack-{uuid.uuid4().hex[:6]}"
    client = make_client(broker_url, federation, "nack")
    full_queue = f"{federation}.full"
    try:
        # A full queue with reject-publish overflow makes the broker nack every publish.
        client.channel.queue_declare(full_queue, arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
        client.publish("", full_queue, b"first")

        with caplog.at_level(logging.WARNING, logger="fedmq.broker"), pytest.raises(PublishError) as error:
            client.publish("", full_queue, b"second")

        retries = [record.getMessage() for record in caplog.records if "nacked" in record.getMessage()]
        assert len(retries) == NACK_ATTEMPTS - 1
        assert f"[attempt 1/{NACK_ATTEMPTS}]" in retries[0]
        assert f"{NACK_ATTEMPTS} times" in str(error.value)
        assert client.queue_depth(full_queue) == 1
    finally:
        client.channel.queue_delete(full_queue)
        client.close()


@pytest.mark.parametrize(
    ("blob_queue", "reason"),
    [
        ("{federation}.blob.w1.missing", "cannot be read"),
        ("{federation}.results", "not a blob queue"),
    ],
    ids=["missing-queue", "foreign-queue"],
)
def test_bad_blob_reference_is_dead_lettered(broker_url: str, blob_queue: str, reason: str) -> None:
    federation = f"faults-ref-{uuid.uuid4().hex[:6]}"
    blob_queue = blob_queue.format(federation=federation)
    coordinator = make_client(broker_url, federation, "ref-coordinator")
    worker = make_client(broker_url, federation, "ref-worker")
    try:
        updates = collect(coordinator, coordinator.topology.results_queue)
        reference = {HEADER_BLOB_QUEUE: blob_queue, HEADER_CHUNK_COUNT: 2, HEADER_PAYLOAD_BYTES: 100, HEADER_SHA256: "0" * 64}
        worker.publish(worker.topology.results_exchange, worker.topology.results_queue, b"", headers=reference)
        worker.publish_result("w1", b"a message after the bad reference")

        pump_until([coordinator], lambda: len(updates) == 1)

        assert bytes(updates[0].body) == b"a message after the bad reference"
        dead = dead_letters(broker_url, federation)
        assert len(dead) == 1
        assert reason in dead[0][0][HEADER_REJECT_REASON]
        assert coordinator.queue_depth(coordinator.topology.results_queue) == 0
        assert coordinator.connected
    finally:
        coordinator.close()
        worker.close()


def test_tampered_blob_chunk_is_dead_lettered(broker_url: str) -> None:
    federation = f"faults-tamper-{uuid.uuid4().hex[:6]}"
    coordinator = make_client(broker_url, federation, "tamper-coordinator")
    worker = make_client(broker_url, federation, "tamper-worker", max_message_bytes=4096)
    try:
        updates = collect(coordinator, coordinator.topology.results_queue)
        # Publish the chunks by hand, the second one altered after the digest was taken.
        body = os.urandom(10_000)
        blob_queue = worker.topology.blob_queue("w1", "tampered")
        worker.channel.queue_declare(blob_queue, durable=True)
        worker.publish("", blob_queue, body[:4096])
        worker.publish("", blob_queue, b"\x00" + body[4097:8192])
        worker.publish("", blob_queue, body[8192:])
        reference = {
            HEADER_BLOB_QUEUE: blob_queue,
            HEADER_CHUNK_COUNT: 3,
            HEADER_PAYLOAD_BYTES: len(body),
            HEADER_SHA256: hashlib.sha256(body).hexdigest(),
        }
        worker.publish(worker.topology.results_exchange, worker.topology.results_queue, b"", headers=reference)
        worker.publish_result("w1", b"next")

        pump_until([coordinator], lambda: len(updates) == 1)

        assert bytes(updates[0].body) == b"next"
        dead = dead_letters(broker_url, federation)
        assert [headers[HEADER_REJECT_REASON] for headers, _ in dead] == [f"invalid_reference: payload in {blob_queue} failed its integrity check"]
    finally:
        coordinator.close()
        worker.close()


def test_deleted_queue_cancels_consumer_and_reconnect_restores_it(rabbitmq: RabbitMQNode) -> None:
    federation = f"faults-cancel-{uuid.uuid4().hex[:6]}"
    client = BrokerClient(BrokerSettings(url=rabbitmq.url, federation=federation), client_name="cancel")
    client.add_setup_step(lambda: client.declare_worker_queue("w1"))
    received = collect(client, client.topology.worker_queue("w1"))
    client.connect()
    try:
        rabbitmq.ctl("delete_queue", client.topology.worker_queue("w1"))

        with pytest.raises(ConsumerCancelledError):
            pump_until([client], lambda: False, timeout_s=10.0)
        client.reconnect()
        client.publish(client.topology.rounds_exchange, client.topology.ROUTING_ALL, b"after the reconnect")
        pump_until([client], lambda: len(received) == 1)

        assert bytes(received[0].body) == b"after the reconnect"
        assert consumer_counts(rabbitmq, federation) == {client.topology.worker_queue("w1"): 1}
    finally:
        client.close()


def test_results_queue_is_durable_quorum_with_persistent_messages(rabbitmq: RabbitMQNode) -> None:
    federation = f"faults-durable-{uuid.uuid4().hex[:6]}"
    client = make_client(rabbitmq.url, federation, "durable")
    try:
        client.publish_result("w1", b"an update")
        client.declare_worker_queue("w1")
        client.publish(client.topology.rounds_exchange, client.topology.ROUTING_ALL, b"a round start")

        table = queue_table(rabbitmq, "type", "durable", "messages_persistent")

        # A quorum queue writes every message to disk and reports no persistent count.
        assert table[client.topology.results_queue][:2] == ["quorum", "true"]
        assert client.queue_depth(client.topology.results_queue) == 1
        assert table[client.topology.worker_queue("w1")] == ["classic", "true", "1"]
        assert table[client.topology.dead_letter_queue][:2] == ["classic", "true"]
    finally:
        client.close()
