"""``fedmq status`` against a real broker with the management plugin and a live worker."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from fedmq.broker import BrokerSettings
from fedmq.cli import main
from fedmq.errors import BrokerError
from fedmq.rabbitmq_node import RabbitMQNode
from fedmq.status import FederationStatus, collect_status, format_status
from tests.ops.conftest import FedmqProcesses

pytestmark = pytest.mark.slow

WORKER_TIMEOUT_S = 120.0


def write_run_dir(run_dir: Path, *, run_id: str, workers: dict[str, float]) -> None:
    checkpoint = run_dir / "checkpoint"
    checkpoint.mkdir(parents=True)
    registry = {worker_id: {"worker_id": worker_id, "last_seen_unix": seen, "num_samples": 500, "last_round": 3} for worker_id, seen in workers.items()}
    state = {"run_id": run_id, "task": "digits", "completed_rounds": 3, "model_version": 3, "finished": False, "extra": {"workers": registry}}
    (checkpoint / "state.json").write_text(json.dumps(state))
    (run_dir / "settings.json").write_text(json.dumps({"service": "coordinator", "run_id": run_id, "settings": {"rounds": 10}}))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"round": 3, "eval": {"accuracy": 0.8125}}) + "\n")


def wait_for(check: Callable[[], FederationStatus | None], timeout_s: float) -> FederationStatus:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = check()
        if status is not None:
            return status
        time.sleep(0.5)
    raise AssertionError(f"the condition did not hold within {timeout_s:.0f} s")


def test_status_shows_worker_queues_and_round(
    make_rabbitmq: Callable[..., RabbitMQNode], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    node = make_rabbitmq(management=True)
    assert node.management_url is not None
    federation = f"ops-status-{uuid.uuid4().hex[:6]}"
    run_dir = tmp_path / "run"
    last_seen = time.time() - 90
    write_run_dir(run_dir, run_id="run-status", workers={"gone-worker": last_seen})
    processes = FedmqProcesses(tmp_path, node.url)
    try:
        processes.start("worker", "worker", "--task", "digits", "--worker-id", "live-worker", "--shard", "0/2", "--federation", federation)

        def connected() -> FederationStatus | None:
            status = collect_status(BrokerSettings(url=node.url, federation=federation), management_url=node.management_url, run_dir=run_dir)
            workers = {worker.worker_id: worker for worker in status.workers}
            # The management API publishes connection details after its statistics interval (5 s by default).
            live = workers.get("live-worker")
            return status if live is not None and live.connected and live.connected_since_unix is not None else None

        status = wait_for(connected, WORKER_TIMEOUT_S)

        # What each source contributed.
        workers = {worker.worker_id: worker for worker in status.workers}
        assert status.management_error is None
        assert set(workers) == {"live-worker", "gone-worker"}
        live = workers["live-worker"]
        assert live.connected is True
        assert live.connected_since_unix is not None and abs(live.connected_since_unix - time.time()) < 300
        assert live.peer is not None and live.peer.startswith("127.0.0.1:")
        assert live.queue_messages == 0
        gone = workers["gone-worker"]
        assert gone.connected is False
        assert gone.last_seen_unix == pytest.approx(last_seen)
        assert gone.last_round == 3
        queues = {queue.name: queue for queue in status.queues}
        assert queues[f"{federation}.results"].exists
        assert queues[f"{federation}.dead"].messages == 0
        assert queues[f"{federation}.worker.live-worker"].consumers == 1
        assert not queues[f"{federation}.worker.gone-worker"].exists
        assert status.coordinator_connected is False
        assert status.run is not None
        assert status.run.current_round == 4
        assert status.run.rounds_planned == 10

        text = format_status(status, now=last_seen + 150)
        assert "run run-status: round 4 of 10 in progress, 3 completed" in text
        assert "last test accuracy 0.8125" in text
        assert "(2 min ago)" in text
        assert "guest:guest" not in text

        # The command, with JSON output and AMQP only.
        monkeypatch.setenv("FEDMQ_BROKER_URL", node.url)
        code = main(["status", "--federation", federation, "--run-dir", str(run_dir), "--json"])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        shown = json.loads(captured.out)
        assert shown["run"]["current_round"] == 4
        # Without the management API, only the registry's workers are known.
        assert {worker["worker_id"]: worker["connected"] for worker in shown["workers"]} == {"gone-worker": False}
        assert shown["broker"].startswith("amqp://guest:***@")
    finally:
        processes.stop_all()


def test_status_without_management_lists_known_queues(broker_url: str) -> None:
    federation = f"ops-status-{uuid.uuid4().hex[:6]}"

    status = collect_status(BrokerSettings(url=broker_url, federation=federation))

    assert [queue.name for queue in status.queues] == [f"{federation}.results", f"{federation}.dead"]
    assert not any(queue.exists for queue in status.queues)
    assert status.workers == []
    assert "none known: pass --run-dir or --management-url" in format_status(status)


def test_status_reports_management_failure(broker_url: str) -> None:
    status = collect_status(BrokerSettings(url=broker_url, federation="ops-status-none"), management_url="http://127.0.0.1:9/", timeout_s=2.0)

    assert status.management_error is not None
    assert "127.0.0.1:9" in status.management_error


def test_status_unreachable_broker_raises() -> None:
    with pytest.raises(BrokerError, match="cannot connect"):
        collect_status(BrokerSettings(url="amqp://guest:guest@127.0.0.1:9/%2F", federation="ops"), timeout_s=2.0)
