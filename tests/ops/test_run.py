"""A real run over the broker, watched as an operator would: metrics, logs, run directory, report, export.

One coordinator and two workers train the digits task for a few rounds as separate
``fedmq`` processes, all logging JSON lines. While the run goes on, the test scrapes
the coordinator's metrics endpoint. The tests then read what the run left behind.
"""

from __future__ import annotations

import html
import json
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from fedmq.cli import main
from fedmq.metrics import scrape
from fedmq.tasks import DigitsTask
from tests.ops.conftest import FedmqProcesses, chromium_command

pytestmark = pytest.mark.slow

ROUNDS = 5
WORKERS = 2
RUN_TIMEOUT_S = 300.0
SCRAPE_INTERVAL_S = 0.05
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOT_FILES = ("accuracy.png", "loss.png", "participation.png", "bytes.png")


@dataclass
class RecordedRun:
    run_dir: Path
    log_dir: Path
    federation: str
    coordinator_exit: int
    # (seconds since the coordinator started, fedmq_rounds_completed_total) per successful scrape.
    round_counter: list[tuple[float, float]]
    last_samples: dict[str, float]


def _metrics_url(log_path: Path, deadline: float) -> str:
    """Return the metrics URL that the coordinator logged when it bound port 0."""
    while time.monotonic() < deadline:
        if log_path.exists():
            for line in log_path.read_text(encoding="utf-8").splitlines():
                found = re.search(r"serving metrics at (http://\S+/metrics)", line)
                if found:
                    return found.group(1)
        time.sleep(0.05)
    raise AssertionError(f"the coordinator did not log its metrics URL:\n{log_path.read_text(encoding='utf-8')[-3000:]}")


@pytest.fixture(scope="module")
def recorded_run(broker_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RecordedRun]:
    log_dir = tmp_path_factory.mktemp("ops-run-logs")
    run_dir = tmp_path_factory.mktemp("ops-run") / "run"
    federation = f"ops-{uuid.uuid4().hex[:8]}"
    processes = FedmqProcesses(log_dir, broker_url)
    try:
        coordinator = processes.start(
            "coordinator", "--log-json", "coordinator",
            "--task", "digits", "--rounds", str(ROUNDS), "--run-dir", str(run_dir), "--federation", federation,
            "--min-workers", str(WORKERS), "--min-updates", str(WORKERS), "--round-deadline-s", "60", "--join-timeout-s", "120",
            "--metrics-address", "127.0.0.1:0", "--progress", "plain",
        )
        started = time.monotonic()
        for index in range(WORKERS):
            processes.start(
                f"worker-{index + 1}", "--log-json", "worker",
                "--task", "digits", "--worker-id", f"ops-worker-{index + 1}", "--shard", f"{index}/{WORKERS}", "--federation", federation,
            )
        deadline = started + RUN_TIMEOUT_S
        url = _metrics_url(log_dir / "coordinator.log", deadline)

        # Scrape until the coordinator exits.
        counter: list[tuple[float, float]] = []
        last: dict[str, float] = {}
        while coordinator.poll() is None:
            assert time.monotonic() < deadline, f"the run did not finish within {RUN_TIMEOUT_S:.0f} s"
            samples = scrape(url, timeout_s=1.0)
            if samples is not None and "fedmq_rounds_completed_total" in samples:
                counter.append((time.monotonic() - started, samples["fedmq_rounds_completed_total"]))
                last = samples
            time.sleep(SCRAPE_INTERVAL_S)
        yield RecordedRun(run_dir, log_dir, federation, coordinator.returncode, counter, last)
    finally:
        processes.stop_all()


def _json_lines(path: Path) -> list[dict[str, Any]]:
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise AssertionError(f"{path.name} line {number} is not JSON: {line!r}") from error
    return entries


# The run and its metrics


def test_run_finishes(recorded_run: RecordedRun) -> None:
    log = (recorded_run.log_dir / "coordinator.log").read_text(encoding="utf-8")

    assert recorded_run.coordinator_exit == 0, log[-3000:]


def test_metrics_round_counter_rises(recorded_run: RecordedRun) -> None:
    values = [value for _, value in recorded_run.round_counter]

    assert values, "no scrape of the coordinator's metrics succeeded"
    assert values == sorted(values)
    assert len(set(values)) >= 2, f"the counter never changed between scrapes: {values[:5]}..."
    assert values[0] < values[-1]
    assert values[-1] <= ROUNDS


def test_metrics_report_updates_and_accuracy(recorded_run: RecordedRun) -> None:
    last = recorded_run.last_samples

    assert last["fedmq_rounds_planned"] == ROUNDS
    assert last["fedmq_updates_accepted_total"] >= WORKERS * (last["fedmq_rounds_completed_total"])
    assert last["fedmq_bytes_sent_total"] > 0
    assert last["fedmq_bytes_received_total"] > 0
    assert 0.0 < last["fedmq_eval_accuracy"] <= 1.0
    assert last["fedmq_workers_known"] == WORKERS


# Logs


