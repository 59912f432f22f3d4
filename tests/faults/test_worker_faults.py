"""Worker faults in real runs: crashes, failing task code, late and returning workers, SIGTERM."""

from __future__ import annotations

import math
import random
import re
import time
from pathlib import Path

from fedmq.rabbitmq_node import RabbitMQNode
from tests.faults.helpers import (
    Service,
    Services,
    consumer_counts,
    queue_depth,
    read_metrics,
    wait_for_round,
    wait_until,
)
from tests.faults.tasks import DELAY_ENV, FAIL_ENV

# A bound on each wait, far above the times measured on a 2-core machine, so that a
# machine busy with other work slows these tests down instead of failing them.
RUN_TIMEOUT_S = 600.0


def trained_rounds(service: Service, *, after: int = 0) -> list[int]:
    """Rounds that a worker started training, in order, from log offset ``after``."""
    return [int(match) for match in re.findall(r"training round (\d+) of run", service.log()[after:])]


def test_three_of_ten_workers_killed(services: Services, tmp_path: Path, federation: str) -> None:
    rounds, deadline_s = 10, 90.0
    common = ["--rounds", str(rounds), "--min-workers", "10", "--min-updates", "5", "--quorum-fraction", "0.7", "--round-deadline-s", str(deadline_s), "--seed", "7"]
    slow = {DELAY_ENV: "0.3"}

    # A fault-free run of the same command, the reference, in its own federation.
    baseline_dir = tmp_path / "baseline"
    reference = Services(tmp_path / "baseline-logs", services.url, federation + "-reference")
    faulty_dir = tmp_path / "faulty"
    with reference:
        baseline_coordinator = reference.coordinator(baseline_dir, *common)
        for index in range(1, 11):
            reference.worker(f"w{index}", f"{index - 1}/10", env=slow)

        # The same run, with three workers killed at seeded moments.
        coordinator = services.coordinator(faulty_dir, *common)
        workers = [services.worker(f"w{index}", f"{index - 1}/10", env=slow) for index in range(1, 11)]
        schedule = random.Random(2024)
        victims = schedule.sample(workers, 3)
        kill_after_rounds = sorted(schedule.sample(range(1, 8), 3))
        killed_at: dict[str, int] = {}
        for victim, after_round in zip(victims, kill_after_rounds):
            wait_for_round(faulty_dir, after_round, timeout_s=RUN_TIMEOUT_S, watch=[coordinator], services=services)
            time.sleep(schedule.uniform(0.0, 0.3))
            victim.kill()
            killed_at[victim.name] = read_metrics(faulty_dir)[-1]["round"]
        assert coordinator.wait(RUN_TIMEOUT_S) == 0, services.logs()
        assert baseline_coordinator.wait(RUN_TIMEOUT_S) == 0, reference.logs()
    baseline = read_metrics(baseline_dir)
    faulty = read_metrics(faulty_dir)

    assert [record["round"] for record in faulty] == list(range(1, rounds + 1))
    for record in faulty:
        assert record["attempts"] == 1
        # Closed by the quorum of live workers, not by the deadline.
        assert record["duration_s"] < deadline_s / 2
        assert record["model_updated"]
        # The quorum counts the workers the round went to; dead ones leave that set after three rounds.
        assert record["accepted"] >= math.ceil(0.7 * record["sent"])
    for name, last_round in killed_at.items():
        late_rounds = [record["round"] for record in faulty if name in record["workers"] and record["round"] > last_round + 1]
        assert late_rounds == [], f"{name} was killed after round {last_round}"
    baseline_accuracy = baseline[-1]["eval"]["accuracy"]
    faulty_accuracy = faulty[-1]["eval"]["accuracy"]
    print(f"final accuracy: fault-free {baseline_accuracy:.4f}, three workers killed {faulty_accuracy:.4f}; kills {killed_at}")
    assert abs(faulty_accuracy - baseline_accuracy) <= 0.01


def test_training_exceptions_count_as_dropouts(services: Services, tmp_path: Path) -> None:
    deadline_s = 60.0
    run_dir = tmp_path / "run"
    coordinator = services.coordinator(run_dir, "--rounds", "4", "--min-workers", "3", "--round-deadline-s", str(deadline_s))
    services.worker("w1", "0/3", env={FAIL_ENV: "2:RuntimeError,3:MemoryError"})
    services.worker("w2", "1/3")
    services.worker("w3", "2/3")

    assert coordinator.wait(RUN_TIMEOUT_S) == 0, services.logs()
    records = read_metrics(run_dir)

    assert [record["round"] for record in records] == [1, 2, 3, 4]
    assert records[1]["failed"]["w1"].startswith("RuntimeError: injected failure")
    assert records[2]["failed"]["w1"].startswith("MemoryError")
    for record in records[1:3]:
        assert record["workers"] == ["w2", "w3"]
        assert record["dropouts"] == []
        # The failure report closes the round at once instead of at the deadline.
        assert record["duration_s"] < deadline_s / 10
    assert "w1" in records[3]["workers"]
    assert "w1" in records[0]["workers"]


