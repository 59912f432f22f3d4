"""The coordinator's sender check (--require-user-id) against impersonation over a real broker."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pika
import pytest

from coordinator.service import Coordinator, CoordinatorSettings
from fedmq.broker import HEADER_REJECT_REASON, BrokerClient, BrokerSettings, Topology
from fedmq.provision import ManagementClient, provision_worker
from fedmq.rabbitmq_node import RabbitMQNode
from fedmq.tasks import PartitionSpec, load_task
from schemas.messages import Leave, Update, encode_message
from schemas.tensors import encode_state
from worker.service import Worker, WorkerSettings

FEDERATION = "ident"
RUN_TIMEOUT_S = 120.0


def _dead_letters(node: RabbitMQNode) -> list[tuple[str, str]]:
    """Return (reason, message id) of every message in the federation's dead-letter queue."""
    connection = pika.BlockingConnection(pika.URLParameters(f"amqp://guest:guest@127.0.0.1:{node.port}/{FEDERATION}"))
    try:
        channel = connection.channel()
        found = []
        while True:
            method, properties, _ = channel.basic_get(Topology(FEDERATION).dead_letter_queue, auto_ack=True)
            if method is None:
                return found
            found.append((str((properties.headers or {}).get(HEADER_REJECT_REASON, "")), str(properties.message_id)))
    finally:
        connection.close()


@pytest.mark.slow
def test_impersonating_updates_are_dead_lettered(make_rabbitmq: Callable[..., RabbitMQNode], tmp_path: Path) -> None:
    node = make_rabbitmq(management=True)
    assert node.management_url is not None
    client = ManagementClient(node.management_url, user="guest", password="guest")
    base_url = f"amqp://127.0.0.1:{node.port}/"
    honest = provision_worker(client, federation=FEDERATION, worker_id="w1", password="honest-pw-1", broker_url=base_url)
    attacker = provision_worker(client, federation=FEDERATION, worker_id="w2", password="attacker-pw-2", broker_url=base_url)

    task = load_task("digits")
    coordinator = Coordinator(
        CoordinatorSettings(
            broker=BrokerSettings(url=f"amqp://guest:guest@127.0.0.1:{node.port}/{FEDERATION}", federation=FEDERATION, reconnect_timeout_s=20),
            task="digits", rounds=1, run_dir=tmp_path / "run", min_workers=1, min_updates=1, round_deadline_s=60.0,
            join_timeout_s=60.0, codec="float32", local_epochs=1, eval_every=0, require_user_id=True,
        ),
        task=task,
    )
    failures: list[BaseException] = []

    def run_coordinator() -> None:
        try:
            coordinator.run()
        except BaseException as exc:  # reported by the test thread
            failures.append(exc)

    coordinator_thread = threading.Thread(target=run_coordinator, name="coordinator", daemon=True)
    coordinator_thread.start()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while coordinator.current is None and time.monotonic() < deadline and coordinator_thread.is_alive():
        time.sleep(0.05)
    assert coordinator.current is not None, failures

    # w2 connects as itself and claims to be w1: an update, and a leave that would drop w1.
    broker = BrokerClient(
        BrokerSettings(url=attacker.broker_url, password=attacker.password, federation=FEDERATION, reconnect_timeout_s=20),
        client_name="attacker", declare=False,
    )
    broker.connect()
    try:
        zeros = encode_state({name: tensor * 0 for name, tensor in coordinator.global_state.items()})
        forged = Update(
            run_id=coordinator.run_id, round=1, attempt=0, model_version=0, worker_id="w1", num_samples=10**6, num_steps=1,
            metrics={}, deltas=zeros, codec="float32",
        )
        broker.publish_result("w2", encode_message(forged), message_id="forged-update", user_id="w2")
        broker.publish_result("w2", encode_message(Leave(worker_id="w1", reason="forged")), message_id="forged-leave", user_id="w2")
        # Without user_id the broker does not vouch for the sender at all.
        broker.publish_result("w2", encode_message(Leave(worker_id="w2", reason="anonymous")), message_id="anonymous-leave")
    finally:
        broker.close()

    worker = Worker(
        WorkerSettings(
            broker=BrokerSettings(url=honest.broker_url, password=honest.password, federation=FEDERATION, reconnect_timeout_s=20),
            task="digits", worker_id="w1", shard_index=0, shard_count=2, partition=PartitionSpec(scheme="iid"), declare_topology=False,
        ),
        task=task,
    )
    worker_thread = threading.Thread(target=worker.run, name="w1", daemon=True)
    worker_thread.start()
    try:
        coordinator_thread.join(RUN_TIMEOUT_S)
        assert not coordinator_thread.is_alive(), "the coordinator did not finish in time"
    finally:
        worker.stop_requested = True
        worker_thread.join(60)
    assert not failures, failures

    record = coordinator.history[0]
    assert record["rejected"] == {"identity_mismatch": 3}
    assert record["accepted"] == 1
    assert record["samples"] < 10**6
    dead = dict((message_id, reason) for reason, message_id in _dead_letters(node))
    assert set(dead) == {"forged-update", "forged-leave", "anonymous-leave"}
    assert "claims worker 'w1' but was published by broker user 'w2'" in dead["forged-update"]
    assert "claims worker 'w1' but was published by broker user 'w2'" in dead["forged-leave"]
    assert "published by broker user None" in dead["anonymous-leave"]
    assert sorted(coordinator.workers) == ["w1"]
