"""Runs one coordinator and its workers on threads of the test process, over a real broker."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from coordinator.service import Coordinator, RunResult
from worker.service import Worker

RUN_TIMEOUT_S = 180.0


def run_federation(coordinator: Coordinator, workers: Sequence[Worker], *, timeout_s: float = RUN_TIMEOUT_S) -> RunResult:
    """Run the coordinator to its end while the workers serve rounds; return its result.

    The workers start once the coordinator has prepared its first round, and are
    asked to stop once the coordinator returns. An exception on any
    thread fails the test with that exception.
    """
    failures: list[BaseException] = []
    results: list[RunResult] = []

    def guarded(run: Callable[[], Any]) -> Callable[[], None]:
        def body() -> None:
            try:
                outcome = run()
                if isinstance(outcome, RunResult):
                    results.append(outcome)
            except BaseException as exc:  # reported by the test thread below
                failures.append(exc)

        return body

    # The coordinator declares the results queue before the workers announce themselves to it.
    coordinator_thread = threading.Thread(target=guarded(coordinator.run), name="coordinator", daemon=True)
    coordinator_thread.start()
    deadline = time.monotonic() + timeout_s
    while coordinator.current is None and coordinator_thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    worker_threads = [threading.Thread(target=guarded(worker.run), name=worker.worker_id, daemon=True) for worker in workers]
    for thread in worker_threads:
        thread.start()
    try:
        coordinator_thread.join(timeout_s)
        if coordinator_thread.is_alive():
            coordinator.stop_requested = True
            coordinator_thread.join(60)
            pytest.fail(f"the coordinator did not finish within {timeout_s:.0f} s")
    finally:
        for worker in workers:
            worker.stop_requested = True
        for thread in worker_threads:
            thread.join(60)
    if failures:
        raise failures[0]
    assert results, "the coordinator returned no result"
    return results[0]
