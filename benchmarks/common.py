"""Timing, memory and machine helpers shared by the benchmark sections."""

from __future__ import annotations

import gc
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def best_time_s(action: Callable[[], object], *, repeats: int, warmup: int = 1) -> float:
    """Return the shortest wall time of ``repeats`` calls of ``action``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        action()
    best = float("inf")
    for _ in range(repeats):
        gc.collect()
        started = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - started)
    return best


def best_time_per_call_s(action: Callable[[], object], *, repeats: int, min_batch_s: float = 0.05) -> float:
    """Return the shortest mean wall time per call of ``action`` over ``repeats`` batches of back-to-back calls.

    A batch repeats the call until it lasts about ``min_batch_s``, as timeit does, so a
    call of well under a millisecond is timed against warm caches and not against the
    garbage collection and timer overhead around a single call.
    """
    started = time.perf_counter()
    action()
    single_s = max(time.perf_counter() - started, 1e-7)
    calls = max(1, math.ceil(min_batch_s / single_s))
    best = float("inf")
    for _ in range(repeats):
        gc.collect()
        started = time.perf_counter()
        for _ in range(calls):
            action()
        best = min(best, (time.perf_counter() - started) / calls)
    return best


def current_rss_bytes() -> int:
    """Return this process's resident set size from /proc/self/statm."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Return the peak resident set size of this process's memory since its exec (VmHWM).

    ``ru_maxrss`` would not do: Linux carries it over from the parent across fork and
    exec, so a subprocess of a large process starts with the parent's peak.
    """
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_python(module: str, *args: str, timeout_s: float, env: dict[str, str] | None = None) -> str:
    """Run ``python -m module args`` from the repository root and return its stdout.

    Raises RuntimeError with the tail of stderr when it fails or times out.
    """
    command = [sys.executable, "-m", module, *args]
    try:
        completed = subprocess.run(
            command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s, env={**os.environ, **(env or {})}, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{' '.join(command)} timed out after {timeout_s:.0f} s") from exc
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit status {completed.returncode}:\n{completed.stderr[-3000:]}")
    return completed.stdout


def machine_description() -> dict[str, Any]:
    """Return the CPU model, cores, memory and the versions of Python, torch, numpy, pika and RabbitMQ."""
    import numpy
    import pika
    import torch

    cpu_model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu_model": cpu_model,
        "cpu_cores": os.cpu_count(),
        "memory_gib": round(memory_bytes / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": numpy.__version__,
        "pika": pika.__version__,
        "glibc": platform.libc_ver()[1] or "unknown",
        "rabbitmq": rabbitmq_version(),
    }


def rabbitmq_version() -> str:
    """Return the installed RabbitMQ server version, read from its installation folder."""
    from fedmq.rabbitmq_node import rabbitmq_server_path

    server = rabbitmq_server_path()
    if server is None:
        return "not installed"
    for parent in [server.resolve().parent, *server.resolve().parents]:
        for candidate in parent.glob("rabbitmq_server-*"):
            return candidate.name.removeprefix("rabbitmq_server-")
        lib = parent / "lib" / "rabbitmq" / "lib"
        for candidate in lib.glob("rabbitmq_server-*") if lib.exists() else []:
            return candidate.name.removeprefix("rabbitmq_server-")
    return "unknown"


def ratio(reference_s: float, measured_s: float) -> float:
    """Return reference time over measured time: above 1 means faster than the reference."""
    return round(reference_s / measured_s, 3) if measured_s > 0 else float("inf")
