"""DP-FedAvg runs over a real broker: epsilon in the metrics, and the stop at the target epsilon."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator.privacy import METRIC_NOISE_STD, PrivacyAccountant
from coordinator.service import Coordinator, CoordinatorSettings
from fedmq.broker import BrokerSettings
from fedmq.errors import ConfigError
from fedmq.rabbitmq_node import RabbitMQNode
from fedmq.tasks import PartitionSpec, load_task
from tests.privacy.federation import run_federation
from worker.service import Worker, WorkerSettings

pytestmark = pytest.mark.slow

NUM_WORKERS = 2


def _settings(broker: BrokerSettings, run_dir: Path, **changes: object) -> CoordinatorSettings:
    values: dict[str, object] = {
        "broker": broker, "task": "digits", "rounds": 10, "run_dir": run_dir, "min_workers": NUM_WORKERS,
        "min_updates": NUM_WORKERS, "round_deadline_s": 60.0, "join_timeout_s": 60.0, "codec": "float32",
        "local_epochs": 1, "eval_every": 0, "metrics_address": "",
    }
    values.update(changes)
    known = CoordinatorSettings.__dataclass_fields__
    return CoordinatorSettings(**{key: value for key, value in values.items() if key in known})  # type: ignore[arg-type]


def _workers(broker: BrokerSettings) -> list[Worker]:
    task = load_task("digits")
    return [
        Worker(
            WorkerSettings(
                broker=broker, task="digits", worker_id=f"dp-worker-{index}", shard_index=index, shard_count=NUM_WORKERS,
                partition=PartitionSpec(scheme="iid"),
            ),
            task=task,
        )
        for index in range(NUM_WORKERS)
    ]


def _records(run_dir: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_training_stops_before_target_epsilon(make_rabbitmq: Callable[..., RabbitMQNode], tmp_path: Path) -> None:
    node = make_rabbitmq()
    broker = BrokerSettings(url=node.url, federation="dp-target", reconnect_timeout_s=30)
    options = {"noise_multiplier": 2.0, "clip_norm": 1.0, "delta": 1e-5, "seed": 0}
    # The target lies between the epsilon of 3 and of 4 rounds, so round 4 must not run.
    reference = PrivacyAccountant(delta=1e-5)
    reference.step(noise_multiplier=2.0, sample_rate=1.0, steps=3)
    after_three = reference.epsilon()
    after_four = reference.epsilon_after(noise_multiplier=2.0, sample_rate=1.0)
    target = (after_three + after_four) / 2
    run_dir = tmp_path / "run"
    settings = _settings(broker, run_dir, strategy="dp-fedavg", strategy_options=options, target_epsilon=target)

    coordinator = Coordinator(settings)
    result = run_federation(coordinator, _workers(broker))

    assert result.rounds_completed == 3
    assert result.stop_reason is not None
    assert "round 4 would raise epsilon" in result.stop_reason
    assert f"above the target {target:g}" in result.stop_reason
    assert result.privacy is not None
    assert result.privacy["epsilon"] == pytest.approx(after_three, rel=1e-9)
    assert result.privacy["epsilon"] <= target
    assert coordinator.finished

    records = _records(run_dir)
    assert [record["round"] for record in records] == [1, 2, 3]
    epsilons = [record["privacy"]["epsilon"] for record in records]  # type: ignore[index]
    assert epsilons == sorted(epsilons)
    assert epsilons[-1] == pytest.approx(after_three, rel=1e-9)
    assert all(record["privacy"]["delta"] == 1e-5 for record in records)  # type: ignore[index]

    # Running the same command again trains no further round.
    again = run_federation(Coordinator(settings), _workers(broker))
    assert again.rounds_completed == 3


def test_worker_placement_run_reports_local_epsilon(make_rabbitmq: Callable[..., RabbitMQNode], tmp_path: Path) -> None:
    node = make_rabbitmq()
    broker = BrokerSettings(url=node.url, federation="dp-worker", reconnect_timeout_s=30)
    options = {"noise_multiplier": 1.0, "clip_norm": 0.5, "placement": "worker", "expected_updates": NUM_WORKERS, "seed": 0}
    run_dir = tmp_path / "run"
    settings = _settings(broker, run_dir, rounds=2, strategy="dp-fedavg", strategy_options=options)

    result = run_federation(Coordinator(settings), _workers(broker))

    assert result.rounds_completed == 2
    records = _records(run_dir)
    for record in records:
        privacy = record["privacy"]
        assert privacy["placement"] == "worker"  # type: ignore[index]
        assert privacy["local_epsilon"] > privacy["epsilon"]  # type: ignore[index]
        assert record["accepted"] == NUM_WORKERS
        # Each worker reported the noise share it added: z * C / sqrt(m).
        assert record["train"][METRIC_NOISE_STD] == pytest.approx(1.0 * 0.5 / NUM_WORKERS**0.5)  # type: ignore[index]


def test_target_epsilon_needs_private_strategy(tmp_path: Path) -> None:
    settings = _settings(BrokerSettings(), tmp_path / "run", target_epsilon=1.0)

    with pytest.raises(ConfigError, match="target_epsilon"):
        Coordinator(settings)
