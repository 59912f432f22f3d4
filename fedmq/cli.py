"""The ``fedmq`` command: coordinator, worker, demo, status, report, export and config.

Every option is declared once, in ``build_parser()``. The options of the coordinator,
worker, demo and status commands, and the top-level ``--log-level`` and
``--log-json``, may also come from ``FEDMQ_<OPTION>`` environment variables and from
a TOML file named by ``--config`` (see fedmq.config). A flag wins over the
environment, which wins over the file. ``fedmq config show coordinator [flags]``
prints the effective settings and where each came from.

The broker URL comes from ``--broker-url``, the ``FEDMQ_BROKER_URL`` environment
variable or the config file. Prefer the variable or the file for URLs that contain a
password, because command lines are visible to other users of the machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any

from fedmq.broker import BrokerSettings
from fedmq.config import CONFIGURABLE_COMMANDS, address, format_settings, integer, number, resolve_settings, settings_json
from fedmq.errors import BrokerError, ConfigError, FedmqError, RoundFailedError
from fedmq.secrets import check_command_line
from fedmq.tasks import PartitionSpec
from fedmq.tuning import tune_allocator

logger = logging.getLogger("fedmq")

DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
EXIT_ROUND_FAILED = 3
EXIT_BROKER = 4
EXIT_CONFIG = 2
DEFAULT_METRICS_ADDRESS = "127.0.0.1:9464"
PROGRESS_CHOICES = ("auto", "rich", "plain", "off")


def _add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("broker")
    group.add_argument("--broker-url", default=None, help="AMQP URL of the broker (default: $FEDMQ_BROKER_URL, else %s)" % DEFAULT_BROKER_URL.replace("%", "%%"))
    group.add_argument("--federation", default="fedmq", help="prefix of the exchange and queue names, one per federation (default: fedmq)")
    group.add_argument("--heartbeat-s", type=integer(minimum=0), default=30, help="AMQP heartbeat interval in seconds (default: 30)")
    group.add_argument(
        "--max-message-bytes", type=integer(minimum=4096), default=15 * 1024 * 1024,
        help="largest message body sent in one piece, in bytes; larger payloads travel in chunks (default: 15 MiB, under RabbitMQ 4.x's 16 MiB limit)",
    )
    group.add_argument("--reconnect-timeout-s", type=number(minimum=0, min_exclusive=True), default=600.0, help="give up reconnecting after this many seconds (default: 600)")
    group.add_argument(
        "--broker-password-file", type=Path, default=None, metavar="FILE",
        help="file holding the broker password, which replaces the URL's (default: $FEDMQ_BROKER_PASSWORD, else the URL's); "
        "never put a password in --broker-url",
    )
    group.add_argument("--broker-ca-file", type=Path, default=None, metavar="FILE", help="PEM file of the CAs that sign the broker's certificate, for amqps:// URLs (default: the system's CAs)")
    group.add_argument("--broker-cert-file", type=Path, default=None, metavar="FILE", help="PEM client certificate presented to the broker over amqps:// (default: none)")
    group.add_argument("--broker-key-file", type=Path, default=None, metavar="FILE", help="PEM private key of --broker-cert-file (default: none)")


def _add_privacy_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("privacy and sender checks")
    group.add_argument(
        "--target-epsilon", type=number(minimum=0, min_exclusive=True), default=None,
        help="stop before the round that would take the privacy spent above this epsilon; needs --strategy dp-fedavg (default: no target)",
    )
    group.add_argument(
        "--require-user-id", action="store_true", default=False,
        help="dead-letter messages whose broker-validated user_id differs from the worker id they claim (default: off, for the shared guest user)",
    )


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("local training (defaults come from the task)")
    group.add_argument("--local-epochs", type=integer(minimum=1), default=None, help="passes over the local data per round (default: the task's)")
    group.add_argument("--learning-rate", type=number(minimum=0, min_exclusive=True), default=None, help="local SGD learning rate (default: the task's)")
    group.add_argument("--batch-size", type=integer(minimum=1), default=None, help="local batch size, in samples (default: the task's)")
    group.add_argument("--momentum", type=number(minimum=0, maximum=1, max_exclusive=True), default=None, help="local SGD momentum, in [0, 1) (default: the task's)")
    group.add_argument("--weight-decay", type=number(minimum=0), default=None, help="local SGD weight decay (L2 penalty) (default: the task's)")
    group.add_argument("--proximal-mu", type=number(minimum=0), default=0.0, help="FedProx proximal term weight mu (default: 0, plain FedAvg)")


def _add_partition_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data partition of the built-in tasks")
    group.add_argument("--partition", choices=("iid", "dirichlet", "shards"), default="dirichlet", help="how the dataset is split across workers (default: dirichlet)")
    group.add_argument("--alpha", type=number(minimum=0, min_exclusive=True), default=0.5, help="Dirichlet concentration; smaller is more skewed (default: 0.5)")
    group.add_argument("--shards-per-worker", type=integer(minimum=1), default=2, help="label shards per worker for --partition shards (default: 2)")
    group.add_argument("--data-seed", type=integer(minimum=0), default=0, help="seed of the partition (default: 0)")


def _add_config_argument(parser: argparse.ArgumentParser, table: str) -> None:
    parser.add_argument(
        "--config", type=Path, default=None, metavar="FILE",
        help=f"TOML file whose [{table}] table sets any of these options; flags and FEDMQ_* variables win over it (default: $FEDMQ_CONFIG, else none)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedmq", description="Federated learning over RabbitMQ.")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="log level (default: INFO)")
    parser.add_argument("--log-json", action="store_true", default=False, help="log one JSON object per line instead of readable lines (default: off)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    coordinator = commands.add_parser("coordinator", help="run the coordinator of one training run")
    coordinator.add_argument("--task", required=True, help="built-in task name (digits, mnist) or package.module:attr (required)")
    coordinator.add_argument("--rounds", type=integer(minimum=1), required=True, help="number of rounds to run (required)")
    coordinator.add_argument("--run-dir", type=Path, default=None, help="folder for checkpoints and metrics; an existing checkpoint there is resumed (default: runs/<task>)")
    coordinator.add_argument("--run-id", default=None, help="run id (default: the checkpoint's, else a new random one)")
    coordinator.add_argument("--min-workers", type=integer(minimum=0), default=1, help="workers to wait for before round 1 (default: 1)")
    coordinator.add_argument("--min-updates", type=integer(minimum=1), default=1, help="updates a round needs at its deadline (default: 1)")
    coordinator.add_argument("--quorum-fraction", type=number(minimum=0, maximum=1, min_exclusive=True), default=1.0, help="a round closes early once this fraction of its workers replied (default: 1.0)")
    coordinator.add_argument("--round-deadline-s", type=number(minimum=0, min_exclusive=True), default=60.0, help="seconds a round waits for updates (default: 60)")
    coordinator.add_argument("--shard-count", type=integer(minimum=0), default=0, help="data shards handed out to workers started with --shard auto (default: --min-workers)")
    coordinator.add_argument("--join-timeout-s", type=number(minimum=0), default=300.0, help="seconds to wait for --min-workers before starting anyway (default: 300)")
    coordinator.add_argument("--max-round-retries", type=integer(minimum=0), default=2, help="re-issues of a round below --min-updates before the run fails (default: 2)")
    coordinator.add_argument("--codec", default="float16", help="uplink codec: float32, float16, bfloat16, q8, q4, topk[:fraction=F], topk_q8 (default: float16)")
    coordinator.add_argument("--lossless", choices=("auto", "none", "zstd"), default="auto", help="lossless stage on updates and round starts (default: auto, zstd where it saves 10%%)")
    coordinator.add_argument(
        "--downlink-codec", default="float16",
        help="codec of the model delta sent to workers that hold the previous model, or 'full' to always send the full model (default: float16)",
    )
    coordinator.add_argument("--seed", type=integer(minimum=0), default=0, help="seed of model initialisation and local training (default: 0)")
    coordinator.add_argument(
        "--strategy", default="fedavg",
        help="server-side strategy by name, such as fedavg, fedadam, scaffold, fednova or ifca; docs/strategies.md lists them (default: fedavg)",
    )
    coordinator.add_argument(
        "--strategy-option", action="append", default=[], metavar="KEY=VALUE",
        help="option of the strategy, repeatable, such as proximal_mu=0.01 or num_clusters=2 (see docs/strategies.md) (default: none)",
    )
    coordinator.add_argument("--server-learning-rate", type=number(minimum=0, min_exclusive=True), default=None, help="step size applied to the aggregated update (default: the strategy's, 1.0 for fedavg)")
    coordinator.add_argument(
        "--personal-layers", default="", metavar="PATTERN[,PATTERN]",
        help="state dict names (fnmatch patterns) that stay on the workers and are never aggregated, such as 'fc2.*' (default: none)",
    )
    coordinator.add_argument("--eval-every", type=int, default=1, help="workers evaluate the global model on their local test split every this many rounds; 0 turns it off (default: 1)")
    coordinator.add_argument("--max-update-norm", type=number(minimum=0, min_exclusive=True), default=None, help="reject updates whose L2 norm exceeds this (default: no fixed bound)")
    coordinator.add_argument(
        "--metrics-address", type=address, default=DEFAULT_METRICS_ADDRESS,
        help="HOST:PORT on which to serve Prometheus metrics at /metrics; '' or 0 disables, port 0 picks a free port (default: %s)" % DEFAULT_METRICS_ADDRESS,
    )
    coordinator.add_argument(
        "--progress", choices=PROGRESS_CHOICES, default="auto",
        help="progress view on stdout: rich (redrawn in place), plain (a line per round), off, or auto: rich on a terminal, else plain (default: auto)",
    )
    _add_config_argument(coordinator, "coordinator")
    _add_training_arguments(coordinator)
    _add_broker_arguments(coordinator)
    _add_privacy_arguments(coordinator)

    worker = commands.add_parser("worker", help="run one worker")
    worker.add_argument("--task", required=True, help="built-in task name (digits, mnist) or package.module:attr (required)")
    worker.add_argument("--worker-id", default="auto", help="unique worker id; 'auto' derives it from the host name (default: auto)")
    worker.add_argument("--shard", default="0/1", help="this worker's data shard as INDEX/COUNT, or 'auto' to take the one the coordinator assigns in join order (default: 0/1)")
    worker.add_argument("--state-dir", type=Path, default=None, help="folder for the worker's state across restarts, such as codec residuals (default: none)")
    worker.add_argument("--threads", type=integer(minimum=1), default=1, help="torch CPU threads for training (default: 1)")
    worker.add_argument("--max-steps", type=integer(minimum=1), default=None, help="cap on local optimizer steps per round, for slow hardware (default: no cap)")
    worker.add_argument("--time-budget-s", type=number(minimum=0, min_exclusive=True), default=None, help="cap on local training time per round, in seconds (default: no cap)")
    worker.add_argument("--local-epochs", type=integer(minimum=1), default=None, help="override the round's local epochs on this worker (default: the round's)")
    worker.add_argument("--exit-after-rounds", type=integer(minimum=1), default=None, help="exit after answering this many rounds (default: run until stopped)")
    worker.add_argument(
        "--metrics-address", type=address, default="",
        help="HOST:PORT on which to serve this worker's Prometheus metrics at /metrics; '' or 0 disables (default: '', disabled)",
    )
    worker.add_argument(
        "--no-declare", action="store_true", default=False,
        help="declare no exchange or queue, for a worker provisioned with 'fedmq provision-worker' whose queue exists already (default: declare them)",
    )
    worker.add_argument(
        "--dp-sgd-noise-multiplier", type=number(minimum=0, min_exclusive=True), default=None,
        help="train with DP-SGD (Opacus) at this noise multiplier, for per-record privacy of this worker's data (default: off)",
    )
    worker.add_argument("--dp-sgd-max-grad-norm", type=number(minimum=0, min_exclusive=True), default=1.0, help="DP-SGD per-sample gradient clip norm (default: 1.0)")
    worker.add_argument("--dp-sgd-delta", type=number(minimum=0, maximum=1, min_exclusive=True, max_exclusive=True), default=1e-5, help="delta at which DP-SGD's epsilon is reported (default: 1e-5)")
    _add_config_argument(worker, "worker")
    _add_partition_arguments(worker)
    _add_broker_arguments(worker)

    demo = commands.add_parser("demo", help="train on real data with one coordinator and N workers on a local broker")
    demo.add_argument("--task", default="digits", help="task (default: digits)")
    demo.add_argument("--workers", type=integer(minimum=1), default=10, help="number of worker processes (default: 10)")
    demo.add_argument("--rounds", type=integer(minimum=1), default=30, help="number of rounds (default: 30)")
    demo.add_argument("--codec", default="q8", help="uplink codec (default: q8)")
    demo.add_argument("--run-dir", type=Path, default=None, help="run folder (default: runs/demo-<time>)")
    demo.add_argument("--broker-url", default=None, help="use this broker instead of starting a private one (default: $FEDMQ_BROKER_URL, else a private node)")
    demo.add_argument("--seed", type=integer(minimum=0), default=0, help="seed (default: 0)")
    demo.add_argument("--progress", choices=PROGRESS_CHOICES, default="auto", help="progress view: rich, plain, off, or auto: rich on a terminal, else plain (default: auto)")
    _add_config_argument(demo, "demo")
    _add_partition_arguments(demo)

    provision = commands.add_parser(
        "provision-worker",
        help="create a worker's broker user, queue and least-privilege permissions through the RabbitMQ management API",
        description="Create or update a worker's user (named after the worker id), the federation's vhost and exchanges, the worker's "
        "queue and bindings, and permissions that let it read only its own queue and publish only its results. "
        "The administrator's password comes from FEDMQ_ADMIN_PASSWORD or --admin-password-file.",
    )
    provision.add_argument("--worker-id", required=True, help="worker id, also the broker user name: letters, digits, '_' and '-' (required)")
    provision.add_argument("--federation", default="fedmq", help="federation whose exchanges and queues the worker uses (default: fedmq)")
    provision.add_argument("--vhost", default=None, help="virtual host of the federation (default: the federation name)")
    provision.add_argument("--task", default="TASK", help="task name shown in the printed worker command (default: TASK)")
    provision.add_argument("--management-url", default="http://127.0.0.1:15672/", help="base URL of the RabbitMQ management HTTP API, without credentials (default: http://127.0.0.1:15672/)")
    provision.add_argument("--management-ca-file", type=Path, default=None, metavar="FILE", help="PEM CA file for an https:// management URL (default: the system's CAs)")
    provision.add_argument("--admin-user", default="guest", help="management API user with the administrator tag (default: guest)")
    provision.add_argument("--admin-password-file", type=Path, default=None, metavar="FILE", help="file holding the administrator's password (default: $FEDMQ_ADMIN_PASSWORD)")
    provision.add_argument("--worker-password-file", type=Path, default=None, metavar="FILE", help="file holding the worker's password (default: generate one and print it once)")
    provision.add_argument("--coordinator-user", default=None, help="broker user of the coordinator, given full rights on the vhost (default: --admin-user)")
    provision.add_argument("--broker-url", default="amqp://127.0.0.1:5672/", help="scheme, host and port of the broker as workers reach it, for the printed settings (default: amqp://127.0.0.1:5672/)")

    status = commands.add_parser("status", help="show the workers, queue depths and current round of a federation")
    status.add_argument(
        "--management-url", default=None,
        help="base URL of the RabbitMQ management HTTP API, such as http://127.0.0.1:15672/, for connections and all queues; "
        "credentials from the URL, else the broker URL's (default: none, AMQP only)",
    )
    status.add_argument("--run-dir", type=Path, default=None, help="the coordinator's run folder, for the current round and when each worker was last heard from (default: none)")
    status.add_argument("--timeout-s", type=number(minimum=0, min_exclusive=True), default=10.0, help="seconds to wait for the broker and the management API (default: 10)")
    status.add_argument("--json", action="store_true", default=False, help="print JSON instead of text (default: off)")
    _add_config_argument(status, "status")
    _add_broker_arguments(status)

    report = commands.add_parser("report", help="draw a run's accuracy, loss, participation and bytes per round as PNG plots and an HTML page")
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the coordinator's run folder")
    report.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR/report)")

    export = commands.add_parser("export", help="write a run's final model as safetensors and as a torch state dict file")
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the coordinator's run folder")
    export.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR/export)")

    config = commands.add_parser(
        "config", help="print the effective settings of a command and where each came from",
        description="Print the settings that 'fedmq TARGET OPTIONS...' would run with, secrets redacted. "
        "Exits with status 2 when a setting is invalid or a required one is missing.",
    )
    config.add_argument("action", choices=("show",), help="show: print the settings")
    config.add_argument("--json", action="store_true", default=False, help="print JSON instead of text; put it before TARGET (default: off)")
    config.add_argument("target", choices=CONFIGURABLE_COMMANDS, metavar="TARGET", help="the command: %s" % ", ".join(CONFIGURABLE_COMMANDS))
    config.add_argument("options", nargs=argparse.REMAINDER, metavar="OPTIONS", help="the command's flags, as you would pass them to it")
    return parser


def broker_settings(args: argparse.Namespace) -> BrokerSettings:
    from fedmq.secrets import broker_password, register_secret, split_credentials

    url = args.broker_url or os.environ.get("FEDMQ_BROKER_URL") or DEFAULT_BROKER_URL
    url_password = split_credentials(url)[2]
    if url_password:
        register_secret(url_password)
    try:
        return BrokerSettings(
            url=url,
            federation=args.federation,
            heartbeat_s=args.heartbeat_s,
            max_message_bytes=args.max_message_bytes,
            reconnect_timeout_s=args.reconnect_timeout_s,
            password=broker_password(args.broker_password_file),
            ca_file=args.broker_ca_file,
            cert_file=args.broker_cert_file,
            key_file=args.broker_key_file,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _sample_privacy(args: argparse.Namespace) -> Any:
    from worker.privacy import SamplePrivacySettings

    if args.dp_sgd_noise_multiplier is None:
        return None
    return SamplePrivacySettings(noise_multiplier=args.dp_sgd_noise_multiplier, max_grad_norm=args.dp_sgd_max_grad_norm, delta=args.dp_sgd_delta)


def run_provision_worker(args: argparse.Namespace) -> int:
    from fedmq.provision import ManagementClient, connection_instructions, generate_password, provision_worker
    from fedmq.secrets import read_secret_file, register_secret

    if args.admin_password_file is not None:
        admin_password = read_secret_file(args.admin_password_file, what="administrator password")
    elif os.environ.get("FEDMQ_ADMIN_PASSWORD"):
        admin_password = os.environ["FEDMQ_ADMIN_PASSWORD"]
        register_secret(admin_password)
    else:
        raise ConfigError("the administrator password is missing; set FEDMQ_ADMIN_PASSWORD or pass --admin-password-file")
    if args.worker_password_file is not None:
        password = read_secret_file(args.worker_password_file, what="worker password")
    else:
        password = generate_password()
        register_secret(password)
    client = ManagementClient(args.management_url, user=args.admin_user, password=admin_password, ca_file=args.management_ca_file)
    worker = provision_worker(
        client,
        federation=args.federation,
        worker_id=args.worker_id,
        password=password,
        vhost=args.vhost,
        coordinator_user=args.coordinator_user,
        broker_url=args.broker_url,
    )
    # stdout, not the log: the text carries a generated password, shown this once.
    print(connection_instructions(worker, task=args.task, password_file=args.worker_password_file))
    return 0


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
    from coordinator.strategies import parse_strategy_options
    from coordinator.strategies.common import parse_patterns
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
        downlink_codec=args.downlink_codec,
        seed=args.seed,
        strategy=args.strategy,
        strategy_options=parse_strategy_options(args.strategy_option),
        server_learning_rate=args.server_learning_rate,
        personal_layers=parse_patterns(args.personal_layers),
        eval_every=args.eval_every,
        max_update_norm=args.max_update_norm,
        target_epsilon=args.target_epsilon,
        require_user_id=args.require_user_id,
    )
    coordinator = Coordinator(settings, task=task)
    coordinator.install_signal_handlers()
    result = _run_monitored(coordinator, args)
    final = result.final_metrics
    logger.info(
        "run %s finished: %d rounds, accuracy %.4f, %.1f s, %d bytes out, %d bytes in",
        result.run_id, result.rounds_completed, final.get("accuracy", float("nan")), result.wall_time_s, result.bytes_out, result.bytes_in,
    )
    if result.privacy is not None:
        logger.info(
            "run %s privacy: epsilon %.4g at delta %.1e over %d DP rounds (noise multiplier %g, sample rate %g)",
            result.run_id, result.privacy["epsilon"], result.privacy["delta"], result.privacy["rounds"],
            result.privacy["noise_multiplier"], result.privacy["sample_rate"],
        )
    if result.stop_reason is not None:
        logger.info("run %s stopped early: %s", result.run_id, result.stop_reason)
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
        declare_topology=not args.no_declare,
        sample_privacy=_sample_privacy(args),
    )
    from fedmq.logging_setup import log_context
    from fedmq.metrics import MetricsServer

    with log_context(worker_id=worker_id):
        worker = Worker(settings)
        worker.install_signal_handlers()
        server = MetricsServer(worker.metrics.registry, args.metrics_address, service=f"worker {worker_id}")
        server.start()
        try:
            worker.run()
        finally:
            server.close()
    return 0


def _run_monitored(coordinator: Any, args: argparse.Namespace) -> Any:
    """Run the coordinator with its metrics endpoint and the progress view; return its RunResult."""
    from fedmq.metrics import MetricsServer, registry_samples
    from fedmq.progress import RunMonitor, open_progress

    server = MetricsServer(coordinator.metrics.registry, args.metrics_address, service=f"run {coordinator.run_id}")
    server.start()
    view = open_progress(args.progress, title=f"fedmq run {coordinator.run_id} ({coordinator.task.name})")
    monitor = None
    if view is not None:
        monitor = RunMonitor(
            view, coordinator.run_dir, lambda: registry_samples(coordinator.metrics.registry), rounds_planned=coordinator.settings.rounds
        )
        monitor.skip_existing()
        monitor.start()
    try:
        return coordinator.run()
    finally:
        if monitor is not None:
            monitor.stop()
        server.close()


def run_status(args: argparse.Namespace) -> int:
    from fedmq.status import collect_status, format_status

    status = collect_status(
        broker_settings(args),
        management_url=args.management_url,
        run_dir=args.run_dir,
        timeout_s=args.timeout_s,
    )
    print(json.dumps(status.to_json(), indent=2) if args.json else format_status(status))
    return 0


def run_report(args: argparse.Namespace) -> int:
    from fedmq.report import build_report

    page = build_report(args.run_dir, args.out)
    print(f"wrote {page}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from fedmq.export import export_model

    result = export_model(args.run_dir, args.out)
    state = "final model" if result.finished else f"checkpoint after round {result.round} (the run has not finished)"
    print(f"exported the {state} of run {result.run_id or '?'}:")
    print(f"  {result.safetensors_path}")
    print(f"  {result.state_dict_path}  (torch.load(path, weights_only=True))")
    return 0


def show_config(args: argparse.Namespace, argv: list[str]) -> int:
    """Print the target command's effective settings; exit status 2 when a required one is missing."""
    root_flags = argv[: argv.index("config")] if "config" in argv else []
    resolved = resolve_settings(build_parser(), [*root_flags, args.target, *args.options], allow_missing=True)
    if args.json:
        print(json.dumps(settings_json(resolved), indent=2))
    else:
        print(format_settings(resolved))
    for setting in resolved.missing:
        print(f"fedmq config: {setting.flag} is required and not set", file=sys.stderr)
    return EXIT_CONFIG if resolved.missing else 0


