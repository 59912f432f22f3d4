"""Coordinator checkpoints: round trips of every dtype and the run state, crash recovery, corrupt files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from coordinator.checkpoint import (
    CHECKPOINT_DIR,
    MODEL_FILE,
    STATE_FILE,
    STRATEGY_FILE,
    Checkpoint,
    RunState,
    encode_torch_rng,
    load_checkpoint,
    restore_torch_rng,
    save_checkpoint,
)
from fedmq.errors import CheckpointError

_BIT_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _assert_bit_exact(expected: torch.Tensor, actual: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    if expected.dtype == torch.bool:
        assert torch.equal(actual, expected)
    else:
        width = _BIT_VIEWS[expected.element_size()]
        assert torch.equal(actual.view(width), expected.view(width))


def _model() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    model = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        name = str(dtype).removeprefix("torch.")
        model[f"{name}.weight"] = torch.randn(4, 3, generator=generator).to(dtype)
        model[f"{name}.scalar"] = torch.tensor(float("nan"), dtype=dtype)
        model[f"{name}.empty"] = torch.empty(0, 2, dtype=dtype)
    model["bn.num_batches_tracked"] = torch.tensor(2**40 + 3, dtype=torch.int64)
    model["int32"] = torch.tensor([-(2**31), 5], dtype=torch.int32)
    model["uint8"] = torch.tensor([0, 255], dtype=torch.uint8)
    model["bool"] = torch.tensor([[True, False], [False, True]])
    model["bool.scalar"] = torch.tensor(False)
    return model


def _state(**changes: object) -> RunState:
    rng = np.random.default_rng(11)
    rng.random(5)
    fields: dict[str, object] = {
        "run_id": "run-checkpoint",
        "task": "digits",
        "completed_rounds": 7,
        "model_version": 9,
        "finished": False,
        "numpy_rng_state": json.loads(json.dumps(rng.bit_generator.state, default=int)),
        "torch_rng_state_b64": encode_torch_rng(),
        "strategy_scalars": {"step": 7, "beta1": 0.9},
        "extra": {"workers": {"worker-1": {"worker_id": "worker-1", "last_seen_unix": 1.5, "num_samples": 10, "last_round": 7}}},
    }
    fields.update(changes)
    return RunState(**fields)  # type: ignore[arg-type]


def _checkpoint(completed_rounds: int = 7) -> Checkpoint:
    return Checkpoint(
        state=_state(completed_rounds=completed_rounds),
        model=_model(),
        strategy_tensors={"momentum.fc.weight": torch.full((4, 3), 0.25)},
    )


def test_round_trip_of_every_dtype_and_run_state(tmp_path: Path) -> None:
    checkpoint = _checkpoint()

    folder = save_checkpoint(tmp_path, checkpoint)
    loaded = load_checkpoint(tmp_path)

    assert folder == tmp_path / CHECKPOINT_DIR
    assert loaded is not None
    assert loaded.state == checkpoint.state
    assert sorted(loaded.model) == sorted(checkpoint.model)
    for name, tensor in checkpoint.model.items():
        _assert_bit_exact(tensor, loaded.model[name])
    assert torch.equal(loaded.strategy_tensors["momentum.fc.weight"], torch.full((4, 3), 0.25))


def test_rng_states_restore(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _checkpoint())
    expected_torch = torch.rand(3)
    rng = np.random.default_rng(11)
    rng.random(5)
    expected_numpy = rng.random(3)

    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    restore_torch_rng(loaded.state.torch_rng_state_b64)
    restored = np.random.default_rng()
    restored.bit_generator.state = loaded.state.numpy_rng_state

    assert torch.equal(torch.rand(3), expected_torch)
    assert np.array_equal(restored.random(3), expected_numpy)


def test_missing_checkpoint_returns_none(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path) is None


def test_no_pickle_in_checkpoint(tmp_path: Path) -> None:
    folder = save_checkpoint(tmp_path, _checkpoint())

    assert sorted(path.name for path in folder.iterdir()) == sorted([MODEL_FILE, STATE_FILE, STRATEGY_FILE])
    for path in folder.iterdir():
        assert not path.read_bytes().startswith(b"\x80"), path


def test_new_checkpoint_replaces_old(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _checkpoint(completed_rounds=1))
    save_checkpoint(tmp_path, _checkpoint(completed_rounds=2))

    loaded = load_checkpoint(tmp_path)

    assert loaded is not None
    assert loaded.state.completed_rounds == 2
    assert sorted(path.name for path in tmp_path.iterdir()) == [CHECKPOINT_DIR]


def test_crash_between_renames_recovers_old(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _checkpoint(completed_rounds=3))
    # A crash after renaming checkpoint/ to .checkpoint.old/ and before renaming the new one in.
    (tmp_path / CHECKPOINT_DIR).rename(tmp_path / f".{CHECKPOINT_DIR}.old")

    loaded = load_checkpoint(tmp_path)

    assert loaded is not None
    assert loaded.state.completed_rounds == 3
    assert (tmp_path / CHECKPOINT_DIR / STATE_FILE).is_file()
    assert not (tmp_path / f".{CHECKPOINT_DIR}.old").exists()


def test_crash_while_staging_keeps_current(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _checkpoint(completed_rounds=4))
    staging = tmp_path / f".{CHECKPOINT_DIR}.tmp"
    staging.mkdir()
    (staging / STATE_FILE).write_text("{\"run_id\": ")

    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    assert loaded.state.completed_rounds == 4

    save_checkpoint(tmp_path, _checkpoint(completed_rounds=5))
    assert not staging.exists()
    reloaded = load_checkpoint(tmp_path)
    assert reloaded is not None
    assert reloaded.state.completed_rounds == 5


def test_crash_before_old_removed_uses_new(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _checkpoint(completed_rounds=6))
    # A crash after the new folder was renamed in and before .checkpoint.old/ was removed.
    old = tmp_path / f".{CHECKPOINT_DIR}.old"
    shutil.copytree(tmp_path / CHECKPOINT_DIR, old)
    state = json.loads((old / STATE_FILE).read_text())
    (old / STATE_FILE).write_text(json.dumps({**state, "completed_rounds": 5}))

    loaded = load_checkpoint(tmp_path)

    assert loaded is not None
    assert loaded.state.completed_rounds == 6


@pytest.mark.parametrize(
    "content",
    ["{\"run_id\": \"run-1\", ", "[1, 2, 3]", "{\"run_id\": \"run-1\"}", "{\"unexpected\": 1}", "\udcff"],
    ids=["truncated", "list", "missing-keys", "unknown-key", "not-utf8"],
)
def test_corrupt_state_file_names_file(tmp_path: Path, content: str) -> None:
    folder = save_checkpoint(tmp_path, _checkpoint())
    state_path = folder / STATE_FILE
    state_path.write_bytes(content.encode("utf-8", errors="surrogateescape"))

    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(tmp_path)

    assert str(state_path) in str(caught.value)
    assert "start the run over" in str(caught.value)


@pytest.mark.parametrize("file_name", [MODEL_FILE, STRATEGY_FILE])
def test_corrupt_tensor_file_names_file(tmp_path: Path, file_name: str) -> None:
    folder = save_checkpoint(tmp_path, _checkpoint())
    path = folder / file_name
    path.write_bytes(path.read_bytes()[:40])

    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(tmp_path)

    assert str(path) in str(caught.value)


@pytest.mark.parametrize("file_name", [MODEL_FILE, STRATEGY_FILE, STATE_FILE])
def test_missing_file_names_file(tmp_path: Path, file_name: str) -> None:
    folder = save_checkpoint(tmp_path, _checkpoint())
    (folder / file_name).unlink()

    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(tmp_path)

    assert str(folder / file_name) in str(caught.value)
    assert "missing" in str(caught.value)
