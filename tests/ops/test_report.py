"""``fedmq report`` and ``fedmq export`` on run directories written by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fedmq.errors import ConfigError
from fedmq.export import export_model
from fedmq.report import build_report, round_bytes
from fedmq.rundir import read_records, write_final_model, write_settings
from fedmq.tasks import DigitsTask


def record(round_number: int, **overrides: Any) -> dict[str, Any]:
    base = {
        "round": round_number,
        "attempts": 1,
        "sent": 3,
        "accepted": 3,
        "samples": 900,
        "dropouts": [],
        "rejected": {},
        "failed": {},
        "eval": {"accuracy": 0.5 + round_number / 20, "loss": 1.0 / round_number},
        "train": {"accuracy": 0.6, "loss": 0.9},
        "duration_s": 1.25,
        "bytes_out_total": 1000 * round_number,
        "bytes_in_total": 300 * round_number,
    }
    return {**base, **overrides}


def write_run(run_dir: Path, records: list[dict[str, Any]]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(item) + "\n" for item in records))


def test_round_bytes_handle_restart() -> None:
    records = [
        record(1, bytes_out_total=1000, bytes_in_total=100),
        record(2, bytes_out_total=2500, bytes_in_total=300),
        record(3, bytes_out_total=700, bytes_in_total=50),
        record(4, bytes_out_total=1000, bytes_in_total=90),
    ]

    assert round_bytes(records) == [(1000, 100), (1500, 200), (700, 50), (300, 40)]


def test_report_writes_plots_and_page(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    write_run(run_dir, [record(1), record(2, dropouts=["w-3"], accepted=2, rejected={"wrong_shape": 1}), record(3)])
    write_settings(run_dir, {"task": "digits", "rounds": 3, "broker": {"url": "amqp://u:secret-pw@h/%2F"}}, service="coordinator", run_id="run-abc")

    page = build_report(run_dir)

    assert page == run_dir / "report" / "report.html"
    text = page.read_text(encoding="utf-8")
    for name in ("accuracy.png", "loss.png", "participation.png", "bytes.png"):
        assert (page.parent / name).stat().st_size > 0
        assert f'<img src="{name}"' in text
    assert "run-abc" in text
    assert "secret-pw" not in text
    assert text.count("<tr><td>") == 3


def test_report_keeps_last_record_of_repeated_round(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    write_run(run_dir, [record(1), record(2, accepted=1), record(2, accepted=3), record(3)])

    page = build_report(run_dir, tmp_path / "out")

    rows = [line for line in page.read_text(encoding="utf-8").splitlines() if line.startswith("<tr><td>")]
    assert [row.split("</td><td>")[0] for row in rows] == ["<tr><td>1", "<tr><td>2", "<tr><td>3"]
    assert "<td>3</td><td>3</td><td>900</td>" in rows[1]


def test_report_without_rounds_raises(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="has no completed rounds"):
        build_report(tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        build_report(tmp_path / "absent")


def test_read_records_skips_cut_line(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text(json.dumps(record(1)) + "\n" + json.dumps(record(2))[:20])

    assert [item["round"] for item in read_records(tmp_path)] == [1]


def test_export_unfinished_run_uses_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "run"
    model = DigitsTask(hidden_units=8).build_model()
    checkpoint = run_dir / "checkpoint"
    checkpoint.mkdir(parents=True)
    write_final_model(checkpoint, model.state_dict())
    (checkpoint / "final_model.safetensors").rename(checkpoint / "model.safetensors")
    (checkpoint / "state.json").write_text(json.dumps({"run_id": "run-x", "task": "digits", "completed_rounds": 2}))

    result = export_model(run_dir)

    assert not result.finished
    assert result.round == 2
    assert "has not finished" in caplog.text
    loaded = torch.load(result.state_dict_path, weights_only=True)
    fresh = DigitsTask(hidden_units=8).build_model()
    fresh.load_state_dict(loaded)
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name


def test_export_without_model_raises(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nothing to export"):
        export_model(tmp_path)