def test_coordinator_json_logs_carry_ids(recorded_run: RecordedRun) -> None:
    entries = _json_lines(recorded_run.log_dir / "coordinator.log")
    service = [entry for entry in entries if entry["logger"] == "coordinator.service"]
    run_ids = {entry.get("run_id") for entry in service}

    assert service
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= set(entry)
    assert None not in run_ids
    assert len(run_ids) == 1, run_ids
    summaries = [entry for entry in service if re.search(r"round \d+/\d+: accuracy", entry["message"])]
    assert [entry["round"] for entry in summaries] == list(range(1, ROUNDS + 1))
    joins = [entry for entry in service if " joined " in entry["message"]]
    assert {entry["worker_id"] for entry in joins} == {f"ops-worker-{index + 1}" for index in range(WORKERS)}
    assert all(entry.get("message_id") for entry in joins)


def test_worker_json_logs_carry_ids(recorded_run: RecordedRun) -> None:
    entries = _json_lines(recorded_run.log_dir / "worker-1.log")
    trained = [entry for entry in entries if re.search(r"round \d+: trained", entry["message"])]

    assert all(entry.get("worker_id") == "ops-worker-1" for entry in entries if entry["logger"] == "worker.service")
    assert len(trained) >= ROUNDS - 1
    for entry in trained:
        assert entry["run_id"].startswith("run-")
        assert f"round {entry['round']}: trained" in entry["message"]
        assert entry["thread"].startswith("train-")


def test_plain_progress_lines(recorded_run: RecordedRun) -> None:
    lines = (recorded_run.log_dir / "coordinator.out").read_text(encoding="utf-8").splitlines()

    assert [line.split()[1] for line in lines] == [f"{number}/{ROUNDS}" for number in range(1, ROUNDS + 1)]
    assert all("accuracy" in line and f"updates {WORKERS}/{WORKERS}" in line for line in lines)


# The run directory


def test_run_dir_has_every_file(recorded_run: RecordedRun) -> None:
    run_dir = recorded_run.run_dir

    for name in ("settings.json", "metrics.jsonl", "final_model.safetensors", "checkpoint/state.json", "checkpoint/model.safetensors"):
        assert (run_dir / name).is_file(), name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["round"] for record in records] == list(range(1, ROUNDS + 1))


def test_settings_json_is_redacted(recorded_run: RecordedRun) -> None:
    text = (recorded_run.run_dir / "settings.json").read_text(encoding="utf-8")
    document = json.loads(text)

    assert document["service"] == "coordinator"
    assert document["settings"]["rounds"] == ROUNDS
    assert document["settings"]["broker"]["federation"] == recorded_run.federation
    assert document["settings"]["broker"]["url"].startswith("amqp://guest:***@127.0.0.1:")
    assert "guest:guest" not in text


def test_final_model_matches_checkpoint(recorded_run: RecordedRun) -> None:
    final = safetensors.torch.load_file(str(recorded_run.run_dir / "final_model.safetensors"))
    checkpoint = safetensors.torch.load_file(str(recorded_run.run_dir / "checkpoint" / "model.safetensors"))

    assert final.keys() == checkpoint.keys()
    for name, tensor in final.items():
        assert torch.equal(tensor, checkpoint[name]), name


# Report and export


def test_report_images_load_in_chromium(
    recorded_run: RecordedRun, chromium: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"

    assert main(["report", str(recorded_run.run_dir), "--out", str(out)]) == 0
    assert f"wrote {out / 'report.html'}" in capsys.readouterr().out

    page = (out / "report.html").read_text(encoding="utf-8")
    for name in PLOT_FILES:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        assert len(data) > 5000, name
        assert f'<img src="{name}"' in page

    # A copy of the page whose script writes each image's decoded size into the DOM.
    probe = out / "probe.html"
    probe.write_text(page.replace("</body>", PROBE_SCRIPT + "</body>"), encoding="utf-8")
    completed = subprocess.run(
        chromium_command(chromium, tmp_path / "chromium-profile", "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()),
        capture_output=True, text=True, timeout=180, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    found = re.search(r'<pre id="image-check">(.*?)</pre>', completed.stdout, re.DOTALL)
    assert found, completed.stdout[-3000:]
    images = json.loads(html.unescape(found.group(1)))
    assert sorted(image["src"] for image in images) == sorted(PLOT_FILES)
    for image in images:
        assert image["complete"], image
        assert image["width"] > 100, image
        assert image["height"] > 100, image


PROBE_SCRIPT = """<script>
window.addEventListener("load", () => {
  const result = Array.from(document.images).map((image) => ({
    src: image.getAttribute("src"), complete: image.complete, width: image.naturalWidth, height: image.naturalHeight,
  }));
  const output = document.createElement("pre");
  output.id = "image-check";
  output.textContent = JSON.stringify(result);
  document.body.appendChild(output);
});
</script>
"""


def test_export_loads_weights_only(recorded_run: RecordedRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "export"

    assert main(["export", str(recorded_run.run_dir), "--out", str(out)]) == 0
    assert "exported the final model" in capsys.readouterr().out

    state_dict = torch.load(out / "model.pt", weights_only=True)
    model = DigitsTask().build_model()
    model.load_state_dict(state_dict)
    final = safetensors.torch.load_file(str(recorded_run.run_dir / "final_model.safetensors"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, final[name]), name

    from_safetensors = safetensors.torch.load_file(str(out / "model.safetensors"))
    assert from_safetensors.keys() == final.keys()
    metadata = json.loads((out / "model.json").read_text())
    assert metadata["round"] == ROUNDS
    assert metadata["finished"] is True
    assert metadata["task"] == "digits"
