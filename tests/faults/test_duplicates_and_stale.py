"""Duplicate and stale updates reach a real coordinator and are counted once or not at all."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from schemas.tensors import decode_state
from tests.faults.helpers import FakeWorker, Services, apply_mean, checkpoint_model, random_deltas, read_metrics

TIMEOUT_S = 180.0


@pytest.fixture
def fake_workers(services: Services) -> Iterator[dict[str, FakeWorker]]:
    workers = {
        name: FakeWorker(services.url, services.federation, name, task="digits", num_samples=samples)
        for name, samples in (("a", 100), ("b", 300))
    }
    yield workers
    for worker in workers.values():
        worker.close()


def test_duplicate_and_stale_updates_counted_once(services: Services, fake_workers: dict[str, FakeWorker], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    coordinator = services.coordinator(run_dir, "--rounds", "2", "--min-workers", "2", "--round-deadline-s", "120", task="digits")
    a, b = fake_workers["a"], fake_workers["b"]
    a.join()
    b.join()

    # Round 1: a's update twice with the same bytes, then a different update of a, then b's.
    start = a.wait_for_round(1, timeout_s=TIMEOUT_S, watch=[coordinator])
    initial = {name: tensor.float() for name, tensor in decode_state(start.weights).items()}
    a_deltas, a_other, b_deltas = random_deltas(start, 1), random_deltas(start, 2), random_deltas(start, 3)
    a_body = a.update_body(start, a_deltas)
    a.publish(a_body, message_id="a-round-1")
    a.publish(a_body, message_id="a-round-1")
    a.publish(a.update_body(start, a_other), message_id="a-round-1-second")
    b.publish(b.update_body(b.wait_for_round(1, timeout_s=TIMEOUT_S, watch=[coordinator]), b_deltas))
    after_round_1 = apply_mean(initial, [(100, a_deltas), (300, b_deltas)])

    # Round 2: a late update of round 1, and one trained from model version 0, before the real ones.
    start_2 = a.wait_for_round(2, timeout_s=TIMEOUT_S, watch=[coordinator])
    assert start_2.model_version == 1
    a.publish(a.update_body(start, random_deltas(start, 4)))
    b.publish(b.update_body(start_2, random_deltas(start, 5, scale=5.0), model_version=0))
    a_deltas_2, b_deltas_2 = random_deltas(start, 6), random_deltas(start, 7)
    a.publish(a.update_body(start_2, a_deltas_2))
    b.publish(b.update_body(b.wait_for_round(2, timeout_s=TIMEOUT_S, watch=[coordinator]), b_deltas_2))
    expected = apply_mean({name: tensor.float() for name, tensor in after_round_1.items()}, [(100, a_deltas_2), (300, b_deltas_2)])

    assert coordinator.wait(TIMEOUT_S) == 0, services.logs()
    round_1, round_2 = read_metrics(run_dir)
    assert round_1["duplicates"] == 2
    assert round_1["accepted"] == 2
    assert round_1["samples"] == 400
    assert round_1["stale"] == 0
    assert round_2["stale"] == 2
    assert round_2["duplicates"] == 0
    assert round_2["workers"] == ["a", "b"]
    assert "duplicate update from worker a (message a-round-1" in coordinator.log()
    assert "discarded a stale update from worker b for round 2 (model version 0)" in coordinator.log()
    final = checkpoint_model(run_dir)
    for name, value in expected.items():
        # float32 accumulation against a float64 reference; the deltas are of order 0.01.
        torch.testing.assert_close(final[name].double(), value, rtol=0, atol=1e-6)
