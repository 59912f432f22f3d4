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
import os
import signal
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch

from coordinator.aggregation import ZeroWeightError
from coordinator.checkpoint import Checkpoint, RunState, encode_torch_rng, load_checkpoint, restore_torch_rng, save_checkpoint
from coordinator.downlink import DEFAULT_DOWNLINK_CODEC, Downlink, parse_downlink_codec
from coordinator.privacy import PrivateStrategy
from coordinator.rounds import RoundState
from coordinator.strategies import ClientUpdate, Strategy, StrategyContext, load_strategy
from coordinator.strategies.common import split_personal
from coordinator.strategies.evaluation import summarize_local_evaluation
from coordinator.validation import NormGate, RejectedUpdate, decode_aux, decode_update, expected_tensors, update_norm
from fedmq.broker import CONNECTION_ERRORS, HEADER_WORKER_ID, BrokerClient, BrokerSettings, Delivery, TransportReject, UnroutableError
from fedmq.errors import BrokerError, CheckpointError, ConfigError, MessageError, RoundFailedError
from fedmq.logging_setup import log_context, set_log_context
from fedmq.metrics import CoordinatorMetrics
from fedmq.rundir import write_final_model, write_settings
from fedmq.tasks import Task, load_task
from schemas.codecs import CodecSpec, all_finite, load_kernels
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
    downlink_codec: str = DEFAULT_DOWNLINK_CODEC
    seed: int = 0
    strategy: str = "fedavg"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    server_learning_rate: float | None = None
    personal_layers: tuple[str, ...] = ()
    eval_every: int = 1
    norm_outlier_factor: float = 50.0
    max_update_norm: float | None = None
    max_update_bytes: int = 1 << 30
    worker_inactive_rounds: int = 3
    shard_count: int = 0
    target_epsilon: float | None = None
    require_user_id: bool = False

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
            (self.server_learning_rate is None or self.server_learning_rate > 0, "server_learning_rate", "a number > 0 or None", self.server_learning_rate),
            (self.eval_every >= 0, "eval_every", "an int >= 0", self.eval_every),
            (self.target_epsilon is None or self.target_epsilon > 0, "target_epsilon", "a number > 0 or None", self.target_epsilon),
            (self.lossless in ("auto", "none", "zstd"), "lossless", "one of auto, none, zstd", self.lossless),
        ]
        for ok, name, expected, got in checks:
            if not ok:
                raise ConfigError(f"{name} must be {expected}, but got {got!r}")
        CodecSpec.parse(self.codec)
        parse_downlink_codec(self.downlink_codec)

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
            "eval_every": self.eval_every,
            "personal_layers": ",".join(self.personal_layers),
        }


@dataclass
class WorkerInfo:
    worker_id: str
    last_seen_unix: float
    num_samples: int = 0
    last_round: int = 0


@dataclass
class RunResult:
    """Summary of a finished run: rounds, final metrics, wall time and bytes."""

    run_id: str
    rounds_completed: int
    final_metrics: dict[str, float]
    wall_time_s: float
    bytes_out: int
    bytes_in: int
    history: list[dict[str, Any]] = field(default_factory=list)
    privacy: dict[str, Any] | None = None
    stop_reason: str | None = None


