"""The live progress view of a run: round r of R, updates against the quorum, time left, accuracy.

``RunMonitor`` reads two sources: the run directory's ``metrics.jsonl`` for completed
rounds, and the coordinator's metrics (its registry in the same process, or its
``/metrics`` endpoint from another process) for the round in progress. It hands both
to a view:

- ``RichProgress`` redraws a panel in place with rich, when the output is a terminal.
- ``PlainProgress`` prints one line per completed round, for logs and pipes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from fedmq.rundir import METRICS_FILE

PROGRESS_MODES = ("auto", "rich", "plain", "off")
# Completed rounds shown under the live panel.
RECENT_ROUNDS = 5


@dataclass(frozen=True)
class ProgressSnapshot:
    """The state of a run at one moment. Fields that are not known are None."""

    rounds_planned: int | None = None
    round: int | None = None
    rounds_completed: int = 0
    updates_received: int | None = None
    updates_target: int | None = None
    deadline_unix: float | None = None
    workers_known: int | None = None
    accuracy: float | None = None
    loss: float | None = None

    @classmethod
    def from_samples(cls, samples: Mapping[str, float], *, rounds_completed: int = 0) -> ProgressSnapshot:
        """Build a snapshot from coordinator metric samples (fedmq.metrics names)."""

        def known(name: str) -> float | None:
            value = samples.get(name)
            return None if value is None or math.isnan(value) else value

        def whole(name: str) -> int | None:
            value = known(name)
            return int(value) if value is not None else None

        deadline = known("fedmq_round_deadline_timestamp_seconds")
        return cls(
            rounds_planned=whole("fedmq_rounds_planned"),
            round=whole("fedmq_round"),
            rounds_completed=rounds_completed,
            updates_received=whole("fedmq_round_updates_received"),
            updates_target=whole("fedmq_round_updates_target"),
            deadline_unix=deadline if deadline else None,
            workers_known=whole("fedmq_workers_known"),
            accuracy=known("fedmq_eval_accuracy"),
            loss=known("fedmq_eval_loss"),
        )


class ProgressView(Protocol):
    def update(self, snapshot: ProgressSnapshot) -> None: ...

    def round_finished(self, record: Mapping[str, Any], rounds_planned: int | None) -> None: ...

    def close(self) -> None: ...


class PlainProgress:
    """One line per completed round: accuracy, loss, updates against the workers sent the round, dropouts, duration."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream

    def update(self, snapshot: ProgressSnapshot) -> None:
        """Plain output prints only completed rounds."""

    def round_finished(self, record: Mapping[str, Any], rounds_planned: int | None) -> None:
        print(format_round_line(record, rounds_planned), file=self.stream or sys.stdout, flush=True)

    def close(self) -> None:
        """Nothing to release."""


class RichProgress:
    """A panel redrawn in place: the round in progress and the last few completed rounds.

    While it runs, rich replaces ``sys.stdout`` and ``sys.stderr`` so that prints and
    log lines (through fedmq.logging_setup's handler) appear above the panel.
    """

    def __init__(self, console: Console | None = None, *, title: str = "fedmq") -> None:
        self.console = console or Console()
        self.title = title
        self.snapshot = ProgressSnapshot()
        self.recent: list[Mapping[str, Any]] = []
        self.rounds_planned: int | None = None
        self._lock = threading.Lock()
        self.live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False, redirect_stdout=True, redirect_stderr=True)
        self.live.start()

    def update(self, snapshot: ProgressSnapshot) -> None:
        with self._lock:
            self.snapshot = snapshot
            self.live.update(self._render())

    def round_finished(self, record: Mapping[str, Any], rounds_planned: int | None) -> None:
        with self._lock:
            self.recent = [*self.recent, record][-RECENT_ROUNDS:]
            self.rounds_planned = rounds_planned or self.rounds_planned
            self.live.update(self._render())

    def close(self) -> None:
        with self._lock:
            self.live.update(self._render())
        self.live.stop()

    def _render(self) -> Group:
        return render_snapshot(self.snapshot, self.recent, title=self.title, rounds_planned=self.rounds_planned)


