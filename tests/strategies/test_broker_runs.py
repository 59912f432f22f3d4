"""Short real runs over the broker: each strategy trains, personal tensors never travel,
IFCA finds known clusters, and strategy state survives a coordinator restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch

from coordinator.service import Coordinator
from coordinator.strategies.common import is_personal
from fedmq.tasks import DigitsTask, PartitionSpec
from schemas.messages import RoundStart, Update
from tests.strategies.federation import Federation, Recorder, federation_name
from tests.strategies.helpers import PermutedDigitsTask
from worker.strategies import PERSONAL_STATE_FILE, SCAFFOLD_STATE_FILE

pytestmark = pytest.mark.slow

DIGITS = DigitsTask()


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Accuracy on the global test set after 4 rounds of 3 workers on an IID split of digits.
# FedAvg with the task's defaults reaches about 0.95; SCAFFOLD and Δ-SGD train with
# plain SGD and reach less in 4 rounds.
RUNS = [
    ("fedavg", {}, 0.90),
    ("fedavgm", {}, 0.90),
    ("fedprox", {"proximal_mu": 0.01}, 0.90),
    ("fedadam", {}, 0.85),
    ("fedyogi", {}, 0.85),
    ("fedadagrad", {}, 0.85),
    ("scaffold", {}, 0.80),
    ("fednova", {}, 0.90),
    ("deltasgd", {}, 0.80),
    ("ifca", {"num_clusters": 2}, 0.85),
]


@pytest.mark.parametrize(("strategy", "options", "target"), RUNS, ids=[run[0] for run in RUNS])
def test_strategy_run_reaches_accuracy(broker_url: str, tmp_path: Path, strategy: str, options: dict[str, object], target: float) -> None:
    federation = Federation(broker_url, tmp_path / "run", DIGITS, federation_name(strategy))
    federation.start_workers()
    try:
        result, _ = federation.run_coordinator(federation.coordinator_settings(strategy=strategy, strategy_options=options, rounds=4))
    finally:
        federation.stop_workers()

    assert result.rounds_completed == 4
    assert result.final_metrics["accuracy"] >= target
    last = result.history[-1]
    assert last["accepted"] == 3
    # Every round carries the workers' evaluation of the model the round started from.
    assert last["federated_eval"]["local_workers"] == 3
    assert 0.0 <= last["federated_eval"]["local_accuracy_worst10"] <= last["federated_eval"]["local_accuracy_mean"]
    assert last["federated_eval"]["local_accuracy_mean"] > 0.5


def test_personal_layers_never_published(broker_url: str, tmp_path: Path) -> None:
    patterns = ("fc2.*",)
    federation = Federation(broker_url, tmp_path / "run", DIGITS, federation_name("personal"), partition=PartitionSpec(scheme="shards", seed=0))
    recorder = Recorder(federation.broker)
    federation.start_workers()
    try:
        result, _ = federation.run_coordinator(federation.coordinator_settings(strategy="fedavg", personal_layers=patterns, rounds=3))
    finally:
        federation.stop_workers()
    try:
        copies = recorder.drain()
    finally:
        recorder.close()

    round_starts = [message for message in copies[recorder.rounds_queue] if isinstance(message, RoundStart)]
    updates = [message for message in copies[recorder.results_queue] if isinstance(message, Update)]
    assert len(round_starts) >= 3
    assert len(updates) == 9
    for start in round_starts:
        assert "fc1.weight" in start.weights
        assert [name for name in (*start.weights, *start.aux) if is_personal(name, patterns)] == []
    for update in updates:
        assert set(update.deltas) == {"fc1.weight", "fc1.bias"}
        assert [name for name in (*update.deltas, *update.aux) if is_personal(name, patterns)] == []

    # Each worker kept its own head, trained away from the shared initial one.
    heads = []
    for index in range(3):
        saved = safetensors.torch.load_file(str(tmp_path / "run-workers" / f"worker-{index + 1}" / PERSONAL_STATE_FILE))
        assert set(saved) == {"fc2.weight", "fc2.bias"}
        heads.append(saved["fc2.weight"])
    assert not torch.equal(heads[0], heads[1])
    # With two label shards per worker, the personalized models beat the global model on the local test splits.
    evaluation = result.history[-1]["federated_eval"]
    assert evaluation["personal_accuracy_mean"] > evaluation["local_accuracy_mean"]
    assert evaluation["personal_accuracy_mean"] > 0.8


def test_ifca_recovers_label_permuted_groups(broker_url: str, tmp_path: Path) -> None:
    task = PermutedDigitsTask()
    federation = Federation(broker_url, tmp_path / "run", task, federation_name("ifca"), workers=4)
    federation.start_workers()
    try:
        result, _ = federation.run_coordinator(federation.coordinator_settings(strategy="ifca", strategy_options={"num_clusters": 2}, rounds=6))
    finally:
        federation.stop_workers()

    # Workers 1 and 3 see the true labels, 2 and 4 the permuted ones.
    members = result.history[-1]["strategy"]["members"]
    groups = sorted(sorted(workers) for workers in members.values())
    assert groups == [["worker-1", "worker-3"], ["worker-2", "worker-4"]]
    assert result.history[-1]["federated_eval"]["local_accuracy_worst10"] > 0.8


def test_scaffold_state_survives_coordinator_restart(broker_url: str, tmp_path: Path) -> None:
    federation = Federation(broker_url, tmp_path / "run", DIGITS, federation_name("restart"))
    federation.start_workers()
    try:
        first_settings = federation.coordinator_settings(strategy="scaffold", rounds=4)
        first, first_coordinator = federation.run_coordinator(first_settings, stop_after_round=2)
        saved_control = {name: tensor.clone() for name, tensor in first_coordinator.strategy.state_tensors().items()}
        saved_scalars = first_coordinator.strategy.state_scalars()

        # A new coordinator on the same run folder starts from the saved control variate.
        second_settings = federation.coordinator_settings(strategy="scaffold", rounds=4, run_id=first.run_id)
        restarted = Coordinator(second_settings, task=DIGITS)
        assert restarted.completed_rounds == 2
        assert restarted.strategy.state_scalars() == saved_scalars
        for name, tensor in saved_control.items():
            assert torch.equal(restarted.strategy.state_tensors()[name], tensor)

        second_result, second_coordinator = federation.run_coordinator(second_settings)
    finally:
        federation.stop_workers()

    assert first.rounds_completed == 2
    assert saved_scalars["workers_seen"] == ["worker-1", "worker-2", "worker-3"]
    assert second_result.rounds_completed == 4
    assert [record["round"] for record in second_result.history] == [1, 2, 3, 4]
    assert set(second_coordinator.strategy.state_tensors()) == set(saved_control)
    assert second_result.final_metrics["accuracy"] >= first.final_metrics["accuracy"] - 0.05
    for index in range(3):
        assert (tmp_path / "run-workers" / f"worker-{index + 1}" / SCAFFOLD_STATE_FILE).exists()