class Coordinator:
    """Runs the rounds of one federated training run (see the module docstring)."""

    def __init__(self, settings: CoordinatorSettings, *, task: Task | None = None) -> None:
        self.settings = settings
        self.task = task or load_task(settings.task)
        # None keeps the strategy's own default, which differs between strategies.
        strategy_options = dict(settings.strategy_options)
        if settings.server_learning_rate is not None:
            strategy_options["server_learning_rate"] = settings.server_learning_rate
        self.strategy: Strategy = load_strategy(settings.strategy, **strategy_options)
        self.strategy.setup(StrategyContext.from_task(self.task, train_config=settings.train_config(), seed=settings.seed))
        if settings.target_epsilon is not None and not isinstance(self.strategy, PrivateStrategy):
            raise ConfigError(
                f"target_epsilon needs a strategy that accounts privacy, such as dp-fedavg, but strategy {settings.strategy!r} does not"
            )
        # Why the run ended before its last round, such as the privacy budget.
        self.stop_reason: str | None = None
        self.broker = BrokerClient(settings.broker, client_name="fedmq-coordinator", stop_requested=lambda: self.stop_requested)
        self.broker.on_transport_reject = self._on_transport_reject
        self.limits = DecodeLimits(max_raw_bytes=settings.max_update_bytes)
        self.workers: dict[str, WorkerInfo] = {}
        self.shard_assignments: dict[str, int] = {}
        self.history: list[dict[str, Any]] = []
        self.stop_requested = False
        self.current: RoundState | None = None
        self._gate: NormGate | None = None
        self._round_start_body: bytes | None = None
        self._round_start_message: RoundStart | None = None
        self._round_start_full_body: bytes | None = None
        self._downlink = Downlink(codec=parse_downlink_codec(settings.downlink_codec), seed=settings.seed)
        self._round_start_expiry_ms: int | None = None
        self._messages_seen = 0
        self._started = time.monotonic()
        self.metrics = CoordinatorMetrics()
        # Norms of the last completed round's accepted updates, the outlier gate's reference.
        self._reference_norms: list[float] = []
        # Metrics of each accepted update of the open round, for the federated evaluation.
        self._worker_metrics: dict[str, dict[str, float]] = {}

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
        # Personal layers stay on the workers: updates and round starts carry only the shared tensors.
        self.expected = expected_tensors(split_personal(self.global_state, settings.personal_layers)[0])
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
        self._reference_norms = [float(norm) for norm in state.extra.get("update_norms", [])]
        self.history = _restore_history(self.run_dir / METRICS_FILE, self.completed_rounds)
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

        Writes settings.json into the run directory first, and final_model.safetensors
        once the last round is done. Raises RoundFailedError when a round stays below
        ``min_updates`` after all retries, BrokerError when the broker stays unreachable.
        """
        with log_context(run_id=self.run_id):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_settings(self.run_dir, self.settings, service="coordinator", run_id=self.run_id)
            self.metrics.bind(
                run_id=self.run_id, task=self.task.name, federation=self.settings.broker.federation,
                rounds_planned=self.settings.rounds, broker=self.broker,
            )
            result = self._run_rounds()
            if self.finished:
                write_final_model(self.run_dir, self.global_state, metadata={"run_id": self.run_id, "task": self.task.name, "round": str(self.completed_rounds)})
            return result

    def _run_rounds(self) -> RunResult:
        started = time.monotonic()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        logger.info("run %s: starting in %s with %r", self.run_id, self.run_dir, self.settings)
        # Loaded before any update arrives, so that decoding the first one is not seconds slower.
        load_kernels()
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
                    if self._privacy_budget_spent():
                        break
                    if self.current is None:
                        self._prepare_round(self.completed_rounds + 1)
                    self._run_round()
                if self.completed_rounds >= self.settings.rounds or self.stop_reason is not None:
                    self.finished = True
                    self._save_checkpoint()
        except BrokerError as exc:
            # A stop requested while reconnecting ends the reconnect attempts; that is a clean stop.
            if not self.stop_requested:
                raise
            logger.warning("run %s: stopped while the broker was unreachable: %s", self.run_id, exc)
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
            privacy=self._privacy_record(),
            stop_reason=self.stop_reason,
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
        set_log_context(round=round_number)
        settings = self.settings
        self.current = RoundState(
            round=round_number,
            model_version=self.model_version,
            min_updates=settings.min_updates,
            quorum_fraction=settings.quorum_fraction,
            deadline_unix=time.time() + settings.round_deadline_s,
        )
        self.strategy.begin_round({name: self.global_state[name] for name in self.expected})
        self._worker_metrics = {}
        self._gate = NormGate(
            factor=settings.norm_outlier_factor, max_norm=settings.max_update_norm, reference_norms=self._reference_norms
        )

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
        # The delta from the previous model version, or the full model when there is none.
        downlink = self._downlink
        downlink.advance({name: self.global_state[name] for name in self.expected}, self.model_version)
        delta = downlink.delta_weights()
        message = RoundStart(
            run_id=self.run_id,
            round=state.round,
            attempt=state.attempt,
            model_version=self.model_version,
            task=self.task.name,
            deadline_unix=state.deadline_unix,
            config={**self.settings.train_config(), **self.strategy.round_config(state.round)},
            weights=downlink.full_weights() if delta is None else delta,
            weights_kind="full" if delta is None else "delta",
            base_version=-1 if delta is None else downlink.base_version,
            aux=encode_state(self.strategy.round_aux(state.round, self.global_state)),
        )
        body = encode_message(message, lossless_method=self.settings.lossless)
        self._round_start_message = message
        self._round_start_body = body
        self._round_start_full_body = body if delta is None else None
        expiry_ms = int(max(1.0, state.deadline_unix - time.time()) * 1000)
        self._round_start_expiry_ms = expiry_ms
        state.sent = {worker_id for worker_id in self.workers}

        # Workers known to hold another version than the delta's base get the full model
        # first, addressed to them. The broadcast delta that follows is then a duplicate to them.
        for worker_id in sorted(state.sent):
            if delta is not None and downlink.needs_full(worker_id):
                self._with_reconnect(lambda worker_id=worker_id: self._send_current_round_to(worker_id))
        names = self.broker.topology
        try:
            self._with_reconnect(lambda: self.broker.publish(names.rounds_exchange, names.ROUTING_ALL, body, expiration_ms=expiry_ms))
        except UnroutableError:
            logger.warning("run %s round %d: no worker queue is bound yet; the round start reaches workers when they join", self.run_id, state.round)
        downlink.note_sent(state.sent)
        logger.info(
            "run %s round %d: published round start (attempt %d, model version %d, %s, %d bytes) to %d workers",
            self.run_id, state.round, state.attempt, self.model_version,
            "full model" if delta is None else f"delta from version {downlink.base_version}", len(body), len(state.sent),
        )

    def _full_round_start_body(self) -> bytes:
        """Return the open round's start with the full model, encoded once per publish."""
        if self._round_start_full_body is None:
            assert self._round_start_message is not None
            message = replace(self._round_start_message, weights=self._downlink.full_weights(), weights_kind="full", base_version=-1)
            self._round_start_full_body = encode_message(message, lossless_method=self.settings.lossless)
        return self._round_start_full_body

    def _send_current_round_to(self, worker_id: str) -> None:
        state = self.current
        if state is None or self._round_start_body is None or worker_id in state.responded:
            return
        # A worker with the delta's base model gets the broadcast delta, and any other worker the full model.
        full = self._downlink.needs_full(worker_id)
        body = self._full_round_start_body() if full else self._round_start_body
        names = self.broker.topology
        expiry_ms = int(max(1.0, state.deadline_unix - time.time()) * 1000)
        try:
            self.broker.publish(names.rounds_exchange, names.worker_routing_key(worker_id), body, expiration_ms=expiry_ms)
        except UnroutableError:
            logger.warning("run %s round %d: worker %s has no queue bound; cannot send it the round", self.run_id, state.round, worker_id)
            return
        state.sent.add(worker_id)
        self._downlink.note_sent([worker_id])
        logger.info(
            "run %s round %d: sent the open round to worker %s (%s, %d bytes)",
            self.run_id, state.round, worker_id, "full model" if full else "delta", len(body),
        )

    def _aggregate_round(self, state: RoundState) -> None:
        model_updated = False
        try:
            new_state = self.strategy.finish_round(self.global_state)
        except ZeroWeightError as exc:
            logger.warning("run %s round %d: %s; the global model stays unchanged", self.run_id, state.round, exc)
        else:
            non_finite = _non_finite_tensors(new_state)
            if non_finite:
                # Every accepted update was finite, but their combination overflowed.
                # NOTE: a strategy with server optimizer state has already advanced it.
                logger.error(
                    "run %s round %d: the aggregate of %d updates makes tensors %s non-finite; the global model stays unchanged",
                    self.run_id, state.round, len(state.accepted), non_finite[:5],
                )
            else:
                self.global_state = new_state
                model_updated = True
        self.model_version += 1
        self.completed_rounds = state.round
        if self._gate is not None and self._gate.norms:
            self._reference_norms = list(self._gate.norms)

        # Evaluate the new global model on the held-out set.
        self.model.load_state_dict(self.global_state)
        evaluation = self.task.evaluate(self.model, self.test_x, self.test_y)

        record = state.summary()
        record["model_updated"] = model_updated
        record["eval"] = evaluation
        record["train"] = {key: float(np.mean(values)) for key, values in state.train_metrics.items() if values}
        # The workers' evaluation of the model version this round started from, on their local test splits.
        record["federated_eval"] = summarize_local_evaluation(self._worker_metrics)
        record["strategy"] = self.strategy.round_summary()
        privacy = self._privacy_record()
        if privacy is not None:
            record["privacy"] = privacy
        record["duration_s"] = round(time.time() - state.started_unix, 3)
        record["bytes_out_total"] = self.broker.bytes_sent
        record["bytes_in_total"] = self.broker.bytes_received
        record["finished_unix"] = time.time()
        self.history.append(record)
        self.metrics.round_completed(record)

        # Persist the metrics, then the checkpoint, then release the round's updates
        # from the queue. A restart removes metrics of rounds after its checkpoint.
        with (self.run_dir / METRICS_FILE).open("a") as metrics_file:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            os.fsync(metrics_file.fileno())
        self._save_checkpoint()
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
        if privacy is not None:
            logger.info(
                "run %s round %d: privacy spent so far: epsilon %.4g at delta %.1e after %d DP rounds",
                self.run_id, state.round, privacy["epsilon"], privacy["delta"], privacy["rounds"],
            )
        if record["dropouts"]:
            logger.warning("run %s round %d: no update from workers %s", self.run_id, state.round, record["dropouts"])
        self.current = None
        self._round_start_body = None

    def _privacy_record(self) -> dict[str, Any] | None:
        if not isinstance(self.strategy, PrivateStrategy):
            return None
        return self.strategy.privacy_record()

    def _privacy_budget_spent(self) -> bool:
        """Return whether the next round would take epsilon above ``target_epsilon``, and set ``stop_reason`` when it would."""
        target = self.settings.target_epsilon
        if target is None or not isinstance(self.strategy, PrivateStrategy):
            return False
        projected = self.strategy.projected_epsilon()
        if projected <= target:
            return False
        spent = self.strategy.privacy_record()
        self.stop_reason = (
            f"round {self.completed_rounds + 1} would raise epsilon from {spent['epsilon']:.4g} to {projected:.4g}, "
            f"above the target {target:g} (delta {spent['delta']:.1e})"
        )
        logger.warning(
            "run %s: stopping after round %d of %d: %s; the model after round %d is final",
            self.run_id, self.completed_rounds, self.settings.rounds, self.stop_reason, self.completed_rounds,
        )
        return True

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
                "update_norms": list(self._reference_norms),
            },
        )
        checkpoint = Checkpoint(state=state, model=self.global_state, strategy_tensors=self.strategy.state_tensors())
        save_checkpoint(self.run_dir, checkpoint)

    # Incoming messages

    def _process(self, time_limit_s: float) -> None:
        self._with_reconnect(lambda: self.broker.process_events(time_limit_s))
        self.metrics.observe_round(self.current, len(self.workers))

    def _with_reconnect(self, action: Any) -> Any:
        while True:
            try:
                return action()
            except CONNECTION_ERRORS as exc:
                self.broker.reconnect(exc)
                if self.current is not None:
                    # The broker requeued the unacked deliveries of the lost connection.
                    # Their updates stay in the sum, and the redeliveries count in ``redelivered``.
                    self.current.held = [d for d in self.current.held if d.epoch == self.broker.epoch]

    def _ack(self, delivery: Delivery) -> None:
        try:
            self.broker.ack(delivery)
        except CONNECTION_ERRORS as exc:
            logger.warning("run %s: could not ack message %s (%r); the broker will redeliver it", self.run_id, delivery.message_id, exc)

    def _on_delivery(self, delivery: Delivery) -> None:
        with log_context(message_id=delivery.message_id or None):
            self._handle_delivery(delivery)

    def _handle_delivery(self, delivery: Delivery) -> None:
        self._messages_seen += 1
        try:
            message = decode_message(delivery.body, self.limits)
        except MessageError as exc:
            self._reject(delivery, "invalid_message", str(exc), worker_id=delivery.user_id, round_number=None)
            return
        set_log_context(worker_id=getattr(message, "worker_id", None))
        if self.settings.require_user_id and not self._sender_verified(delivery, message):
            return

        if isinstance(message, Update):
            self._on_update(delivery, message)
        elif isinstance(message, Join):
            self._on_join(message)
            self._ack(delivery)
        elif isinstance(message, Leave):
            self._on_leave(message)
            self._ack(delivery)
        elif isinstance(message, TrainingFailed):
            self._on_training_failed(message)
            self._ack(delivery)
        else:
            self._reject(delivery, "unexpected_kind", f"a {message.KIND} message does not belong on the results queue", worker_id=None, round_number=None)

    def _sender_verified(self, delivery: Delivery, message: Any) -> bool:
        """Check that the broker user who published a message is the worker it names; dead-letter it otherwise.

        RabbitMQ rejects a publish whose user_id property differs from the
        connection's user, so user_id names the publisher. Provisioned workers connect
        as a user named after their worker id, so both must be equal. A payload sent
        by reference must also come through one of that worker's blob queues.
        """
        claimed = getattr(message, "worker_id", None)
        if claimed is None:
            return True
        user = delivery.user_id
        if user != claimed:
            self._reject(
                delivery, "identity_mismatch",
                f"a {message.KIND} message claims worker {claimed!r} but was published by broker user {user!r}",
                worker_id=claimed, round_number=getattr(message, "round", None),
            )
            return False
        blob_prefix = self.broker.topology.blob_queue(claimed, "")
        if delivery.blob_queue is not None and not delivery.blob_queue.startswith(blob_prefix):
            self._reject(
                delivery, "identity_mismatch",
                f"worker {claimed!r} sent its {message.KIND} through blob queue {delivery.blob_queue!r}, not one of its own",
                worker_id=claimed, round_number=getattr(message, "round", None),
            )
            return False
        return True

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
        # The version in the Join decides whether the worker gets a delta or the full model.
        self._downlink.note_held(message.worker_id, message.model_version)
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

    def _on_leave(self, message: Leave) -> None:
        self.workers.pop(message.worker_id, None)
        state = self.current
        if state is None or message.worker_id not in state.sent or message.worker_id in state.responded:
            logger.info("run %s: worker %s left (%s)", self.run_id, message.worker_id, message.reason)
            return
        # The round stops waiting for a worker that left without sending its update.
        state.failed[message.worker_id] = f"left: {message.reason}"[:500]
        logger.warning(
            "run %s round %d: worker %s left (%s) without sending its update; counted as a dropout",
            self.run_id, state.round, message.worker_id, message.reason,
        )

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
            self.metrics.update_rejected("other_run")
            logger.warning(
                "run %s: discarded an update from worker %s for another run %r (round %d)",
                self.run_id, worker_id, update.run_id, update.round,
            )
            self._ack(delivery)
            return
        if state is None or update.round < state.round or update.model_version < state.model_version:
            if state is not None:
                state.stale += 1
            known = self.workers.get(worker_id)
            if known is not None:
                # A late reply shows that the worker is alive, so it is not forgotten as inactive.
                known.last_seen_unix = time.time()
                known.last_round = max(known.last_round, update.round)
            self.metrics.update_rejected("stale")
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
            # Held with the round: the original's delivery may have been requeued by a reconnect.
            state.held.append(delivery)
            if delivery.redelivered and delivery.message_id == state.accepted_messages.get(worker_id):
                state.redelivered += 1
                logger.info(
                    "run %s round %d: the broker redelivered the accepted update %s of worker %s; counted once",
                    self.run_id, state.round, delivery.message_id, worker_id,
                )
                return
            state.duplicates += 1
            self.metrics.update_rejected("duplicate")
            logger.warning(
                "run %s round %d: duplicate update from worker %s (message %s, accepted message %s); counted once",
                self.run_id, state.round, worker_id, delivery.message_id, state.accepted_messages.get(worker_id),
            )
            return

        # Decode and validate the tensors.
        try:
            decoded = decode_update(update, self.expected)
            aux = decode_aux(update)
            client_update = ClientUpdate(worker_id, update.num_samples, update.num_steps, decoded, aux=aux, metrics=update.metrics)
            self.strategy.check_update(client_update)
            norm = update_norm(decoded, self.expected)
            assert self._gate is not None
            self._gate.check(norm)
        except RejectedUpdate as exc:
            self._reject(delivery, exc.reason, exc.detail, worker_id=worker_id, round_number=update.round)
            return

        # Accept: add to the running weighted sum.
        self.strategy.add_update(client_update)
        self._worker_metrics[worker_id] = dict(update.metrics)
        self._gate.record(norm)
        state.accepted[worker_id] = update.num_samples
        state.accepted_messages[worker_id] = delivery.message_id
        self.metrics.update_accepted()
        state.failed.pop(worker_id, None)
        body_bytes = len(delivery.body)
        state.bytes_in += body_bytes
        state.held.append(delivery)
        # The ack after the checkpoint needs only the delivery tags. Dropping the body here
        # keeps one update body in memory at a time, unless the strategy kept its values.
        delivery.body = b""
        for key, value in update.metrics.items():
            state.train_metrics.setdefault(key, []).append(float(value))
        info = self.workers.setdefault(worker_id, WorkerInfo(worker_id, time.time()))
        info.last_seen_unix = time.time()
        info.last_round = state.round
        if worker_id not in state.sent:
            state.sent.add(worker_id)
        logger.debug(
            "run %s round %d: accepted update from worker %s (%d samples, norm %.4g, %d bytes) [%d/%d]",
            self.run_id, state.round, worker_id, update.num_samples, norm, body_bytes, len(state.accepted), state.target,
        )

    def _on_transport_reject(self, rejected: TransportReject) -> None:
        """Count and log a chunk or blob reference that the broker client dead-lettered."""
        state = self.current
        if state is not None:
            state.rejected[rejected.category] += 1
        worker = f"{rejected.claimed_worker_id} (claimed in a header)" if rejected.claimed_worker_id else "unknown"
        logger.warning(
            "run %s round %s: rejected message %s from worker %s to the dead-letter queue: %s: %s",
            self.run_id, state.round if state is not None else "none", rejected.message_id, worker, rejected.category, rejected.reason,
        )

    def _reject(self, delivery: Delivery, reason: str, detail: str, *, worker_id: str | None, round_number: int | None) -> None:
        """Count a rejected message, log it and move it to the dead-letter queue.

        Without a decoded worker id, the sender named in the ``fedmq-worker-id``
        header is logged (marked as claimed, because any client can set it), and
        without a decoded round, the coordinator's current round.
        """
        if self.current is not None:
            self.current.rejected[reason] += 1
        self.metrics.update_rejected(reason)
        if worker_id is None:
            claimed = delivery.headers.get(HEADER_WORKER_ID)
            worker_id = f"{claimed} (claimed in a header)" if claimed else "unknown"
        if round_number is None and self.current is not None:
            round_number = self.current.round
        logger.warning(
            "run %s round %s: rejected message %s from worker %s to the dead-letter queue: %s: %s",
            self.run_id, round_number if round_number is not None else "none", delivery.message_id, worker_id, reason, detail,
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


def _restore_history(path: Path, completed_rounds: int) -> list[dict[str, Any]]:
    """Read the metrics of a resumed run, removing records of rounds after the checkpoint.

    A coordinator that stopped between writing a round's metrics and its checkpoint
    runs that round again, so the earlier record of the round is removed from the file.
    """
    history = _read_history(path)
    kept = [record for record in history if int(record.get("round", 0)) <= completed_rounds]
    if len(kept) != len(history):
        logger.warning(
            "%s: removing the metrics of %d rounds after the checkpoint's round %d; those rounds run again",
            path, len(history) - len(kept), completed_rounds,
        )
        path.write_text("".join(json.dumps(record) + "\n" for record in kept))
    return kept


def _non_finite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    non_finite = []
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            continue
        if tensor.dtype == torch.float32 and tensor.device.type == "cpu":
            # One BLAS pass, where torch.isfinite would first allocate a model-sized bool tensor.
            finite = all_finite(tensor.detach().numpy())
        else:
            finite = bool(torch.isfinite(tensor).all())
        if not finite:
            non_finite.append(name)
    return non_finite


def settings_dict(settings: CoordinatorSettings) -> dict[str, Any]:
    data = asdict(settings)
    data["broker"] = repr(settings.broker)
    data["run_dir"] = str(settings.run_dir)
    return data