def test_late_and_returning_workers(services: Services, rabbitmq: RabbitMQNode, tmp_path: Path, federation: str) -> None:
    run_dir = tmp_path / "run"
    slow = {DELAY_ENV: "1"}
    # More rounds than the test needs; it stops the coordinator with SIGTERM.
    coordinator = services.coordinator(
        run_dir, "--rounds", "100", "--min-workers", "2", "--quorum-fraction", "0.6", "--round-deadline-s", "30"
    )
    services.worker("w1", "0/3", env=slow)
    services.worker("w2", "1/3", env=slow)

    # A worker that joins mid-run receives the open round.
    wait_for_round(run_dir, 2, timeout_s=RUN_TIMEOUT_S, watch=[coordinator], services=services)
    late = services.worker("w3", "2/3", env=slow)
    sent = wait_until(
        lambda: re.findall(r"round (\d+): sent the open round to worker w3", coordinator.log()),
        timeout_s=60, what="the open round sent to w3", watch=[coordinator, late], services=services,
    )
    wait_until(lambda: trained_rounds(late), timeout_s=60, what="w3 training", watch=[late], services=services)
    assert trained_rounds(late)[0] == int(sent[0])

    # A worker back from several missed rounds trains only the newest round start.
    wait_until(lambda: "confirmed by the broker" in late.log(), timeout_s=60, what="w3's first update", watch=[late], services=services)
    late.kill()
    missed_from = read_metrics(run_dir)[-1]["round"]
    wait_for_round(run_dir, missed_from + 4, timeout_s=RUN_TIMEOUT_S, watch=[coordinator], services=services)
    backlog = queue_depth(rabbitmq.url, federation, f"{federation}.worker.w3")
    log_offset = len(late.log())
    returned = services.worker("w3", "2/3", env=slow)
    resent = wait_until(
        lambda: (found := re.findall(r"round (\d+): sent the open round to worker w3", coordinator.log())) and len(found) > len(sent) and found,
        timeout_s=60, what="the open round sent to the returning w3", watch=[coordinator, returned], services=services,
    )
    newest_round = int(resent[len(sent)])
    wait_until(lambda: trained_rounds(returned, after=log_offset), timeout_s=60, what="w3 training again", watch=[returned], services=services)
    coordinator.terminate()

    assert backlog >= 3
    assert min(trained_rounds(returned, after=log_offset)) >= newest_round
    assert coordinator.wait(60) == 0, services.logs()


def test_worker_sigterm_finishes_round_and_leaves(services: Services, rabbitmq: RabbitMQNode, tmp_path: Path, federation: str) -> None:
    deadline_s = 60.0
    run_dir = tmp_path / "run"
    coordinator = services.coordinator(run_dir, "--rounds", "3", "--min-workers", "2", "--round-deadline-s", str(deadline_s))
    services.worker("w1", "0/2")
    slow = services.worker("w2", "1/2", env={DELAY_ENV: "3"})

    wait_until(lambda: "training round 2 of run" in slow.log(), timeout_s=RUN_TIMEOUT_S, what="w2 training round 2", watch=[coordinator, slow], services=services)
    slow.terminate()

    assert slow.wait(30) == 0
    assert coordinator.wait(RUN_TIMEOUT_S) == 0, services.logs()
    records = read_metrics(run_dir)
    # The update of the round in training was finished and counted, then the worker left.
    assert records[1]["workers"] == ["w1", "w2"]
    assert records[2]["workers"] == ["w1"]
    # Round 3 went out before or after the Leave arrived, and in both cases the round does not wait for w2.
    if records[2]["sent"] == 2:
        assert records[2]["failed"] == {"w2": "left: shutdown"}
    assert records[2]["dropouts"] == []
    assert records[2]["duration_s"] < deadline_s / 10
    assert "worker w2 left (shutdown)" in coordinator.log()
    assert "training round 3" not in slow.log()
    assert f"{federation}.worker.w2" not in consumer_counts(rabbitmq, federation)
