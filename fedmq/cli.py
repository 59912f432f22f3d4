"""The ``fedmq`` command: coordinator, worker and demo.

The broker URL comes from ``--broker-url`` or the ``FEDMQ_BROKER_URL`` environment
variable. Prefer the variable for URLs that contain a password, because command
lines are visible to other users of the machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any

from fedmq.broker import BrokerSettings
from fedmq.errors import BrokerError, ConfigError, FedmqError, RoundFailedError
from fedmq.tasks import PartitionSpec

logger = logging.getLogger("fedmq")

DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
EXIT_ROUND_FAILED = 3
EXIT_BROKER = 4
EXIT_CONFIG = 2


def _add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("broker")
    group.add_argument("--broker-url", default=None, help="AMQP URL of the broker (default: $FEDMQ_BROKER_URL, else %s)" % DEFAULT_BROKER_URL.replace("%", "%%"))
    group.add_argument("--federation", default="fedmq", help="prefix of the exchange and queue names, one per federation (default: fedmq)")
    group.add_argument("--heartbeat-s", type=int, default=30, help="AMQP heartbeat interval in seconds (default: 30)")
    group.add_argument(
        "--max-message-bytes", type=int, default=15 * 1024 * 1024,
        help="largest message body sent in one piece, in bytes; larger payloads travel in chunks (default: 15 MiB, under RabbitMQ 4.x's 16 MiB limit)",
    )
    group.add_argument("--reconnect-timeout-s", type=float, default=600.0, help="give up reconnecting after this many seconds (default: 600)")


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("local training (defaults come from the task)")
    group.add_argument("--local-epochs", type=int, default=None, help="passes over the local data per round")
    group.add_argument("--learning-rate", type=float, default=None, help="local SGD learning rate")
    group.add_argument("--batch-size", type=int, default=None, help="local batch size")
    group.add_argument("--momentum", type=float, default=None, help="local SGD momentum")
    group.add_argument("--weight-decay", type=float, default=None, help="local SGD weight decay")
    group.add_argument("--proximal-mu", type=float, default=0.0, help="FedProx proximal term weight mu (default: 0, plain FedAvg)")


def _add_partition_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data partition of the built-in tasks")
    group.add_argument("--partition", choices=("iid", "dirichlet", "shards"), default="dirichlet", help="how the dataset is split across workers (default: dirichlet)")
    group.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration; smaller is more skewed (default: 0.5)")
    group.add_argument("--shards-per-worker", type=int, default=2, help="label shards per worker for --partition shards (default: 2)")
    group.add_argument("--data-seed", type=int, default=0, help="seed of the partition (default: 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedmq", description="Federated learning over RabbitMQ.")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="log level (default: INFO)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    coordinator = commands.add_parser("coordinator", help="run the coordinator of one training run")
    coordinator.add_argument("--task", required=True, help="built-in task name (digits, mnist) or package.module:attr")
    coordinator.add_argument("--rounds", type=int, required=True, help="number of rounds to run")
    coordinator.add_argument("--run-dir", type=Path, default=None, help="folder for checkpoints and metrics; an existing checkpoint there is resumed (default: runs/<task>)")
    coordinator.add_argument("--run-id", default=None, help="run id (default: the checkpoint's, else a new random one)")
    coordinator.add_argument("--min-workers", type=int, default=1, help="workers to wait for before round 1 (default: 1)")
    coordinator.add_argument("--min-updates", type=int, default=1, help="updates a round needs at its deadline (default: 1)")
    coordinator.add_argument("--quorum-fraction", type=float, default=1.0, help="a round closes early once this fraction of its workers replied (default: 1.0)")
    coordinator.add_argument("--round-deadline-s", type=float, default=60.0, help="seconds a round waits for updates (default: 60)")
    coordinator.add_argument("--shard-count", type=int, default=0, help="data shards handed out to workers started with --shard auto (default: --min-workers)")
    coordinator.add_argument("--join-timeout-s", type=float, default=300.0, help="seconds to wait for --min-workers before starting anyway (default: 300)")
    coordinator.add_argument("--max-round-retries", type=int, default=2, help="re-issues of a round below --min-updates before the run fails (default: 2)")
    coordinator.add_argument("--codec", default="float16", help="uplink codec: float32, float16, bfloat16, q8, q4, topk[:fraction=F], topk_q8 (default: float16)")
    coordinator.add_argument("--lossless", choices=("auto", "none", "zstd"), default="auto", help="lossless stage on updates (default: auto, zstd where it saves 10%%)")
    coordinator.add_argument("--seed", type=int, default=0, help="seed of model initialisation and local training (default: 0)")
    coordinator.add_argument("--strategy", default="fedavg", help="server-side strategy (default: fedavg)")
    coordinator.add_argument("--server-learning-rate", type=float, default=1.0, help="step size applied to the mean update (default: 1.0)")
    coordinator.add_argument("--max-update-norm", type=float, default=None, help="reject updates whose L2 norm exceeds this (default: no fixed bound)")
    _add_training_arguments(coordinator)
    _add_broker_arguments(coordinator)

    worker = commands.add_parser("worker", help="run one worker")
    worker.add_argument("--task", required=True, help="built-in task name (digits, mnist) or package.module:attr")
    worker.add_argument("--worker-id", default="auto", help="unique worker id; 'auto' derives it from the host name (default: auto)")
    worker.add_argument("--shard", default="0/1", help="this worker's data shard as INDEX/COUNT, or 'auto' to take the one the coordinator assigns in join order (default: 0/1)")
    worker.add_argument("--state-dir", type=Path, default=None, help="folder for the worker's state across restarts, such as codec residuals (default: none)")
    worker.add_argument("--threads", type=int, default=1, help="torch CPU threads for training (default: 1)")
    worker.add_argument("--max-steps", type=int, default=None, help="cap on local optimizer steps per round, for slow hardware")
    worker.add_argument("--time-budget-s", type=float, default=None, help="cap on local training time per round in seconds")
    worker.add_argument("--local-epochs", type=int, default=None, help="override the round's local epochs on this worker")
    worker.add_argument("--exit-after-rounds", type=int, default=None, help="exit after answering this many rounds (default: run until stopped)")
    _add_partition_arguments(worker)
    _add_broker_arguments(worker)

    demo = commands.add_parser("demo", help="train on real data with one coordinator and N workers on a local broker")
    demo.add_argument("--task", default="digits", help="task (default: digits)")
    demo.add_argument("--workers", type=int, default=10, help="number of worker processes (default: 10)")
    demo.add_argument("--rounds", type=int, default=30, help="number of rounds (default: 30)")
    demo.add_argument("--codec", default="q8", help="uplink codec (default: q8)")
    demo.add_argument("--run-dir", type=Path, default=None, help="run folder (default: runs/demo-<time>)")
    demo.add_argument("--broker-url", default=None, help="use this broker instead of starting a private one (default: $FEDMQ_BROKER_URL, else a private node)")
    demo.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    _add_partition_arguments(demo)
    return parser


def broker_settings(args: argparse.Namespace) -> BrokerSettings:
    url = args.broker_url or os.environ.get("FEDMQ_BROKER_URL") or DEFAULT_BROKER_URL
    try:
        return BrokerSettings(
            url=url,
            federation=args.federation,
            heartbeat_s=args.heartbeat_s,
            max_message_bytes=args.max_message_bytes,
            reconnect_timeout_s=args.reconnect_timeout_s,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def resolve_worker_id(value: str) -> str:
    if value != "auto":
        return value
    return re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()) or "worker"


def parse_shard(value: str) -> tuple[int, int]:
    """Parse ``INDEX/COUNT``, or ``auto`` for a shard that the coordinator assigns (returned as ``(0, 0)``)."""
    if value == "auto":
        return 0, 0
    index_text, sep, count_text = value.partition("/")
    if not sep or not index_text.isdigit() or not count_text.isdigit():
        raise ConfigError(f"--shard must be INDEX/COUNT or auto, but got {value!r}")
    index, count = int(index_text), int(count_text)
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"--shard index must be in [0, COUNT) with COUNT >= 1, but got {value!r}")
    return index, count


def run_coordinator(args: argparse.Namespace) -> int:
    from coordinator.service import Coordinator, CoordinatorSettings
    from fedmq.tasks import load_task

    task = load_task(args.task)
    defaults = task.default_train_config()
    settings = CoordinatorSettings(
        broker=broker_settings(args),
        task=args.task,
        rounds=args.rounds,
        run_dir=args.run_dir or Path("runs") / task.name,
        run_id=args.run_id,
        min_workers=args.min_workers,
        min_updates=args.min_updates,
        quorum_fraction=args.quorum_fraction,
        round_deadline_s=args.round_deadline_s,
        join_timeout_s=args.join_timeout_s,
        max_round_retries=args.max_round_retries,
        shard_count=args.shard_count,
        local_epochs=_pick(args.local_epochs, defaults.local_epochs),
        learning_rate=_pick(args.learning_rate, defaults.learning_rate),
        batch_size=_pick(args.batch_size, defaults.batch_size),
        momentum=_pick(args.momentum, defaults.momentum),
        weight_decay=_pick(args.weight_decay, defaults.weight_decay),
        proximal_mu=args.proximal_mu,
        codec=args.codec,
        lossless=args.lossless,
        seed=args.seed,
        strategy=args.strategy,
        server_learning_rate=args.server_learning_rate,
        max_update_norm=args.max_update_norm,
    )
    coordinator = Coordinator(settings, task=task)
    coordinator.install_signal_handlers()
    result = coordinator.run()
    final = result.final_metrics
    logger.info(
        "run %s finished: %d rounds, accuracy %.4f, %.1f s, %d bytes out, %d bytes in",
        result.run_id, result.rounds_completed, final.get("accuracy", float("nan")), result.wall_time_s, result.bytes_out, result.bytes_in,
    )
    return 0


def run_worker(args: argparse.Namespace) -> int:
    from worker.service import Worker, WorkerSettings

    worker_id = resolve_worker_id(args.worker_id)
    shard_index, shard_count = parse_shard(args.shard)
    settings = WorkerSettings(
        broker=broker_settings(args),
        task=args.task,
        worker_id=worker_id,
        shard_index=shard_index,
        shard_count=shard_count,
        partition=PartitionSpec(scheme=args.partition, alpha=args.alpha, shards_per_worker=args.shards_per_worker, seed=args.data_seed),
        state_dir=args.state_dir,
        torch_threads=args.threads,
        local_epochs=args.local_epochs,
        max_steps=args.max_steps,
        time_budget_s=args.time_budget_s,
        exit_after_rounds=args.exit_after_rounds,
    )
    worker = Worker(settings)
    worker.install_signal_handlers()
    worker.run()
    return 0


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # pika logs every failed connection attempt at ERROR; fedmq logs each retry itself.
    logging.getLogger("pika").setLevel(logging.CRITICAL)


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        if args.command == "coordinator":
            return run_coordinator(args)
        if args.command == "worker":
            return run_worker(args)
        if args.command == "demo":
            from fedmq.demo import run_demo

            return run_demo(args)
    except ConfigError as exc:
        logger.error("invalid configuration: %s", exc)
        return EXIT_CONFIG
    except RoundFailedError as exc:
        logger.error("%s", exc)
        return EXIT_ROUND_FAILED
    except BrokerError as exc:
        logger.error("broker error: %s", exc)
        return EXIT_BROKER
    except FedmqError as exc:
        logger.error("%s: %s", type(exc).__name__, exc)
        return 1
    parser.error(f"unknown command {args.command!r}")
    return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
