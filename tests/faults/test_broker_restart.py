"""The broker stops for 15 seconds mid-round, and later drops every connection: the run finishes intact."""

from __future__ import annotations

import re
import time
from pathlib import Path

from fedmq.rabbitmq_node import RabbitMQNode
from tests.faults.helpers import Service, Services, consumer_counts, read_metrics, wait_for_round, wait_until
from tests.faults.tasks import DELAY_ENV

TIMEOUT_S = 240.0
ROUNDS = 7
OUTAGE_S = 15.0


def confirmed_rounds(worker: Service) -> set[int]:
    """Rounds whose update the broker confirmed to the worker."""
    return {int(found) for found in re.findall(r"round (\d+): update \w+ confirmed by the broker", worker.log())}


def expected_consumers(federation: str) -> dict[str, int]:
    return {f"{federation}.results": 1, **{f"{federation}.worker.w{index}": 1 for index in (1, 2, 3)}}


def test_broker_outage_and_dropped_connections(own_services: Services, node: RabbitMQNode, tmp_path: Path, federation: str) -> None:
    run_dir = tmp_path / "run"
    coordinator = own_services.coordinator(run_dir, "--rounds", str(ROUNDS), "--min-workers", "3", "--round-deadline-s", "120")
    # Staggered workers keep each round open for about three seconds.
    workers = [own_services.worker(f"w{index}", f"{index - 1}/3", env={DELAY_ENV: delay}) for index, delay in ((1, "0.3"), (2, "1.5"), (3, "3"))]
    everyone = [coordinator, *workers]

    # Stop the broker after round 3's first update was accepted, and start it again.
    wait_until(lambda: "round 3: accepted update from worker" in coordinator.log(), timeout_s=TIMEOUT_S, what="round 3's first update", watch=everyone, services=own_services)
    node.stop()
    time.sleep(OUTAGE_S)
    node.start()

    # After the restart each queue has exactly one consumer again.
    wait_for_round(run_dir, 4, timeout_s=TIMEOUT_S, watch=everyone, services=own_services)
    after_restart = consumer_counts(node, federation)

    # Every connection is closed by the broker in round 5.
    wait_until(lambda: "round 5: accepted update from worker" in coordinator.log(), timeout_s=TIMEOUT_S, what="round 5's first update", watch=everyone, services=own_services)
    node.ctl("close_all_connections", "connections closed by a fault test")
    wait_for_round(run_dir, 6, timeout_s=TIMEOUT_S, watch=everyone, services=own_services)
    after_close = consumer_counts(node, federation)

    assert coordinator.wait(TIMEOUT_S) == 0, own_services.logs()
    assert after_restart == expected_consumers(federation)
    assert after_close == expected_consumers(federation)

    # No update that the broker confirmed was lost, and none counted twice.
    records = read_metrics(run_dir)
    assert [record["round"] for record in records] == list(range(1, ROUNDS + 1))
    for record in records:
        assert record["workers"] == ["w1", "w2", "w3"]
        assert record["duplicates"] == 0
        assert record["stale"] == 0
    for worker in workers:
        assert confirmed_rounds(worker) == set(range(1, ROUNDS + 1)), worker.name

    # Each side reconnected by itself, logging the attempts.
    for service in everyone:
        log = service.log()
        assert "connection lost" in log, service.name
        assert re.search(r"connecting to \S+ failed \[attempt \d+\]", log), service.name
