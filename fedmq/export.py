"""``fedmq export RUN_DIR``: the run's global model as safetensors and as a PyTorch state dict file.

The model comes from ``final_model.safetensors``, which the coordinator writes after
the last round. A run that has not finished yet is exported from its latest
checkpoint, with a warning. The output folder (default RUN_DIR/export) gets:

- ``model.safetensors``: the state dict, with the run id, task and round as metadata.
- ``model.pt``: the same state dict saved with ``torch.save``; it contains only
  tensors, so ``torch.load(path, weights_only=True)`` accepts it.
- ``model.json``: run id, task, round, the source file and the last test metrics.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from fedmq.errors import CheckpointError, ConfigError
from fedmq.rundir import CHECKPOINT_DIR, CHECKPOINT_MODEL_FILE, FINAL_MODEL_FILE, read_records, read_run_state

logger = logging.getLogger(__name__)

EXPORT_DIR = "export"
SAFETENSORS_FILE = "model.safetensors"
STATE_DICT_FILE = "model.pt"
METADATA_FILE = "model.json"


@dataclass(frozen=True)
class ExportResult:
    """The files written and what they contain."""

    safetensors_path: Path
    state_dict_path: Path
    metadata_path: Path
    source: Path
    run_id: str
    task: str
    round: int
    finished: bool


def export_model(run_dir: Path, out_dir: Path | None = None) -> ExportResult:
    """Write the run's global model into ``out_dir`` (default RUN_DIR/export) in both formats.

    Raises ConfigError when ``run_dir`` contains neither a final model nor a checkpoint,
    and CheckpointError when the model file cannot be read.
    """
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} not found; pass the --run-dir of a coordinator run")
    state = read_run_state(run_dir) or {}
    source = run_dir / FINAL_MODEL_FILE
    finished = source.exists()
    if not finished:
        source = run_dir / CHECKPOINT_DIR / CHECKPOINT_MODEL_FILE
        if not source.exists():
            raise ConfigError(f"run directory {run_dir} has neither {FINAL_MODEL_FILE} nor a checkpoint; nothing to export")
        logger.warning(
            "run directory %s has no %s because the run has not finished; exporting the checkpoint after round %s",
            run_dir, FINAL_MODEL_FILE, state.get("completed_rounds", "?"),
        )

    try:
        tensors = safetensors.torch.load_file(str(source))
    except (OSError, safetensors.SafetensorError) as exc:
        raise CheckpointError(f"cannot read the model in {source}: {exc}") from exc

    run_id = str(state.get("run_id", ""))
    task = str(state.get("task", ""))
    round_number = int(state.get("completed_rounds", 0))
    out_dir = out_dir if out_dir is not None else run_dir / EXPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)

    # Both formats hold the same tensors, contiguous and on the CPU.
    state_dict = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    metadata = {"run_id": run_id, "task": task, "round": str(round_number), "format": "pytorch state dict"}
    safetensors_path = out_dir / SAFETENSORS_FILE
    safetensors.torch.save_file(state_dict, str(safetensors_path), metadata=metadata)
    state_dict_path = out_dir / STATE_DICT_FILE
    torch.save(state_dict, state_dict_path)

    result = ExportResult(safetensors_path, state_dict_path, out_dir / METADATA_FILE, source, run_id, task, round_number, finished)
    result.metadata_path.write_text(json.dumps(_metadata(result, run_dir), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    logger.info("exported the model of run %s after round %d to %s", run_id or "?", round_number, out_dir)
    return result


def _metadata(result: ExportResult, run_dir: Path) -> dict[str, Any]:
    records = read_records(run_dir)
    evaluation = records[-1].get("eval", {}) if records else {}
    data = {key: str(value) if isinstance(value, Path) else value for key, value in asdict(result).items()}
    data["eval"] = evaluation
    return data
