"""``fedmq status``: the federation as the broker and the run directory see it.

Three sources, each optional except the first:

1. AMQP (always): a passive ``queue.declare`` of each known queue returns its
   message count and consumer count without changing it. A worker queue with a
   consumer means that worker is connected. The results and dead-letter queues are
   always checked; worker queues are known from the sources below.
2. The RabbitMQ management HTTP API (``--management-url``): every queue of the
   federation, and for each consumer the connection behind it, with the time it
   connected and the peer address.
3. The run directory (``--run-dir``): the current round from the checkpoint and
   ``metrics.jsonl``, and the coordinator's worker registry (``extra.workers`` of
   ``checkpoint/state.json``), which records when each worker was last heard from.
"""

from __future__ import annotations

import base64
import datetime
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pika
import pika.exceptions

from fedmq.broker import BrokerSettings, Topology, connection_parameters, redact_url
from fedmq.config import redact_url_password
from fedmq.errors import BrokerError
from fedmq.rundir import read_records, read_run_state, read_settings

logger = logging.getLogger(__name__)

# AMQP reply code of a passive declare of a queue that does not exist.
_NOT_FOUND = 404


@dataclass
class QueueStatus:
    name: str
    exists: bool
    messages: int | None = None
    consumers: int | None = None


@dataclass
class WorkerStatus:
    """A worker's state. A field is None when no source at hand reports it."""

    worker_id: str
    connected: bool | None = None
    connected_since_unix: float | None = None
    peer: str | None = None
    last_seen_unix: float | None = None
    last_round: int | None = None
    num_samples: int | None = None
    queue_messages: int | None = None


@dataclass
class RunStatus:
    run_dir: str
    run_id: str | None = None
    task: str | None = None
    rounds_planned: int | None = None
    completed_rounds: int = 0
    finished: bool = False
    last_accuracy: float | None = None
    checkpoint_unix: float | None = None

    @property
    def current_round(self) -> int | None:
        """The round in progress, or None when the run has finished."""
        return None if self.finished else self.completed_rounds + 1


@dataclass
class FederationStatus:
    federation: str
    broker: str
    queues: list[QueueStatus] = field(default_factory=list)
    workers: list[WorkerStatus] = field(default_factory=list)
    coordinator_connected: bool | None = None
    run: RunStatus | None = None
    management_url: str | None = None
    management_error: str | None = None
    collected_unix: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if self.run is not None:
            data["run"]["current_round"] = self.run.current_round
        return data


def collect_status(
    broker: BrokerSettings,
    *,
    management_url: str | None = None,
    run_dir: Path | None = None,
    timeout_s: float = 10.0,
) -> FederationStatus:
    """Gather the status of ``broker.federation`` from the broker, the management API and the run directory.

    The AMQP connection uses the broker settings as the services do (password, TLS).
    Raises BrokerError when the broker cannot be reached over AMQP. A failing
    management API is reported in ``management_error`` instead, because the AMQP
    part is still useful.
    """
    federation = broker.federation
    topology = Topology(federation)
    status = FederationStatus(federation=federation, broker=redact_url(broker.url))
    workers: dict[str, WorkerStatus] = {}

    # The run directory: round and worker registry.
    if run_dir is not None:
        status.run = _run_status(run_dir)
        for worker_id, info in _registry(run_dir).items():
            workers[worker_id] = WorkerStatus(
                worker_id,
                last_seen_unix=_float_or_none(info.get("last_seen_unix")),
                last_round=_int_or_none(info.get("last_round")),
                num_samples=_int_or_none(info.get("num_samples")),
            )

    # The management API: every queue of the federation and the connections behind consumers.
    management_queues: dict[str, QueueStatus] = {}
    if management_url:
        status.management_url = redact_url_password(management_url)
        try:
            management_queues = _management_status(management_url, broker, topology, workers, status, timeout_s)
        except BrokerError as exc:
            status.management_error = str(exc)
            logger.warning("management API at %s failed: %s", status.management_url, exc)

    # AMQP: passive declares of the queues known so far.
    names = [topology.results_queue, topology.dead_letter_queue]
    names += sorted(name for name in management_queues if name not in names and not name.startswith(f"{federation}.blob."))
    names += [topology.worker_queue(worker_id) for worker_id in sorted(workers) if topology.worker_queue(worker_id) not in names]
    queues = _amqp_queue_status(broker, names, timeout_s)
    status.queues = queues

    # Workers: a consumer on the worker's own queue means it is connected.
    prefix = f"{federation}.worker."
    for queue in queues:
        if queue.name.startswith(prefix):
            worker = workers.setdefault(queue.name[len(prefix):], WorkerStatus(queue.name[len(prefix):]))
            worker.queue_messages = queue.messages
            worker.connected = bool(queue.exists and queue.consumers)
        elif queue.name == topology.results_queue:
            status.coordinator_connected = bool(queue.exists and queue.consumers)
    status.workers = [workers[worker_id] for worker_id in sorted(workers)]
    return status


