"""A coordinator killed or stopped mid-round resumes from its checkpoint and ends with the uninterrupted model."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from tests.faults.helpers import (
    Service,
    Services,
    checkpoint_model,
    checkpoint_state,
    count_lines,
    read_metrics,
    wait_for_round,
    wait_until,
)
from tests.faults.tasks import DELAY_ENV

TIMEOUT_S = 240.0
ROUNDS = 5

# Workers reply in a fixed order, seconds apart, so a round is open long enough to interrupt.
WORKER_DELAYS_S = {"w1": "0.1", "w2": "1.5", "w3": "3"}


def start_workers(services: Services) -> list[Service]:
    return [
        services.worker(worker_id, f"{index}/3", env={DELAY_ENV: delay})
        for index, (worker_id, delay) in enumerate(WORKER_DELAYS_S.items())
    ]


def accepted_in_round(coordinator: Service, round_number: int, *, after: int = 0) -> int:
    return len(re.findall(rf"round {round_number}: accepted update from worker", coordinator.log()[after:]))


def test_coordinator_kill_and_sigterm_resume_same_model(services: Services, tmp_path: Path, federation: str) -> None:
    # The full downlink sends workers the exact global model. A lossy downlink's worker
    # view is not part of the checkpoint, so a restart would change what workers start from.
    # The float32 uplink keeps a last-bit difference of the float32 sum, whose order
    # follows arrival, from becoming a whole float16 step of the next round's updates.
    command = [
        "--rounds", str(ROUNDS), "--min-workers", "3", "--round-deadline-s", "120", "--seed", "3",
        "--downlink-codec", "full", "--codec", "float32",
    ]

    # The uninterrupted reference, in its own federation, at the same time.
    reference_dir = tmp_path / "reference"
    reference = Services(tmp_path / "reference-logs", services.url, federation + "-reference")
    with reference:
        reference_coordinator = reference.coordinator(reference_dir, *command)
        start_workers(reference)

        run_dir = tmp_path / "run"
        coordinator = services.coordinator(run_dir, *command)
        workers = start_workers(services)

        # SIGKILL in round 3, after w1's update was accepted and before the round closed.
        wait_until(lambda: accepted_in_round(coordinator, 3), timeout_s=TIMEOUT_S, what="round 3's first update", watch=[coordinator], services=services)
        coordinator.kill()
        assert checkpoint_state(run_dir)["completed_rounds"] == 2
        assert [record["round"] for record in read_metrics(run_dir)] == [1, 2]
        restarted = services.coordinator(run_dir, *command, name="coordinator-restarted")

        # SIGTERM in round 4 of the restarted coordinator: it writes its checkpoint and exits 0.
        wait_until(lambda: accepted_in_round(restarted, 4), timeout_s=TIMEOUT_S, what="round 4's first update", watch=[restarted], services=services)
        restarted.terminate()
        assert restarted.wait(60) == 0, services.logs()
        assert checkpoint_state(run_dir)["completed_rounds"] == 3
        stopped_log = len(restarted.log())
        resumed = services.coordinator(run_dir, *command, name="coordinator-restarted")

        assert resumed.wait(TIMEOUT_S) == 0, services.logs()
        assert reference_coordinator.wait(TIMEOUT_S) == 0, reference.logs()

    # Every round has all three updates once, including the interrupted ones.
    records = read_metrics(run_dir)
    assert [record["round"] for record in records] == list(range(1, ROUNDS + 1))
    for record in records:
        assert record["workers"] == ["w1", "w2", "w3"]
        assert record["duplicates"] == 0
    assert "resuming from checkpoint after round 2" in restarted.log()
    assert "resuming from checkpoint after round 3" in resumed.log()[stopped_log:]
    # w1's round 3 update, accepted by the killed coordinator, came back from the queue.
    assert accepted_in_round(restarted, 3) == 3
    for worker in workers:
        for round_number in range(1, ROUNDS + 1):
            assert count_lines(worker, f"training round {round_number} of run") == 1, (worker.name, round_number)
    assert count_lines(workers[0], "round 3 (attempt 0) already answered or in training") >= 1

    # The same global model as the uninterrupted run. Updates are summed in float32 in
    # arrival order, which can differ between runs (already in round 1, when the
    # workers' first training includes torch's warm-up). Swapping round 1's order in an
    # in-process FedAvg of this task changed the model after 5 rounds by at most 3e-7
    # with the float32 uplink, and by 2e-5 with the float16 one.
    final = checkpoint_model(run_dir)
    expected = checkpoint_model(reference_dir)
    for name, value in expected.items():
        torch.testing.assert_close(final[name], value, rtol=1e-5, atol=1e-6)
    state = checkpoint_state(run_dir)
    assert state["completed_rounds"] == ROUNDS
    assert state["finished"]