def configure_logging(level: str, *, json_lines: bool = False) -> None:
    """Log to stderr as readable lines, or JSON lines, with the run, round, worker and message ids."""
    from fedmq.logging_setup import configure_logging as install_handler

    install_handler(level, json_lines=json_lines)
    from fedmq.secrets import install_redaction

    install_redaction(logging.getLogger().handlers)


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        resolved = resolve_settings(build_parser(), argv)
        args = resolved.namespace
        check_command_line({name: setting.source for name, setting in resolved.settings.items()}, vars(args))
    except ConfigError as exc:
        print(f"fedmq: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(args.log_level, json_lines=args.log_json)
    # Before any large buffer exists: reuse freed message-sized blocks (see fedmq.tuning).
    tune_allocator()
    try:
        if args.command == "coordinator":
            return run_coordinator(args)
        if args.command == "worker":
            return run_worker(args)
        if args.command == "demo":
            from fedmq.demo import run_demo

            return run_demo(args)
        if args.command == "provision-worker":
            return run_provision_worker(args)
        if args.command == "status":
            return run_status(args)
        if args.command == "report":
            return run_report(args)
        if args.command == "export":
            return run_export(args)
        if args.command == "config":
            return show_config(args, argv)
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
    build_parser().error(f"unknown command {args.command!r}")
    return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