# Sources

def _run_status(run_dir: Path) -> RunStatus:
    run = RunStatus(run_dir=str(run_dir))
    state = read_run_state(run_dir)
    if state is not None:
        run.run_id = state.get("run_id")
        run.task = state.get("task")
        run.completed_rounds = int(state.get("completed_rounds", 0))
        run.finished = bool(state.get("finished", False))
        run.checkpoint_unix = (run_dir / "checkpoint" / "state.json").stat().st_mtime
    settings = read_settings(run_dir)
    if settings is not None:
        planned = settings.get("settings", {}).get("rounds")
        run.rounds_planned = int(planned) if isinstance(planned, int) else None
        run.run_id = run.run_id or settings.get("run_id")
    records = read_records(run_dir)
    if records:
        run.completed_rounds = max(run.completed_rounds, int(records[-1]["round"]))
        accuracy = records[-1].get("eval", {}).get("accuracy")
        run.last_accuracy = float(accuracy) if isinstance(accuracy, (int, float)) else None
    return run


def _registry(run_dir: Path) -> dict[str, dict[str, Any]]:
    state = read_run_state(run_dir) or {}
    workers = state.get("extra", {}).get("workers", {})
    return {str(worker_id): info for worker_id, info in workers.items() if isinstance(info, dict)}


def _amqp_queue_status(broker: BrokerSettings, names: list[str], timeout_s: float) -> list[QueueStatus]:
    broker_url = broker.url
    parameters = connection_parameters(broker)
    parameters.socket_timeout = timeout_s
    parameters.blocked_connection_timeout = timeout_s
    parameters.connection_attempts = 1
    parameters.client_properties = {"connection_name": "fedmq-status"}
    try:
        connection = pika.BlockingConnection(parameters)
    except pika.exceptions.AMQPError as exc:
        raise BrokerError(f"cannot connect to {redact_url(broker_url)}: {exc!r}; check --broker-url and that the broker runs") from exc

    result = []
    try:
        channel = connection.channel()
        for name in names:
            if not channel.is_open:
                channel = connection.channel()
            try:
                declared = channel.queue_declare(name, passive=True)
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != _NOT_FOUND:
                    raise BrokerError(f"passive declare of queue {name!r} failed: {exc}") from exc
                result.append(QueueStatus(name, exists=False))
                continue
            result.append(QueueStatus(name, True, int(declared.method.message_count), int(declared.method.consumer_count)))
    except pika.exceptions.AMQPError as exc:
        raise BrokerError(f"reading queue depths from {redact_url(broker_url)} failed: {exc!r}") from exc
    finally:
        if connection.is_open:
            connection.close()
    return result


def _management_status(
    management_url: str,
    broker: BrokerSettings,
    topology: Topology,
    workers: dict[str, WorkerStatus],
    status: FederationStatus,
    timeout_s: float,
) -> dict[str, QueueStatus]:
    base, authorization = _management_endpoint(management_url, broker)
    vhost = _vhost(broker.url)
    quoted_vhost = urllib.parse.quote(vhost, safe="")
    federation = topology.federation

    queues: dict[str, QueueStatus] = {}
    for item in _get_json(f"{base}/api/queues/{quoted_vhost}", authorization, timeout_s):
        name = str(item.get("name", ""))
        if name.startswith(f"{federation}."):
            queues[name] = QueueStatus(name, True, _int_or_none(item.get("messages")), _int_or_none(item.get("consumers")))

    connections = {str(item.get("name")): item for item in _get_json(f"{base}/api/connections", authorization, timeout_s)}
    prefix = f"{federation}.worker."
    for consumer in _get_json(f"{base}/api/consumers/{quoted_vhost}", authorization, timeout_s):
        queue_name = str(consumer.get("queue", {}).get("name", ""))
        connection = connections.get(str(consumer.get("channel_details", {}).get("connection_name", "")), {})
        if queue_name == topology.results_queue:
            status.coordinator_connected = True
        if not queue_name.startswith(prefix):
            continue
        worker = workers.setdefault(queue_name[len(prefix):], WorkerStatus(queue_name[len(prefix):]))
        worker.connected = True
        connected_at_ms = connection.get("connected_at")
        worker.connected_since_unix = connected_at_ms / 1000.0 if isinstance(connected_at_ms, (int, float)) else None
        if connection.get("peer_host") is not None:
            worker.peer = f"{connection.get('peer_host')}:{connection.get('peer_port')}"
    for name in queues:
        if name.startswith(prefix):
            workers.setdefault(name[len(prefix):], WorkerStatus(name[len(prefix):]))
    return queues


