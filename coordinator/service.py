"""The coordinator service: publishes rounds, collects updates, aggregates, checkpoints.

One round:

1. Publish a round start with the global weights to every known worker.
2. Collect updates: decode and validate each, add valid ones to a running weighted
   sum, dead-letter invalid ones with the reason, count stale and duplicate ones.
3. Close the round once the quorum is reached, every worker has replied, or the
   deadline passes. Below the minimum at the deadline, re-issue the round start (the
   updates already accepted are kept) up to ``max_round_retries`` times.
4. Apply the mean update, evaluate on the held-out set, write the checkpoint and the
   round's metrics, then ack the round's updates.

Threading rule: everything here runs on one thread, which owns the broker connection.
"""

from __future__ import annotations

import json
import logging
import signal
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch

from coordinator.aggregation import ZeroWeightError
from coordinator.checkpoint import Checkpoint, RunState, encode_torch_rng, load_checkpoint, restore_torch_rng, save_checkpoint
from coordinator.rounds import RoundState
from coordinator.strategies import ClientUpdate, Strategy, load_strategy
from coordinator.validation import NormGate, RejectedUpdate, decode_aux, decode_update, expected_tensors, update_norm
from fedmq.broker import CONNECTION_ERRORS, BrokerClient, BrokerSettings, Delivery, UnroutableError
from fedmq.errors import CheckpointError, ConfigError, MessageError, RoundFailedError
from fedmq.tasks import Task, load_task
from schemas.codecs import CodecSpec
from schemas.messages import (
    DecodeLimits,
    Join,
    Leave,
    RoundStart,
    ShardAssignment,
    TrainingFailed,
    Update,
    decode_message,
    encode_message,
)
from schemas.tensors import encode_state

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class CoordinatorSettings:
    """Settings of one coordinator run. Durations are in seconds."""

    broker: BrokerSettings
    task: str
    rounds: int
    run_dir: Path
    run_id: str | None = None
    min_workers: int = 1
    min_updates: int = 1
    quorum_fraction: float = 1.0
    round_deadline_s: float = 60.0
    join_timeout_s: float = 300.0
    max_round_retries: int = 2
    local_epochs: int = 1
    learning_rate: float = 0.05
    batch_size: int = 32
    momentum: float = 0.0
    weight_decay: float = 0.0
    proximal_mu: float = 0.0
    codec: str = "float16"
    lossless: str = "auto"
    seed: int = 0
    strategy: str = "fedavg"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    server_learning_rate: float = 1.0
    norm_outlier_factor: float = 50.0
    max_update_norm: float | None = None
    max_update_bytes: int = 1 << 30
    worker_inactive_rounds: int = 3
    shard_count: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.rounds >= 1, "rounds", "an int >= 1", self.rounds),
            (self.min_workers >= 0, "min_workers", "an int >= 0", self.min_workers),
            (self.min_updates >= 1, "min_updates", "an int >= 1", self.min_updates),
            (0.0 < self.quorum_fraction <= 1.0, "quorum_fraction", "a fraction in (0, 1]", self.quorum_fraction),
            (self.round_deadline_s > 0, "round_deadline_s", "a number > 0", self.round_deadline_s),
            (self.join_timeout_s >= 0, "join_timeout_s", "a number >= 0", self.join_timeout_s),
            (self.max_round_retries >= 0, "max_round_retries", "an int >= 0", self.max_round_retries),
            (self.local_epochs >= 1, "local_epochs", "an int >= 1", self.local_epochs),
            (self.learning_rate > 0, "learning_rate", "a number > 0", self.learning_rate),
            (self.batch_size >= 1, "batch_size", "an int >= 1", self.batch_size),
            (self.proximal_mu >= 0, "proximal_mu", "a number >= 0", self.proximal_mu),
            (self.server_learning_rate > 0, "server_learning_rate", "a number > 0", self.server_learning_rate),
            (self.lossless in ("auto", "none", "zstd"), "lossless", "one of auto, none, zstd", self.lossless),
        ]
        for ok, name, expected, got in checks:
            if not ok:
                raise ConfigError(f"{name} must be {expected}, but got {got!r}")
        CodecSpec.parse(self.codec)

    def train_config(self) -> dict[str, Any]:
        return {
            "local_epochs": self.local_epochs,
            "learning_rate": self.learning_rate,
            "batch_size": self.batch_size,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "proximal_mu": self.proximal_mu,
            "codec": self.codec,
            "lossless": self.lossless,
            "seed": self.seed,
        }


