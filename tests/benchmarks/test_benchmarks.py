"""The benchmark suite's pieces at their quick sizes, checked for correct results, never for speed."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import aggregation_bench, codecs_bench, compression_bench, report, rounds_bench, training_bench
from benchmarks.__main__ import run_suite
from coordinator.validation import expected_tensors
from fedmq.rabbitmq_node import RabbitMQNode
from fedmq.tasks import DigitsTask, PartitionSpec, TrainConfig, load_task
from schemas.codecs import CodecSpec


def test_make_state_has_requested_size() -> None:
    state = codecs_bench.make_state(100_000)
    total = sum(tensor.numel() for tensor in state.values())
    assert 90_000 <= total <= 100_000
    assert all(tensor.dtype == torch.float32 for tensor in state.values())


@pytest.mark.parametrize("codec", codecs_bench.CODEC_TEXTS)
def test_encode_decode_round_trip(codec: str) -> None:
    state = codecs_bench.make_state(20_000, seed=3)
    body = codecs_bench.encode_update(state, CodecSpec.parse(codec), np.random.default_rng(0))
    decoded = codecs_bench.decode_update_body(body, expected_tensors(state))

    assert set(decoded) == set(state)
    for name, tensor in state.items():
        assert decoded[name].shape == tuple(tensor.shape)
        if codec == "float32":
            np.testing.assert_array_equal(decoded[name], tensor.numpy())


def test_codecs_section_quick() -> None:
    section = codecs_bench.run(quick=True)
    rows = section["results"]
    assert len(rows) == len(codecs_bench.QUICK_SIZES) * len(codecs_bench.CODEC_TEXTS)
    for row in rows:
        assert row["encode_s"] > 0
        assert row["decode_s"] > 0
        assert row["copy_s"] > 0
        assert row["encode_vs_copy"] == pytest.approx(row["copy_s"] / row["encode_s"], abs=0.001)
    float32 = next(row for row in rows if row["codec"] == "float32")
    assert float32["bytes_per_param"] == pytest.approx(4.0, abs=0.05)


def test_streaming_memory_below_naive(tmp_path: Path) -> None:
    body_path = tmp_path / "update.bin"
    params = 2_000_000
    body_path.write_bytes(codecs_bench.encode_update(codecs_bench.make_state(params, seed=1), CodecSpec("float32"), np.random.default_rng(0)))
    rows = aggregation_bench._memory(params, 8, body_path)

    by_approach = {(row["approach"], row["allocator_tuned"]): row for row in rows}
    streaming = by_approach[("streaming", True)]
    naive = by_approach[("naive", True)]
    assert naive["peak_above_baseline_bytes"] > streaming["peak_above_baseline_bytes"] + 4 * streaming["model_bytes"]


def test_weighted_sum_speed_rows_are_consistent() -> None:
    row = aggregation_bench._speed(200_000, 3, repeats=1)
    assert row["updates"] == 3
    assert row["params"] > 0
    assert row["weighted_sum_vs_bound"] == pytest.approx(row["bound_s"] / row["weighted_sum_s"], abs=0.001)


def test_compression_simulation_counts_bytes() -> None:
    dense = compression_bench.simulate(DigitsTask(), compression_bench.PARTITIONS["iid"], "float32", 2)
    sparse = compression_bench.simulate(DigitsTask(), compression_bench.PARTITIONS["iid"], "topk_q8:fraction=0.01", 2)

    assert 0.0 <= dense["final_accuracy"] <= 1.0
    assert sparse["uplink_bytes_per_round"] * 10 < dense["uplink_bytes_per_round"]
    assert sparse["uplink_data_bytes_per_round"] < sparse["uplink_bytes_per_round"]
    # The downlink is the same codec for both runs: a full model, then float16 deltas.
    assert dense["downlink_bytes_per_round"] > 0


@pytest.mark.slow
def test_round_times_over_broker(make_rabbitmq: Callable[..., RabbitMQNode]) -> None:
    node = make_rabbitmq()
    fedmq_times = rounds_bench.fedmq_round_times(node.url, 2, 10_000, 2)
    raw_times = rounds_bench.raw_round_times(node.url, 2, 40_000, 2, tuned=True)

    assert len(fedmq_times) == 2
    assert len(raw_times) == 2
    assert all(value > 0 for value in fedmq_times + raw_times)


def test_report_renders_every_section(tmp_path: Path) -> None:
    results = run_suite(quick=True, sections=("codecs",), output_dir=tmp_path)
    written = json.loads((tmp_path / "benchmarks.json").read_text())
    page = (tmp_path / "benchmarks.md").read_text()

    assert written["sections"]["codecs"]["results"]
    assert "## codecs" in page
    assert results["machine"]["cpu_cores"] >= 1
    for component in ("torch", "numpy", "pika", "rabbitmq"):
        assert component in page
    assert report.render(results) == page


def test_plain_loop_matches_fedmq_training() -> None:
    task = load_task("digits")
    data = task.load_local_data(0, 4, PartitionSpec())
    torch.manual_seed(0)
    model = task.build_model()
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    config = TrainConfig(local_epochs=1, learning_rate=training_bench.LEARNING_RATE, batch_size=32, seed=3)

    result = task.train(model, data, config)
    trained = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    model.load_state_dict(initial)
    steps = training_bench.plain_loop(model, data.x_train, data.y_train, batch_size=32, seed=3)

    # The reference does the same work: same steps, same batch order, same weights.
    assert steps == result.num_steps
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, trained[name])


def test_training_section_quick() -> None:
    section = training_bench.run(quick=True)
    row = section["results"][0]

    assert row["task"] == "digits"
    assert row["steps"] == -(-row["samples"] // row["batch_size"])
    assert row["plain_s"] > 0
    assert row["fedmq_train_s"] > 0
    assert row["worker_round_s"] > 0
    page = report.render({"machine": {}, "mode": "quick", "started_unix": 0.0, "load_average_at_start": [0.0] * 3,
                          "load_average_at_end": [0.0] * 3, "duration_s": 1.0, "sections": {"training": section}})
    assert "## training" in page
