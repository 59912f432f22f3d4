"""The custom task of docs/custom-task.md loads, trains, and runs a federation with the page's commands."""

from __future__ import annotations

import json
import re
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fedmq.tasks import PartitionSpec, load_task
from tests.ops.conftest import REPO_ROOT, FedmqProcesses

EXAMPLES = REPO_ROOT / "docs" / "examples"
RUN_TIMEOUT_S = 300.0


@pytest.fixture
def examples_on_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    yield
    sys.modules.pop("my_task", None)


def test_example_loads_by_import_path(examples_on_path: None) -> None:
    task = load_task("my_task:CancerTask", hidden_units=8)

    assert task.name == "breast-cancer"
    assert task.options()["hidden_units"] == 8
    x_test, y_test = task.load_test_set()
    assert x_test.shape[1] == 30
    assert set(y_test.tolist()) == {0, 1}


def test_example_trains_above_chance(examples_on_path: None) -> None:
    task = load_task("my_task:CancerTask")
    torch.manual_seed(0)
    model = task.build_model()
    data = task.load_local_data(0, 2, PartitionSpec(scheme="iid"))
    x_test, y_test = task.load_test_set()

    result = task.train(model, data, task.default_train_config())
    evaluation = task.evaluate(model, x_test, y_test)

    assert result.num_samples == data.num_train
    assert evaluation["accuracy"] > 0.9


def test_example_commands_in_docs_match(examples_on_path: None) -> None:
    page = (REPO_ROOT / "docs" / "custom-task.md").read_text(encoding="utf-8")
    source = (EXAMPLES / "my_task.py").read_text(encoding="utf-8")

    assert "docs/examples/my_task.py" in page
    assert "--task my_task:CancerTask" in page
    # The page shows the module in full; a change to one must reach the other.
    assert source.strip() in page


@pytest.mark.slow
def test_example_federation_over_broker(broker_url: str, tmp_path: Path) -> None:
    processes = FedmqProcesses(tmp_path, broker_url)
    processes.env["PYTHONPATH"] = str(EXAMPLES)
    federation = f"ops-docs-{uuid.uuid4().hex[:6]}"
    run_dir = tmp_path / "run"
    try:
        coordinator = processes.start(
            "coordinator", "coordinator", "--task", "my_task:CancerTask", "--rounds", "3", "--min-workers", "2",
            "--min-updates", "2", "--run-dir", str(run_dir), "--federation", federation, "--metrics-address", "", "--progress", "off",
        )
        for index in (1, 2):
            processes.start(
                f"worker-{index}", "worker", "--task", "my_task:CancerTask", "--worker-id", f"w{index}", "--shard", f"{index - 1}/2",
                "--federation", federation,
            )
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while coordinator.poll() is None:
            assert time.monotonic() < deadline, "the example federation did not finish in time"
            time.sleep(0.2)
    finally:
        processes.stop_all()

    log = (tmp_path / "coordinator.log").read_text(encoding="utf-8")
    assert coordinator.returncode == 0, log[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["round"] for record in records] == [1, 2, 3]
    assert records[-1]["eval"]["accuracy"] > 0.85
    assert re.search(r"round 3/3: accuracy", log)
