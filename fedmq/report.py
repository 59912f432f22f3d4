"""``fedmq report RUN_DIR``: PNG plots of a run and one HTML page that shows them.

The plots come from the run directory's ``metrics.jsonl``:

- ``accuracy.png`` and ``loss.png``: the global model on the held-out set after each
  round, with the workers' mean local training value for comparison.
- ``participation.png``: per round, the workers sent the round, the updates
  accepted, the dropouts, and the updates rejected or failed.
- ``bytes.png``: per round, MiB the coordinator sent and received.

``report.html`` shows the plots, a summary, a table of every round and the run's
settings. It references the PNG files by relative path, so the folder can be moved
or served as a whole.
"""

from __future__ import annotations

import html
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from fedmq.errors import ConfigError
from fedmq.rundir import METRICS_FILE, read_records, read_run_state, read_settings

logger = logging.getLogger(__name__)

REPORT_DIR = "report"
REPORT_FILE = "report.html"
MIB = 1024 * 1024
_FIGURE_SIZE_IN = (7.0, 3.6)
_DPI = 110


@dataclass(frozen=True)
class Plot:
    file_name: str
    title: str
    description: str


PLOTS = (
    Plot("accuracy.png", "Accuracy per round", "Accuracy of the global model on the held-out test set, and the workers' mean local training accuracy."),
    Plot("loss.png", "Loss per round", "Cross-entropy of the global model on the held-out test set, and the workers' mean local training loss."),
    Plot("participation.png", "Participation per round", "Workers sent each round, updates accepted, workers that dropped out, and updates rejected or failed."),
    Plot("bytes.png", "Bytes per round", "Message body MiB the coordinator sent (round starts) and received (updates) in each round."),
)


def build_report(run_dir: Path, out_dir: Path | None = None) -> Path:
    """Draw the plots and write ``report.html`` into ``out_dir`` (default RUN_DIR/report). Return the page's path.

    Raises ConfigError when ``run_dir`` is not a folder or has no completed round.
    """
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} not found; pass the --run-dir of a coordinator run")
    records = read_records(run_dir)
    if not records:
        raise ConfigError(f"run directory {run_dir} has no completed rounds in {METRICS_FILE}; run at least one round first")
    records = _latest_per_round(records)
    out_dir = out_dir if out_dir is not None else run_dir / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)

    rounds = [int(record["round"]) for record in records]
    _plot_metric(out_dir / "accuracy.png", rounds, records, "accuracy", "accuracy")
    _plot_metric(out_dir / "loss.png", rounds, records, "loss", "loss")
    _plot_participation(out_dir / "participation.png", rounds, records)
    _plot_bytes(out_dir / "bytes.png", rounds, round_bytes(records))

    page = out_dir / REPORT_FILE
    page.write_text(_render_html(run_dir, records), encoding="utf-8")
    logger.info("wrote %s with %d plots for %d rounds", page, len(PLOTS), len(records))
    return page


def round_bytes(records: Sequence[Mapping[str, Any]]) -> list[tuple[float, float]]:
    """Return (bytes sent, bytes received) of each round from the records' running totals.

    The totals count from the start of each coordinator process, so a total that
    drops marks a restart, and that round's bytes are the new process's total.
    """
    result = []
    previous_out = previous_in = 0.0
    for record in records:
        total_out = float(record.get("bytes_out_total", 0))
        total_in = float(record.get("bytes_in_total", 0))
        sent = total_out - previous_out if total_out >= previous_out else total_out
        received = total_in - previous_in if total_in >= previous_in else total_in
        result.append((sent, received))
        previous_out, previous_in = total_out, total_in
    return result