@dataclass
class WorkerInfo:
    worker_id: str
    last_seen_unix: float
    num_samples: int = 0
    last_round: int = 0


@dataclass
class RunResult:
    """What a finished run reports."""

    run_id: str
    rounds_completed: int
    final_metrics: dict[str, float]
    wall_time_s: float
    bytes_out: int
    bytes_in: int
    history: list[dict[str, Any]] = field(default_factory=list)


class Coordinator:
    """Runs the rounds of one federated training run (see the module docstring)."""

    def __init__(self, settings: CoordinatorSettings, *, task: Task | None = None) -> None:
        self.settings = settings
        self.task = task or load_task(settings.task)
        self.strategy: Strategy = load_strategy(
            settings.strategy, server_learning_rate=settings.server_learning_rate, **settings.strategy_options
        )
        self.broker = BrokerClient(settings.broker, client_name="fedmq-coordinator", stop_requested=lambda: self.stop_requested)
        self.limits = DecodeLimits(max_raw_bytes=settings.max_update_bytes)
        self.workers: dict[str, WorkerInfo] = {}
        self.shard_assignments: dict[str, int] = {}
        self.history: list[dict[str, Any]] = []
        self.stop_requested = False
        self.current: RoundState | None = None
        self._gate: NormGate | None = None
        self._round_start_body: bytes | None = None
        self._round_start_expiry_ms: int | None = None
        self._messages_seen = 0
        self._started = time.monotonic()

        # Model and run state, from the checkpoint when one exists.
        self.run_dir = settings.run_dir
        checkpoint = load_checkpoint(self.run_dir)
        if checkpoint is None:
            torch.manual_seed(settings.seed)
            model = self.task.build_model()
            self.global_state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
            self.run_id = settings.run_id or f"run-{uuid.uuid4().hex[:12]}"
            self.completed_rounds = 0
            self.model_version = 0
            self.rng = np.random.default_rng(settings.seed)
            self.finished = False
        else:
            self._resume(checkpoint)
        self.model = self.task.build_model()
        self.expected = expected_tensors(self.global_state)
        self.test_x, self.test_y = self.task.load_test_set()

    def _resume(self, checkpoint: Checkpoint) -> None:
        state = checkpoint.state
        if self.settings.run_id and state.run_id != self.settings.run_id:
            raise CheckpointError(
                f"checkpoint in {self.run_dir} belongs to run {state.run_id!r}, not {self.settings.run_id!r}; "
                "use another --run-dir or the checkpoint's run id"
            )
        if state.task != self.task.name:
            raise CheckpointError(f"checkpoint in {self.run_dir} is for task {state.task!r}, not {self.task.name!r}")
        self.global_state = checkpoint.model
        self.strategy.load_state(checkpoint.strategy_tensors, state.strategy_scalars)
        self.run_id = state.run_id
        self.completed_rounds = state.completed_rounds
        self.model_version = state.model_version
        self.finished = state.finished
        self.rng = np.random.default_rng()
        if state.numpy_rng_state:
            self.rng.bit_generator.state = state.numpy_rng_state
        restore_torch_rng(state.torch_rng_state_b64)
        for worker_id, info in state.extra.get("workers", {}).items():
            self.workers[worker_id] = WorkerInfo(**info)
        self.shard_assignments = {str(k): int(v) for k, v in state.extra.get("shard_assignments", {}).items()}
        self.history = _read_history(self.run_dir / METRICS_FILE)
        logger.info(
            "run %s: resuming from checkpoint after round %d (model version %d)",
            self.run_id, self.completed_rounds, self.model_version,
        )

    # Public entry points

    def install_signal_handlers(self) -> None:
        def request_stop(signum: int, frame: FrameType | None) -> None:
            logger.warning("run %s: received signal %d; stopping after writing the checkpoint", self.run_id, signum)
            self.stop_requested = True

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    def run(self) -> RunResult:
        """Run the remaining rounds and return the result.

        Raises RoundFailedError when a round stays below ``min_updates`` after all
        retries, BrokerError when the broker stays unreachable.
        """
        started = time.monotonic()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        logger.info("run %s: starting in %s with %r", self.run_id, self.run_dir, self.settings)
        self.broker.connect()
        self.broker.consume(self.broker.topology.results_queue, self._on_delivery, prefetch=64)
        try:
            if self.finished or self.completed_rounds >= self.settings.rounds:
                logger.info("run %s: already finished after %d rounds", self.run_id, self.completed_rounds)
            else:
                # The round state exists while waiting, so updates that a previous
                # coordinator process left on the queue for this round are kept.
                self._prepare_round(self.completed_rounds + 1)
                self._wait_for_workers()
                while self.completed_rounds < self.settings.rounds and not self.stop_requested:
                    if self.current is None:
                        self._prepare_round(self.completed_rounds + 1)
                    self._run_round()
                if self.completed_rounds >= self.settings.rounds:
                    self.finished = True
                    self._save_checkpoint()
        finally:
            if self.stop_requested:
                self._save_checkpoint()
            self.broker.close()
        final = self.history[-1].get("eval", {}) if self.history else {}
        return RunResult(
            run_id=self.run_id,
            rounds_completed=self.completed_rounds,
            final_metrics=dict(final),
            wall_time_s=time.monotonic() - started,
            bytes_out=self.broker.bytes_sent,
            bytes_in=self.broker.bytes_received,
            history=list(self.history),
        )

    # Waiting for workers

    def _wait_for_workers(self) -> None:
        needed = self.settings.min_workers
        deadline = time.monotonic() + self.settings.join_timeout_s
        if len(self.workers) < needed:
            logger.info("run %s: waiting up to %.0f s for %d workers to join", self.run_id, self.settings.join_timeout_s, needed)
        while len(self.workers) < needed and not self.stop_requested:
            if time.monotonic() >= deadline:
                logger.warning(
                    "run %s: only %d of %d workers joined within %.0f s; starting anyway",
                    self.run_id, len(self.workers), needed, self.settings.join_timeout_s,
                )
                return
            self._process(0.2)

    # One round

    def _prepare_round(self, round_number: int) -> None:
        settings = self.settings
        self.current = RoundState(
            round=round_number,
            model_version=self.model_version,
            min_updates=settings.min_updates,
            quorum_fraction=settings.quorum_fraction,
            deadline_unix=time.time() + settings.round_deadline_s,
        )
        self.strategy.begin_round({name: self.global_state[name] for name in self.expected})
        self._gate = NormGate(factor=settings.norm_outlier_factor, max_norm=settings.max_update_norm)

    def _run_round(self) -> None:
        settings = self.settings
        state = self.current
        assert state is not None
        round_number = state.round
        state.started_unix = time.time()
        state.deadline_unix = state.started_unix + settings.round_deadline_s

        while True:
            # Publish the round start to every known worker.
            self._publish_round_start(state)

            # Collect updates until the round can close.
            while not state.ready_to_close(time.time()) and not self.stop_requested:
                self._process(0.1)
            if self.stop_requested:
                return
            if state.quorum_met():
                break
            if state.attempt >= settings.max_round_retries:
                self._finish_failed_round(state)
            logger.warning(
                "run %s round %d: deadline passed with %d of %d required updates; missing workers %s; re-issuing [%d/%d]",
                self.run_id, round_number, len(state.accepted), settings.min_updates, state.missing,
                state.attempt + 1, settings.max_round_retries,
            )
            state.attempt += 1
            state.deadline_unix = time.time() + settings.round_deadline_s

        self._aggregate_round(state)

    def _publish_round_start(self, state: RoundState) -> None:
        message = RoundStart(
            run_id=self.run_id,
            round=state.round,
            attempt=state.attempt,
            model_version=self.model_version,
            task=self.task.name,
            deadline_unix=state.deadline_unix,
            config={**self.settings.train_config(), **self.strategy.round_config(state.round)},
            weights=encode_state(self.global_state),
            aux=encode_state(self.strategy.round_aux(state.round, self.global_state)),
        )
        body = encode_message(message)
        self._round_start_body = body
        expiry_ms = int(max(1.0, state.deadline_unix - time.time()) * 1000)
        self._round_start_expiry_ms = expiry_ms
        state.sent = {worker_id for worker_id in self.workers}
        names = self.broker.topology
        try:
            self._with_reconnect(lambda: self.broker.publish(names.rounds_exchange, names.ROUTING_ALL, body, expiration_ms=expiry_ms))
        except UnroutableError:
            logger.warning("run %s round %d: no worker queue is bound yet; the round start reaches workers when they join", self.run_id, state.round)
        logger.info(
            "run %s round %d: published round start (attempt %d, model version %d, %d bytes) to %d workers",
            self.run_id, state.round, state.attempt, self.model_version, len(body), len(state.sent),
        )

    def _send_current_round_to(self, worker_id: str) -> None:
        state = self.current
        if state is None or self._round_start_body is None or worker_id in state.responded:
            return
        names = self.broker.topology
        expiry_ms = int(max(1.0, state.deadline_unix - time.time()) * 1000)
        try:
            self.broker.publish(names.rounds_exchange, names.worker_routing_key(worker_id), self._round_start_body, expiration_ms=expiry_ms)
        except UnroutableError:
            logger.warning("run %s round %d: worker %s has no queue bound; cannot send it the round", self.run_id, state.round, worker_id)
            return
        state.sent.add(worker_id)
        logger.info("run %s round %d: sent the open round to worker %s", self.run_id, state.round, worker_id)

    def _aggregate_round(self, state: RoundState) -> None:
        try:
            self.global_state = self.strategy.finish_round(self.global_state)
        except ZeroWeightError as exc:
            logger.warning("run %s round %d: %s; the global model stays unchanged", self.run_id, state.round, exc)
        self.model_version += 1
        self.completed_rounds = state.round

        # Evaluate the new global model on the held-out set.
        self.model.load_state_dict(self.global_state)
        evaluation = self.task.evaluate(self.model, self.test_x, self.test_y)

        record = state.summary()
        record["eval"] = evaluation
        record["train"] = {key: float(np.mean(values)) for key, values in state.train_metrics.items() if values}
        record["duration_s"] = round(time.time() - state.started_unix, 3)
        record["bytes_out_total"] = self.broker.bytes_sent
        record["bytes_in_total"] = self.broker.bytes_received
        record["finished_unix"] = time.time()
        self.history.append(record)

        # Persist, then release the round's updates from the queue.
        self._save_checkpoint()
        with (self.run_dir / METRICS_FILE).open("a") as metrics_file:
            metrics_file.write(json.dumps(record) + "\n")
        for delivery in state.held:
            self._ack(delivery)
        state.held.clear()
        self._forget_inactive_workers(state)
        logger.info(
            "run %s round %d/%d: accuracy %.4f, loss %.4f, %d updates (%d samples), %d dropouts, %d rejected, %.2f s",
            self.run_id, state.round, self.settings.rounds, evaluation.get("accuracy", float("nan")),
            evaluation.get("loss", float("nan")), len(state.accepted), record["samples"], len(record["dropouts"]),
            sum(state.rejected.values()), record["duration_s"],
        )
        if record["dropouts"]:
            logger.warning("run %s round %d: no update from workers %s", self.run_id, state.round, record["dropouts"])
        self.current = None
        self._round_start_body = None

    def _finish_failed_round(self, state: RoundState) -> None:
        self._save_checkpoint()
        message = (
            f"run {self.run_id} round {state.round}: only {len(state.accepted)} of the required {self.settings.min_updates} "
            f"updates arrived after {state.attempt + 1} attempts of {self.settings.round_deadline_s:.0f} s; "
            f"missing workers {state.missing}. The checkpoint after round {self.completed_rounds} is kept; "
            "start more workers and run the same command again to resume"
        )
        logger.error(message)
        raise RoundFailedError(message)

    def _forget_inactive_workers(self, state: RoundState) -> None:
        for worker_id in list(self.workers):
            info = self.workers[worker_id]
            if state.round - info.last_round >= self.settings.worker_inactive_rounds and worker_id not in state.responded:
                logger.warning(
                    "run %s: worker %s replied to none of the last %d rounds; it no longer counts toward the quorum until it replies",
                    self.run_id, worker_id, self.settings.worker_inactive_rounds,
                )
                del self.workers[worker_id]

    def _save_checkpoint(self) -> None:
        state = RunState(
            run_id=self.run_id,
            task=self.task.name,
            completed_rounds=self.completed_rounds,
            model_version=self.model_version,
            finished=self.finished,
            numpy_rng_state=_jsonable(self.rng.bit_generator.state),
            torch_rng_state_b64=encode_torch_rng(),
            strategy_scalars=self.strategy.state_scalars(),
            extra={
                "workers": {worker_id: asdict(info) for worker_id, info in self.workers.items()},
                "shard_assignments": dict(self.shard_assignments),
            },
        )
        checkpoint = Checkpoint(state=state, model=self.global_state, strategy_tensors=self.strategy.state_tensors())
        save_checkpoint(self.run_dir, checkpoint)

    # Incoming messages

    def _process(self, time_limit_s: float) -> None:
        self._with_reconnect(lambda: self.broker.process_events(time_limit_s))

    def _with_reconnect(self, action: Any) -> Any:
        while True:
            try:
                return action()
            except CONNECTION_ERRORS as exc:
                self.broker.reconnect(exc)
                if self.current is not None:
                    # The broker requeued the unacked deliveries of the lost connection.
                    # Their updates stay in the sum, and redeliveries count as duplicates.
                    self.current.held = [d for d in self.current.held if d.epoch == self.broker.epoch]

    def _ack(self, delivery: Delivery) -> None:
        try:
            self.broker.ack(delivery)
        except CONNECTION_ERRORS as exc:
            logger.warning("run %s: could not ack message %s (%r); the broker will redeliver it", self.run_id, delivery.message_id, exc)

    def _on_delivery(self, delivery: Delivery) -> None:
        self._messages_seen += 1
        try:
            message = decode_message(delivery.body, self.limits)
        except MessageError as exc:
            self._reject(delivery, "invalid_message", str(exc), worker_id=delivery.user_id, round_number=None)
            return

        if isinstance(message, Update):
            self._on_update(delivery, message)
        elif isinstance(message, Join):
            self._on_join(message)
            self._ack(delivery)
        elif isinstance(message, Leave):
            self.workers.pop(message.worker_id, None)
            logger.info("run %s: worker %s left (%s)", self.run_id, message.worker_id, message.reason)
            self._ack(delivery)
        elif isinstance(message, TrainingFailed):
            self._on_training_failed(message)
            self._ack(delivery)
        else:
            self._reject(delivery, "unexpected_kind", f"a {message.KIND} message does not belong on the results queue", worker_id=None, round_number=None)

    def _on_join(self, message: Join) -> None:
        if message.task != self.task.name:
            logger.warning("run %s: worker %s runs task %r, not %r; ignoring it", self.run_id, message.worker_id, message.task, self.task.name)
            return
        if message.shard_count == 0:
            self._assign_shard(message.worker_id)
            return
        known = message.worker_id in self.workers
        info = self.workers.setdefault(message.worker_id, WorkerInfo(message.worker_id, time.time()))
        info.last_seen_unix = time.time()
        info.num_samples = message.num_samples
        if self.current is not None:
            info.last_round = max(info.last_round, self.current.round - 1)
        logger.info("run %s: worker %s %s (%d samples); %d workers known", self.run_id, message.worker_id, "rejoined" if known else "joined", message.num_samples, len(self.workers))
        self._send_current_round_to(message.worker_id)

    def _assign_shard(self, worker_id: str) -> None:
        """Send a worker without a shard index the index it had before, or the next one in join order."""
        count = self.settings.shard_count or max(1, self.settings.min_workers)
        index = self.shard_assignments.get(worker_id)
        if index is None:
            index = len(self.shard_assignments) % count
            self.shard_assignments[worker_id] = index
        body = encode_message(ShardAssignment(worker_id=worker_id, shard_index=index, shard_count=count))
        names = self.broker.topology
        try:
            self.broker.publish(names.rounds_exchange, names.worker_routing_key(worker_id), body)
        except UnroutableError:
            logger.warning("run %s: worker %s has no queue bound; cannot send its shard assignment", self.run_id, worker_id)
            return
        logger.info("run %s: assigned shard %d/%d to worker %s", self.run_id, index, count, worker_id)

    def _on_training_failed(self, message: TrainingFailed) -> None:
        state = self.current
        logger.warning(
            "run %s round %d: worker %s failed to train: %s: %s",
            self.run_id, message.round, message.worker_id, message.error_type, message.error_message,
        )
        if state is not None and message.run_id == self.run_id and message.round == state.round and message.worker_id not in state.accepted:
            state.failed[message.worker_id] = f"{message.error_type}: {message.error_message}"[:500]

    def _on_update(self, delivery: Delivery, update: Update) -> None:
        state = self.current
        worker_id = update.worker_id

        # Identity, run, round and version checks.
        if update.run_id != self.run_id:
            if state is not None:
                state.other_run += 1
            logger.warning(
                "run %s: discarded an update from worker %s for another run %r (round %d)",
                self.run_id, worker_id, update.run_id, update.round,
            )
            self._ack(delivery)
            return
        if state is None or update.round < state.round or update.model_version < state.model_version:
            if state is not None:
                state.stale += 1
            logger.warning(
                "run %s: discarded a stale update from worker %s for round %d (model version %d); current round %s",
                self.run_id, worker_id, update.round, update.model_version, state.round if state else "none",
            )
            self._ack(delivery)
            return
        if update.round > state.round or update.model_version != state.model_version:
            self._reject(
                delivery, "wrong_round",
                f"update for round {update.round} model version {update.model_version} during round {state.round} model version {state.model_version}",
                worker_id=worker_id, round_number=update.round,
            )
            return
        if worker_id in state.accepted:
            state.duplicates += 1
            logger.warning("run %s round %d: duplicate update from worker %s (message %s) counted once", self.run_id, state.round, worker_id, delivery.message_id)
            # Held with the round: the original's delivery may have been requeued by a reconnect.
            state.held.append(delivery)
            return

        # Decode and validate the tensors.
        try:
            decoded = decode_update(update, self.expected)
            aux = decode_aux(update)
            norm = update_norm(decoded, self.expected)
            assert self._gate is not None
            self._gate.check(norm)
        except RejectedUpdate as exc:
            self._reject(delivery, exc.reason, exc.detail, worker_id=worker_id, round_number=update.round)
            return

        # Accept: add to the running weighted sum.
        self.strategy.add_update(
            ClientUpdate(worker_id, update.num_samples, update.num_steps, decoded, aux=aux, metrics=update.metrics)
        )
        self._gate.record(norm)
        state.accepted[worker_id] = update.num_samples
        state.failed.pop(worker_id, None)
        state.bytes_in += len(delivery.body)
        state.held.append(delivery)
        for key, value in update.metrics.items():
            state.train_metrics.setdefault(key, []).append(float(value))
        info = self.workers.setdefault(worker_id, WorkerInfo(worker_id, time.time()))
        info.last_seen_unix = time.time()
        info.last_round = state.round
        if worker_id not in state.sent:
            state.sent.add(worker_id)
        logger.debug(
            "run %s round %d: accepted update from worker %s (%d samples, norm %.4g, %d bytes) [%d/%d]",
            self.run_id, state.round, worker_id, update.num_samples, norm, len(delivery.body), len(state.accepted), state.target,
        )

    def _reject(self, delivery: Delivery, reason: str, detail: str, *, worker_id: str | None, round_number: int | None) -> None:
        if self.current is not None:
            self.current.rejected[reason] += 1
        logger.warning(
            "run %s round %s: rejected message %s from worker %s to the dead-letter queue: %s: %s",
            self.run_id, round_number if round_number is not None else "?", delivery.message_id, worker_id or "?", reason, detail,
        )
        try:
            self.broker.dead_letter(delivery, f"{reason}: {detail}")
        except CONNECTION_ERRORS as exc:
            logger.warning("run %s: could not dead-letter message %s (%r); the broker will redeliver it", self.run_id, delivery.message_id, exc)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=int))


def _read_history(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    history = []
    for line in path.read_text().splitlines():
        if line.strip():
            history.append(json.loads(line))
    return history


def settings_dict(settings: CoordinatorSettings) -> dict[str, Any]:
    data = asdict(settings)
    data["broker"] = repr(settings.broker)
    data["run_dir"] = str(settings.run_dir)
    return data
