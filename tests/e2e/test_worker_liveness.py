"""Workers over a real broker while training takes long or a worker dies mid-round."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pika
import pika.exceptions
import pytest

from fedmq.broker import BrokerClient, BrokerSettings, ChannelClosedByBrokerError, Delivery
from fedmq.rabbitmq_node import RabbitMQNode
from tests.e2e.helpers import FedmqProcesses, read_metrics, unique_federation, wait_for
from tests.helper_tasks.slow import MARKER_DIR_ENV, SLEEP_ENV

pytestmark = pytest.mark.slow

SLOW_TASK = "tests.helper_tasks.slow:SlowDigitsTask"
RUN_TIMEOUT_S = 300.0

# RabbitMQ 3.10 checks consumer_timeout on each channel tick, every
# channel_tick_interval ms (60000 by default, settable only in advanced.config).
CONSUMER_TIMEOUT_MS = 4000
TICK_CONFIG = "[{rabbit, [{channel_tick_interval, 500}]}]."
HEARTBEAT_S = 2
TRAIN_SLEEP_S = 8.0

# Lines that RabbitMQ 3.10 logs when it closes a channel for consumer_timeout, and a
# connection for missed heartbeats.
CONSUMER_TIMEOUT_LOG = "timed out waiting for delivery acknowledgement"
MISSED_HEARTBEATS_LOG = "missed heartbeats from client"


def _node_log(node: RabbitMQNode) -> str:
    return node.log_path.read_text(encoding="utf-8", errors="replace")


def _marker(marker_dir: Path, pid: int, call: int) -> Path:
    return marker_dir / f"train-{pid}-{call}.started"


def test_killed_worker_counts_as_dropout(broker_url: str, tmp_path: Path) -> None:
    marker_dir = tmp_path / "markers"
    marker_dir.mkdir()
    run_dir = tmp_path / "run"
    env = {SLEEP_ENV: "2", MARKER_DIR_ENV: str(marker_dir)}
    with FedmqProcesses(log_dir=tmp_path / "logs", broker_url=broker_url, federation=unique_federation("e2e-kill"), env=env) as processes:
        # Round 2 waits for its deadline, because the killed worker never replies.
        coordinator = processes.start_coordinator(
            task="digits",
            rounds=2,
            run_dir=run_dir,
            arguments=["--min-workers", "3", "--min-updates", "2", "--round-deadline-s", "30", "--max-round-retries", "0"],
        )
        workers = [
            processes.start_worker(f"worker-{index + 1}", task=SLOW_TASK, shard=f"{index}/3", arguments=["--exit-after-rounds", "2"])
            for index in range(3)
        ]
        victim = workers[2]

        # Kill worker-3 once it is inside its training call of round 2.
        wait_for(lambda: read_metrics(run_dir), timeout_s=RUN_TIMEOUT_S, description="round 1", diagnostics=processes.log_tails)
        wait_for(
            lambda: _marker(marker_dir, victim.pid, 2).exists(),
            timeout_s=60,
            description="worker-3 to start training round 2",
            diagnostics=processes.log_tails,
        )
        assert victim.kill() == -signal.SIGKILL

        exit_status = coordinator.wait(RUN_TIMEOUT_S)
        survivor_statuses = [survivor.wait(60) for survivor in workers[:2]]
        diagnostics = processes.log_tails()
    assert exit_status == 0, diagnostics
    assert survivor_statuses == [0, 0], diagnostics

    records = read_metrics(run_dir)
    assert [record["round"] for record in records] == [1, 2], diagnostics
    assert records[0]["accepted"] == 3, diagnostics
    assert records[0]["dropouts"] == [], diagnostics
    assert records[1]["accepted"] == 2, diagnostics
    assert records[1]["dropouts"] == ["worker-3"], diagnostics
    assert records[1]["model_updated"] is True, diagnostics
    # The killed worker never finished training round 2.
    assert "round 2: trained" not in victim.log_text()


def _consume_without_ack(url: str, queue: str, hold_s: float) -> tuple[bool, float]:
    """Consume one message without acking it, and return whether the broker closed the channel and after how long."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.queue_declare(queue, auto_delete=True)
        channel.basic_publish("", queue, b"unacked")
        received: list[float] = []
        channel.basic_consume(queue, lambda ch, method, properties, body: received.append(time.monotonic()), auto_ack=False)
        deadline = time.monotonic() + hold_s
        while time.monotonic() < deadline:
            connection.process_data_events(time_limit=0.2)
            if channel.is_closed:
                return True, time.monotonic() - received[0]
        return False, hold_s
    finally:
        if connection.is_open:
            connection.close()


def _connection_survives_without_io(url: str, heartbeat_s: int, idle_s: float) -> bool:
    """Open a connection, leave it without I/O for ``idle_s`` seconds, and return whether it is still usable."""
    parameters = pika.URLParameters(url)
    parameters.heartbeat = heartbeat_s
    connection = pika.BlockingConnection(parameters)
    time.sleep(idle_s)
    try:
        connection.process_data_events(time_limit=0.5)
        connection.channel().close()
    except pika.exceptions.AMQPError:
        return False
    connection.close()
    return True


