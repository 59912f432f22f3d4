"""Tests of the worker's local round: downlink decoding, uplink encoding and error feedback across restarts."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from coordinator.downlink import encode_model_delta
from schemas import tensors as wire_tensors
from schemas.codecs import CodecSpec
from schemas.messages import RoundStart, Update, decode_message
from fedmq.tasks import PartitionSpec, load_task
from tests.tasks.helper_tasks import TinyTask
from worker.training import LocalOverrides, LocalTrainer, MissingBaseModelError

TASK = TinyTask(num_features=64)


def _trainer(state_dir: Path | None) -> LocalTrainer:
    data = TASK.load_local_data(0, 1, None)  # type: ignore[arg-type]
    return LocalTrainer(TASK, data, worker_id="w1", state_dir=state_dir, overrides=LocalOverrides())


def _global_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {name: tensor.detach().clone() for name, tensor in TASK.build_model().state_dict().items()}


def _start(round_number: int, state: dict[str, torch.Tensor], *, codec: str = "topk:fraction=0.05", run_id: str = "run") -> RoundStart:
    return RoundStart(
        run_id=run_id, round=round_number, attempt=0, model_version=round_number - 1, task=TASK.name,
        deadline_unix=time.time() + 60, config={"codec": codec, "lossless": "none", "seed": 3, "learning_rate": 0.5},
        weights=wire_tensors.encode_state(state),
    )


def _sent_deltas(body: bytes) -> dict[str, np.ndarray]:
    update = decode_message(body)
    assert isinstance(update, Update)
    return {name: np.array(wire_tensors.decode(tensor, name=name)) for name, tensor in update.deltas.items()}


# Error feedback


def test_topk_residual_is_what_was_not_sent(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    start_state = _global_state(1)
    body, _ = trainer.run_round(_start(1, start_state))

    sent = _sent_deltas(body)
    trained = trainer.model.state_dict()
    residuals = trainer.error_feedback.state()
    for name, value in start_state.items():
        full_delta = (trained[name] - value).numpy()
        np.testing.assert_allclose(sent[name] + residuals[name], full_delta, rtol=0, atol=1e-6)
        # top-k at 5% leaves most entries unsent.
        assert np.count_nonzero(sent[name]) <= max(1, int(np.ceil(0.05 * full_delta.size)))
    assert (tmp_path / "error_feedback.safetensors").exists()


def test_topk_residual_survives_restart(tmp_path: Path) -> None:
    continuous = _trainer(tmp_path / "continuous")
    continuous.run_round(_start(1, _global_state(1)))
    expected, _ = continuous.run_round(_start(2, _global_state(2)))

    before_restart = _trainer(tmp_path / "restarted")
    before_restart.run_round(_start(1, _global_state(1)))
    saved = before_restart.error_feedback.state()
    after_restart = _trainer(tmp_path / "restarted")
    loaded = after_restart.error_feedback.state()
    assert set(loaded) == set(saved)
    for name in saved:
        np.testing.assert_array_equal(loaded[name], saved[name])
    restarted, _ = after_restart.run_round(_start(2, _global_state(2)))

    forgetful = _trainer(None)
    forgetful.run_round(_start(1, _global_state(1)))
    forgetful = _trainer(None)
    without_residuals, _ = forgetful.run_round(_start(2, _global_state(2)))

    expected_deltas = _sent_deltas(expected)
    restarted_deltas = _sent_deltas(restarted)
    lost_deltas = _sent_deltas(without_residuals)
    for name in expected_deltas:
        np.testing.assert_array_equal(restarted_deltas[name], expected_deltas[name])
    assert any(not np.array_equal(lost_deltas[name], expected_deltas[name]) for name in expected_deltas)


# Downlink decoding


def test_delta_round_applies_to_held_model() -> None:
    trainer = _trainer(None)
    first = _global_state(1)
    trainer.run_round(_start(1, first, codec="float32"))
    assert trainer.held_version == 0

    second = _global_state(2)
    delta = encode_model_delta(second, first, CodecSpec("float32"), rng=np.random.default_rng(0))
    start = _start(2, second, codec="float32")
    start.weights, start.weights_kind, start.base_version = delta, "delta", 0
    assert trainer.holds_weights_for(start)
    rebuilt = trainer.decode_weights(start)
    for name, tensor in second.items():
        torch.testing.assert_close(rebuilt[name], tensor, rtol=0, atol=1e-6)


def test_delta_without_base_raises() -> None:
    trainer = _trainer(None)
    first = _global_state(1)
    delta = encode_model_delta(_global_state(2), first, CodecSpec("float32"), rng=np.random.default_rng(0))
    start = _start(2, first, codec="float32")
    start.weights, start.weights_kind, start.base_version = delta, "delta", 0

    assert not trainer.holds_weights_for(start)
    assert trainer.version_held_for("run") == -1
    with pytest.raises(MissingBaseModelError, match="needs the full model"):
        trainer.run_round(start)


def test_delta_of_other_run_needs_full_model() -> None:
    trainer = _trainer(None)
    first = _global_state(1)
    trainer.run_round(_start(1, first, codec="float32", run_id="old-run"))
    delta = encode_model_delta(_global_state(2), first, CodecSpec("float32"), rng=np.random.default_rng(0))
    start = _start(2, first, codec="float32", run_id="new-run")
    start.weights, start.weights_kind, start.base_version = delta, "delta", 0

    assert not trainer.holds_weights_for(start)
    assert trainer.version_held_for("new-run") == -1
    assert trainer.version_held_for("old-run") == 0


def test_full_model_replaces_held_model() -> None:
    trainer = _trainer(None)
    trainer.run_round(_start(1, _global_state(1), codec="float32"))
    replacement = _global_state(7)
    start = _start(1, replacement, codec="float32")

    state = trainer.decode_weights(start)
    for name, tensor in replacement.items():
        assert torch.equal(state[name], tensor)


# Floating buffers


@pytest.mark.parametrize(("codec", "buffer_codec"), [("topk_q8:fraction=0.01", "float16"), ("q4", "float16"), ("bfloat16", "bfloat16"), ("float32", "float32")])
def test_running_stats_travel_dense(codec: str, buffer_codec: str) -> None:
    task = load_task("mnist")
    trainer = LocalTrainer(task, task.load_local_data(0, 10, PartitionSpec()), worker_id="w1", state_dir=None, overrides=LocalOverrides())
    torch.manual_seed(0)
    state = {name: tensor.detach().clone() for name, tensor in task.build_model().state_dict().items()}
    start = RoundStart(
        run_id="run", round=1, attempt=0, model_version=0, task=task.name, deadline_unix=time.time() + 60,
        config={"codec": codec, "lossless": "none", "seed": 3, "max_steps": 2}, weights=wire_tensors.encode_state(state),
    )

    body, _ = trainer.run_round(start)
    update = decode_message(body)
    assert isinstance(update, Update)
    trained = trainer.model.state_dict()

    assert update.deltas["bn1.running_mean"].codec == buffer_codec
    assert update.deltas["bn1.running_var"].codec == buffer_codec
    assert update.deltas["conv1.weight"].codec == CodecSpec.parse(codec).name
    assert update.deltas["bn1.num_batches_tracked"].codec == wire_tensors.RAW
    # Every running-variance change arrives, so the mean of the workers' values stays positive.
    sent = wire_tensors.decode(update.deltas["bn1.running_var"], name="bn1.running_var")
    expected = (trained["bn1.running_var"] - state["bn1.running_var"]).numpy()
    np.testing.assert_allclose(sent, expected, rtol=1e-2, atol=1e-4)
    assert "bn1.running_var" not in trainer.error_feedback.state()