def render_snapshot(
    snapshot: ProgressSnapshot,
    recent: list[Mapping[str, Any]],
    *,
    title: str = "fedmq",
    rounds_planned: int | None = None,
    now: float | None = None,
) -> Group:
    """Build the rich renderable of the live panel."""
    now = time.time() if now is None else now
    planned = snapshot.rounds_planned or rounds_planned
    completed = max(snapshot.rounds_completed, int(recent[-1]["round"]) if recent else 0)
    current = snapshot.round if snapshot.round is not None and snapshot.round > completed else None

    header = Text(title, style="bold")
    line = Text()
    if current is not None:
        line.append(f"round {current}/{planned or '?'}", style="bold cyan")
    else:
        line.append(f"completed {completed}/{planned or '?'} rounds", style="bold cyan")
    if current is not None and snapshot.updates_received is not None:
        target = snapshot.updates_target if snapshot.updates_target is not None else "?"
        line.append(f"  updates {snapshot.updates_received}/{target} (quorum)")
    if current is not None and snapshot.deadline_unix is not None:
        line.append(f"  deadline in {max(0.0, snapshot.deadline_unix - now):.0f} s")
    if snapshot.workers_known is not None:
        line.append(f"  workers {snapshot.workers_known}")
    if snapshot.accuracy is not None:
        line.append(f"  accuracy {snapshot.accuracy:.4f}", style="green")
    bar = Table.grid(padding=(0, 1))
    bar.add_row(
        ProgressBar(total=float(planned or 1), completed=float(min(completed, planned or completed)), width=40),
        Text(f"{completed}/{planned or '?'} rounds completed"),
    )

    table = Table(show_edge=False, box=None, pad_edge=False)
    for column in ("round", "accuracy", "loss", "updates", "dropouts", "duration"):
        table.add_column(column, justify="right")
    for record in recent:
        evaluation = record.get("eval", {})
        table.add_row(
            str(record["round"]),
            _number(evaluation.get("accuracy")),
            _number(evaluation.get("loss")),
            f"{record.get('accepted', '?')}/{record.get('sent', '?')}",
            str(len(record.get("dropouts", ()))),
            f"{float(record.get('duration_s', 0.0)):.2f} s",
        )
    return Group(header, line, bar, table)


def format_round_line(record: Mapping[str, Any], rounds_planned: int | None) -> str:
    evaluation = record.get("eval", {})
    return (
        f"round {record['round']:>3}/{rounds_planned or '?'}  accuracy {_number(evaluation.get('accuracy'))}  "
        f"loss {_number(evaluation.get('loss'))}  updates {record.get('accepted', '?')}/{record.get('sent', '?')}  "
        f"dropouts {len(record.get('dropouts', ()))}  {float(record.get('duration_s', 0.0)):.2f} s"
    )


def _number(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{float(value):.4f}"


def open_progress(mode: str, *, stream: TextIO | None = None, title: str = "fedmq") -> ProgressView | None:
    """Return the view for ``mode``: rich on a terminal for ``auto``, plain lines otherwise, None for ``off``."""
    if mode not in PROGRESS_MODES:
        raise ValueError(f"progress mode must be one of {', '.join(PROGRESS_MODES)}, but got {mode!r}")
    if mode == "off":
        return None
    stream = stream or sys.stdout
    if mode == "rich" or (mode == "auto" and stream.isatty()):
        return RichProgress(Console(file=stream, force_terminal=mode == "rich" or None), title=title)
    return PlainProgress(stream)


class RunMonitor:
    """A poller that feeds a view from a run directory's completed rounds and a live metrics source.

    ``live_samples`` returns the coordinator's metric samples, or None while they are
    unavailable. The view then shows the completed rounds only. Call ``poll``
    periodically, or ``start`` a thread that does.
    """

    def __init__(
        self,
        view: ProgressView,
        run_dir: Path,
        live_samples: Callable[[], Mapping[str, float] | None],
        *,
        rounds_planned: int | None = None,
        interval_s: float = 0.25,
    ) -> None:
        self.view = view
        self.metrics_path = run_dir / METRICS_FILE
        self.live_samples = live_samples
        self.rounds_planned = rounds_planned
        self.interval_s = interval_s
        self.rounds_completed = 0
        self._offset = 0
        self._pending = b""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def skip_existing(self) -> None:
        """Start after the rounds already in metrics.jsonl, as a resumed run does."""
        if self.metrics_path.exists():
            self._offset = self.metrics_path.stat().st_size
            self.rounds_completed = sum(1 for line in self.metrics_path.read_bytes().splitlines() if line.strip())

    def poll(self) -> None:
        for record in self._new_records():
            self.rounds_completed = max(self.rounds_completed, int(record["round"]))
            self.view.round_finished(record, self.rounds_planned)
        samples = self.live_samples()
        snapshot = ProgressSnapshot.from_samples(samples or {}, rounds_completed=self.rounds_completed)
        if snapshot.rounds_planned is not None:
            self.rounds_planned = snapshot.rounds_planned
        else:
            snapshot = dataclasses.replace(snapshot, rounds_planned=self.rounds_planned)
        self.view.update(snapshot)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fedmq-progress", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the polling thread after one last poll, then close the view."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self.poll()
        self.view.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def _new_records(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        with self.metrics_path.open("rb") as file:
            file.seek(self._offset)
            data = file.read()
        self._offset += len(data)
        data = self._pending + data
        # A line without its newline is still being written, so it waits for the next poll.
        complete, _, self._pending = data.rpartition(b"\n")
        records = []
        for line in complete.splitlines():
            if line.strip():
                record = json.loads(line)
                if isinstance(record, dict) and "round" in record:
                    records.append(record)
        return records