def test_long_training_keeps_connection(make_rabbitmq: Callable[..., RabbitMQNode], tmp_path: Path) -> None:
    node = make_rabbitmq(consumer_timeout_ms=CONSUMER_TIMEOUT_MS, heartbeat_s=HEARTBEAT_S, advanced_config=TICK_CONFIG)
    marker_dir = tmp_path / "markers"
    marker_dir.mkdir()
    run_dir = tmp_path / "run"
    env = {SLEEP_ENV: str(TRAIN_SLEEP_S), MARKER_DIR_ENV: str(marker_dir)}
    with FedmqProcesses(log_dir=tmp_path / "logs", broker_url=node.url, federation=unique_federation("e2e-long"), env=env) as processes:
        coordinator = processes.start_coordinator(
            task="digits",
            rounds=1,
            run_dir=run_dir,
            arguments=["--min-workers", "1", "--min-updates", "1", "--round-deadline-s", "120", "--max-round-retries", "0"],
        )
        worker = processes.start_worker(
            "worker-slow", task=SLOW_TASK, shard="0/1", arguments=["--heartbeat-s", str(HEARTBEAT_S), "--exit-after-rounds", "1"]
        )

        started = wait_for(
            lambda: _marker(marker_dir, worker.pid, 1).exists() and time.monotonic(),
            timeout_s=120,
            description="the worker to start training",
            diagnostics=processes.log_tails,
        )
        exit_status = coordinator.wait(RUN_TIMEOUT_S)
        training_to_result_s = time.monotonic() - started
        assert exit_status == 0, processes.log_tails()
        assert worker.wait(60) == 0, processes.log_tails()

    # The update arrived in round 1, after training outlasted both limits.
    records = read_metrics(run_dir)
    assert len(records) == 1
    assert records[0]["accepted"] == 1, records[0]
    assert records[0]["dropouts"] == [], records[0]
    assert training_to_result_s >= TRAIN_SLEEP_S
    assert TRAIN_SLEEP_S * 1000 >= 2 * CONSUMER_TIMEOUT_MS
    assert TRAIN_SLEEP_S >= 3 * HEARTBEAT_S

    # The worker kept its first connection throughout.
    worker_log = worker.log_text()
    assert "(connection 1)" in worker_log
    assert "(connection 2)" not in worker_log
    assert "connection lost" not in worker_log
    node_log = _node_log(node)
    assert CONSUMER_TIMEOUT_LOG not in node_log
    assert MISSED_HEARTBEATS_LOG not in node_log

    # Control: under the same settings, a consumer that keeps a message unacked
    # past consumer_timeout loses its channel ...
    closed, after_s = _consume_without_ack(node.url, f"control-{uuid.uuid4().hex[:8]}", hold_s=TRAIN_SLEEP_S + 4)
    assert closed, f"the broker did not close a channel holding an unacked message for {TRAIN_SLEEP_S + 4:.0f} s"
    assert after_s >= CONSUMER_TIMEOUT_MS / 1000
    wait_for(lambda: CONSUMER_TIMEOUT_LOG in _node_log(node), timeout_s=10, description="the broker to log the consumer timeout")

    # ... and a connection whose thread does no I/O for the training time is dropped.
    assert not _connection_survives_without_io(node.url, HEARTBEAT_S, idle_s=TRAIN_SLEEP_S)
    wait_for(lambda: MISSED_HEARTBEATS_LOG in _node_log(node), timeout_s=10, description="the broker to log missed heartbeats")


def test_broker_client_reports_consumer_timeout(make_rabbitmq: Callable[..., RabbitMQNode]) -> None:
    node = make_rabbitmq(consumer_timeout_ms=2000, advanced_config=TICK_CONFIG)
    client = BrokerClient(BrokerSettings(url=node.url, federation=unique_federation("timeout")), client_name="timeout-test")
    deliveries: list[Delivery] = []
    client.connect()
    try:
        client.consume(client.topology.results_queue, deliveries.append)
        client.publish(client.topology.results_exchange, client.topology.results_queue, b"held")

        # The delivery stays unacked until the broker closes the channel.
        started = time.monotonic()
        with pytest.raises(ChannelClosedByBrokerError):
            while time.monotonic() - started < 15:
                client.process_events(0.2)
        assert len(deliveries) == 1
        assert time.monotonic() - started >= 2.0

        # Reconnecting restores the consumer, and the broker delivers the message again.
        def redelivered() -> bool:
            client.process_events(0.2)
            return len(deliveries) == 2

        client.reconnect()
        wait_for(redelivered, timeout_s=15, description="the redelivery")
        assert deliveries[1].redelivered
        assert bytes(deliveries[1].body) == b"held"
        client.ack(deliveries[1])
    finally:
        client.close()