def _latest_per_round(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # A coordinator that crashed after appending a round's record but before its
    # checkpoint repeats that round on restart. The later record is the one that counts.
    by_round: dict[int, dict[str, Any]] = {}
    for record in records:
        by_round[int(record["round"])] = record
    return [by_round[number] for number in sorted(by_round)]


# Plots

def _new_axes(title: str, ylabel: str) -> tuple[Figure, Any]:
    figure = Figure(figsize=_FIGURE_SIZE_IN, dpi=_DPI, layout="constrained")
    axes = figure.add_subplot()
    axes.set_title(title)
    axes.set_xlabel("round")
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    return figure, axes


def _plot_metric(path: Path, rounds: list[int], records: list[dict[str, Any]], key: str, label: str) -> None:
    figure, axes = _new_axes(f"{label.capitalize()} per round", label)
    evaluated = [_get(record, "eval", key) for record in records]
    trained = [_get(record, "train", key) for record in records]
    axes.plot(rounds, evaluated, marker="o", markersize=3, label="global model, test set")
    if any(not math.isnan(value) for value in trained):
        axes.plot(rounds, trained, linestyle="--", marker=".", markersize=3, label="workers, local training (mean)")
    if key == "accuracy":
        axes.set_ylim(0.0, 1.0)
    axes.legend(loc="best")
    _integer_ticks(axes)
    figure.savefig(path)


def _plot_participation(path: Path, rounds: list[int], records: list[dict[str, Any]]) -> None:
    figure, axes = _new_axes("Participation per round", "workers or updates")
    sent = [int(record.get("sent", 0)) for record in records]
    accepted = [int(record.get("accepted", 0)) for record in records]
    dropouts = [len(record.get("dropouts", ())) for record in records]
    rejected = [sum(record.get("rejected", {}).values()) + len(record.get("failed", {})) for record in records]
    axes.plot(rounds, sent, marker="o", markersize=3, label="sent the round")
    axes.plot(rounds, accepted, marker="o", markersize=3, label="updates accepted")
    axes.bar([r - 0.2 for r in rounds], dropouts, width=0.4, alpha=0.6, label="dropouts")
    axes.bar([r + 0.2 for r in rounds], rejected, width=0.4, alpha=0.6, label="rejected or failed")
    axes.set_ylim(bottom=0)
    axes.legend(loc="best")
    _integer_ticks(axes)
    figure.savefig(path)


def _plot_bytes(path: Path, rounds: list[int], per_round: list[tuple[float, float]]) -> None:
    figure, axes = _new_axes("Bytes per round", "MiB")
    axes.plot(rounds, [sent / MIB for sent, _ in per_round], marker="o", markersize=3, label="sent (round starts)")
    axes.plot(rounds, [received / MIB for _, received in per_round], marker="o", markersize=3, label="received (updates)")
    axes.set_ylim(bottom=0)
    axes.legend(loc="best")
    _integer_ticks(axes)
    figure.savefig(path)


def _integer_ticks(axes: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def _get(record: Mapping[str, Any], section: str, key: str) -> float:
    value = record.get(section, {}).get(key)
    return float(value) if isinstance(value, (int, float)) else math.nan


# The page

def _render_html(run_dir: Path, records: list[dict[str, Any]]) -> str:
    settings = read_settings(run_dir) or {}
    state = read_run_state(run_dir) or {}
    run_id = str(state.get("run_id") or settings.get("run_id") or run_dir.name)
    last = records[-1]
    evaluation = last.get("eval", {})
    per_round = round_bytes(records)
    summary = [
        ("run id", run_id),
        ("task", str(state.get("task", settings.get("settings", {}).get("task", "?")))),
        ("rounds completed", f"{len(records)}" + (" (finished)" if state.get("finished") else "")),
        ("final test accuracy", _format(evaluation.get("accuracy"))),
        ("final test loss", _format(evaluation.get("loss"))),
        ("MiB sent / received", f"{sum(s for s, _ in per_round) / MIB:.2f} / {sum(r for _, r in per_round) / MIB:.2f}"),
        ("total round time", f"{sum(float(r.get('duration_s', 0.0)) for r in records):.1f} s"),
    ]

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>fedmq report: {_e(run_id)}</title>",
        "<style>",
        "body { font-family: sans-serif; margin: 2em; max-width: 1100px; }",
        "table { border-collapse: collapse; margin-bottom: 1.5em; }",
        "td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }",
        "th { background: #f3f3f3; }",
        "figure { margin: 0 0 1.5em 0; }",
        "img { max-width: 100%; border: 1px solid #eee; }",
        "pre { background: #f7f7f7; padding: 1em; overflow-x: auto; }",
        "</style>",
        "</head>",
        "<body>",
        f"<h1>fedmq run {_e(run_id)}</h1>",
        f"<p>Generated {_e(time.strftime('%Y-%m-%d %H:%M:%S %Z'))} from {_e(str(run_dir))}.</p>",
        "<table>",
        *(f"<tr><th>{_e(name)}</th><td>{_e(value)}</td></tr>" for name, value in summary),
        "</table>",
    ]
    for plot in PLOTS:
        parts += [
            "<figure>",
            f'<img src="{_e(plot.file_name)}" alt="{_e(plot.title)}">',
            f"<figcaption>{_e(plot.description)}</figcaption>",
            "</figure>",
        ]
    parts += ["<h2>Rounds</h2>", _rounds_table(records, per_round)]
    if settings:
        parts += ["<h2>Settings</h2>", f"<pre>{_e(json.dumps(settings.get('settings', settings), indent=2, sort_keys=True))}</pre>"]
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def _rounds_table(records: list[dict[str, Any]], per_round: list[tuple[float, float]]) -> str:
    header = ("round", "attempts", "sent", "accepted", "samples", "dropouts", "rejected", "test accuracy", "test loss", "KiB sent", "KiB received", "duration")
    rows = ["<table>", "<tr>" + "".join(f"<th>{_e(name)}</th>" for name in header) + "</tr>"]
    for record, (sent, received) in zip(records, per_round):
        evaluation = record.get("eval", {})
        cells = (
            record["round"],
            record.get("attempts", 1),
            record.get("sent", ""),
            record.get("accepted", ""),
            record.get("samples", ""),
            len(record.get("dropouts", ())),
            sum(record.get("rejected", {}).values()),
            _format(evaluation.get("accuracy")),
            _format(evaluation.get("loss")),
            f"{sent / 1024:.1f}",
            f"{received / 1024:.1f}",
            f"{float(record.get('duration_s', 0.0)):.2f} s",
        )
        rows.append("<tr>" + "".join(f"<td>{_e(str(cell))}</td>" for cell in cells) + "</tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _format(value: Any) -> str:
    return f"{float(value):.4f}" if isinstance(value, (int, float)) else "-"


def _e(text: str) -> str:
    return html.escape(text, quote=True)
