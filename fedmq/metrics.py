"""Prometheus metrics of the coordinator and the workers, each in its own registry.

Every service object owns a ``CollectorRegistry``, not prometheus-client's global
one, so several coordinators and workers can live in one process (as they do in
the tests). ``MetricsServer`` serves one registry over HTTP at ``/metrics``.

Coordinator metrics (names as exposed):

- ``fedmq_rounds_completed_total``: rounds aggregated by this process.
- ``fedmq_rounds_planned``, ``fedmq_round``, ``fedmq_round_attempt``: the run's
  length, the round in progress (the last completed one between rounds), and the
  attempt of that round (0 for the first).
- ``fedmq_round_updates_received``, ``fedmq_round_updates_target``,
  ``fedmq_round_deadline_timestamp_seconds``: the open round's accepted updates, the
  count that closes it early (the quorum), and its deadline as a Unix time.
- ``fedmq_workers_known``: workers that count toward the quorum.
- ``fedmq_updates_accepted_total`` and ``fedmq_updates_rejected_total{reason}``. The
  reasons are those of the messages dead-lettered from the results queue (validation
  reasons, ``wrong_round``, ``invalid_message``) plus ``stale``, ``duplicate`` and
  ``other_run`` for updates that were discarded.
- ``fedmq_dropouts_total``: workers sent a round that did not reply before it closed.
- ``fedmq_round_duration_seconds``: histogram of round durations.
- ``fedmq_bytes_sent_total``, ``fedmq_bytes_received_total``: AMQP body bytes.
- ``fedmq_eval_accuracy``, ``fedmq_eval_loss``: the latest evaluation of the global
  model on the held-out set (NaN before the first round).
- ``fedmq_last_round_timestamp_seconds``: when the last round completed.
- ``fedmq_privacy_epsilon``: privacy budget spent, from the ``privacy`` entry of the
  round's record; NaN without a strategy that accounts differential privacy.
- ``fedmq_run_info{run_id, task, federation}``: always 1.

Worker metrics: ``fedmq_worker_rounds_trained_total``,
``fedmq_worker_training_failures_total``, ``fedmq_worker_training_seconds``
(histogram), ``fedmq_worker_bytes_sent_total``, ``fedmq_worker_bytes_received_total``
and ``fedmq_worker_info{worker_id, task, federation}``.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from fedmq.config import split_address

logger = logging.getLogger(__name__)

# Upper bounds of the duration histograms, in seconds: rounds last from seconds to hours.
ROUND_DURATION_BUCKETS_S = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)
TRAINING_DURATION_BUCKETS_S = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


class RoundView(Protocol):
    """The read-only view of an open round (coordinator.rounds.RoundState) that the gauges copy."""

    @property
    def round(self) -> int: ...

    @property
    def attempt(self) -> int: ...

    @property
    def deadline_unix(self) -> float: ...

    @property
    def accepted(self) -> Mapping[str, int]: ...

    @property
    def target(self) -> int: ...


class ByteCounter(Protocol):
    """A broker client's traffic counters (fedmq.broker.BrokerClient)."""

    bytes_sent: int
    bytes_received: int


class _BrokerBytesCollector(Collector):
    """Reports a broker client's byte counters at scrape time, so no code path has to copy them."""

    def __init__(self, prefix: str, source: Callable[[], ByteCounter | None]) -> None:
        self.prefix = prefix
        self.source = source

    def collect(self) -> Iterable[Metric]:
        broker = self.source()
        sent = CounterMetricFamily(f"{self.prefix}_bytes_sent", "AMQP message body bytes published, in bytes")
        received = CounterMetricFamily(f"{self.prefix}_bytes_received", "AMQP message body bytes consumed, in bytes")
        sent.add_metric([], float(broker.bytes_sent) if broker is not None else 0.0)
        received.add_metric([], float(broker.bytes_received) if broker is not None else 0.0)
        return [sent, received]


