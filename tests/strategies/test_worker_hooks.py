"""Worker-side strategy code against hand computations: SCAFFOLD, Δ-SGD, IFCA, personal layers, local evaluation."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from coordinator.strategies.common import IFCA_CHOICE, SCAFFOLD_CONTROL_PREFIX, SCAFFOLD_DELTA_PREFIX, ifca_cluster_name
from tests.strategies.helpers import SmallTask, decode_update, round_start, seeded_state
from worker.strategies import PERSONAL_STATE_FILE, SCAFFOLD_STATE_FILE, DeltaSgdRule, scaffold_client_control
from worker.training import LocalOverrides, LocalTrainer

TASK = SmallTask()
PARAMETER_NAMES = ("0.weight", "0.bias", "2.weight", "2.bias")


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def trainer(state_dir: Path | None = None, *, worker_index: int = 0, overrides: LocalOverrides | None = None) -> LocalTrainer:
    data = TASK.load_local_data(worker_index, 2, None)  # type: ignore[arg-type]
    return LocalTrainer(TASK, data, worker_id=f"worker-{worker_index}", state_dir=state_dir, overrides=overrides or LocalOverrides())


def full_batch_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return {name: parameter.grad.detach().clone() for name, parameter in model.named_parameters() if parameter.grad is not None}


def random_like(state: dict[str, torch.Tensor], seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: scale * torch.randn(state[name].shape, generator=generator) for name in PARAMETER_NAMES}


# SCAFFOLD


def test_scaffold_worker_follows_option_two(tmp_path: Path) -> None:
    start_state = seeded_state(TASK, 1)
    server_control = random_like(start_state, 2)
    client_control = random_like(start_state, 3)
    safetensors.torch.save_file(client_control, str(tmp_path / SCAFFOLD_STATE_FILE))
    steps, lr = 4, 0.2

    local = trainer(tmp_path)
    aux = {SCAFFOLD_CONTROL_PREFIX + name: tensor for name, tensor in server_control.items()}
    start = round_start(TASK, start_state, {"strategy": "scaffold", "learning_rate": lr, "local_epochs": steps}, aux=aux)
    update, deltas, update_aux = decode_update(local.run_round(start)[0])

    # Reference: full-batch SGD on the corrected gradient g + c - c_i (the batch size exceeds the data, so one step per epoch).
    model = TASK.build_model()
    model.load_state_dict(start_state)
    for _ in range(steps):
        gradient = full_batch_gradient(model, local.data.x_train, local.data.y_train)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter -= lr * (gradient[name] + server_control[name] - client_control[name])
    trained = dict(model.named_parameters())
    assert update.num_steps == steps
    for name in PARAMETER_NAMES:
        np.testing.assert_allclose(deltas[name], (trained[name] - start_state[name]).detach().numpy(), rtol=1e-4, atol=1e-6)
        drift = start_state[name] - trained[name].detach()
        new_client_control = client_control[name] - server_control[name] + drift / (steps * lr)
        np.testing.assert_allclose(update_aux[SCAFFOLD_DELTA_PREFIX + name], (new_client_control - client_control[name]).numpy(), rtol=1e-3, atol=1e-5)

    # The new c_i is on disk, and a restarted worker continues from it.
    saved = safetensors.torch.load_file(str(tmp_path / SCAFFOLD_STATE_FILE))
    restarted = trainer(tmp_path)
    second = round_start(TASK, start_state, {"strategy": "scaffold", "learning_rate": lr}, aux=aux, round_number=2)
    _, _, second_aux = decode_update(restarted.run_round(second)[0])
    for name in PARAMETER_NAMES:
        np.testing.assert_allclose(saved[name].numpy(), (client_control[name] + torch.from_numpy(update_aux[SCAFFOLD_DELTA_PREFIX + name])).numpy(), rtol=1e-5, atol=1e-6)
        assert not np.allclose(second_aux[SCAFFOLD_DELTA_PREFIX + name], 0.0)


def test_scaffold_client_control_formula() -> None:
    new = scaffold_client_control(torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([0.3]), steps=3, learning_rate=0.1)
    assert float(new) == pytest.approx(1.0 - 0.5 + 0.3 / 0.3)


def test_scaffold_without_steps_sends_zero_change() -> None:
    start_state = seeded_state(TASK, 1)
    local = trainer(overrides=LocalOverrides(time_budget_s=1e-9))
    aux = {SCAFFOLD_CONTROL_PREFIX + name: tensor for name, tensor in random_like(start_state, 2).items()}
    update, _, update_aux = decode_update(local.run_round(round_start(TASK, start_state, {"strategy": "scaffold"}, aux=aux))[0])
    assert update.num_steps == 0
    for name in PARAMETER_NAMES:
        assert np.all(update_aux[SCAFFOLD_DELTA_PREFIX + name] == 0)


# Δ-SGD


def test_delta_sgd_rule_sequence() -> None:
    rule = DeltaSgdRule(initial_step=0.1, amplifier=0.5)
    assert rule.next_step(0.0, 0.0) == 0.1
    # Growth bound sqrt(1 + 0.5 * 1) * 0.1 = 0.1225 is below the smoothness bound 1 / (2 * 2) = 0.25.
    assert rule.next_step(1.0, 2.0) == pytest.approx(math.sqrt(1.5) * 0.1)
    # Smoothness bound 0.01 / (2 * 1) = 0.005 is below the growth bound.
    assert rule.next_step(0.01, 1.0) == pytest.approx(0.005)
    theta = 0.005 / (math.sqrt(1.5) * 0.1)
    # Without a smoothness estimate only the growth bound applies.
    assert rule.next_step(0.0, 0.0) == pytest.approx(math.sqrt(1 + 0.5 * theta) * 0.005)


def test_delta_sgd_worker_uses_same_batch_gradients() -> None:
    start_state = seeded_state(TASK, 4)
    lr, amplifier, steps = 0.5, 0.1, 3
    local = trainer()
    start = round_start(TASK, start_state, {"strategy": "deltasgd", "delta_sgd_amplifier": amplifier, "learning_rate": lr, "local_epochs": steps})
    update, deltas, _ = decode_update(local.run_round(start)[0])

    # Reference: full-batch gradients, so gradients at x_k and x_{k-1} share the batch.
    model = TASK.build_model()
    model.load_state_dict(start_state)
    x, y = local.data.x_train, local.data.y_train
    previous_parameters: dict[str, torch.Tensor] = {}
    previous_gradient: dict[str, torch.Tensor] = {}
    step_sizes: list[float] = []
    theta = 1.0
    for _ in range(steps):
        gradient = full_batch_gradient(model, x, y)
        parameters = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
        if not step_sizes:
            step = lr
        else:
            moved = math.sqrt(sum(float((parameters[n] - previous_parameters[n]).pow(2).sum()) for n in parameters))
            changed = math.sqrt(sum(float((gradient[n] - previous_gradient[n]).pow(2).sum()) for n in parameters))
            step = min(math.sqrt(1 + amplifier * theta) * step_sizes[-1], moved / (2 * changed))
            theta = step / step_sizes[-1]
        step_sizes.append(step)
        previous_parameters, previous_gradient = parameters, gradient
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter -= step * gradient[name]

    assert update.num_steps == steps
    assert update.metrics["mean_step_size"] == pytest.approx(sum(step_sizes) / steps, rel=1e-4)
    assert update.metrics["last_step_size"] == pytest.approx(step_sizes[-1], rel=1e-4)
    assert step_sizes[1] != step_sizes[0]
    for name, parameter in model.named_parameters():
        np.testing.assert_allclose(deltas[name], (parameter - start_state[name]).detach().numpy(), rtol=1e-4, atol=1e-6)


# IFCA


def test_ifca_worker_trains_cluster_with_lowest_loss() -> None:
    local = trainer()
    random_cluster = seeded_state(TASK, 5)
    fitted = trainer()
    fitted_start = round_start(TASK, random_cluster, {"local_epochs": 200, "learning_rate": 0.5})
    fitted.run_round(fitted_start)
    good_cluster = {name: tensor.detach().clone() for name, tensor in fitted.model.state_dict().items()}

    # The good model travels as cluster 1 in aux; cluster 0 is in the weights.
    aux = {ifca_cluster_name(1, name): tensor for name, tensor in good_cluster.items()}
    start = round_start(TASK, random_cluster, {"strategy": "ifca", "ifca_clusters": 2, "ifca_weights_cluster": 0, "local_epochs": 2}, aux=aux)
    update, deltas, update_aux = decode_update(local.run_round(start)[0])

    assert update_aux[IFCA_CHOICE].tolist() == [1]
    assert update.metrics["cluster"] == 1.0
    trained = local.model.state_dict()
    for name, tensor in good_cluster.items():
        np.testing.assert_allclose(tensor.numpy() + deltas[name], trained[name].numpy(), rtol=1e-5, atol=1e-6)


def test_ifca_worker_rejects_missing_cluster() -> None:
    from fedmq.errors import MessageError

    local = trainer()
    start = round_start(TASK, seeded_state(TASK, 5), {"strategy": "ifca", "ifca_clusters": 2, "ifca_weights_cluster": 0})
    with pytest.raises(MessageError, match="ifca.cluster1"):
        local.run_round(start)


# Personal layers and local evaluation


def test_personal_layers_stay_on_worker(tmp_path: Path) -> None:
    shared_state = {name: tensor for name, tensor in seeded_state(TASK, 6).items() if not name.startswith("2.")}
    config = {"personal_layers": "2.*", "eval_every": 1, "seed": 11}
    local = trainer(tmp_path)
    update, deltas, _ = decode_update(local.run_round(round_start(TASK, shared_state, config))[0])

    # The update carries only shared tensors, and the worker keeps its head on disk.
    assert set(deltas) == {"0.weight", "0.bias"}
    saved = safetensors.torch.load_file(str(tmp_path / PERSONAL_STATE_FILE))
    assert set(saved) == {"2.weight", "2.bias"}
    trained = local.model.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(tensor, trained[name])

    # Before training, the worker started from the run's initial head: the model built under the run seed.
    initial = seeded_state(TASK, 11)
    fresh = trainer()
    plan = fresh.plan_round(round_start(TASK, shared_state, config))
    for name in ("2.weight", "2.bias"):
        assert torch.equal(plan.model_state[name], initial[name])

    # A restarted worker continues with its own head.
    restarted = trainer(tmp_path)
    plan = restarted.plan_round(round_start(TASK, shared_state, config, round_number=2))
    for name in ("2.weight", "2.bias"):
        assert torch.equal(plan.model_state[name], saved[name])
    for name in ("0.weight", "0.bias"):
        assert torch.equal(plan.model_state[name], shared_state[name])

    # Local evaluation: the global model (initial head) and the personalized one.
    for key in ("local_accuracy", "local_loss", "personal_accuracy", "personal_loss", "local_test_samples"):
        assert key in plan.metrics
    assert plan.metrics["local_test_samples"] == 10.0
    model = TASK.build_model()
    model.load_state_dict({**shared_state, **saved})
    expected = TASK.evaluate(model, restarted.data.x_test, restarted.data.y_test)
    assert plan.metrics["personal_accuracy"] == pytest.approx(expected["accuracy"])
    assert plan.metrics["personal_loss"] == pytest.approx(expected["loss"])
    assert update.metrics["local_test_samples"] == 10.0


def test_local_evaluation_follows_eval_every() -> None:
    state = seeded_state(TASK, 6)
    local = trainer()
    odd = local.plan_round(round_start(TASK, state, {"eval_every": 2}, round_number=2))
    even = local.plan_round(round_start(TASK, state, {"eval_every": 2}, round_number=3))
    off = local.plan_round(round_start(TASK, state, {"eval_every": 0}, round_number=3))
    assert "local_accuracy" not in odd.metrics
    assert "personal_accuracy" not in even.metrics
    assert "local_accuracy" not in off.metrics
    model = TASK.build_model()
    model.load_state_dict(state)
    assert even.metrics["local_accuracy"] == pytest.approx(TASK.evaluate(model, local.data.x_test, local.data.y_test)["accuracy"])


def test_local_step_limits_reach_the_update() -> None:
    state = seeded_state(TASK, 6)
    capped = trainer(overrides=LocalOverrides(max_steps=3, local_epochs=5))
    update, _, _ = decode_update(capped.run_round(round_start(TASK, state, {"batch_size": 4}))[0])
    assert update.num_steps == 3
    uncapped = trainer(overrides=LocalOverrides(local_epochs=2))
    update, _, _ = decode_update(uncapped.run_round(round_start(TASK, state, {"batch_size": 4}))[0])
    assert update.num_steps == 2 * math.ceil(30 / 4)
