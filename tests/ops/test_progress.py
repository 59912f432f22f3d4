"""The progress view: what it shows, and how it follows a run directory."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console

from fedmq.progress import PlainProgress, ProgressSnapshot, RichProgress, RunMonitor, format_round_line, open_progress, render_snapshot

RECORD = {"round": 2, "eval": {"accuracy": 0.875, "loss": 0.42}, "accepted": 3, "sent": 4, "dropouts": ["w-4"], "duration_s": 1.5}


class RecordingView:
    def __init__(self) -> None:
        self.snapshots: list[ProgressSnapshot] = []
        self.records: list[Mapping[str, Any]] = []
        self.closed = False

    def update(self, snapshot: ProgressSnapshot) -> None:
        self.snapshots.append(snapshot)

    def round_finished(self, record: Mapping[str, Any], rounds_planned: int | None) -> None:
        self.records.append(record)

    def close(self) -> None:
        self.closed = True


def rendered(snapshot: ProgressSnapshot, recent: list[Mapping[str, Any]], now: float) -> str:
    console = Console(file=io.StringIO(), width=120, force_terminal=False, color_system=None)
    console.print(render_snapshot(snapshot, recent, title="fedmq run run-1", now=now))
    output = console.file
    assert isinstance(output, io.StringIO)
    return output.getvalue()


def test_snapshot_from_samples() -> None:
    samples = {
        "fedmq_rounds_planned": 10.0,
        "fedmq_round": 3.0,
        "fedmq_round_updates_received": 2.0,
        "fedmq_round_updates_target": 4.0,
        "fedmq_round_deadline_timestamp_seconds": 1030.0,
        "fedmq_workers_known": 5.0,
        "fedmq_eval_accuracy": math.nan,
    }

    snapshot = ProgressSnapshot.from_samples(samples, rounds_completed=2)

    assert snapshot == ProgressSnapshot(
        rounds_planned=10, round=3, rounds_completed=2, updates_received=2, updates_target=4, deadline_unix=1030.0, workers_known=5
    )


def test_panel_shows_round_quorum_deadline_accuracy() -> None:
    snapshot = ProgressSnapshot(
        rounds_planned=10, round=3, rounds_completed=2, updates_received=2, updates_target=4, deadline_unix=1030.0, accuracy=0.875
    )

    text = rendered(snapshot, [RECORD], now=1000.0)

    assert "fedmq run run-1" in text
    assert "round 3/10" in text
    assert "updates 2/4 (quorum)" in text
    assert "deadline in 30 s" in text
    assert "accuracy 0.8750" in text
    assert "0.4200" in text


def test_panel_between_rounds_shows_completed() -> None:
    snapshot = ProgressSnapshot(rounds_planned=5, round=2, rounds_completed=2)

    text = rendered(snapshot, [RECORD], now=0.0)

    assert "completed 2/5 rounds" in text
    assert "2/5 rounds completed" in text
    assert "updates" not in text.splitlines()[1]


def test_plain_line_per_round() -> None:
    stream = io.StringIO()
    view = PlainProgress(stream)

    view.update(ProgressSnapshot(round=3))
    view.round_finished(RECORD, 10)

    assert stream.getvalue() == format_round_line(RECORD, 10) + "\n"
    assert stream.getvalue().startswith("round   2/10  accuracy 0.8750  loss 0.4200  updates 3/4  dropouts 1  1.50 s")


def test_auto_mode_without_terminal_is_plain() -> None:
    assert isinstance(open_progress("auto", stream=io.StringIO()), PlainProgress)
    assert open_progress("off", stream=io.StringIO()) is None


def test_rich_view_draws_and_closes() -> None:
    stream = io.StringIO()
    view = open_progress("rich", stream=stream, title="fedmq run run-1")
    assert isinstance(view, RichProgress)

    view.update(ProgressSnapshot(rounds_planned=4, round=1, updates_received=1, updates_target=2))
    view.round_finished(RECORD, 4)
    view.close()

    assert "fedmq run run-1" in stream.getvalue()
    assert "0.8750" in stream.getvalue()


def test_monitor_reads_new_complete_lines(tmp_path: Path) -> None:
    view = RecordingView()
    samples = {"fedmq_rounds_planned": 4.0, "fedmq_round": 2.0}
    monitor = RunMonitor(view, tmp_path, lambda: samples)
    metrics = tmp_path / "metrics.jsonl"

    metrics.write_text(json.dumps({**RECORD, "round": 1}) + "\n" + json.dumps(RECORD)[:10])
    monitor.poll()
    assert [record["round"] for record in view.records] == [1]

    with metrics.open("a") as file:
        file.write(json.dumps(RECORD)[10:] + "\n")
    monitor.poll()
    assert [record["round"] for record in view.records] == [1, 2]
    assert view.snapshots[-1].rounds_completed == 2
    assert monitor.rounds_planned == 4


def test_monitor_skips_existing_rounds(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text(json.dumps({**RECORD, "round": 1}) + "\n" + json.dumps(RECORD) + "\n")
    view = RecordingView()
    monitor = RunMonitor(view, tmp_path, lambda: None)

    monitor.skip_existing()
    monitor.poll()

    assert view.records == []
    assert view.snapshots == [ProgressSnapshot(rounds_completed=2)]
    assert monitor.rounds_completed == 2


def test_monitor_fills_planned_rounds(tmp_path: Path) -> None:
    view = RecordingView()
    monitor = RunMonitor(view, tmp_path, lambda: {"fedmq_round": 1.0}, rounds_planned=7)

    monitor.poll()

    assert view.snapshots[-1].rounds_planned == 7
    assert view.snapshots[-1].round == 1


def test_monitor_thread_stops_and_closes_view(tmp_path: Path) -> None:
    view = RecordingView()
    monitor = RunMonitor(view, tmp_path, lambda: {"fedmq_round": 1.0}, interval_s=0.01)

    monitor.start()
    monitor.stop()

    assert view.closed
    assert view.snapshots
