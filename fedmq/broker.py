"""The RabbitMQ transport shared by the coordinator and the workers.

``BrokerClient`` owns one pika ``BlockingConnection`` and one channel. Threading
rule: pika's blocking connection is not thread-safe, so a client is used only by
the thread that created it. Another thread hands work to that thread with
``call_threadsafe``, which queues a callable that the owning thread runs inside
``process_events``.

Delivery guarantees:

- Every publish waits for a publisher confirm and sets the mandatory flag. A nack
  is retried up to ``NACK_ATTEMPTS`` times and then raises PublishError. A returned
  (unroutable) message raises UnroutableError, and the caller decides whether to
  re-declare and retry.
- Messages are persistent. The results queue is a quorum queue where the broker
  supports it and a durable classic queue otherwise.
- Consumption uses manual acks. The caller acks a Delivery when it is done with it,
  or dead-letters it with a reason.
- A body larger than ``max_message_bytes`` travels in chunks. Round starts go out in
  order through the rounds exchange and are reassembled by each worker. Each chunk
  is acked when it arrives, because a prefetch window full of unacked chunks would
  stop the broker from sending the rest. Updates are sent by reference: the chunks
  go to a private blob queue, and a small reference message on the results queue
  names it. The consumer reads the blob queue on a second channel, so a missing
  blob queue (which makes the broker close that channel) never cancels the
  consumer. Every reassembled payload is checked against the SHA-256 digest its
  sender declared.
- When the broker closes the channel because a body exceeds its ``max_message_size``,
  the client lowers its ``max_message_bytes`` to the limit in the broker's message
  and raises. The caller reconnects and publishes again, now in chunks.
- A consumer that the broker cancels (its queue was deleted) raises
  ConsumerCancelledError from ``process_events``. It is one of ``CONNECTION_ERRORS``,
  so the services reconnect, which declares the queue again and restores the consumer.

pika's exceptions do not escape this module except through ``CONNECTION_ERRORS``,
which the services catch to reconnect.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import re
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_delay, wait_random_exponential
from tenacity.stop import stop_base

from fedmq.errors import BrokerError, PayloadTooLargeError, PublishError
from fedmq.secrets import split_credentials
from fedmq.tuning import tune_pika_reads

logger = logging.getLogger(__name__)


class ConsumerCancelledError(BrokerError):
    """The broker cancelled a consumer, for example because its queue was deleted."""


class ChannelClosedByBrokerError(BrokerError):
    """The broker closed the client's channel, for example after RabbitMQ's consumer_timeout."""


CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    ConsumerCancelledError,
    ChannelClosedByBrokerError,
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.AMQPChannelError,
    pika.exceptions.StreamLostError,
    pika.exceptions.ConnectionClosed,
    pika.exceptions.ChannelClosed,
    pika.exceptions.ChannelWrongStateError,
    pika.exceptions.ConnectionWrongStateError,
    ConnectionError,
    OSError,
)

HEADER_PAYLOAD_ID = "fedmq-payload-id"
HEADER_CHUNK_INDEX = "fedmq-chunk-index"
HEADER_CHUNK_COUNT = "fedmq-chunk-count"
HEADER_PAYLOAD_BYTES = "fedmq-payload-bytes"
HEADER_SHA256 = "fedmq-sha256"
HEADER_BLOB_QUEUE = "fedmq-blob-queue"
HEADER_REJECT_REASON = "fedmq-reject-reason"
HEADER_WORKER_ID = "fedmq-worker-id"
HEADER_TRUNCATED_FROM = "fedmq-truncated-from-bytes"

# Incomplete chunked payloads kept per consumer before the oldest is dropped.
MAX_PARTIAL_PAYLOADS = 4

# Publishes of one message that the broker may nack before PublishError is raised.
NACK_ATTEMPTS = 5
NACK_RETRY_MAX_WAIT_S = 2.0

# RabbitMQ's reply text when a body exceeds max_message_size (3.8 to 4.x).
_SIZE_LIMIT_TEXT = re.compile(r"larger than configured max size (\d+)")


class UnroutableError(PublishError):
    """A mandatory publish was returned because no queue is bound for its routing key."""


@dataclass(frozen=True)
class BrokerSettings:
    """Connection and size settings of one client.

    ``max_message_bytes`` is the largest AMQP message body sent in one piece
    (RabbitMQ 4.x rejects bodies over 16 MiB by default, 3.x over 128 MiB).
    ``max_payload_bytes`` bounds a whole logical message, chunked or not, on both
    sending and receiving.

    ``password`` replaces the URL's password, so the URL can name only the user.
    With an ``amqps://`` URL the client verifies the broker's certificate against
    ``ca_file`` (the system's CAs when None) and its host name against the URL's
    host, and presents ``cert_file`` with ``key_file`` when the broker asks for a
    client certificate.
    """

    url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    federation: str = "fedmq"
    heartbeat_s: int = 30
    blocked_connection_timeout_s: float = 300.0
    max_message_bytes: int = 15 * 1024 * 1024
    max_payload_bytes: int = 4 * 1024 * 1024 * 1024
    reconnect_max_wait_s: float = 10.0
    reconnect_timeout_s: float = 600.0
    classic_results_queue: bool = False
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be set together, but only one of them is set")
        uses_tls = self.url.lower().startswith("amqps://")
        if not uses_tls and any(path is not None for path in (self.ca_file, self.cert_file, self.key_file)):
            raise ValueError("ca_file, cert_file and key_file need an amqps:// URL, but the URL uses another scheme")
        if self.heartbeat_s < 0:
            raise ValueError(f"heartbeat_s must be >= 0, but got {self.heartbeat_s}")
        if self.max_message_bytes < 4096:
            raise ValueError(f"max_message_bytes must be >= 4096, but got {self.max_message_bytes}")
        if self.max_payload_bytes < self.max_message_bytes:
            raise ValueError(
                f"max_payload_bytes must be >= max_message_bytes ({self.max_message_bytes}), but got {self.max_payload_bytes}"
            )
        if not self.federation or any(c in self.federation for c in " #*"):
            raise ValueError(f"federation must be a non-empty name without spaces, '#' or '*', but got {self.federation!r}")

    def __repr__(self) -> str:
        return (
            f"BrokerSettings(url={redact_url(self.url)!r}, federation={self.federation!r}, heartbeat_s={self.heartbeat_s}, "
            f"max_message_bytes={self.max_message_bytes}, max_payload_bytes={self.max_payload_bytes}, "
            f"ca_file={self.ca_file!r}, cert_file={self.cert_file!r})"
        )


def connection_parameters(settings: BrokerSettings) -> pika.URLParameters:
    """Build pika's parameters: credentials set apart from the URL, and TLS with verification for amqps://."""
    bare_url, user, url_password = split_credentials(settings.url)
    parameters = pika.URLParameters(bare_url)
    if user is not None:
        password = settings.password if settings.password is not None else url_password
        parameters.credentials = pika.PlainCredentials(user, password or "")
    if bare_url.lower().startswith("amqps://"):
        parameters.ssl_options = pika.SSLOptions(tls_context(settings), server_hostname=parameters.host)
    return parameters


def tls_context(settings: BrokerSettings) -> ssl.SSLContext:
    """Return a client TLS context that verifies the broker's certificate and host name (TLS 1.2 or newer)."""
    try:
        context = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file is not None else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if settings.cert_file is not None and settings.key_file is not None:
            context.load_cert_chain(str(settings.cert_file), str(settings.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise BrokerError(
            f"cannot load the TLS files (CA {settings.ca_file}, certificate {settings.cert_file}, key {settings.key_file}): {exc}"
        ) from exc
    return context


def redact_url(url: str) -> str:
    """Return an AMQP URL with its password replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


@dataclass(frozen=True)
class Topology:
    """Names of the exchanges and queues of one federation."""

    federation: str

    @property
    def rounds_exchange(self) -> str:
        return f"{self.federation}.rounds"

    @property
    def results_exchange(self) -> str:
        return f"{self.federation}.results"

    @property
    def results_queue(self) -> str:
        return f"{self.federation}.results"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.federation}.dlx"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.federation}.dead"

    def worker_queue(self, worker_id: str) -> str:
        return f"{self.federation}.worker.{worker_id}"

    @property
    def blob_prefix(self) -> str:
        """Prefix of every blob queue name; a reference to any other queue is rejected."""
        return f"{self.federation}.blob."

    def blob_queue(self, worker_id: str, payload_id: str) -> str:
        return f"{self.blob_prefix}{worker_id}.{payload_id}"

    @property
    def blobs_exchange(self) -> str:
        """Topic exchange that blob chunks travel through, so a worker needs no write access to the default exchange."""
        return f"{self.federation}.blobs"

    @staticmethod
    def blob_routing_key(worker_id: str, payload_id: str) -> str:
        return f"blob.{worker_id}.{payload_id}"

    ROUTING_ALL = "round.all"

    @staticmethod
    def worker_routing_key(worker_id: str) -> str:
        return f"round.worker.{worker_id}"


@dataclass
class Delivery:
    """One complete message as consumed: its body and what is needed to ack it.

    ``delivery_tags`` are the AMQP tags still to ack (one, or none for a chunked
    payload, whose chunks were acked on arrival) and are valid only on the
    connection ``epoch`` they arrived on. ``blob_queue`` is set for a payload sent
    by reference and is deleted once the delivery is acked.
    """

    body: bytes | bytearray
    properties: BasicProperties
    delivery_tags: list[int]
    epoch: int
    redelivered: bool
    routing_key: str
    blob_queue: str | None = None
    received_unix: float = field(default_factory=time.time)

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self.properties.headers or {})

    @property
    def message_id(self) -> str:
        return str(self.properties.message_id or "")

    @property
    def user_id(self) -> str | None:
        return self.properties.user_id


@dataclass(frozen=True)
class TransportReject:
    """A chunk or blob reference that the client dead-lettered before it became a Delivery.

    ``claimed_worker_id`` comes from the ``fedmq-worker-id`` header, which any client can set.
    """

    category: str
    reason: str
    message_id: str
    claimed_worker_id: str | None


@dataclass
class _PartialPayload:
    count: int
    total_bytes: int
    sha256: str
    properties: BasicProperties
    pieces: dict[int, bytes] = field(default_factory=dict)
    received_bytes: int = 0
    redelivered: bool = False
    routing_key: str = ""


class _StopWhen(stop_base):
    """Stops retrying once ``predicate`` returns True, such as after a shutdown signal."""

    def __init__(self, predicate: Callable[[], bool]) -> None:
        self.predicate = predicate

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.predicate()


def broker_size_limit(error: BaseException) -> int | None:
    """Return the body size limit named in a channel close over ``max_message_size``, or None for other errors."""
    if not isinstance(error, pika.exceptions.ChannelClosedByBroker) or error.reply_code != 406:
        return None
    match = _SIZE_LIMIT_TEXT.search(str(error.reply_text))
    return int(match.group(1)) if match else None


def _log_retry(what: str) -> Callable[[RetryCallState], None]:
    def log(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        wait_s = state.next_action.sleep if state.next_action else 0.0
        logger.warning("%s failed [attempt %d]: %r; retrying in %.1f s", what, state.attempt_number, error, wait_s)

    return log


class BrokerClient:
    """A connection and channel to RabbitMQ with confirms, chunking and reconnects.

    Use it only from the thread that created it (see the module docstring).
    """

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        client_name: str,
        declare: bool = True,
        stop_requested: Callable[[], bool] = lambda: False,
    ) -> None:
        # Large reads make consuming big messages several times faster (see fedmq.tuning).
        tune_pika_reads()
        self.settings = settings
        self.stop_requested = stop_requested
        self.topology = Topology(settings.federation)
        self.client_name = client_name
        self.declare = declare
        self.epoch = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        # Lowered below the setting when the broker reports a smaller max_message_size.
        self.max_message_bytes = settings.max_message_bytes
        # Called for each chunk or reference that this client dead-letters, so the owner can log and count it.
        self.on_transport_reject: Callable[[TransportReject], None] | None = None
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._blob_channel: BlockingChannel | None = None
        self._consumers: list[tuple[str, Callable[[Delivery], None], int]] = []
        self._consumer_queues: dict[str, str] = {}
        self._cancelled_queues: list[str] = []
        self._setup_steps: list[Callable[[], object]] = []
        self._partials: dict[str, _PartialPayload] = {}
        self._threadsafe_calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._results_queue_type = "classic" if settings.classic_results_queue else "quorum"
        # Set as the user_id property of every publish without one; RabbitMQ rejects a
        # user_id other than the connection's user, so a receiver can trust it.
        self.user_id: str | None = None

    @property
    def username(self) -> str | None:
        """The broker user of the connection, from the URL; None when the URL names none."""
        return split_credentials(self.settings.url)[1]

    # Connection lifecycle

    @property
    def connected(self) -> bool:
        return (
            self._connection is not None
            and self._connection.is_open
            and self._channel is not None
            and self._channel.is_open
        )

    @property
    def channel(self) -> BlockingChannel:
        if self._channel is None or not self._channel.is_open:
            raise ChannelClosedByBrokerError(f"{self.client_name}: the channel is not open; reconnect first")
        return self._channel

    def connect(self) -> None:
        """Open the connection, declare the topology and restore consumers, retrying with backoff.

        Retries use capped exponential backoff with jitter and give up after
        ``reconnect_timeout_s``, raising BrokerError.
        """
        retrying = Retrying(
            retry=retry_if_exception_type(CONNECTION_ERRORS),
            wait=wait_random_exponential(multiplier=0.5, max=self.settings.reconnect_max_wait_s),
            stop=stop_after_delay(self.settings.reconnect_timeout_s) | _StopWhen(self.stop_requested),
            before_sleep=_log_retry(f"{self.client_name}: connecting to {redact_url(self.settings.url)}"),
            reraise=True,
        )
        try:
            retrying(self._connect_once)
        except CONNECTION_ERRORS as exc:
            raise BrokerError(
                f"{self.client_name}: could not connect to {redact_url(self.settings.url)} "
                f"within {self.settings.reconnect_timeout_s:.0f} s: {exc!r}"
            ) from exc

    def _connect_once(self) -> None:
        self._close_quietly()
        parameters = connection_parameters(self.settings)
        parameters.heartbeat = self.settings.heartbeat_s
        parameters.blocked_connection_timeout = self.settings.blocked_connection_timeout_s
        parameters.client_properties = {"connection_name": self.client_name}
        connection = pika.BlockingConnection(parameters)
        try:
            channel = self._open_channel(connection)
        except BaseException:
            connection.close()
            raise
        self._connection = connection
        self._channel = channel
        self.epoch += 1
        self._consumer_queues.clear()
        self._cancelled_queues.clear()
        # Partial chunked payloads are kept: their chunks were acked, so the broker
        # does not send them again, and the remaining chunks still arrive.
        if self.declare:
            self.declare_topology()
        for step in self._setup_steps:
            step()
        for queue_name, callback, prefetch in self._consumers:
            self._start_consumer(queue_name, callback, prefetch)
        logger.info("%s: connected to %s (connection %d)", self.client_name, redact_url(self.settings.url), self.epoch)

    def add_setup_step(self, step: Callable[[], object]) -> None:
        """Run ``step`` after every connect, after the topology and before the consumers start."""
        self._setup_steps.append(step)

    def reconnect(self, error: BaseException | None = None) -> None:
        if error is not None:
            logger.warning("%s: connection lost (%r); reconnecting", self.client_name, error)
        self.connect()

    def close(self) -> None:
        self._close_quietly()
        logger.debug("%s: connection closed", self.client_name)

    def _open_channel(self, connection: pika.BlockingConnection) -> BlockingChannel:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.add_on_cancel_callback(self._on_consumer_cancelled)
        return channel

    def _on_consumer_cancelled(self, frame: Any) -> None:
        queue_name = self._consumer_queues.get(frame.method.consumer_tag, frame.method.consumer_tag)
        logger.warning("%s: the broker cancelled the consumer of queue %s", self.client_name, queue_name)
        self._cancelled_queues.append(queue_name)

    def _close_quietly(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        self._blob_channel = None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except CONNECTION_ERRORS as exc:
                logger.debug("%s: error while closing the connection: %r", self.client_name, exc)

    # Topology

    def declare_topology(self) -> None:
        """Declare the federation's exchanges and queues; repeating it changes nothing."""
        channel = self.channel
        names = self.topology
        channel.exchange_declare(names.rounds_exchange, exchange_type="topic", durable=True)
        channel.exchange_declare(names.results_exchange, exchange_type="direct", durable=True)
        channel.exchange_declare(names.dead_letter_exchange, exchange_type="fanout", durable=True)
        channel.exchange_declare(names.blobs_exchange, exchange_type="topic", durable=True)
        channel.queue_declare(names.dead_letter_queue, durable=True)
        channel.queue_bind(names.dead_letter_queue, names.dead_letter_exchange)
        self._declare_results_queue()
        channel = self.channel
        channel.queue_bind(names.results_queue, names.results_exchange, routing_key=names.results_queue)

    def _declare_results_queue(self) -> None:
        names = self.topology
        arguments: dict[str, Any] = {"x-dead-letter-exchange": names.dead_letter_exchange}
        if self._results_queue_type == "quorum":
            try:
                self.channel.queue_declare(names.results_queue, durable=True, arguments={**arguments, "x-queue-type": "quorum"})
                return
            except pika.exceptions.ChannelClosedByBroker as exc:
                # A classic queue of this name already exists, or the broker has no quorum queues.
                logger.warning(
                    "%s: cannot declare %s as a quorum queue (%s); using a durable classic queue",
                    self.client_name, names.results_queue, exc,
                )
                self._results_queue_type = "classic"
                self._reopen_channel()
        self.channel.queue_declare(names.results_queue, durable=True, arguments=arguments)

    def _reopen_channel(self) -> None:
        if self._connection is None:
            raise BrokerError(f"{self.client_name}: no connection to reopen a channel on")
        # Used only while declaring, before the consumers start.
        self._channel = self._open_channel(self._connection)

    def declare_worker_queue(self, worker_id: str, *, expires_s: int = 7 * 24 * 3600) -> str:
        """Declare a worker's round-start queue, bound to broadcast and worker-addressed rounds."""
        names = self.topology
        queue_name = names.worker_queue(worker_id)
        self.channel.queue_declare(queue_name, durable=True, arguments={"x-expires": expires_s * 1000})
        self.channel.queue_bind(queue_name, names.rounds_exchange, routing_key=names.ROUTING_ALL)
        self.channel.queue_bind(queue_name, names.rounds_exchange, routing_key=names.worker_routing_key(worker_id))
        return queue_name

    # Publishing

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        message_id: str | None = None,
        headers: dict[str, Any] | None = None,
        expiration_ms: int | None = None,
        user_id: str | None = None,
    ) -> str:
        """Publish a message with confirms, in chunks when it exceeds ``max_message_bytes``.

        Returns the message id. Raises PayloadTooLargeError before sending anything
        when the body exceeds ``max_payload_bytes``, PublishError when the broker
        nacks every attempt, and UnroutableError when no queue receives it.
        """
        size = len(body)
        if size > self.settings.max_payload_bytes:
            raise PayloadTooLargeError(size, self.settings.max_payload_bytes, "message")
        payload_id = message_id or uuid.uuid4().hex
        return self._publish_in_order(exchange, routing_key, body, payload_id, headers or {}, expiration_ms, user_id)

    def _publish_in_order(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        message_id: str,
        headers: dict[str, Any],
        expiration_ms: int | None,
        user_id: str | None,
    ) -> str:
        size = len(body)
        if size <= self.max_message_bytes:
            self._publish_one(exchange, routing_key, body, message_id, headers, expiration_ms, user_id)
            return message_id

        view = memoryview(body)
        chunk_size = self.max_message_bytes
        count = (size + chunk_size - 1) // chunk_size
        digest = hashlib.sha256(view).hexdigest()
        for index in range(count):
            chunk_headers = {
                **headers,
                HEADER_PAYLOAD_ID: message_id,
                HEADER_CHUNK_INDEX: index,
                HEADER_CHUNK_COUNT: count,
                HEADER_PAYLOAD_BYTES: size,
                HEADER_SHA256: digest,
            }
            piece = bytes(view[index * chunk_size : (index + 1) * chunk_size])
            self._publish_one(exchange, routing_key, piece, f"{message_id}.{index}", chunk_headers, expiration_ms, user_id)
        logger.debug("%s: published message %s in %d chunks (%d bytes)", self.client_name, message_id, count, size)
        return message_id

    def publish_result(self, worker_id: str, body: bytes, *, message_id: str | None = None, headers: dict[str, Any] | None = None, user_id: str | None = None) -> str:
        """Publish a worker's message to the results queue, by reference when it is too large for one message.

        The message carries ``worker_id`` in the ``fedmq-worker-id`` header, so even
        a body that fails to decode can be traced to its sender. Publishing the same
        ``message_id`` again (a retry) uses a new blob queue, so the chunks of two
        attempts never mix. Raises like ``publish``.
        """
        size = len(body)
        if size > self.settings.max_payload_bytes:
            raise PayloadTooLargeError(size, self.settings.max_payload_bytes, "update")
        payload_id = message_id or uuid.uuid4().hex
        all_headers = {**(headers or {}), HEADER_WORKER_ID: worker_id}
        return self._publish_result_once(worker_id, body, payload_id, all_headers, user_id)

    def _publish_result_once(self, worker_id: str, body: bytes, message_id: str, headers: dict[str, Any], user_id: str | None) -> str:
        names = self.topology
        size = len(body)
        if size <= self.max_message_bytes:
            self._publish_one(names.results_exchange, names.results_queue, body, message_id, headers, None, user_id)
            return message_id

        # Large payload: chunks into a private blob queue, then a reference on the results queue.
        blob_id = uuid.uuid4().hex
        blob_queue = names.blob_queue(worker_id, blob_id)
        routing_key = names.blob_routing_key(worker_id, blob_id)
        self.channel.queue_declare(blob_queue, durable=True, arguments={"x-expires": 24 * 3600 * 1000})
        self.channel.queue_bind(blob_queue, names.blobs_exchange, routing_key=routing_key)
        view = memoryview(body)
        chunk_size = self.max_message_bytes
        count = (size + chunk_size - 1) // chunk_size
        for index in range(count):
            piece = bytes(view[index * chunk_size : (index + 1) * chunk_size])
            self._publish_one(names.blobs_exchange, routing_key, piece, f"{message_id}.{index}", {HEADER_CHUNK_INDEX: index}, None, user_id)
        reference_headers = {
            **headers,
            HEADER_BLOB_QUEUE: blob_queue,
            HEADER_CHUNK_COUNT: count,
            HEADER_PAYLOAD_BYTES: size,
            HEADER_SHA256: hashlib.sha256(view).hexdigest(),
        }
        self._publish_one(names.results_exchange, names.results_queue, b"", message_id, reference_headers, None, user_id)
        logger.debug("%s: published %s by reference through %s (%d chunks, %d bytes)", self.client_name, message_id, blob_queue, count, size)
        return message_id

    def _publish_one(
        self,
        exchange: str,
        routing_key: str,
        body: bytes | bytearray | memoryview,
        message_id: str,
        headers: dict[str, Any],
        expiration_ms: int | None,
        user_id: str | None,
    ) -> None:
        properties = BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=message_id,
            headers=headers or None,
            expiration=str(max(1, int(expiration_ms))) if expiration_ms is not None else None,
            timestamp=int(time.time()),
            user_id=user_id if user_id is not None else self.user_id,
            content_type="application/x-fedmq",
        )
        if not isinstance(body, bytes):
            # pika sends only bytes; a bytearray or memoryview body is copied once here.
            body = bytes(body)
        for attempt in range(1, NACK_ATTEMPTS + 1):
            try:
                self.channel.basic_publish(exchange, routing_key, body, properties, mandatory=True)
                break
            except pika.exceptions.ChannelClosedByBroker as exc:
                self._learn_size_limit(exc)
                raise
            except pika.exceptions.UnroutableError as exc:
                raise UnroutableError(
                    f"{self.client_name}: message {message_id} to exchange {exchange!r} with routing key {routing_key!r} "
                    "was returned: no queue is bound for it"
                ) from exc
            except pika.exceptions.NackError as exc:
                if attempt == NACK_ATTEMPTS:
                    raise PublishError(
                        f"{self.client_name}: the broker nacked message {message_id} to exchange {exchange!r} "
                        f"{NACK_ATTEMPTS} times; giving up on it"
                    ) from exc
                wait_s = min(NACK_RETRY_MAX_WAIT_S, 0.1 * 2**attempt)
                logger.warning(
                    "%s: the broker nacked message %s to exchange %r [attempt %d/%d]; retrying in %.1f s",
                    self.client_name, message_id, exchange, attempt, NACK_ATTEMPTS, wait_s,
                )
                # A plain sleep: processing events here would run consumer callbacks inside a publish.
                time.sleep(wait_s)
        self.bytes_sent += len(body)

    def _learn_size_limit(self, error: pika.exceptions.ChannelClosedByBroker) -> None:
        limit = broker_size_limit(error)
        if limit is None or limit >= self.max_message_bytes:
            return
        logger.warning(
            "%s: the broker rejects message bodies over %d bytes; lowering max_message_bytes from %d to %d, "
            "so the publish after reconnecting goes out in chunks",
            self.client_name, limit, self.max_message_bytes, limit,
        )
        self.max_message_bytes = limit

    # Consuming

    def consume(self, queue_name: str, callback: Callable[[Delivery], None], *, prefetch: int = 16) -> None:
        """Consume a queue with manual acks; the consumer is restored after every reconnect."""
        self._consumers.append((queue_name, callback, prefetch))
        if self.connected:
            self._start_consumer(queue_name, callback, prefetch)

    def set_prefetch(self, prefetch: int) -> None:
        self._consumers = [(name, callback, prefetch) for name, callback, _ in self._consumers]
        if self.connected:
            self.channel.basic_qos(prefetch_count=prefetch)

    def _start_consumer(self, queue_name: str, callback: Callable[[Delivery], None], prefetch: int) -> None:
        channel = self.channel
        channel.basic_qos(prefetch_count=prefetch)
        epoch = self.epoch

        def on_message(ch: BlockingChannel, method: Basic.Deliver, properties: BasicProperties, body: bytes) -> None:
            self.bytes_received += len(body)
            delivery = self._assemble(method, properties, body, epoch)
            if delivery is not None:
                callback(delivery)

        consumer_tag = channel.basic_consume(queue_name, on_message, auto_ack=False)
        self._consumer_queues[consumer_tag] = queue_name

    def _assemble(self, method: Basic.Deliver, properties: BasicProperties, body: bytes, epoch: int) -> Delivery | None:
        headers = properties.headers or {}
        tag = method.delivery_tag
        if HEADER_BLOB_QUEUE in headers:
            return self._fetch_blob(method, properties, epoch)
        if HEADER_PAYLOAD_ID not in headers:
            return Delivery(body, properties, [tag], epoch, bool(method.redelivered), method.routing_key)

        # One chunk of an in-order chunked payload.
        try:
            payload_id = str(headers[HEADER_PAYLOAD_ID])
            index = int(headers[HEADER_CHUNK_INDEX])
            count = int(headers[HEADER_CHUNK_COUNT])
            total = int(headers[HEADER_PAYLOAD_BYTES])
            digest = str(headers[HEADER_SHA256])
        except (KeyError, TypeError, ValueError, OverflowError):
            self._reject_in_transport("invalid_chunk", [tag], properties, body, "chunk headers are missing or invalid")
            return None
        if not (0 <= index < count) or total > self.settings.max_payload_bytes or count * self.settings.max_payload_bytes < total:
            self._reject_in_transport("invalid_chunk", [tag], properties, body, f"chunk {index}/{count} of {total} bytes is out of range")
            return None

        # The chunk is held in memory and acked now (see the module docstring).
        self.ack_tags([tag], epoch)
        partial = self._partials.get(payload_id)
        if partial is None:
            if len(self._partials) >= MAX_PARTIAL_PAYLOADS:
                oldest_id = next(iter(self._partials))
                dropped = self._partials.pop(oldest_id)
                logger.warning("%s: dropping incomplete payload %s (%d of %d chunks)", self.client_name, oldest_id, len(dropped.pieces), dropped.count)
            partial = _PartialPayload(count, total, digest, properties, routing_key=method.routing_key)
            self._partials[payload_id] = partial
        # The received bytes may never exceed the declared total, which is within the limit.
        partial.received_bytes += len(body) - len(partial.pieces.get(index, b""))
        partial.pieces[index] = body
        if partial.received_bytes > partial.total_bytes:
            del self._partials[payload_id]
            logger.warning(
                "%s: payload %s sent more than its declared %d bytes and was dropped",
                self.client_name, payload_id, partial.total_bytes,
            )
            return None
        partial.redelivered = partial.redelivered or bool(method.redelivered)
        if len(partial.pieces) < partial.count:
            return None

        del self._partials[payload_id]
        assembled = b"".join(partial.pieces[i] for i in range(partial.count))
        if len(assembled) != partial.total_bytes or hashlib.sha256(assembled).hexdigest() != partial.sha256:
            logger.warning(
                "%s: payload %s failed its integrity check (%d bytes, %d declared) and was dropped",
                self.client_name, payload_id, len(assembled), partial.total_bytes,
            )
            return None
        return Delivery(assembled, partial.properties, [], epoch, partial.redelivered, partial.routing_key)

    def _fetch_blob(self, method: Basic.Deliver, properties: BasicProperties, epoch: int) -> Delivery | None:
        headers = properties.headers or {}
        tag = method.delivery_tag
        blob_queue = str(headers.get(HEADER_BLOB_QUEUE))
        try:
            count = int(headers[HEADER_CHUNK_COUNT])
            total = int(headers[HEADER_PAYLOAD_BYTES])
            digest = str(headers[HEADER_SHA256])
        except (KeyError, TypeError, ValueError, OverflowError):
            self._reject_in_transport("invalid_reference", [tag], properties, b"", "reference headers are missing or invalid")
            return None
        if not blob_queue.startswith(self.topology.blob_prefix):
            self._reject_in_transport("invalid_reference", [tag], properties, b"", f"reference names queue {blob_queue!r}, which is not a blob queue of this federation")
            return None
        if total > self.settings.max_payload_bytes or count < 1 or total < 0:
            self._reject_in_transport(
                "invalid_reference", [tag], properties, b"",
                f"referenced payload of {total} bytes in {count} chunks is outside 0 to {self.settings.max_payload_bytes} bytes",
            )
            return None

        # The body grows with the chunks that arrive, so memory follows the bytes
        # received, never the declared total alone.
        body = bytearray()
        position = 0
        chunk_tags: list[int] = []
        reader = self._blob_reader()
        failure: str | None = None
        for _ in range(count):
            try:
                method_frame, _, piece = reader.basic_get(blob_queue, auto_ack=False)
            except pika.exceptions.ChannelClosedByBroker as exc:
                # The broker closed only the blob channel; the consumer's channel is intact.
                self._blob_channel = None
                chunk_tags.clear()
                failure = f"blob queue {blob_queue} cannot be read: {exc}"
                break
            if method_frame is None or position + len(piece) > total:
                failure = f"blob queue {blob_queue} holds fewer or larger chunks than the {count} chunks of {total} bytes declared"
                if method_frame is not None:
                    chunk_tags.append(method_frame.delivery_tag)
                break
            chunk_tags.append(method_frame.delivery_tag)
            body += piece
            position += len(piece)
            self.bytes_received += len(piece)
        if failure is None and (position != total or hashlib.sha256(body).hexdigest() != digest):
            failure = f"payload in {blob_queue} failed its integrity check"
        if failure is not None:
            # Chunks read so far go back to the blob queue, as they were before.
            if chunk_tags and self._blob_channel is not None:
                self._blob_channel.basic_nack(chunk_tags[-1], multiple=True, requeue=True)
            self._reject_in_transport("invalid_reference", [tag], properties, b"", failure)
            return None
        return Delivery(body, properties, [tag], epoch, bool(method.redelivered), method.routing_key, blob_queue=blob_queue)

    def _blob_reader(self) -> BlockingChannel:
        """Return the channel for blob queue reads, opening it when needed."""
        if self._blob_channel is None or not self._blob_channel.is_open:
            if self._connection is None or not self._connection.is_open:
                raise BrokerError(f"{self.client_name}: not connected")
            self._blob_channel = self._connection.channel()
        return self._blob_channel

    # Acknowledgement

    def ack(self, delivery: Delivery) -> None:
        """Ack every piece of a delivery; a blob queue it came through is deleted."""
        self.ack_tags(delivery.delivery_tags, delivery.epoch)
        if delivery.blob_queue and delivery.epoch == self.epoch:
            self.channel.queue_delete(delivery.blob_queue)

    def ack_tags(self, tags: list[int], epoch: int) -> None:
        if epoch != self.epoch:
            # The broker requeued these when the connection they came on closed.
            return
        for tag in tags:
            self.channel.basic_ack(tag)

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move a delivery to the dead-letter queue with ``reason`` in a header, then ack it."""
        self._dead_letter_tags(delivery.delivery_tags, delivery.properties, bytes(delivery.body), reason, delivery.epoch)
        if delivery.blob_queue and delivery.epoch == self.epoch:
            self.channel.queue_delete(delivery.blob_queue)

    def _reject_in_transport(self, category: str, tags: list[int], properties: BasicProperties, body: bytes, reason: str) -> None:
        """Dead-letter a chunk or reference that cannot become a Delivery, and report it.

        The report goes to ``on_transport_reject`` when it is set (the owner logs and
        counts it), and to this module's log otherwise.
        """
        claimed = (properties.headers or {}).get(HEADER_WORKER_ID)
        rejected = TransportReject(category, reason, str(properties.message_id or ""), str(claimed) if claimed else None)
        if self.on_transport_reject is not None:
            self.on_transport_reject(rejected)
        else:
            logger.warning(
                "%s: rejected message %s from worker %s to the dead-letter queue: %s: %s",
                self.client_name, rejected.message_id, rejected.claimed_worker_id or "unknown", category, reason,
            )
        self._dead_letter_tags(tags, properties, body, f"{category}: {reason}")

    def _dead_letter_tags(self, tags: list[int], properties: BasicProperties, body: bytes, reason: str, epoch: int | None = None) -> None:
        """Publish a copy to the dead-letter exchange with ``reason`` in a header, then ack the tags.

        A body longer than ``max_message_bytes`` is cut to that length, and the
        ``fedmq-truncated-from-bytes`` header records its full size.
        """
        headers = {**(properties.headers or {}), HEADER_REJECT_REASON: reason[:1000]}
        headers.pop(HEADER_BLOB_QUEUE, None)
        if len(body) > self.max_message_bytes:
            headers[HEADER_TRUNCATED_FROM] = len(body)
            body = body[: self.max_message_bytes]
        self._publish_one(
            self.topology.dead_letter_exchange,
            "",
            body,
            str(properties.message_id or uuid.uuid4().hex),
            headers,
            None,
            None,
        )
        self.ack_tags(tags, self.epoch if epoch is None else epoch)

    # Event loop

    def process_events(self, time_limit_s: float) -> None:
        """Run callbacks (deliveries, heartbeats and queued thread-safe calls) for up to ``time_limit_s``."""
        if self._connection is None:
            raise BrokerError(f"{self.client_name}: not connected")
        self._run_threadsafe_calls()
        self._connection.process_data_events(time_limit=time_limit_s)
        self._run_threadsafe_calls()
        if self._channel is not None and self._channel.is_closed:
            # pika raises for a channel that the broker closed only at the next call on
            # that channel, so without this check the consumers would stop silently.
            raise ChannelClosedByBrokerError(
                f"{self.client_name}: the broker closed the channel (see the broker's log for the reason, such as "
                "a delivery left unacked past consumer_timeout); reconnecting opens a new one and restores the consumers"
            )
        if self._cancelled_queues:
            raise ConsumerCancelledError(
                f"{self.client_name}: the broker cancelled the consumer of {', '.join(self._cancelled_queues)}; "
                "reconnecting declares the queue again and restores the consumer"
            )

    def call_threadsafe(self, function: Callable[[], None]) -> None:
        """Queue ``function`` to run on the connection's thread; callable from any thread.

        The call runs during the owning thread's next ``process_events``, also after
        a reconnect, so it is never lost with a connection.
        """
        self._threadsafe_calls.put(function)
        connection = self._connection
        if connection is not None and connection.is_open:
            try:
                # Wakes process_data_events early; the queued call runs either way.
                connection.add_callback_threadsafe(lambda: None)
            except CONNECTION_ERRORS:
                pass

    def _run_threadsafe_calls(self) -> None:
        while True:
            try:
                function = self._threadsafe_calls.get_nowait()
            except queue.Empty:
                return
            function()

    def sleep(self, seconds: float) -> None:
        """Wait while keeping the connection alive (heartbeats, deliveries)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.process_events(min(left, 0.25))

    def queue_depth(self, queue_name: str) -> int:
        result = self.channel.queue_declare(queue_name, passive=True)
        return int(result.method.message_count)
