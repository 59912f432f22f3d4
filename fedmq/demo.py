"""``fedmq demo``: one coordinator and N workers as separate processes on a real broker.

Without a broker URL the demo starts a private RabbitMQ node on loopback (its own
port, node name and data folder, removed at exit). Each process logs to a file in
the run folder. The demo shows the live progress view (fedmq.progress), fed by the
run folder's metrics.jsonl and the coordinator's metrics endpoint on a free loopback
port, and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from fedmq.metrics import scrape
from fedmq.progress import RunMonitor, open_progress
from fedmq.rabbitmq_node import RabbitMQNode, RabbitMQNotInstalledError

# Seconds the demo waits for a worker to exit after SIGTERM before it sends SIGKILL.
WORKER_STOP_TIMEOUT_S = 15.0


def _fedmq_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedmq", "--log-level", "INFO", *args]


def _format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} GiB"


def _free_loopback_port() -> int:
    # The port is free now, but another process may take it before the coordinator
    # binds it. The coordinator then runs without metrics, and the view shows only
    # the completed rounds.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _read_records(path: Path, seen: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [json.loads(line) for line in lines[seen:]]


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo and return the process exit code."""
    started = time.monotonic()
    run_dir: Path = args.run_dir or Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    logs = run_dir / "logs"
    logs.mkdir(exist_ok=True)
    federation = f"demo-{uuid.uuid4().hex[:8]}"
    workers = args.workers
    if workers < 1:
        print(f"fedmq demo: --workers must be >= 1, but got {workers}", file=sys.stderr)
        return 2

    # Broker: the given one, or a private node on loopback.
    node: RabbitMQNode | None = None
    url = args.broker_url or os.environ.get("FEDMQ_BROKER_URL")
    if not url:
        node = RabbitMQNode(base_dir=None)
        try:
            node.start()
        except RabbitMQNotInstalledError as exc:
            print(f"fedmq demo: {exc}", file=sys.stderr)
            return 1
        url = node.url
        print(f"started a private RabbitMQ node on 127.0.0.1:{node.port}")

    env = {**os.environ, "FEDMQ_BROKER_URL": url, "PYTHONUNBUFFERED": "1"}
    common = ["--task", args.task, "--federation", federation]
    metrics_port = _free_loopback_port()
    coordinator_args = [
        "coordinator", *common,
        "--rounds", str(args.rounds),
        "--run-dir", str(run_dir),
        "--min-workers", str(workers),
        "--min-updates", str(max(1, math.ceil(workers / 2))),
        "--round-deadline-s", "30",
        "--codec", args.codec,
        "--seed", str(args.seed),
        "--metrics-address", f"127.0.0.1:{metrics_port}",
        "--progress", "off",
    ]
    processes: list[subprocess.Popen[bytes]] = []
    monitor: RunMonitor | None = None
    try:
        coordinator_log = (logs / "coordinator.log").open("wb")
        coordinator = subprocess.Popen(_fedmq_command(*coordinator_args), env=env, stdout=coordinator_log, stderr=subprocess.STDOUT)
        for index in range(workers):
            worker_args = [
                "worker", *common,
                "--worker-id", f"worker-{index + 1}",
                "--shard", f"{index}/{workers}",
                "--partition", args.partition,
                "--alpha", str(args.alpha),
                "--shards-per-worker", str(args.shards_per_worker),
                "--data-seed", str(args.data_seed),
                "--state-dir", str(run_dir / "workers" / f"worker-{index + 1}"),
                "--metrics-address", "",
            ]
            log = (logs / f"worker-{index + 1}.log").open("wb")
            processes.append(subprocess.Popen(_fedmq_command(*worker_args), env=env, stdout=log, stderr=subprocess.STDOUT))
        print(f"started 1 coordinator and {workers} workers on task {args.task} ({args.partition}, alpha {args.alpha}); logs in {logs}")
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        print(f"coordinator metrics at {metrics_url}", flush=True)

        # Progress: the live view, or one line per finished round when stdout is not a terminal.
        view = open_progress(args.progress, title=f"fedmq demo: task {args.task}, {workers} workers")
        if view is not None:
            monitor = RunMonitor(view, run_dir, lambda: scrape(metrics_url, timeout_s=0.5), rounds_planned=args.rounds)
        while True:
            exit_code = coordinator.poll()
            if monitor is not None:
                monitor.poll()
            if exit_code is not None:
                break
            time.sleep(0.25)
    finally:
        if monitor is not None:
            monitor.stop()
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + WORKER_STOP_TIMEOUT_S
        for process in processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if "coordinator" in locals() and coordinator.poll() is None:
            coordinator.send_signal(signal.SIGTERM)
            coordinator.wait(timeout=30)
        if node is not None:
            node.close()

    # Summary.
    records = _read_records(run_dir / "metrics.jsonl", 0)
    wall_s = time.monotonic() - started
    if exit_code != 0 or not records:
        print(f"fedmq demo: the coordinator exited with code {exit_code}; see {logs / 'coordinator.log'}", file=sys.stderr)
        return exit_code or 1
    last = records[-1]
    accuracy = last.get("eval", {}).get("accuracy", float("nan"))
    reached = next((r["round"] for r in records if r.get("eval", {}).get("accuracy", 0) >= 0.95), None)
    print()
    print(f"test accuracy     {accuracy:.4f} after {last['round']} rounds" + (f" (95% first reached in round {reached})" if reached else ""))
    print(f"wall time         {wall_s:.1f} s")
    print(f"bytes sent        {_format_bytes(last['bytes_out_total'])} coordinator to workers, {_format_bytes(last['bytes_in_total'])} workers to coordinator")
    print(f"run folder        {run_dir}")
    return 0
