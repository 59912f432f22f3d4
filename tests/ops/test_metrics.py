"""Coordinator and worker metrics: registries, values and the HTTP endpoint."""

from __future__ import annotations

import logging
import math
import socket
import urllib.request
from dataclasses import dataclass, field

import pytest

from fedmq.metrics import CoordinatorMetrics, MetricsServer, WorkerMetrics, registry_samples, scrape


@dataclass
class FakeBroker:
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass
class FakeRound:
    round: int
    attempt: int
    deadline_unix: float
    accepted: dict[str, int] = field(default_factory=dict)
    target: int = 3


def sample(metrics: CoordinatorMetrics | WorkerMetrics, name: str, labels: dict[str, str] | None = None) -> float | None:
    return metrics.registry.get_sample_value(name, labels or {})


def test_coordinators_have_separate_registries() -> None:
    first = CoordinatorMetrics()
    second = CoordinatorMetrics()

    first.round_completed({"round": 1, "dropouts": [], "duration_s": 1.0, "eval": {}})

    assert sample(first, "fedmq_rounds_completed_total") == 1.0
    assert sample(second, "fedmq_rounds_completed_total") == 0.0


def test_round_completed_sets_counters_and_gauges() -> None:
    metrics = CoordinatorMetrics()
    record = {"round": 4, "dropouts": ["w-3", "w-5"], "duration_s": 7.5, "eval": {"accuracy": 0.91, "loss": 0.3}, "finished_unix": 1000.0}

    metrics.round_completed(record)

    assert sample(metrics, "fedmq_rounds_completed_total") == 1.0
    assert sample(metrics, "fedmq_round") == 4.0
    assert sample(metrics, "fedmq_dropouts_total") == 2.0
    assert sample(metrics, "fedmq_round_duration_seconds_count") == 1.0
    assert sample(metrics, "fedmq_round_duration_seconds_sum") == 7.5
    assert sample(metrics, "fedmq_eval_accuracy") == 0.91
    assert sample(metrics, "fedmq_eval_loss") == 0.3
    assert sample(metrics, "fedmq_last_round_timestamp_seconds") == 1000.0


def test_eval_and_epsilon_start_as_nan() -> None:
    metrics = CoordinatorMetrics()

    for name in ("fedmq_eval_accuracy", "fedmq_eval_loss", "fedmq_privacy_epsilon"):
        value = sample(metrics, name)
        assert value is not None and math.isnan(value), name
    metrics.set_privacy_epsilon(1.25)
    assert sample(metrics, "fedmq_privacy_epsilon") == 1.25


def test_round_record_sets_privacy_epsilon() -> None:
    metrics = CoordinatorMetrics()

    metrics.round_completed({"round": 1, "eval": {}, "privacy": {"epsilon": 0.75, "delta": 1e-5, "rounds": 1}})

    assert sample(metrics, "fedmq_privacy_epsilon") == 0.75


def test_updates_counted_by_reason() -> None:
    metrics = CoordinatorMetrics()

    metrics.update_accepted()
    metrics.update_accepted()
    metrics.update_rejected("wrong_shape")
    metrics.update_rejected("stale")
    metrics.update_rejected("stale")

    assert sample(metrics, "fedmq_updates_accepted_total") == 2.0
    assert sample(metrics, "fedmq_updates_rejected_total", {"reason": "wrong_shape"}) == 1.0
    assert sample(metrics, "fedmq_updates_rejected_total", {"reason": "stale"}) == 2.0


def test_observe_round_copies_progress() -> None:
    metrics = CoordinatorMetrics()
    state = FakeRound(round=2, attempt=1, deadline_unix=1234.5, accepted={"w-1": 10, "w-2": 20}, target=3)

    metrics.observe_round(state, workers_known=5)

    assert sample(metrics, "fedmq_round") == 2.0
    assert sample(metrics, "fedmq_round_attempt") == 1.0
    assert sample(metrics, "fedmq_round_updates_received") == 2.0
    assert sample(metrics, "fedmq_round_updates_target") == 3.0
    assert sample(metrics, "fedmq_round_deadline_timestamp_seconds") == 1234.5
    assert sample(metrics, "fedmq_workers_known") == 5.0


def test_bytes_read_from_broker_at_scrape() -> None:
    metrics = CoordinatorMetrics()
    broker = FakeBroker()
    metrics.bind(run_id="run-1", task="digits", federation="ops", rounds_planned=9, broker=broker)

    broker.bytes_sent = 4096
    broker.bytes_received = 100

    assert sample(metrics, "fedmq_bytes_sent_total") == 4096.0
    assert sample(metrics, "fedmq_bytes_received_total") == 100.0
    assert sample(metrics, "fedmq_rounds_planned") == 9.0
    assert sample(metrics, "fedmq_run_info", {"run_id": "run-1", "task": "digits", "federation": "ops"}) == 1.0


def test_worker_metrics() -> None:
    metrics = WorkerMetrics()
    broker = FakeBroker(bytes_sent=512)
    metrics.bind(worker_id="w-1", task="digits", federation="ops", broker=broker)

    metrics.round_trained(2.5)
    metrics.training_failed()

    assert sample(metrics, "fedmq_worker_rounds_trained_total") == 1.0
    assert sample(metrics, "fedmq_worker_training_failures_total") == 1.0
    assert sample(metrics, "fedmq_worker_training_seconds_sum") == 2.5
    assert sample(metrics, "fedmq_worker_bytes_sent_total") == 512.0
    assert sample(metrics, "fedmq_worker_info", {"worker_id": "w-1", "task": "digits", "federation": "ops"}) == 1.0


def test_server_serves_registry() -> None:
    metrics = CoordinatorMetrics()
    metrics.round_completed({"round": 1, "dropouts": [], "duration_s": 1.0, "eval": {"accuracy": 0.5}})
    server = MetricsServer(metrics.registry, "127.0.0.1:0", service="test")

    assert server.start()
    try:
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(server.url, timeout=5) as response:
            text = response.read().decode()
        scraped = scrape(server.url)
    finally:
        server.close()

    assert "fedmq_rounds_completed_total 1.0" in text
    assert scraped is not None
    assert scraped["fedmq_eval_accuracy"] == 0.5
    local = registry_samples(metrics.registry)
    assert set(scraped) == set(local)
    for name, value in local.items():
        assert scraped[name] == value or (math.isnan(value) and math.isnan(scraped[name])), name


def test_server_disabled_by_empty_address() -> None:
    server = MetricsServer(CoordinatorMetrics().registry, "", service="test")

    assert server.start() is False
    assert server.port is None
    server.close()


def test_server_port_taken_logs_error(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = MetricsServer(CoordinatorMetrics().registry, f"127.0.0.1:{port}", service="run run-1")

        with caplog.at_level(logging.ERROR, logger="fedmq.metrics"):
            started = server.start()

    assert started is False
    assert f"run run-1: cannot serve metrics on 127.0.0.1:{port}" in caplog.text


def test_scrape_unreachable_returns_none() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    assert scrape(f"http://127.0.0.1:{port}/metrics", timeout_s=1.0) is None