class CoordinatorMetrics:
    """The coordinator's metrics (see the module docstring) in a registry of their own."""

    def __init__(self, *, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.rounds_completed = Counter("fedmq_rounds_completed", "Rounds aggregated by this coordinator process", registry=r)
        self.rounds_planned = Gauge("fedmq_rounds_planned", "Rounds the run is configured to complete", registry=r)
        self.round = Gauge("fedmq_round", "Round in progress, or the last completed round between rounds", registry=r)
        self.round_attempt = Gauge("fedmq_round_attempt", "Attempt of the round in progress, 0 for the first", registry=r)
        self.updates_received = Gauge("fedmq_round_updates_received", "Updates accepted in the round in progress", registry=r)
        self.updates_target = Gauge("fedmq_round_updates_target", "Accepted updates that close the round in progress early (the quorum)", registry=r)
        self.deadline = Gauge("fedmq_round_deadline_timestamp_seconds", "Deadline of the round in progress, as a Unix time in seconds", registry=r)
        self.workers_known = Gauge("fedmq_workers_known", "Workers that count toward the quorum", registry=r)
        self.updates_accepted = Counter("fedmq_updates_accepted", "Updates accepted into a round's aggregate", registry=r)
        self.updates_rejected = Counter("fedmq_updates_rejected", "Updates dead-lettered or discarded, by reason", ["reason"], registry=r)
        self.dropouts = Counter("fedmq_dropouts", "Workers sent a round that did not reply before the round closed", registry=r)
        self.round_duration = Histogram(
            "fedmq_round_duration_seconds", "Duration of completed rounds, in seconds", buckets=ROUND_DURATION_BUCKETS_S, registry=r
        )
        self.eval_accuracy = Gauge("fedmq_eval_accuracy", "Accuracy of the global model on the held-out set after the last round", registry=r)
        self.eval_loss = Gauge("fedmq_eval_loss", "Loss of the global model on the held-out set after the last round", registry=r)
        self.last_round_time = Gauge("fedmq_last_round_timestamp_seconds", "When the last round completed, as a Unix time in seconds", registry=r)
        self.privacy_epsilon = Gauge("fedmq_privacy_epsilon", "Differential privacy budget spent so far (epsilon); NaN without a DP mechanism", registry=r)
        self.run_info = Info("fedmq_run", "The run this coordinator serves", registry=r)
        self._broker: ByteCounter | None = None
        r.register(_BrokerBytesCollector("fedmq", lambda: self._broker))
        for gauge in (self.eval_accuracy, self.eval_loss, self.privacy_epsilon):
            gauge.set(math.nan)

    def bind(self, *, run_id: str, task: str, federation: str, rounds_planned: int, broker: ByteCounter) -> None:
        """Record the run's identity and the broker client whose byte counters are reported."""
        self.run_info.info({"run_id": run_id, "task": task, "federation": federation})
        self.rounds_planned.set(rounds_planned)
        self._broker = broker

    def observe_round(self, state: RoundView | None, workers_known: int) -> None:
        """Copy the open round's progress into the gauges. Cheap enough to call on every event-loop turn."""
        self.workers_known.set(workers_known)
        if state is None:
            self.updates_received.set(0)
            return
        self.round.set(state.round)
        self.round_attempt.set(state.attempt)
        self.updates_received.set(len(state.accepted))
        self.updates_target.set(state.target)
        self.deadline.set(state.deadline_unix)

    def update_accepted(self) -> None:
        self.updates_accepted.inc()

    def update_rejected(self, reason: str) -> None:
        self.updates_rejected.labels(reason=reason).inc()

    def round_completed(self, record: Mapping[str, Any]) -> None:
        """Count a completed round from its metrics.jsonl record."""
        self.rounds_completed.inc()
        self.round.set(float(record["round"]))
        self.dropouts.inc(len(record.get("dropouts", ())))
        if "duration_s" in record:
            self.round_duration.observe(float(record["duration_s"]))
        evaluation = record.get("eval", {})
        if "accuracy" in evaluation:
            self.eval_accuracy.set(float(evaluation["accuracy"]))
        if "loss" in evaluation:
            self.eval_loss.set(float(evaluation["loss"]))
        self.last_round_time.set(float(record.get("finished_unix", 0.0)))
        # A strategy that accounts differential privacy adds the epsilon spent so far.
        privacy = record.get("privacy")
        if isinstance(privacy, Mapping) and isinstance(privacy.get("epsilon"), (int, float)):
            self.privacy_epsilon.set(float(privacy["epsilon"]))
        self.updates_received.set(0)

    def set_privacy_epsilon(self, epsilon: float) -> None:
        self.privacy_epsilon.set(epsilon)


class WorkerMetrics:
    """A worker's metrics (see the module docstring) in a registry of their own.

    The training thread calls ``round_trained`` and ``training_failed``, which is safe
    because prometheus-client's metrics are thread-safe.
    """

    def __init__(self, *, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.rounds_trained = Counter("fedmq_worker_rounds_trained", "Rounds this worker trained and answered with an update", registry=r)
        self.training_failures = Counter("fedmq_worker_training_failures", "Rounds whose local training raised", registry=r)
        self.training_time = Histogram(
            "fedmq_worker_training_seconds", "Local training time per round, in seconds", buckets=TRAINING_DURATION_BUCKETS_S, registry=r
        )
        self.info = Info("fedmq_worker", "The worker process", registry=r)
        self._broker: ByteCounter | None = None
        r.register(_BrokerBytesCollector("fedmq_worker", lambda: self._broker))

    def bind(self, *, worker_id: str, task: str, federation: str, broker: ByteCounter) -> None:
        self.info.info({"worker_id": worker_id, "task": task, "federation": federation})
        self._broker = broker

    def round_trained(self, train_time_s: float) -> None:
        self.rounds_trained.inc()
        self.training_time.observe(train_time_s)

    def training_failed(self) -> None:
        self.training_failures.inc()


class MetricsServer:
    """Serves one registry at ``http://ADDRESS/metrics`` on a daemon thread.

    ``address`` is ``HOST:PORT`` (``[IPV6]:PORT``), or ``""`` to serve nothing. Port 0
    picks a free port, which ``port`` returns after ``start``. A port that cannot be
    bound is logged as an error and the service runs on without metrics, because a
    training run must not stop for its monitoring.
    """

    def __init__(self, registry: CollectorRegistry, address: str, *, service: str) -> None:
        self.registry = registry
        self.address = address
        self.service = service
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int | None:
        return int(self._server.server_address[1]) if self._server is not None else None

    @property
    def url(self) -> str | None:
        if self._server is None:
            return None
        host, _ = split_address(self.address)
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}/metrics"

    def start(self) -> bool:
        """Start serving. Return False when disabled or when the address cannot be bound."""
        if not self.address or self._server is not None:
            return self._server is not None
        host, port = split_address(self.address)
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            logger.error("%s: cannot serve metrics on %s: %s; running without metrics", self.service, self.address, exc)
            return False
        if not _is_loopback(host):
            logger.warning(
                "%s: serving metrics without authentication on %s; allow only the Prometheus server to reach it",
                self.service, self.address,
            )
        logger.info("%s: serving metrics at %s", self.service, self.url)
        return True

    def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        logger.debug("%s: stopped serving metrics", self.service)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# Reading metrics back

def registry_samples(registry: CollectorRegistry) -> dict[str, float]:
    """Return {sample name: value} for every unlabelled sample of ``registry``."""
    samples: dict[str, float] = {}
    for family in registry.collect():
        for sample in family.samples:
            if not sample.labels:
                samples[sample.name] = float(sample.value)
    return samples


def scrape(url: str, *, timeout_s: float = 2.0) -> dict[str, float] | None:
    """Fetch a Prometheus text endpoint and return its unlabelled samples, or None when it is unreachable."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            text = response.read().decode("utf-8")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        logger.debug("scraping %s failed: %s", url, exc)
        return None
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.labels:
                samples[sample.name] = float(sample.value)
    return samples
