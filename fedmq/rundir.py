"""The files of a run directory, and how to write and read them.

One coordinator run keeps everything in one folder:

- ``settings.json``: the effective settings of the latest start, secrets redacted.
- ``metrics.jsonl``: one JSON object per completed round.
- ``checkpoint/``: the latest checkpoint (coordinator.checkpoint), whose
  ``state.json`` also contains the worker registry under ``extra.workers``.
- ``final_model.safetensors``: the global model after the last round.
- ``report/`` and ``export/``: written by ``fedmq report`` and ``fedmq export``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from fedmq.config import redact_value

logger = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"
METRICS_FILE = "metrics.jsonl"
FINAL_MODEL_FILE = "final_model.safetensors"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_STATE_FILE = "state.json"
CHECKPOINT_MODEL_FILE = "model.safetensors"


def settings_record(settings: Any) -> dict[str, Any]:
    """Return a dataclass of settings as JSON-ready data, with secrets and URL passwords redacted."""
    data = dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) and not isinstance(settings, type) else dict(settings)
    redacted = redact_value("settings", data)
    return json.loads(json.dumps(redacted, default=str))


def write_settings(run_dir: Path, settings: Any, *, service: str, run_id: str) -> Path:
    """Write ``settings.json`` for the service's latest start, replacing the previous file atomically."""
    document = {
        "service": service,
        "run_id": run_id,
        "written_unix": time.time(),
        "settings": settings_record(settings),
    }
    path = run_dir / SETTINGS_FILE
    _write_atomic(path, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return path


def write_final_model(run_dir: Path, state: Mapping[str, torch.Tensor], *, metadata: Mapping[str, str] | None = None) -> Path:
    """Write the final global model as ``final_model.safetensors``, atomically."""
    path = run_dir / FINAL_MODEL_FILE
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}
    data = safetensors.torch.save(tensors, metadata=dict(metadata) if metadata else None)
    _write_atomic(path, data)
    return path


def read_settings(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / SETTINGS_FILE
    if not path.exists():
        return None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        logger.warning("%s is not valid JSON (%s); ignoring it", path, exc)
        return None
    return document if isinstance(document, dict) else None


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """Return the per-round records of ``metrics.jsonl``, oldest first.

    A line that is not valid JSON, such as a last line cut short by a crash, is
    skipped with a warning.
    """
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s line %d is not valid JSON; skipping it", path, number)
            continue
        if isinstance(record, dict) and isinstance(record.get("round"), int):
            records.append(record)
    return records


def read_run_state(run_dir: Path) -> dict[str, Any] | None:
    """Return the checkpoint's ``state.json`` as a dict, or None when the run has no checkpoint."""
    path = run_dir / CHECKPOINT_DIR / CHECKPOINT_STATE_FILE
    if not path.exists():
        return None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        logger.warning("%s is not valid JSON (%s); ignoring it", path, exc)
        return None
    return document if isinstance(document, dict) else None


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