def _management_endpoint(management_url: str, broker: BrokerSettings) -> tuple[str, str]:
    """Return the API base URL without credentials, and the Basic authorization header value.

    Credentials come from the management URL, else from the broker settings (the
    URL's user, with the separate password when one is set).
    """
    parts = urllib.parse.urlsplit(management_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BrokerError(f"--management-url must be an http(s) URL such as http://127.0.0.1:15672/, but got {redact_url_password(management_url)!r}")
    user, password = parts.username, parts.password
    if user is None:
        broker_parts = urllib.parse.urlsplit(broker.url)
        user = broker_parts.username or "guest"
        password = broker.password if broker.password is not None else (broker_parts.password or "guest")
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    base = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    token = base64.b64encode(f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password or '')}".encode()).decode("ascii")
    return base, f"Basic {token}"


def _get_json(url: str, authorization: str, timeout_s: float) -> list[dict[str, Any]]:
    request = urllib.request.Request(url, headers={"Authorization": authorization, "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            document = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        raise BrokerError(f"GET {url} failed with HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise BrokerError(f"GET {url} failed: {exc}") from exc
    if not isinstance(document, list):
        raise BrokerError(f"GET {url} returned a JSON {type(document).__name__}, but a JSON list was expected")
    return [item for item in document if isinstance(item, dict)]


def _vhost(broker_url: str) -> str:
    path = urllib.parse.urlsplit(broker_url).path
    return urllib.parse.unquote(path[1:]) if len(path) > 1 else "/"


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _float_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# Display

def format_status(status: FederationStatus, *, now: float | None = None) -> str:
    """Render the status as text for a terminal."""
    now = time.time() if now is None else now
    lines = [f"federation {status.federation} on {status.broker}"]
    coordinator = {True: "connected", False: "not connected", None: "unknown"}[status.coordinator_connected]
    lines.append(f"coordinator: {coordinator} (a consumer on {Topology(status.federation).results_queue})")

    run = status.run
    if run is not None:
        planned = run.rounds_planned if run.rounds_planned is not None else "?"
        if run.run_id is None and run.completed_rounds == 0:
            lines.append(f"run directory {run.run_dir}: no checkpoint or metrics yet")
        elif run.finished:
            lines.append(f"run {run.run_id}: finished after {run.completed_rounds} of {planned} rounds")
        else:
            lines.append(f"run {run.run_id}: round {run.current_round} of {planned} in progress, {run.completed_rounds} completed")
        if run.last_accuracy is not None:
            lines.append(f"  last test accuracy {run.last_accuracy:.4f}")
        if run.checkpoint_unix is not None:
            lines.append(f"  last checkpoint {_when(run.checkpoint_unix, now)}")
    if status.management_error:
        lines.append(f"management API: {status.management_error}")

    lines += ["", "queues"]
    width = max((len(queue.name) for queue in status.queues), default=10)
    lines.append(f"  {'name':<{width}}  {'messages':>8}  {'consumers':>9}")
    for queue in status.queues:
        if queue.exists:
            lines.append(f"  {queue.name:<{width}}  {queue.messages:>8}  {queue.consumers:>9}")
        else:
            lines.append(f"  {queue.name:<{width}}  {'missing':>8}  {'-':>9}")

    lines += ["", f"workers ({len(status.workers)})"]
    if not status.workers:
        lines.append("  none known: pass --run-dir or --management-url to list workers")
        return "\n".join(lines)
    id_width = max(len("worker"), *(len(worker.worker_id) for worker in status.workers))
    lines.append(f"  {'worker':<{id_width}}  {'connected':<9}  {'connected since':<24}  {'last heard from':<24}  {'last round':>10}  {'samples':>8}")
    for worker in status.workers:
        connected = {True: "yes", False: "no", None: "?"}[worker.connected]
        since = _when(worker.connected_since_unix, now) if worker.connected_since_unix is not None else "-"
        heard = _when(worker.last_seen_unix, now) if worker.last_seen_unix is not None else "-"
        last_round = str(worker.last_round) if worker.last_round is not None else "-"
        samples = str(worker.num_samples) if worker.num_samples is not None else "-"
        lines.append(f"  {worker.worker_id:<{id_width}}  {connected:<9}  {since:<24}  {heard:<24}  {last_round:>10}  {samples:>8}")
    return "\n".join(lines)


def _when(unix: float, now: float) -> str:
    stamp = datetime.datetime.fromtimestamp(unix).strftime("%Y-%m-%d %H:%M:%S")
    return f"{stamp} ({_ago(now - unix)})"


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} d ago"
