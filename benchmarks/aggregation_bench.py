"""Section ``aggregation``: the coordinator's streaming weighted sum, its speed and its memory.

Speed: N float32 updates are added into the FedAvg accumulator (``WeightedSum.add``),
and separately through the coordinator's whole per-update path (decode the message,
validate every value, take the norm, add). The reference is the plain in-place
multiply-add ``accumulator.add_(update, alpha=weight)`` over one flat tensor of the
same size, the bound for any streaming sum. Updates cycle through four distinct
buffers, so each one comes from memory, not from the cache.

Memory: a subprocess per approach receives N update messages one at a time, as new
bytes objects as pika delivers them. The streaming approach decodes each into views
and adds it to the accumulator. The naive approach keeps a copy of every decoded
update in a list and averages at the end. The figure is the peak RSS above the RSS
before the model existed, less the one message body the test harness keeps, divided
by the model's float32 size. It counts the global model itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.codecs_bench import decode_update_body, encode_update, make_state
from benchmarks.common import best_time_s, current_rss_bytes, peak_rss_bytes, ratio, run_python
from coordinator.aggregation import WeightedSum, apply_mean_delta
from coordinator.validation import expected_tensors, update_norm
from schemas.codecs import CodecSpec

FULL_PARAMS = 11_000_000
QUICK_PARAMS = 1_000_000
FULL_COUNTS = (10, 100)
QUICK_COUNTS = (10,)
DISTINCT_UPDATES = 4


def _speed(num_params: int, count: int, repeats: int) -> dict[str, Any]:
    template = make_state(num_params, seed=0)
    expected = expected_tensors(template)
    rng = np.random.default_rng(0)
    bodies = [encode_update(make_state(num_params, seed=seed + 1), CodecSpec("float32"), rng) for seed in range(DISTINCT_UPDATES)]
    decoded = [decode_update_body(body, expected) for body in bodies]
    flats = [torch.from_numpy(np.concatenate([array.reshape(-1) for array in update.values()])) for update in decoded]
    accumulator = torch.zeros_like(flats[0])

    def bound() -> None:
        for index in range(count):
            accumulator.add_(flats[index % DISTINCT_UPDATES], alpha=float(index + 1))

    def streaming_sum() -> None:
        total = WeightedSum(template)
        for index in range(count):
            total.add(decoded[index % DISTINCT_UPDATES], float(index + 1))

    def coordinator_path() -> None:
        total = WeightedSum(template)
        for index in range(count):
            values = decode_update_body(bodies[index % DISTINCT_UPDATES], expected)
            update_norm(values, expected)
            total.add(values, float(index + 1))

    bound_s = best_time_s(bound, repeats=repeats)
    sum_s = best_time_s(streaming_sum, repeats=repeats)
    path_s = best_time_s(coordinator_path, repeats=repeats)
    return {
        "params": int(flats[0].numel()),
        "updates": count,
        "bound_s": round(bound_s, 6),
        "weighted_sum_s": round(sum_s, 6),
        "coordinator_path_s": round(path_s, 6),
        "weighted_sum_vs_bound": ratio(bound_s, sum_s),
        "coordinator_path_vs_bound": ratio(bound_s, path_s),
    }


def _memory(num_params: int, count: int, body_path: Path) -> list[dict[str, Any]]:
    rows = []
    for approach, tuned in (("streaming", True), ("streaming", False), ("naive", True)):
        arguments = ["--approach", approach, "--params", str(num_params), "--updates", str(count), "--body", str(body_path)]
        if not tuned:
            arguments.append("--untuned")
        output = run_python("benchmarks.aggregation_bench", *arguments, timeout_s=600)
        row = json.loads(output.strip().splitlines()[-1])
        rows.append(row)
    return rows


def run(*, quick: bool) -> dict[str, Any]:
    started = time.monotonic()
    num_params = QUICK_PARAMS if quick else FULL_PARAMS
    counts = QUICK_COUNTS if quick else FULL_COUNTS
    repeats = 2 if quick else 3
    speed = [_speed(num_params, count, repeats) for count in counts]
    with tempfile.TemporaryDirectory(prefix="fedmq-bench-") as folder:
        # The update that every subprocess receives, encoded here so that encoding leaves
        # no freed buffers behind in the processes that measure memory.
        body_path = Path(folder) / "update.bin"
        body_path.write_bytes(encode_update(make_state(num_params, seed=1), CodecSpec("float32"), np.random.default_rng(0)))
        memory = [row for count in counts for row in _memory(num_params, count, body_path)]
    return {
        "reference": "torch add_(update, alpha=weight) over one flat float32 tensor of the model's size",
        "targets": {"weighted_sum_vs_bound": ">= 0.7", "streaming peak_over_model": "<= 3.0 for 100 updates"},
        "speed": speed,
        "memory": memory,
        "duration_s": round(time.monotonic() - started, 1),
    }


# Memory measurement, run in a subprocess per approach


def _measure_memory(approach: str, num_params: int, count: int, body_path: Path, tuned: bool) -> dict[str, Any]:
    if tuned:
        from fedmq.tuning import tune_allocator

        tune_allocator()
    # One small round first, so that lazily loaded code and first-use caches of numpy,
    # torch and msgpack are not counted as aggregation memory.
    small = make_state(10_000, seed=0)
    small_expected = expected_tensors(small)
    warmup = WeightedSum(small)
    warmup.add(decode_update_body(encode_update(small, CodecSpec("float32"), np.random.default_rng(0)), small_expected), 1.0)
    apply_mean_delta(small, warmup.mean(in_place=True))
    del small, warmup

    baseline = current_rss_bytes()
    template = make_state(num_params, seed=0)
    expected = expected_tensors(template)
    model_bytes = sum(tensor.numel() * 4 for tensor in template.values())
    # The update that arrives N times, read in one allocation. It is the test harness's
    # copy, not the coordinator's, and is subtracted below.
    body = body_path.read_bytes()

    if approach == "streaming":
        total = WeightedSum(template)
        for index in range(count):
            received = bytes(memoryview(body))  # a new body per message, as pika delivers it
            values = decode_update_body(received, expected)
            update_norm(values, expected)
            total.add(values, float(index + 1))
            del values, received
        # As FedAvg finishes a round: the accumulators become the mean, then the new model.
        mean = total.mean(in_place=True)
    else:
        kept: list[tuple[float, dict[str, torch.Tensor]]] = []
        for index in range(count):
            received = bytes(memoryview(body))
            values = decode_update_body(received, expected)
            kept.append((float(index + 1), {name: torch.tensor(array) for name, array in values.items()}))
            del values, received
        weight_total = sum(weight for weight, _ in kept)
        mean = {}
        for name, tensor in template.items():
            mean[name] = torch.zeros_like(tensor)
            for weight, update in kept:
                mean[name] += weight / weight_total * update[name]
    new_global = apply_mean_delta(template, mean)
    assert set(new_global) == set(template)

    peak = peak_rss_bytes()
    coordinator_bytes = peak - baseline - len(body)
    return {
        "approach": approach,
        "allocator_tuned": tuned,
        "params": num_params,
        "updates": count,
        "model_bytes": model_bytes,
        "peak_above_baseline_bytes": coordinator_bytes,
        "peak_over_model": round(coordinator_bytes / model_bytes, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure the coordinator's peak memory for one aggregation approach.")
    parser.add_argument("--approach", choices=("streaming", "naive"), required=True)
    parser.add_argument("--params", type=int, required=True)
    parser.add_argument("--updates", type=int, required=True)
    parser.add_argument("--body", type=Path, required=True, help="file with the encoded float32 update")
    parser.add_argument("--untuned", action="store_true", help="keep glibc's default malloc settings")
    args = parser.parse_args(argv)
    print(json.dumps(_measure_memory(args.approach, args.params, args.updates, args.body, not args.untuned)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
