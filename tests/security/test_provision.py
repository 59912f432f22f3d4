"""Provisioned workers on a real RabbitMQ node: each permission denial, and a run without declarations.

Every check connects as a provisioned worker user and tries one operation. RabbitMQ
rejects an operation by closing the channel with 403 ACCESS_REFUSED (or 406
PRECONDITION_FAILED for a forged user_id), which pika raises as ChannelClosedByBroker.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pika
import pika.exceptions
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from coordinator.service import Coordinator, CoordinatorSettings
from fedmq.broker import BrokerSettings, Topology
from fedmq.errors import BrokerError, ConfigError
from fedmq.provision import ManagementClient, ProvisionedWorker, provision_worker, worker_permissions, worker_url
from fedmq.rabbitmq_node import RabbitMQNode
from fedmq.tasks import PartitionSpec, load_task
from tests.privacy.federation import run_federation
from worker.service import Worker, WorkerSettings

FEDERATION = "locked"
NAMES = Topology(FEDERATION)


@dataclass
class LockedBroker:
    node: RabbitMQNode
    client: ManagementClient
    workers: dict[str, ProvisionedWorker]

    def worker_settings(self, worker_id: str, **changes: object) -> BrokerSettings:
        worker = self.workers[worker_id]
        return BrokerSettings(url=worker.broker_url, password=worker.password, federation=FEDERATION, reconnect_timeout_s=20, **changes)  # type: ignore[arg-type]

    def coordinator_settings(self) -> BrokerSettings:
        return BrokerSettings(url=f"amqp://guest:guest@127.0.0.1:{self.node.port}/{FEDERATION}", federation=FEDERATION, reconnect_timeout_s=20)

    @contextmanager
    def channel(self, worker_id: str) -> Iterator[BlockingChannel]:
        worker = self.workers[worker_id]
        parameters = pika.ConnectionParameters(
            host="127.0.0.1", port=self.node.port, virtual_host=worker.vhost,
            credentials=pika.PlainCredentials(worker.user, worker.password), connection_attempts=1,
        )
        connection = pika.BlockingConnection(parameters)
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            yield channel
        finally:
            if connection.is_open:
                connection.close()


@pytest.fixture(scope="module")
def locked(rabbitmq_server: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LockedBroker]:
    node = RabbitMQNode(base_dir=tmp_path_factory.mktemp("rabbitmq-locked"), management=True)
    node.start()
    try:
        assert node.management_url is not None
        client = ManagementClient(node.management_url, user="guest", password="guest")
        workers = {
            worker_id: provision_worker(
                client, federation=FEDERATION, worker_id=worker_id, password=f"pw-{worker_id}-Xq7", broker_url=f"amqp://127.0.0.1:{node.port}/"
            )
            for worker_id in ("w1", "w2")
        }
        yield LockedBroker(node, client, workers)
    finally:
        node.close()


def _refused(locked: LockedBroker, worker_id: str, action: Callable[[BlockingChannel], object]) -> pika.exceptions.ChannelClosedByBroker:
    with locked.channel(worker_id) as channel, pytest.raises(pika.exceptions.ChannelClosedByBroker) as raised:
        action(channel)
    return raised.value


def _allowed(locked: LockedBroker, worker_id: str, action: Callable[[BlockingChannel], object]) -> object:
    with locked.channel(worker_id) as channel:
        return action(channel)


def _publish(channel: BlockingChannel, exchange: str, routing_key: str, user_id: str | None = None) -> None:
    channel.basic_publish(exchange, routing_key, b"probe", pika.BasicProperties(user_id=user_id))


# What a worker may do


def test_worker_consumes_own_queue(locked: LockedBroker) -> None:
    method, _, _ = _allowed(locked, "w1", lambda channel: channel.basic_get(NAMES.worker_queue("w1"), auto_ack=True))  # type: ignore[misc]
    assert method is None


def test_worker_publishes_results_as_itself(locked: LockedBroker) -> None:
    # The results queue does not exist yet, so the publish is simply unroutable (not refused).
    _allowed(locked, "w1", lambda channel: _publish(channel, NAMES.results_exchange, NAMES.results_queue, user_id="w1"))


def test_worker_sends_blob_through_own_queue(locked: LockedBroker) -> None:
    queue = NAMES.blob_queue("w1", "0123abcd")
    key = NAMES.blob_routing_key("w1", "0123abcd")

    def send_blob(channel: BlockingChannel) -> None:
        channel.queue_declare(queue, durable=True, arguments={"x-expires": 60_000})
        channel.queue_bind(queue, NAMES.blobs_exchange, routing_key=key)
        channel.basic_publish(NAMES.blobs_exchange, key, b"chunk", mandatory=True)
        channel.queue_delete(queue)

    _allowed(locked, "w1", send_blob)


# What a worker may not do


@pytest.mark.parametrize("queue", [NAMES.worker_queue("w2"), NAMES.results_queue, NAMES.dead_letter_queue])
def test_worker_cannot_read_other_queues(locked: LockedBroker, queue: str) -> None:
    error = _refused(locked, "w1", lambda channel: channel.basic_get(queue, auto_ack=True))
    assert error.reply_code == 403
    assert f"queue '{queue}'" in error.reply_text


def test_worker_cannot_consume_other_worker_queue(locked: LockedBroker) -> None:
    error = _refused(locked, "w1", lambda channel: channel.basic_consume(NAMES.worker_queue("w2"), lambda *args: None))
    assert error.reply_code == 403


@pytest.mark.parametrize("routing_key", [NAMES.ROUTING_ALL, NAMES.worker_routing_key("w2")])
def test_worker_cannot_publish_round_starts(locked: LockedBroker, routing_key: str) -> None:
    error = _refused(locked, "w1", lambda channel: _publish(channel, NAMES.rounds_exchange, routing_key))
    assert error.reply_code == 403
    assert f"exchange '{NAMES.rounds_exchange}'" in error.reply_text


def test_worker_cannot_publish_to_default_exchange(locked: LockedBroker) -> None:
    # That would reach any queue by name, another worker's round-start queue included.
    error = _refused(locked, "w1", lambda channel: _publish(channel, "", NAMES.worker_queue("w2")))
    assert error.reply_code == 403
    assert "amq.default" in error.reply_text


def test_worker_cannot_forge_user_id(locked: LockedBroker) -> None:
    error = _refused(locked, "w1", lambda channel: _publish(channel, NAMES.results_exchange, NAMES.results_queue, user_id="w2"))
    assert error.reply_code == 406
    assert "user_id property set to 'w2'" in error.reply_text


def test_worker_cannot_publish_into_other_worker_blobs(locked: LockedBroker) -> None:
    error = _refused(locked, "w1", lambda channel: _publish(channel, NAMES.blobs_exchange, NAMES.blob_routing_key("w2", "0123abcd")))
    assert error.reply_code == 403
    assert "topic" in error.reply_text


@pytest.mark.parametrize("routing_key", [NAMES.blob_routing_key("w2", "0123abcd"), "#", "blob.*.*"])
def test_worker_cannot_bind_to_other_worker_blobs(locked: LockedBroker, routing_key: str) -> None:
    queue = NAMES.blob_queue("w1", "feed")

    def bind(channel: BlockingChannel) -> None:
        channel.queue_declare(queue, durable=False, auto_delete=True)
        channel.queue_bind(queue, NAMES.blobs_exchange, routing_key=routing_key)

    error = _refused(locked, "w1", bind)
    assert error.reply_code == 403


def test_worker_cannot_declare_other_worker_blob_queue(locked: LockedBroker) -> None:
    error = _refused(locked, "w1", lambda channel: channel.queue_declare(NAMES.blob_queue("w2", "0123abcd"), durable=True))
    assert error.reply_code == 403


def test_worker_cannot_bind_own_queue_to_results(locked: LockedBroker) -> None:
    # That would copy every other worker's update into this worker's queue.
    error = _refused(locked, "w1", lambda channel: channel.queue_bind(NAMES.worker_queue("w1"), NAMES.results_exchange, routing_key=NAMES.results_queue))
    assert error.reply_code == 403


@pytest.mark.parametrize(
    "action",
    [
        lambda channel: channel.exchange_declare(NAMES.rounds_exchange, exchange_type="topic", durable=True),
        lambda channel: channel.queue_purge(NAMES.worker_queue("w2")),
        lambda channel: channel.queue_delete(NAMES.worker_queue("w2")),
    ],
    ids=["declare exchange", "purge other queue", "delete other queue"],
)
def test_worker_cannot_change_topology(locked: LockedBroker, action: Callable[[BlockingChannel], object]) -> None:
    error = _refused(locked, "w1", action)
    assert error.reply_code == 403


def test_worker_user_cannot_use_management_api(locked: LockedBroker) -> None:
    assert locked.node.management_url is not None
    client = ManagementClient(locked.node.management_url, user="w1", password=locked.workers["w1"].password)

    with pytest.raises(BrokerError, match="HTTP 401"):
        client.request("GET", "/api/queues")


# Provisioning itself


def test_permissions_cover_only_own_names() -> None:
    permissions = worker_permissions("fed", "w1")

    assert re.fullmatch(permissions.read, "fed.worker.w1")
    assert not re.fullmatch(permissions.read, "fed.worker.w10")
    assert not re.fullmatch(permissions.read, "fed.results")
    assert re.fullmatch(permissions.configure, "fed.blob.w1.0a1b")
    assert not re.fullmatch(permissions.configure, "fed.blob.w1.0a1b.x")
    assert not re.fullmatch(permissions.configure, "fed.blob.w2.0a1b")
    assert re.fullmatch(permissions.write, "fed.results")
    assert not re.fullmatch(permissions.write, "fed.rounds")
    assert not re.fullmatch(permissions.write, "amq.default")
    assert re.fullmatch(permissions.topic_write, "blob.w1.0a1b")
    assert not re.fullmatch(permissions.topic_write, "blob.w1.0a1b.w2")


@pytest.mark.parametrize("worker_id", ["a.b", "a b", "", "w*"])
def test_provisioning_rejects_ambiguous_worker_ids(worker_id: str) -> None:
    with pytest.raises(ConfigError):
        worker_permissions("fed", worker_id)


def test_worker_url_carries_user_and_vhost_only() -> None:
    assert worker_url("amqps://admin:secret@broker.example:5671/", "w1", "fed/a") == "amqps://w1@broker.example:5671/fed%2Fa"


@pytest.mark.slow
def test_provisioned_workers_run_without_declaring(locked: LockedBroker, tmp_path: Path) -> None:
    task = load_task("digits")
    settings = CoordinatorSettings(
        broker=locked.coordinator_settings(), task="digits", rounds=2, run_dir=tmp_path / "run", min_workers=2, min_updates=2,
        round_deadline_s=60.0, join_timeout_s=60.0, codec="float32", local_epochs=1, eval_every=0, require_user_id=True,
    )
    workers = [
        Worker(
            WorkerSettings(
                # w2's updates exceed 4,096 bytes, so they travel in chunks through its blob queues.
                broker=locked.worker_settings(worker_id, max_message_bytes=4096 if worker_id == "w2" else 15 * 1024 * 1024),
                task="digits", worker_id=worker_id, shard_index=index, shard_count=2,
                partition=PartitionSpec(scheme="iid"), declare_topology=False,
            ),
            task=task,
        )
        for index, worker_id in enumerate(("w1", "w2"))
    ]

    exchanges: list[str] = []
    publish_one = workers[1].broker._publish_one

    def record_exchange(exchange: str, *args: object) -> None:
        exchanges.append(exchange)
        publish_one(exchange, *args)  # type: ignore[arg-type]

    workers[1].broker._publish_one = record_exchange  # type: ignore[method-assign]

    result = run_federation(Coordinator(settings, task=task), workers)

    assert result.rounds_completed == 2
    # Each round's update of w2 went out in chunks through the blobs exchange.
    assert exchanges.count(NAMES.blobs_exchange) >= 2
    assert all(record["accepted"] == 2 for record in result.history)
    assert all(not record["rejected"] for record in result.history)
