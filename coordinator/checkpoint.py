"""Coordinator checkpoints: the global model, strategy state and run state, pickle-free.

A checkpoint is a folder ``checkpoint/`` in the run directory holding
``model.safetensors`` (the global state dict), ``strategy.safetensors`` (the server
optimizer's tensors, possibly empty) and ``state.json`` (round, model version, run id,
random states and strategy scalars). A new checkpoint is written to a temporary
folder and renamed over the old one, so a crash leaves either the old or the new
checkpoint, never a mix.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from fedmq.errors import CheckpointError

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
STRATEGY_FILE = "strategy.safetensors"


@dataclass
class RunState:
    """Everything besides tensors that a restarted coordinator needs to continue a run."""

    run_id: str
    task: str
    completed_rounds: int
    model_version: int
    finished: bool = False
    numpy_rng_state: dict[str, Any] = field(default_factory=dict)
    torch_rng_state_b64: str = ""
    strategy_scalars: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Checkpoint:
    state: RunState
    model: dict[str, torch.Tensor]
    strategy_tensors: dict[str, torch.Tensor]


def encode_torch_rng() -> str:
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii")


def restore_torch_rng(encoded: str) -> None:
    if encoded:
        raw = bytearray(base64.b64decode(encoded))
        torch.set_rng_state(torch.frombuffer(raw, dtype=torch.uint8).clone())


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write a checkpoint atomically and return its folder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / CHECKPOINT_DIR
    staging = run_dir / f".{CHECKPOINT_DIR}.tmp"
    old = run_dir / f".{CHECKPOINT_DIR}.old"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()

    safetensors.torch.save_file(_contiguous(checkpoint.model), str(staging / MODEL_FILE))
    safetensors.torch.save_file(_contiguous(checkpoint.strategy_tensors), str(staging / STRATEGY_FILE))
    state_path = staging / STATE_FILE
    state_path.write_text(json.dumps(asdict(checkpoint.state), indent=2, sort_keys=True))
    for path in staging.iterdir():
        _fsync(path)

    # Swap: the old checkpoint stays readable until the new one is in place.
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    _fsync(run_dir)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """Load the run directory's checkpoint, or return None when there is none.

    A checkpoint left half-swapped by a crash (only the ``.old`` folder present) is
    recovered from that folder. Raises CheckpointError when files are missing or corrupt.
    """
    final = run_dir / CHECKPOINT_DIR
    if not final.exists():
        old = run_dir / f".{CHECKPOINT_DIR}.old"
        if not old.exists():
            return None
        old.rename(final)
    state = _load_state(final / STATE_FILE)
    model = _load_tensors(final / MODEL_FILE)
    strategy_tensors = _load_tensors(final / STRATEGY_FILE)
    return Checkpoint(state=state, model=model, strategy_tensors=strategy_tensors)


def _load_state(path: Path) -> RunState:
    hint = f"remove {path.parent} to start the run over"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint file {path} is missing; {hint}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {path} is not valid JSON ({exc}); {hint}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint file {path} must hold a JSON object, but holds a {type(data).__name__}; {hint}")
    try:
        return RunState(**data)
    except TypeError as exc:
        raise CheckpointError(f"checkpoint file {path} does not hold a run state ({exc}); {hint}") from exc


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    hint = f"remove {path.parent} to start the run over"
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing; {hint}")
    try:
        return safetensors.torch.load_file(str(path))
    except (OSError, safetensors.SafetensorError) as exc:
        raise CheckpointError(f"checkpoint file {path} is not a valid safetensors file ({exc}); {hint}") from exc


def _contiguous(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
