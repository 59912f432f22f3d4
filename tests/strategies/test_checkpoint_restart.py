"""Strategy state through a coordinator checkpoint: a restarted Coordinator continues bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from coordinator.service import Coordinator, CoordinatorSettings
from coordinator.strategies import ClientUpdate
from coordinator.strategies.common import IFCA_CHOICE, SCAFFOLD_DELTA_PREFIX
from fedmq.broker import BrokerSettings
from tests.strategies.helpers import SmallTask

TASK = SmallTask()
# The coordinator never connects in these tests; the URL only has to parse.
UNUSED_BROKER = BrokerSettings(url="amqp://guest:guest@127.0.0.1:1/%2F", federation="strategies-checkpoint")

STATEFUL = [
    ("fedavgm", {}),
    ("fedadam", {}),
    ("fedyogi", {}),
    ("fedadagrad", {}),
    ("scaffold", {}),
    ("ifca", {"num_clusters": 3}),
]


def make_coordinator(run_dir: Path, strategy: str, options: dict[str, object], *, personal_layers: tuple[str, ...] = ()) -> Coordinator:
    settings = CoordinatorSettings(
        broker=UNUSED_BROKER, task=TASK.name, rounds=10, run_dir=run_dir, strategy=strategy, strategy_options=dict(options),
        personal_layers=personal_layers, momentum=0.5,
    )
    return Coordinator(settings, task=TASK)


def synthetic_updates(coordinator: Coordinator, round_number: int) -> list[ClientUpdate]:
    rng = np.random.default_rng(round_number)
    updates = []
    for index, worker in enumerate(("worker-1", "worker-2", "worker-3")):
        # Sorted names: a checkpoint stores the state dict in another order than the model.
        values = {name: rng.normal(scale=0.05, size=coordinator.expected[name].shape).astype(np.float32) for name in sorted(coordinator.expected)}
        aux: dict[str, np.ndarray] = {IFCA_CHOICE: np.array([(index + round_number) % 2], dtype=np.int64)}
        for name in sorted(coordinator.strategy.context.parameter_names & set(coordinator.expected)):
            aux[SCAFFOLD_DELTA_PREFIX + name] = rng.normal(scale=0.01, size=coordinator.expected[name].shape).astype(np.float32)
        updates.append(ClientUpdate(worker, 10 + 5 * index, 3 + index, values, aux=aux))
    return updates


def play_round(coordinator: Coordinator, round_number: int) -> None:
    """Aggregate one round of synthetic updates the way the coordinator's round loop does."""
    coordinator.strategy.begin_round({name: coordinator.global_state[name] for name in coordinator.expected})
    coordinator.strategy.round_aux(round_number, coordinator.global_state)
    for update in synthetic_updates(coordinator, round_number):
        coordinator.strategy.check_update(update)
        coordinator.strategy.add_update(update)
    coordinator.global_state = coordinator.strategy.finish_round(coordinator.global_state)
    coordinator.completed_rounds = round_number
    coordinator.model_version += 1


@pytest.mark.parametrize(("strategy", "options"), STATEFUL, ids=[name for name, _ in STATEFUL])
def test_restarted_coordinator_continues_strategy(tmp_path: Path, strategy: str, options: dict[str, object]) -> None:
    first = make_coordinator(tmp_path, strategy, options)
    for round_number in (1, 2):
        play_round(first, round_number)
    first._save_checkpoint()

    restarted = make_coordinator(tmp_path, strategy, options)
    assert restarted.completed_rounds == 2
    assert restarted.strategy.state_scalars() == first.strategy.state_scalars()
    saved = first.strategy.state_tensors()
    assert saved, f"{strategy} keeps no state to test"
    assert set(restarted.strategy.state_tensors()) == set(saved)
    for name, tensor in saved.items():
        assert torch.equal(restarted.strategy.state_tensors()[name], tensor)

    # Round 3 on the restarted coordinator equals round 3 on the first one, model and strategy state.
    play_round(first, 3)
    play_round(restarted, 3)
    for name, tensor in first.global_state.items():
        assert torch.equal(restarted.global_state[name], tensor), name
    for name, tensor in first.strategy.state_tensors().items():
        assert torch.equal(restarted.strategy.state_tensors()[name], tensor), name

    # Without the saved strategy state, round 3 comes out different.
    forgetful = make_coordinator(tmp_path / "other", strategy, options)
    forgetful.global_state = {name: tensor.clone() for name, tensor in make_coordinator(tmp_path, strategy, options).global_state.items()}
    play_round(forgetful, 3)
    model_differs = any(not torch.equal(forgetful.global_state[name], tensor) for name, tensor in first.global_state.items())
    state_differs = any(not torch.equal(forgetful.strategy.state_tensors()[name], tensor) for name, tensor in first.strategy.state_tensors().items())
    assert model_differs or state_differs


def test_personal_layers_leave_the_expected_set(tmp_path: Path) -> None:
    coordinator = make_coordinator(tmp_path, "fedavg", {}, personal_layers=("2.*",))
    assert set(coordinator.expected) == {"0.weight", "0.bias"}
    config = coordinator.settings.train_config()
    assert config["personal_layers"] == "2.*"
    assert config["eval_every"] == 1
    play_round(coordinator, 1)
    initial = make_coordinator(tmp_path / "fresh", "fedavg", {}, personal_layers=("2.*",)).global_state
    for name in ("2.weight", "2.bias"):
        assert torch.equal(coordinator.global_state[name], initial[name])
    assert not torch.equal(coordinator.global_state["0.weight"], initial["0.weight"])


def test_strategy_learning_rate_default_applies(tmp_path: Path) -> None:
    assert make_coordinator(tmp_path / "a", "fedadam", {}).strategy.server_learning_rate == 0.03  # type: ignore[attr-defined]
    settings = CoordinatorSettings(broker=UNUSED_BROKER, task=TASK.name, rounds=1, run_dir=tmp_path / "b", strategy="fedadam", server_learning_rate=0.2)
    assert Coordinator(settings, task=TASK).strategy.server_learning_rate == 0.2  # type: ignore[attr-defined]
