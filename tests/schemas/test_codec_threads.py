"""Chunking over the codec threads: bounds, ordering, errors, and codecs called from many threads at once."""

from __future__ import annotations

import multiprocessing
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from schemas import codec_threads
from schemas.codec_threads import chunk_bounds, run_chunks
from schemas.codecs import CODEC_NAMES, CodecSpec, EncodedTensor, decode, encode

# Large enough to be split over the codec threads.
LARGE = 2 * codec_threads.MIN_PARALLEL_VALUES + 12_345


@pytest.fixture
def four_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Split calls four ways even on a machine with fewer cores."""
    monkeypatch.setattr(codec_threads, "_threads", 4)


@pytest.mark.parametrize("count", [0, 1, 1000, 2**20, 2**21 - 1, 2**21, 5 * 2**20 + 17])
@pytest.mark.parametrize("align", [1, 64, 65536])
def test_chunk_bounds_cover_range_aligned(four_threads: None, count: int, align: int) -> None:
    bounds = chunk_bounds(count, align=align)

    assert bounds[0][0] == 0
    assert bounds[-1][1] == count
    for (_, stop), (start, _) in zip(bounds, bounds[1:]):
        assert stop == start
    assert all(start % align == 0 for start, _ in bounds)
    assert all(stop > start for start, stop in bounds) or count == 0
    assert len(bounds) <= 4
    assert all(stop - start >= codec_threads.MIN_PARALLEL_VALUES for start, stop in bounds[:-1])


def test_chunk_bounds_single_chunk_when_small(four_threads: None) -> None:
    assert chunk_bounds(2 * codec_threads.MIN_PARALLEL_VALUES - 1) == [(0, 2 * codec_threads.MIN_PARALLEL_VALUES - 1)]


def test_run_chunks_returns_results_in_order(four_threads: None) -> None:
    def task(value: int) -> int:
        time.sleep(0.01 * (4 - value))
        return value

    assert run_chunks([lambda value=value: task(value) for value in range(4)]) == [0, 1, 2, 3]


def test_run_chunks_waits_for_every_task_before_raising(four_threads: None) -> None:
    finished: list[int] = []

    def slow() -> None:
        time.sleep(0.2)
        finished.append(1)

    def failing() -> None:
        raise ValueError("chunk failed")

    with pytest.raises(ValueError, match="chunk failed"):
        run_chunks([failing, slow, slow])

    assert finished == [1, 1]


def _encode_all(values: np.ndarray, seed: int) -> dict[str, EncodedTensor]:
    rng = np.random.default_rng(seed)
    return {name: encode(values, CodecSpec(name, block_size=64, topk_fraction=0.01), rng=rng) for name in CODEC_NAMES}


def _assert_same(first: dict[str, EncodedTensor], second: dict[str, EncodedTensor]) -> None:
    for name in CODEC_NAMES:
        for part, array in first[name].arrays.items():
            np.testing.assert_array_equal(array, second[name].arrays[part], err_msg=f"{name}.{part}")


def test_result_independent_of_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    values = np.random.default_rng(0).standard_normal(LARGE).astype(np.float32)
    monkeypatch.setattr(codec_threads, "_threads", 1)
    single = _encode_all(values, seed=1)

    monkeypatch.setattr(codec_threads, "_threads", 4)
    split = _encode_all(values, seed=1)

    _assert_same(single, split)
    for name, encoded in split.items():
        np.testing.assert_array_equal(
            decode(encoded.codec, encoded.params, encoded.shape, encoded.arrays),
            decode(single[name].codec, single[name].params, single[name].shape, single[name].arrays),
        )


def test_codecs_called_from_many_threads(four_threads: None) -> None:
    rng = np.random.default_rng(2)
    inputs = [rng.standard_normal(size).astype(np.float32) for size in (LARGE, 300_001, 4099, 17, LARGE + 64)]
    expected = [_encode_all(values, seed=index) for index, values in enumerate(inputs)]
    expected_decoded = [
        {name: decode(e.codec, e.params, e.shape, e.arrays) for name, e in encoded.items()} for encoded in expected
    ]
    start = threading.Barrier(8)

    def work(worker: int) -> None:
        start.wait()
        for round_index in range(3):
            index = (worker + round_index) % len(inputs)
            encoded = _encode_all(inputs[index], seed=index)
            _assert_same(expected[index], encoded)
            for name, tensor in encoded.items():
                decoded = decode(tensor.codec, tensor.params, tensor.shape, tensor.arrays)
                np.testing.assert_array_equal(decoded, expected_decoded[index][name])

    with ThreadPoolExecutor(max_workers=8) as workers:
        for future in [workers.submit(work, worker) for worker in range(8)]:
            future.result(timeout=300)


def _encode_in_child(queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    # The fork handler forgot the thread count and the parent's pool; force a split again.
    assert codec_threads._pool is None
    codec_threads._threads = 4
    values = np.random.default_rng(3).standard_normal(LARGE).astype(np.float32)
    encoded = encode(values, CodecSpec("q8"), rng=np.random.default_rng(4))
    queue.put(encoded.arrays["codes"].tobytes())


# Python 3.12 warns that forking a process with threads may deadlock; the pool's idle
# threads hold no lock that the child needs.
@pytest.mark.filterwarnings("ignore:.*multi-threaded.*fork:DeprecationWarning")
def test_forked_child_runs_parallel_chunks(four_threads: None) -> None:
    values = np.random.default_rng(3).standard_normal(LARGE).astype(np.float32)
    expected = encode(values, CodecSpec("q8"), rng=np.random.default_rng(4)).arrays["codes"].tobytes()
    context = multiprocessing.get_context("fork")
    queue = context.Queue()

    child = context.Process(target=_encode_in_child, args=(queue,))
    child.start()
    try:
        assert queue.get(timeout=120) == expected
    finally:
        child.join(timeout=60)
    assert child.exitcode == 0
