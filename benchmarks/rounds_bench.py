"""Section ``rounds``: the time of one round with no-op training, against raw pika moving the same bytes.

fedmq: the coordinator runs in this process, the workers as threads of one
subprocess (``benchmarks.round_workers``). A round is timed from the coordinator's
round start (just before it publishes) to the moment the new global model exists
(the no-op task's evaluation, which the coordinator calls right after aggregating).
The uplink codec is float32 without a lossless stage and the downlink sends the full
model, so each round moves the model's size once to every worker and once back.

raw pika: the same process layout. This process publishes one body of the model's
size to a fanout exchange bound to one durable queue per worker thread. Each thread
replies with the same number of bytes to a quorum results queue, which this process
consumes. Messages are persistent and publishes wait for confirms, as in fedmq.

Both run ``ROUNDS`` rounds; the figure is the median of all rounds but the first.
Both sides use fedmq.tuning's settings; one raw configuration also runs without them.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pika

from benchmarks.common import REPO_ROOT, ratio
from benchmarks.round_workers import RAW_EXCHANGE, RAW_RESULTS, NoOpTask
from coordinator.service import Coordinator, CoordinatorSettings
from fedmq.broker import BrokerSettings

FULL_CONFIGS = [(workers, megabytes) for workers in (10, 50) for megabytes in (1, 10, 50)]
QUICK_CONFIGS = [(4, 1)]
ROUNDS = 4
# Rough resident memory per worker thread, in model sizes: the model, the held global
# model, the received round start, the delta and the encoded update.
WORKER_MODEL_COPIES = 6
MAX_MEMORY_FRACTION = 0.5


def _start_workers(mode: str, url: str, workers: int, rounds: int, extra: list[str]) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "benchmarks.round_workers", mode, "--url", url, "--workers", str(workers), "--rounds", str(rounds), *extra]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if line.strip() != "ready":
        process.kill()
        _, error = process.communicate(timeout=30)
        raise RuntimeError(f"benchmark workers ({mode}) did not start: {error[-2000:]}")
    return process


def _finish(process: subprocess.Popen[str], timeout_s: float) -> None:
    try:
        _, error = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise RuntimeError(f"benchmark workers did not exit within {timeout_s:.0f} s") from None
    if process.returncode != 0:
        raise RuntimeError(f"benchmark workers exited with status {process.returncode}: {error[-2000:]}")


def fedmq_round_times(url: str, workers: int, num_params: int, rounds: int) -> list[float]:
    """Run ``rounds`` rounds of fedmq with no-op training and return each round's time in seconds."""
    federation = f"bench-{uuid.uuid4().hex[:8]}"
    process = _start_workers("fedmq", url, workers, rounds, ["--params", str(num_params), "--federation", federation])
    try:
        task = NoOpTask(num_params)
        with tempfile.TemporaryDirectory(prefix="fedmq-bench-run-") as run_dir:
            settings = CoordinatorSettings(
                broker=BrokerSettings(url=url, federation=federation, heartbeat_s=120),
                task=task.name, rounds=rounds, run_dir=Path(run_dir), min_workers=workers, min_updates=workers,
                round_deadline_s=600.0, join_timeout_s=300.0, codec="float32", lossless="none", downlink_codec="full",
            )
            result = Coordinator(settings, task=task).run()
    finally:
        _finish(process, 300)
    times = []
    for record, evaluated in zip(result.history, task.evaluated_unix):
        started = record["finished_unix"] - record["duration_s"]
        times.append(evaluated - started)
    return times


def raw_round_times(url: str, workers: int, size_bytes: int, rounds: int, *, tuned: bool) -> list[float]:
    """Move ``size_bytes`` to every worker and back with plain pika ``rounds`` times; return each round's time."""
    body = bytes(size_bytes)
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.confirm_delivery()
    channel.exchange_declare(RAW_EXCHANGE, exchange_type="fanout", durable=True)
    channel.queue_declare(RAW_RESULTS, durable=True, arguments={"x-queue-type": "quorum"})
    extra = ["--bytes", str(size_bytes)] + ([] if tuned else ["--untuned"])
    process = _start_workers("raw", url, workers, rounds, extra)
    times = []
    try:
        channel.basic_qos(prefetch_count=max(2, workers))
        for _ in range(rounds):
            started = time.perf_counter()
            channel.basic_publish(RAW_EXCHANGE, "", body, pika.BasicProperties(delivery_mode=2), mandatory=True)
            received = 0
            for method, _, _ in channel.consume(RAW_RESULTS, inactivity_timeout=300):
                if method is None:
                    raise RuntimeError(f"raw round: only {received} of {workers} replies within 300 s")
                channel.basic_ack(method.delivery_tag)
                received += 1
                if received == workers:
                    break
            times.append(time.perf_counter() - started)
        channel.cancel()
    finally:
        _finish(process, 300)
        for index in range(workers):
            channel.queue_delete(f"bench.raw.worker.{index}")
        channel.queue_delete(RAW_RESULTS)
        connection.close()
    return times


def _memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def run(*, quick: bool, url: str) -> dict[str, Any]:
    started = time.monotonic()
    configs = QUICK_CONFIGS if quick else FULL_CONFIGS
    rounds = 3 if quick else ROUNDS
    results = []
    for workers, megabytes in configs:
        size_bytes = megabytes * 1_000_000
        row: dict[str, Any] = {"workers": workers, "model_mb": megabytes, "rounds": rounds}
        if workers * WORKER_MODEL_COPIES * size_bytes > MAX_MEMORY_FRACTION * _memory_bytes():
            row["skipped"] = (
                f"about {workers * WORKER_MODEL_COPIES * size_bytes / 2**30:.1f} GiB for the worker threads exceeds "
                f"{MAX_MEMORY_FRACTION:.0%} of this machine's memory"
            )
            results.append(row)
            continue
        fedmq_times = fedmq_round_times(url, workers, size_bytes // 4, rounds)
        raw_times = raw_round_times(url, workers, size_bytes, rounds, tuned=True)
        fedmq_s = statistics.median(fedmq_times[1:])
        raw_s = statistics.median(raw_times[1:])
        row.update(
            {
                "fedmq_round_s": round(fedmq_s, 4),
                "raw_round_s": round(raw_s, 4),
                "fedmq_over_raw": round(fedmq_s / raw_s, 3),
                "raw_vs_fedmq": ratio(raw_s, fedmq_s),
                "fedmq_all_rounds_s": [round(value, 4) for value in fedmq_times],
                "raw_all_rounds_s": [round(value, 4) for value in raw_times],
            }
        )
        if (workers, megabytes) == (10, 10) or quick:
            untuned = raw_round_times(url, workers, size_bytes, rounds, tuned=False)
            row["raw_untuned_round_s"] = round(statistics.median(untuned[1:]), 4)
        results.append(row)
    return {
        "reference": "raw pika: one persistent publish fanned out to N durable queues, N same-sized persistent replies to a quorum queue",
        "workers_are": "threads of one subprocess, each with its own connection; the coordinator runs in the benchmark process",
        "targets": {"fedmq_over_raw": "<= 1.3"},
        "results": results,
        "duration_s": round(time.monotonic() - started, 1),
    }
