"""The worker service: waits for round starts, trains locally, publishes updates.

A worker opens only outbound connections to the broker. It declares its own queue,
bound to broadcast round starts and to round starts addressed to it, and announces
itself with a Join message on every (re)connect.

Threading rule: the main thread owns the broker connection and is the only thread
that calls pika. Local training runs on one training thread, so the main thread
keeps servicing heartbeats however long training takes. The training thread never
touches the connection. It puts the encoded message into ``self._outbox``, and the
main thread publishes it, retrying across reconnects until the broker confirms it.

A round start is acked as soon as it is decoded, before training, so training that
outlasts the broker's ``consumer_timeout`` cannot get the channel closed. A round
start that is lost with a dead worker is covered by the coordinator's deadline.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import torch
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, stop_after_delay, wait_random_exponential

from fedmq.broker import CONNECTION_ERRORS, BrokerClient, BrokerSettings, Delivery, UnroutableError
from fedmq.errors import MessageError, PayloadTooLargeError, PublishError
from fedmq.logging_setup import log_context, set_log_context
from fedmq.metrics import WorkerMetrics
from fedmq.tasks import PartitionSpec, Task, load_task
from schemas.messages import DecodeLimits, Join, Leave, RoundStart, ShardAssignment, decode_message, encode_message
from worker.privacy import SamplePrivacy, SamplePrivacySettings
from worker.training import LocalOverrides, LocalTrainer, failure_message, warm_up

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSettings:
    """Settings of one worker process."""

    broker: BrokerSettings
    task: str
    worker_id: str
    shard_index: int = 0
    shard_count: int = 1
    partition: PartitionSpec = PartitionSpec()
    state_dir: Path | None = None
    torch_threads: int = 1
    local_epochs: int | None = None
    max_steps: int | None = None
    time_budget_s: float | None = None
    max_round_bytes: int = 1 << 30
    publish_attempts: int = 20
    exit_after_rounds: int | None = None
    # False for a worker provisioned on a locked-down broker: its queue, bindings and
    # the federation's exchanges exist already, and it may not declare them.
    declare_topology: bool = True
    sample_privacy: SamplePrivacySettings | None = None

    def __post_init__(self) -> None:
        from fedmq.errors import ConfigError

        if not self.worker_id or any(c in self.worker_id for c in " #*/"):
            raise ConfigError(f"worker_id must be a non-empty name without spaces, '#', '*' or '/', but got {self.worker_id!r}")
        # shard_count 0 means that the coordinator assigns the shard when the worker joins.
        if self.shard_count != 0 and not 0 <= self.shard_index < self.shard_count:
            raise ConfigError(f"shard must satisfy 0 <= index < count, but got {self.shard_index}/{self.shard_count}")
        if self.torch_threads < 1:
            raise ConfigError(f"torch_threads must be >= 1, but got {self.torch_threads}")


class Worker:
    """One federated worker (see the module docstring for the threading rule)."""

    def __init__(self, settings: WorkerSettings, *, task: Task | None = None) -> None:
        self.settings = settings
        self.worker_id = settings.worker_id
        self.task = task or load_task(settings.task)
        torch.set_num_threads(settings.torch_threads)
        self.trainer: LocalTrainer | None = None
        self.num_samples = 0
        self.shard_count = 0
        if settings.shard_count > 0:
            self._load_shard(settings.shard_index, settings.shard_count)
        self.broker = BrokerClient(
            settings.broker,
            client_name=f"fedmq-worker-{self.worker_id}",
            declare=settings.declare_topology,
            stop_requested=lambda: self.stop_requested,
        )
        # The broker checks this user_id against the connection's user, so the
        # coordinator can tell who sent each message (see --require-user-id).
        self.broker.user_id = self.broker.username
        self.limits = DecodeLimits(max_raw_bytes=settings.max_round_bytes)
        self.stop_requested = False
        self.rounds_done = 0
        self._outbox: queue.SimpleQueue[tuple[str, bytes, RoundStart]] = queue.SimpleQueue()
        self._pending: tuple[str, bytes, RoundStart] | None = None
        self._training: threading.Thread | None = None
        self._training_key: tuple[str, int, int] | None = None
        self._next_start: RoundStart | None = None
        # The connection epoch on which this worker's queue was last seen empty, or -1.
        self._drained_epoch = -1
        self._answered: set[tuple[str, int, int]] = set()
        self._pending_message_id: str | None = None
        self.metrics = WorkerMetrics()
        self.metrics.bind(worker_id=self.worker_id, task=self.task.name, federation=settings.broker.federation, broker=self.broker)

    def _load_shard(self, shard_index: int, shard_count: int) -> None:
        data = self.task.load_local_data(shard_index, shard_count, self.settings.partition)
        overrides = LocalOverrides(self.settings.local_epochs, self.settings.max_steps, self.settings.time_budget_s)
        self.trainer = LocalTrainer(self.task, data, worker_id=self.worker_id, state_dir=self.settings.state_dir, overrides=overrides)
        if self.settings.sample_privacy is not None:
            self.trainer.sample_privacy = SamplePrivacy(self.settings.sample_privacy, state_dir=self.settings.state_dir)
        self.num_samples = data.num_train
        self.shard_count = shard_count
        logger.info("worker %s: loaded shard %d/%d with %d training samples", self.worker_id, shard_index, shard_count, self.num_samples)

    # Lifecycle

    def install_signal_handlers(self) -> None:
        def request_stop(signum: int, frame: FrameType | None) -> None:
            logger.warning("worker %s: received signal %d; finishing the current round, then leaving", self.worker_id, signum)
            self.stop_requested = True

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    def run(self) -> None:
        """Serve rounds until stopped by a signal, or after ``exit_after_rounds`` rounds."""
        with log_context(worker_id=self.worker_id):
            self._serve()

    def _serve(self) -> None:
        logger.info("worker %s: starting with %r", self.worker_id, self.settings.broker)
        # Before the Join, so that the coordinator does not wait for these loads in round 1.
        warm_up()
        self._connect()
        try:
            while not self._should_exit():
                self._step()
            self._finish()
        finally:
            self.broker.close()
        logger.info("worker %s: stopped after %d rounds", self.worker_id, self.rounds_done)

    def _should_exit(self) -> bool:
        limit = self.settings.exit_after_rounds
        if limit is not None and self.rounds_done >= limit and self._pending is None and self._training is None:
            return True
        return self.stop_requested and self._training is None and self._pending is None

    def _finish(self) -> None:
        try:
            body = encode_message(Leave(worker_id=self.worker_id, reason="shutdown"))
            self.broker.publish_result(self.worker_id, body)
        except PublishError as exc:
            logger.warning("worker %s: could not send the leave message: %r", self.worker_id, exc)
        except CONNECTION_ERRORS as exc:
            logger.warning("worker %s: could not send the leave message: %r", self.worker_id, exc)

    def _connect(self) -> None:
        queue_name = self.broker.topology.worker_queue(self.worker_id)
        if self.settings.declare_topology:
            self.broker.add_setup_step(lambda: self.broker.declare_worker_queue(self.worker_id))
        self.broker.add_setup_step(self._announce)
        self.broker.consume(queue_name, self._on_delivery, prefetch=8)
        self.broker.connect()

    def _announce(self, model_version: int | None = None) -> None:
        """Send a Join; ``model_version`` overrides the held version that it reports."""
        if model_version is None:
            model_version = self.trainer.held_version if self.trainer is not None else -1
        join = Join(
            worker_id=self.worker_id,
            task=self.task.name,
            num_samples=self.num_samples,
            model_version=model_version,
            shard_count=self.shard_count,
        )
        try:
            self.broker.publish_result(self.worker_id, encode_message(join))
        except UnroutableError:
            logger.info("worker %s: no coordinator has declared the results queue yet; waiting for a round start", self.worker_id)

    # Main loop, on the connection's thread

    def _step(self) -> None:
        try:
            self.broker.process_events(0.1)
            self._collect_training_result()
            self._publish_pending()
            self._start_next_round()
        except CONNECTION_ERRORS as exc:
            self.broker.reconnect(exc)

    def _on_delivery(self, delivery: Delivery) -> None:
        with log_context(message_id=delivery.message_id or None):
            self._handle_delivery(delivery)

    def _handle_delivery(self, delivery: Delivery) -> None:
        try:
            message = decode_message(delivery.body, self.limits)
        except MessageError as exc:
            logger.warning("worker %s: discarded an invalid message %s: %s", self.worker_id, delivery.message_id, exc)
            self.broker.ack(delivery)
            return
        self.broker.ack(delivery)
        if isinstance(message, ShardAssignment):
            self._on_shard_assignment(message)
            return
        if not isinstance(message, RoundStart):
            logger.warning("worker %s: discarded a %s message on its round queue", self.worker_id, message.KIND)
            return
        if message.task != self.task.name:
            logger.warning("worker %s: discarded round %d of task %r; this worker runs %r", self.worker_id, message.round, message.task, self.task.name)
            return
        key = (message.run_id, message.round, message.model_version)
        if key in self._answered or key == self._training_key:
            logger.debug("worker %s: round %d (attempt %d) already answered or in training", self.worker_id, message.round, message.attempt)
            return
        if message.deadline_unix < time.time():
            logger.warning("worker %s: discarded round %d of run %s, whose deadline has passed", self.worker_id, message.round, message.run_id)
            return
        waiting = self._next_start
        if waiting is not None and (waiting.run_id, waiting.round, waiting.model_version) == key and message.weights_kind == "delta":
            # The same round waits already, in full or as a delta; another delta adds nothing.
            logger.debug("worker %s: round %d (attempt %d) is already waiting", self.worker_id, message.round, message.attempt)
            return
        # Only the newest round start waits: an older one waiting is dropped, and an
        # older one arriving (a backlog after an absence) is discarded.
        if waiting is not None and waiting.run_id == message.run_id and (message.round, message.model_version) < (waiting.round, waiting.model_version):
            logger.info("worker %s: discarded round %d, which is older than the waiting round %d", self.worker_id, message.round, waiting.round)
            return
        if waiting is not None:
            logger.info("worker %s: round %d replaces waiting round %d", self.worker_id, message.round, waiting.round)
        self._next_start = message

    def _on_shard_assignment(self, message: ShardAssignment) -> None:
        if message.worker_id != self.worker_id or self.trainer is not None:
            logger.debug("worker %s: ignored a shard assignment for %s", self.worker_id, message.worker_id)
            return
        self._load_shard(message.shard_index, message.shard_count)
        self._announce()

    def _start_next_round(self) -> None:
        if self.stop_requested and self._next_start is not None:
            logger.info("worker %s: stopping, so round %d is not started", self.worker_id, self._next_start.round)
            self._next_start = None
        if self._training is not None or self._next_start is None or self._pending is not None or self.trainer is None:
            return
        # Round starts still queued are newer than the waiting one. Draining them first
        # means a worker back from an absence trains only the newest round of its backlog.
        # Round starts are acked on arrival, so the prefetch window never fills: once the
        # queue was seen empty on this connection, later round starts arrive as they are
        # published, and the queue needs no further check until the next reconnect.
        if self._drained_epoch != self.broker.epoch:
            if self.broker.queue_depth(self.broker.topology.worker_queue(self.worker_id)) > 0:
                return
            self._drained_epoch = self.broker.epoch
        start, self._next_start = self._next_start, None

        # A delta needs the model it was computed against; without it, ask for the full model.
        # No training runs here, so the trainer's held model is settled.
        if not self.trainer.holds_weights_for(start):
            held = self.trainer.version_held_for(start.run_id)
            logger.info(
                "worker %s: round %d carries a delta from model version %d, but this worker holds version %d; asking for the full model",
                self.worker_id, start.round, start.base_version, held,
            )
            self._announce(held)
            return
        key = (start.run_id, start.round, start.model_version)
        self._training_key = key
        set_log_context(run_id=start.run_id, round=start.round)
        logger.info("worker %s: training round %d of run %s (attempt %d, model version %d)", self.worker_id, start.round, start.run_id, start.attempt, start.model_version)
        self._training = threading.Thread(target=self._train, args=(start,), name=f"train-{self.worker_id}", daemon=True)
        self._training.start()

    # Training thread

    def _train(self, start: RoundStart) -> None:
        # A new thread starts with an empty log context.
        with log_context(worker_id=self.worker_id, run_id=start.run_id, round=start.round):
            self._train_round(start)
        # Wake the main thread, which may wait up to its poll interval for broker events,
        # so the result is published at once.
        self.broker.call_threadsafe(lambda: None)

    def _train_round(self, start: RoundStart) -> None:
        assert self.trainer is not None, "a round starts only after the shard is loaded"
        try:
            body, summary = self.trainer.run_round(start)
            logger.info(
                "worker %s round %d: trained %d steps on %d samples in %.2f s, update %d bytes",
                self.worker_id, start.round, summary["num_steps"], summary["num_samples"], summary["train_time_s"], summary["bytes"],
            )
            self.metrics.round_trained(float(summary["train_time_s"]))
            self._outbox.put(("update", body, start))
        except (Exception, MemoryError) as exc:
            self.metrics.training_failed()
            logger.error("worker %s round %d: training failed", self.worker_id, start.round, exc_info=True)
            self._outbox.put(("failure", failure_message(start, self.worker_id, exc), start))

    # Back on the connection's thread

    def _collect_training_result(self) -> None:
        if self._pending is not None:
            return
        try:
            self._pending = self._outbox.get_nowait()
        except queue.Empty:
            return
        if self._training is not None:
            self._training.join()
        self._training = None

    def _publish_pending(self) -> None:
        """Publish the training result, retrying until the broker confirms it.

        A lost connection propagates to ``_step``, which reconnects. The result stays
        pending and goes out again with the same message id, so the coordinator can
        tell the broker's redelivery from a second update. A returned (unroutable)
        publish declares the topology again, and a returned or nacked publish is
        retried up to ``publish_attempts`` times while the round's deadline has not
        passed. After that the result is dropped with an error, and the coordinator
        counts this worker as a dropout of the round.
        """
        if self._pending is None:
            return
        kind, body, start = self._pending
        if self._pending_message_id is None:
            self._pending_message_id = uuid.uuid4().hex
        message_id = self._pending_message_id
        attempts = self.settings.publish_attempts

        def publish() -> None:
            try:
                self.broker.publish_result(self.worker_id, body, message_id=message_id)
            except UnroutableError:
                # The results queue or its binding is gone; declare them again before the retry.
                if self.settings.declare_topology:
                    self.broker.declare_topology()
                raise

        retrying = Retrying(
            retry=retry_if_exception_type(PublishError),
            wait=wait_random_exponential(multiplier=0.5, max=10),
            stop=stop_after_attempt(attempts) | stop_after_delay(max(0.0, start.deadline_unix - time.time())),
            reraise=True,
            sleep=self.broker.sleep,
            before_sleep=lambda state: logger.warning(
                "worker %s round %d: publishing the %s %s failed [attempt %d/%d]: %s; retrying in %.1f s",
                self.worker_id, start.round, kind, message_id, state.attempt_number, attempts,
                state.outcome.exception() if state.outcome else None, state.next_action.sleep if state.next_action else 0.0,
            ),
        )
        try:
            retrying(publish)
        except PayloadTooLargeError as exc:
            # The coordinator learns of the failure at once instead of at the deadline.
            logger.error("worker %s round %d: %s; reporting a training failure instead", self.worker_id, start.round, exc)
            self._pending = ("failure", failure_message(start, self.worker_id, exc), start)
            self._pending_message_id = None
            return
        except PublishError as exc:
            logger.error(
                "worker %s round %d: dropping the %s %s (%d bytes) after %d attempts or past the round's deadline: %s; "
                "the coordinator counts this worker as a dropout",
                self.worker_id, start.round, kind, message_id, len(body), attempts, exc,
            )
        else:
            logger.info("worker %s round %d: %s %s confirmed by the broker (%d bytes)", self.worker_id, start.round, kind, message_id, len(body))
        self._pending_message_id = None
        self._pending = None
        self._training_key = None
        self._answered.add((start.run_id, start.round, start.model_version))
        if len(self._answered) > 1000:
            self._answered = set(sorted(self._answered, key=lambda k: k[1])[-100:])
        self.rounds_done += 1
