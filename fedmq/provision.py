"""Provision a worker on a locked-down RabbitMQ broker through the management HTTP API.

``fedmq provision-worker`` gives a worker the least it needs on a broker that does
not trust it:

- a broker user named after the worker id, with a generated password (or one read
  from a file) and no management tags;
- a virtual host per federation, on which the coordinator's user gets full rights;
- the federation's exchanges, and the worker's own round-start queue bound to the
  broadcast and worker-addressed round starts, declared by the administrator, so the
  worker runs with ``--no-declare`` and needs no configure right on them;
- permissions (RabbitMQ 3.7 or newer) that let the worker read only its own queue,
  write only to the results exchange and to the blobs exchange, and create, bind
  and delete only its own blob queues. Topic permissions on the blobs exchange
  limit its routing keys to ``blob.<worker id>.<hex id>``, so it can neither publish
  into nor bind to another worker's blobs.

The worker gets no right on the default exchange. RabbitMQ checks a publish to the
default exchange as a write to ``amq.default`` and not to the target queue, so that
right would let a worker put a message into any queue, such as another worker's
round-start queue. Blob chunks therefore travel through the federation's
``<federation>.blobs`` topic exchange.

Worker ids of provisioned workers contain only letters, digits, ``_`` and ``-``: a dot
would let the permission patterns of worker ``a`` match the names of worker ``a.b``.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import secrets
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from fedmq.broker import Topology
from fedmq.errors import BrokerError, ConfigError
from fedmq.secrets import register_secret, split_credentials, with_user

logger = logging.getLogger(__name__)

WORKER_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
# Blob ids are uuid4().hex (see fedmq.broker).
_BLOB_ID = "[0-9a-f]+"


@dataclass(frozen=True)
class WorkerPermissions:
    """The regular expressions of one worker's permissions on its federation's vhost."""

    configure: str
    write: str
    read: str
    topic_exchange: str
    topic_write: str
    topic_read: str


def worker_permissions(federation: str, worker_id: str) -> WorkerPermissions:
    """Return the permissions of worker ``worker_id``, as described in the module docstring."""
    check_worker_id(worker_id)
    names = Topology(federation)
    own_queue = re.escape(names.worker_queue(worker_id))
    blob_queues = re.escape(names.blob_queue(worker_id, "")) + _BLOB_ID
    results = re.escape(names.results_exchange)
    blobs = re.escape(names.blobs_exchange)
    blob_keys = "^" + re.escape(names.blob_routing_key(worker_id, "")) + _BLOB_ID + "$"
    return WorkerPermissions(
        # queue.declare and queue.delete of its blob queues.
        configure=f"^{blob_queues}$",
        # basic.publish to the two exchanges; queue.bind needs write on the queue bound.
        write=f"^({results}|{blobs}|{blob_queues})$",
        # basic.consume of its queue; queue.bind needs read on the exchange bound to.
        read=f"^({own_queue}|{blobs})$",
        topic_exchange=names.blobs_exchange,
        topic_write=blob_keys,
        topic_read=blob_keys,
    )


def check_worker_id(worker_id: str) -> None:
    if not WORKER_ID_PATTERN.fullmatch(worker_id):
        raise ConfigError(
            f"a provisioned worker id must contain only letters, digits, '_' and '-', but got {worker_id!r}; "
            "a dot would make its permissions cover other workers' names"
        )


def generate_password() -> str:
    """Return a random password of 32 URL-safe characters (192 bits)."""
    return secrets.token_urlsafe(24)


class ManagementClient:
    """A small client of the RabbitMQ management HTTP API, on urllib.

    Errors become BrokerError with the method, the path, the HTTP status and the API's
    reason; the password never appears in them.
    """

    def __init__(self, base_url: str, *, user: str, password: str, ca_file: Path | None = None, timeout_s: float = 10.0) -> None:
        bare_url, url_user, url_password = split_credentials(base_url)
        if url_user is not None or url_password is not None:
            raise ConfigError("the management URL must not contain credentials; pass the user and password separately")
        if not bare_url.startswith(("http://", "https://")):
            raise ConfigError(f"the management URL must start with http:// or https://, but got {bare_url!r}")
        self.base_url = bare_url.rstrip("/")
        self.user = user
        self._authorization = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        register_secret(password)
        self.timeout_s = timeout_s
        self._context: ssl.SSLContext | None = None
        if bare_url.startswith("https://"):
            self._context = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """Send one request and return the decoded JSON response, or None for an empty one."""
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        request.add_header("Authorization", self._authorization)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s, context=self._context) as response:
                text = response.read().decode("utf-8")
        except urllib.error.HTTPError as exc:
            raise BrokerError(f"management API {method} {path} failed with HTTP {exc.code}: {_reason(exc)}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            raise BrokerError(f"cannot reach the management API at {self.base_url}: {reason}") from None
        return json.loads(text) if text.strip() else None

    def put(self, path: str, body: Any) -> None:
        self.request("PUT", path, body)

    def post(self, path: str, body: Any) -> None:
        self.request("POST", path, body)


def _reason(error: urllib.error.HTTPError) -> str:
    try:
        document = json.loads(error.read().decode("utf-8"))
    except (ValueError, OSError):
        return str(error.reason)
    if isinstance(document, dict):
        return str(document.get("reason") or document.get("error") or error.reason)
    return str(error.reason)


@dataclass(frozen=True)
class ProvisionedWorker:
    """The connection settings of a provisioned worker: its user, vhost, URL (without the password) and password."""

    worker_id: str
    user: str
    vhost: str
    federation: str
    broker_url: str
    password: str = field(repr=False)


def provision_worker(
    client: ManagementClient,
    *,
    federation: str,
    worker_id: str,
    password: str,
    vhost: str | None = None,
    coordinator_user: str | None = None,
    broker_url: str = "amqp://127.0.0.1:5672/",
) -> ProvisionedWorker:
    """Create or update the vhost, exchanges, user, queue, bindings and permissions of one worker.

    Every step is idempotent, so running it again resets the worker's password and
    permissions. ``coordinator_user`` (default: the management user) gets full rights
    on the vhost. ``broker_url`` gives the scheme, host and port of the returned URL.
    Raises BrokerError when the API refuses a step, for example when the worker's
    queue exists with other arguments.
    """
    check_worker_id(worker_id)
    vhost = vhost or federation
    names = Topology(federation)
    permissions = worker_permissions(federation, worker_id)
    vhost_path = quote(vhost, safe="")

    # The federation's vhost, the coordinator's rights and the exchanges.
    client.put(f"/api/vhosts/{vhost_path}", {})
    coordinator = coordinator_user or client.user
    client.put(f"/api/permissions/{vhost_path}/{quote(coordinator, safe='')}", {"configure": ".*", "write": ".*", "read": ".*"})
    for exchange, kind in (
        (names.rounds_exchange, "topic"),
        (names.results_exchange, "direct"),
        (names.dead_letter_exchange, "fanout"),
        (names.blobs_exchange, "topic"),
    ):
        # The same properties as BrokerClient.declare_topology, so its declarations match.
        client.put(
            f"/api/exchanges/{vhost_path}/{quote(exchange, safe='')}",
            {"type": kind, "durable": True, "auto_delete": False, "internal": False, "arguments": {}},
        )

    # The worker's user, queue, bindings and permissions.
    user_path = quote(worker_id, safe="")
    client.put(f"/api/users/{user_path}", {"password": password, "tags": ""})
    queue = names.worker_queue(worker_id)
    client.put(f"/api/queues/{vhost_path}/{quote(queue, safe='')}", {"durable": True, "auto_delete": False, "arguments": {}})
    for routing_key in (names.ROUTING_ALL, names.worker_routing_key(worker_id)):
        client.post(
            f"/api/bindings/{vhost_path}/e/{quote(names.rounds_exchange, safe='')}/q/{quote(queue, safe='')}",
            {"routing_key": routing_key, "arguments": {}},
        )
    client.put(
        f"/api/permissions/{vhost_path}/{user_path}",
        {"configure": permissions.configure, "write": permissions.write, "read": permissions.read},
    )
    client.put(
        f"/api/topic-permissions/{vhost_path}/{user_path}",
        {"exchange": permissions.topic_exchange, "write": permissions.topic_write, "read": permissions.topic_read},
    )
    logger.info("provisioned worker %s as broker user %s on vhost %s of federation %s", worker_id, worker_id, vhost, federation)
    return ProvisionedWorker(
        worker_id=worker_id,
        user=worker_id,
        vhost=vhost,
        federation=federation,
        broker_url=worker_url(broker_url, worker_id, vhost),
        password=password,
    )


def worker_url(base_url: str, user: str, vhost: str) -> str:
    """Return ``base_url``'s scheme, host and port with ``user`` and ``vhost``, without a password."""
    parts = urlsplit(split_credentials(base_url)[0])
    if parts.scheme not in ("amqp", "amqps") or not parts.netloc:
        raise ConfigError(f"the broker URL must look like amqp://HOST:PORT or amqps://HOST:PORT, but got {base_url!r}")
    return with_user(f"{parts.scheme}://{parts.netloc}/{quote(vhost, safe='')}", user)


def connection_instructions(worker: ProvisionedWorker, *, task: str, password_file: Path | None) -> str:
    """Return the instructions for starting the provisioned worker, for the operator.

    With ``password_file`` None the generated password is part of the text, so this
    text is shown once and not logged.
    """
    lines = [
        f"Provisioned worker {worker.worker_id} as broker user {worker.user} on vhost {worker.vhost!r} (federation {worker.federation}).",
        "",
        "Worker settings:",
        f"  FEDMQ_BROKER_URL={worker.broker_url}",
    ]
    if password_file is None:
        lines.append(f"  FEDMQ_BROKER_PASSWORD={worker.password}")
        lines.append("  (the password is shown only this once; store it in a file that only the worker can read)")
        password_option = ""
    else:
        password_option = f" --broker-password-file {password_file}"
    lines += [
        "",
        "Start it with:",
        f"  fedmq worker --task {task} --worker-id {worker.worker_id} --federation {worker.federation} --no-declare{password_option}",
    ]
    return "\n".join(lines)
