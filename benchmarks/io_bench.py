"""Section ``io``: what fedmq.tuning changes, each setting measured in a fresh subprocess.

- ``alloc``: copying a 100 MB buffer into a new bytes object, as every received or
  encoded message does, with glibc's default malloc settings and with
  ``tune_allocator``. The reference is the same copy into a buffer reused each time.
- ``consume``: one pika BlockingConnection consuming 10 MB messages that it first
  published to a queue of the same broker, with neither, one or both settings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from typing import Any

import numpy as np

from benchmarks.common import best_time_s, run_python

ALLOC_BYTES = 100_000_000


def _alloc(tuned: bool) -> dict[str, Any]:
    if tuned:
        from fedmq.tuning import tune_allocator

        tune_allocator()
    source = np.ones(ALLOC_BYTES, dtype=np.uint8)
    reused = np.zeros_like(source)
    fresh_s = best_time_s(lambda: source.tobytes(), repeats=8)
    reused_s = best_time_s(lambda: np.copyto(reused, source), repeats=8)
    return {
        "allocator_tuned": tuned,
        "fresh_copy_gb_s": round(ALLOC_BYTES / fresh_s / 1e9, 2),
        "reused_copy_gb_s": round(ALLOC_BYTES / reused_s / 1e9, 2),
    }


def _consume(url: str, tune_alloc: bool, tune_reads: bool, size_bytes: int, count: int) -> dict[str, Any]:
    import pika

    from fedmq.tuning import tune_allocator, tune_pika_reads

    if tune_alloc:
        tune_allocator()
    if tune_reads:
        tune_pika_reads()
    body = bytes(size_bytes)
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.confirm_delivery()
    queue_name = f"bench.io.{uuid.uuid4().hex[:8]}"
    channel.queue_declare(queue_name, auto_delete=False)
    for _ in range(count):
        channel.basic_publish("", queue_name, body)
    received = 0
    started = time.perf_counter()
    for method, _, _ in channel.consume(queue_name, auto_ack=True, inactivity_timeout=120):
        if method is None:
            raise RuntimeError(f"only {received} of {count} messages arrived within 120 s")
        received += 1
        if received == count:
            break
    elapsed = time.perf_counter() - started
    channel.cancel()
    channel.queue_delete(queue_name)
    connection.close()
    return {
        "allocator_tuned": tune_alloc,
        "pika_reads_tuned": tune_reads,
        "message_bytes": size_bytes,
        "messages": count,
        "consume_gb_s": round(size_bytes * count / elapsed / 1e9, 3),
    }


def run(*, quick: bool, url: str) -> dict[str, Any]:
    started = time.monotonic()
    alloc = [json.loads(run_python("benchmarks.io_bench", "alloc", *([] if tuned else ["--untuned"]), timeout_s=120)) for tuned in (False, True)]
    size, count = (4_000_000, 10) if quick else (10_000_000, 30)
    consume = []
    for tune_alloc, tune_reads in ((False, False), (False, True), (True, False), (True, True)):
        flags = ["--url", url, "--bytes", str(size), "--count", str(count)]
        flags += ["--tune-alloc"] if tune_alloc else []
        flags += ["--tune-reads"] if tune_reads else []
        consume.append(json.loads(run_python("benchmarks.io_bench", "consume", *flags, timeout_s=300)))
    return {"alloc": alloc, "consume": consume, "duration_s": round(time.monotonic() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure one I/O setting in this process.")
    parser.add_argument("what", choices=("alloc", "consume"))
    parser.add_argument("--untuned", action="store_true")
    parser.add_argument("--url")
    parser.add_argument("--bytes", type=int, default=10_000_000)
    parser.add_argument("--count", type=int, default=30)
    parser.add_argument("--tune-alloc", action="store_true")
    parser.add_argument("--tune-reads", action="store_true")
    args = parser.parse_args(argv)
    if args.what == "alloc":
        result = _alloc(not args.untuned)
    else:
        result = _consume(args.url, args.tune_alloc, args.tune_reads, args.bytes, args.count)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
