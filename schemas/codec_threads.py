"""Runs codec kernels over chunks of one tensor on a small thread pool that all callers share.

The kernels in ``schemas.codec_kernels`` release the interpreter lock, so chunks of one
tensor run in parallel. The calling thread works on the first chunk itself and waits
for the others, which the pool's threads run. Pool threads never wait on the pool, so
any number of threads may call the codecs at once: the worker service encodes on its
training thread, and ``benchmarks.round_workers`` runs many workers as threads of one
process. Calls from several threads share the pool's threads and queue behind each
other, and none of them blocks the others for longer than its chunks take.

No kernel uses numba's own parallel loops (``parallel=True``), whose default threading
layer aborts the process when two threads run such loops at once.

A child process made by ``fork`` starts a new pool of its own on first use.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TypeVar

Result = TypeVar("Result")

# Threads that work on one call, the caller included. Memory bandwidth, not arithmetic,
# bounds most kernels, and a few cores already reach it.
MAX_THREADS = 4
# Values per chunk at least: handing a chunk to another thread costs tens of
# microseconds, so tensors below twice this many run on the calling thread alone.
MIN_PARALLEL_VALUES = 1 << 20

_threads: int | None = None
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def thread_count() -> int:
    """Return how many threads work on one large call: the usable cores, at most MAX_THREADS.

    The count is taken once per process (and again in a forked child).
    """
    global _threads
    if _threads is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not available on macOS
            cores = os.cpu_count() or 1
        _threads = max(1, min(MAX_THREADS, cores))
    return _threads


def chunk_bounds(count: int, *, align: int = 1, min_values: int = MIN_PARALLEL_VALUES) -> list[tuple[int, int]]:
    """Split ``range(count)`` into contiguous ``(start, stop)`` chunks, one per thread.

    Every start is a multiple of ``align``, and every chunk but the last has at least
    ``min_values`` values. Fewer than twice that, or one usable thread, give one chunk.
    """
    threads = min(thread_count(), count // max(1, min_values))
    if threads <= 1:
        return [(0, count)]
    size = -(-count // threads)
    size = -(-size // align) * align
    return [(start, min(count, start + size)) for start in range(0, count, size)]


def run_chunks(tasks: Sequence[Callable[[], Result]]) -> list[Result]:
    """Run every task, one per chunk, and return their results in order.

    The first task runs on the calling thread and the rest on the shared pool. When a
    task raises, the call still waits for every other task before raising, so no
    kernel is left writing into arrays that the caller no longer expects to change.
    """
    if len(tasks) == 1:
        return [tasks[0]()]

    pool = _shared_pool()
    futures: list[Future[Result]] = [pool.submit(task) for task in tasks[1:]]
    try:
        first = tasks[0]()
    finally:
        wait(futures)
    return [first, *(future.result() for future in futures)]


def _shared_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, thread_count() - 1), thread_name_prefix="fedmq-codec")
        return _pool


def _forget_pool_after_fork() -> None:
    # The pool's threads do not exist in a forked child, so the child makes its own pool.
    global _threads, _pool, _pool_lock
    _threads = None
    _pool = None
    _pool_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_after_fork)
