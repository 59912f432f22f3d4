"""Too few live workers: the round retries at its deadline, then the coordinator stops with exit code 3."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from fedmq.cli import EXIT_ROUND_FAILED
from tests.faults.helpers import Services, checkpoint_model, checkpoint_state, read_metrics, wait_for_checkpoint
from tests.faults.tasks import DELAY_ENV, DELAY_FROM_ENV


def test_round_below_minimum_fails_after_retries(services: Services, tmp_path: Path) -> None:
    # Long enough for the first round's training, which includes torch's warm-up.
    deadline_s, retries = 10.0, 1
    run_dir = tmp_path / "run"
    coordinator = services.coordinator(
        run_dir, "--rounds", "5", "--min-workers", "3", "--min-updates", "3",
        "--round-deadline-s", str(deadline_s), "--max-round-retries", str(retries),
    )
    # w2 and w3 train round 2 slowly, so they are killed before they reply to it.
    slow_from_round_2 = {DELAY_ENV: "5", DELAY_FROM_ENV: "2"}
    workers = [services.worker("w1", "0/3")]
    workers += [services.worker(f"w{index}", f"{index - 1}/3", env=slow_from_round_2) for index in (2, 3)]
    wait_for_checkpoint(run_dir, 1, timeout_s=300, watch=[coordinator], services=services)
    model_after_round_1 = checkpoint_model(run_dir)
    workers[1].kill()
    workers[2].kill()
    killed = time.monotonic()

    exit_code = coordinator.wait(deadline_s * (retries + 1) + 60)
    elapsed_s = time.monotonic() - killed

    assert exit_code == EXIT_ROUND_FAILED, services.logs()
    # Round 2 ran its first attempt and one retry, and the retry alone lasts a deadline.
    assert elapsed_s >= deadline_s
    assert [record["round"] for record in read_metrics(run_dir)] == [1]
    assert checkpoint_state(run_dir)["completed_rounds"] == 1
    final = checkpoint_model(run_dir)
    for name, value in model_after_round_1.items():
        assert torch.equal(final[name], value)
    log = coordinator.log()
    assert "round 2: deadline passed with 1 of 3 required updates; missing workers ['w2', 'w3']; re-issuing [1/1]" in log
    assert "round 2: only 1 of the required 3 updates arrived after 2 attempts" in log
    assert workers[0].running
