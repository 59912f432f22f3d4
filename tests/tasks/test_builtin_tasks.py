from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from fedmq.errors import ConfigError, TaskError
from fedmq.tasks import DigitsTask, LocalData, MnistTask, PartitionSpec, TrainConfig
from fedmq.tasks.dataset import ArrayDatasetTask

DIRICHLET = PartitionSpec(scheme="dirichlet", alpha=0.5, seed=0)


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    # These models are too small to gain from intra-op threads, and on a busy machine
    # the threads' synchronisation makes training many times slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def digits() -> DigitsTask:
    return DigitsTask()


@pytest.fixture(scope="module")
def mnist() -> MnistTask:
    return MnistTask()


@pytest.fixture(scope="module")
def digits_data(digits: DigitsTask) -> LocalData:
    return digits.load_local_data(0, 4, PartitionSpec(seed=0))


def seeded_model(task: ArrayDatasetTask, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return task.build_model()


def parameters_distance(model: nn.Module, reference: dict[str, torch.Tensor]) -> float:
    squared = 0.0
    for name, parameter in model.named_parameters():
        squared += float((parameter.detach() - reference[name]).pow(2).sum())
    return squared**0.5


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def states_equal(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


# Datasets and splits


def test_digits_dataset_scaled(digits: DigitsTask) -> None:
    features, labels = digits.load_dataset()

    assert features.shape == (1797, 64)
    assert features.dtype == torch.float32
    assert float(features.min()) == 0.0
    assert float(features.max()) == 1.0
    assert labels.dtype == torch.int64
    assert sorted(labels.unique().tolist()) == list(range(10))


def test_mnist_dataset_scaled(mnist: MnistTask) -> None:
    features, labels = mnist.load_dataset()

    assert features.shape == (5000, 1, 28, 28)
    assert features.dtype == torch.float32
    assert float(features.min()) == 0.0
    assert float(features.max()) == 1.0
    assert labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == [500] * 10


@pytest.mark.parametrize("task_fixture", ["digits", "mnist"])
@pytest.mark.parametrize("spec", [PartitionSpec(), DIRICHLET, PartitionSpec(scheme="shards", seed=3)])
def test_holdout_disjoint_from_workers(
    task_fixture: str, spec: PartitionSpec, request: pytest.FixtureRequest
) -> None:
    task: ArrayDatasetTask = request.getfixturevalue(task_fixture)
    num_rows = len(task.load_dataset()[1])
    holdout = task.holdout_indices()

    worker_rows = []
    for worker_index in range(10):
        train_rows, test_rows = task.worker_indices(worker_index, 10, spec)
        assert np.intersect1d(train_rows, test_rows).size == 0
        worker_rows.extend([train_rows, test_rows])
    all_worker_rows = np.concatenate(worker_rows)

    assert np.intersect1d(all_worker_rows, holdout).size == 0
    assert len(np.unique(all_worker_rows)) == len(all_worker_rows)
    assert np.array_equal(np.sort(np.concatenate([all_worker_rows, holdout])), np.arange(num_rows))


def test_holdout_about_a_fifth_and_stratified(digits: DigitsTask) -> None:
    _, labels = digits.load_dataset()
    x_test, y_test = digits.load_test_set()

    assert len(y_test) == 360
    assert x_test.shape == (360, 64)
    class_shares = torch.bincount(y_test) / len(y_test)
    full_shares = torch.bincount(labels) / len(labels)
    assert torch.allclose(class_shares, full_shares, atol=0.01)


def test_local_data_rows_match_indices(digits: DigitsTask) -> None:
    features, labels = digits.load_dataset()
    train_rows, test_rows = digits.worker_indices(2, 5, DIRICHLET)

    data = digits.load_local_data(2, 5, DIRICHLET)

    assert torch.equal(data.x_train, features[torch.from_numpy(train_rows)])
    assert torch.equal(data.y_train, labels[torch.from_numpy(train_rows)])
    assert torch.equal(data.x_test, features[torch.from_numpy(test_rows)])
    assert torch.equal(data.y_test, labels[torch.from_numpy(test_rows)])


def test_test_set_rows_match_indices(mnist: MnistTask) -> None:
    features, labels = mnist.load_dataset()
    rows = torch.from_numpy(mnist.holdout_indices())

    x_test, y_test = mnist.load_test_set()

    assert torch.equal(x_test, features[rows])
    assert torch.equal(y_test, labels[rows])


def test_local_split_about_four_to_one(digits: DigitsTask) -> None:
    for worker_index in range(10):
        data = digits.load_local_data(worker_index, 10, PartitionSpec(seed=1))
        total = data.num_train + data.num_test

        assert abs(data.num_test - 0.2 * total) <= 1


def test_split_same_for_new_instance(digits: DigitsTask) -> None:
    other = DigitsTask()

    assert np.array_equal(other.holdout_indices(), digits.holdout_indices())
    other_rows = other.worker_indices(3, 10, DIRICHLET)
    rows = digits.worker_indices(3, 10, DIRICHLET)
    for first, second in zip(other_rows, rows, strict=True):
        assert np.array_equal(first, second)


def test_worker_index_out_of_range(digits: DigitsTask) -> None:
    with pytest.raises(ConfigError, match="worker_index must be an integer in \\[0, 4\\) for 4 workers, but got 4"):
        digits.load_local_data(4, 4, PartitionSpec())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"holdout_fraction": 0.0}, "holdout_fraction must be a number in (0, 1), but got 0.0"),
        ({"local_test_fraction": 1.0}, "local_test_fraction must be a number in [0, 1), but got 1.0"),
        ({"holdout_seed": -1}, "holdout_seed must be an integer in [0, 2**32), but got -1"),
        ({"hidden_units": 0}, "hidden_units must be an integer >= 1, but got 0"),
    ],
)
def test_digits_option_validation(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        DigitsTask(**options)  # type: ignore[arg-type]

    assert str(caught.value) == message


def test_task_repr_lists_options() -> None:
    task = MnistTask(channels=4)

    assert repr(task) == "MnistTask(holdout_fraction=0.2, local_test_fraction=0.2, holdout_seed=0, channels=4)"
    assert MnistTask(**task.options()).options() == task.options()


# Models


def test_mnist_model_has_batchnorm_buffers(mnist: MnistTask) -> None:
    state = seeded_model(mnist).state_dict()

    assert "bn1.running_mean" in state
    assert "bn1.running_var" in state
    assert state["bn1.num_batches_tracked"].dtype == torch.int64


def test_mnist_training_updates_batchnorm(mnist: MnistTask) -> None:
    model = seeded_model(mnist)
    data = mnist.load_local_data(0, 10, PartitionSpec())
    before = clone_state(model)

    result = mnist.train(model, data, TrainConfig(max_steps=3))

    after = model.state_dict()
    assert result.num_steps == 3
    assert int(after["bn1.num_batches_tracked"]) == 3
    assert not torch.equal(after["bn1.running_mean"], before["bn1.running_mean"])


def test_build_model_deterministic_under_seed(digits: DigitsTask) -> None:
    assert states_equal(seeded_model(digits, 4).state_dict(), seeded_model(digits, 4).state_dict())
    assert not states_equal(seeded_model(digits, 4).state_dict(), seeded_model(digits, 5).state_dict())


# Training


def test_training_reduces_loss(digits: DigitsTask, digits_data: LocalData) -> None:
    model = seeded_model(digits)
    before = digits.evaluate(model, digits_data.x_train, digits_data.y_train)

    result = digits.train(model, digits_data, digits.default_train_config())

    after = digits.evaluate(model, digits_data.x_train, digits_data.y_train)
    assert after["loss"] < 0.5 * before["loss"]
    assert after["accuracy"] > 0.8
    assert result.num_samples == digits_data.num_train
    assert result.num_steps == 2 * -(-digits_data.num_train // 16)
    assert result.metrics["loss"] > 0.0
    assert 0.0 < result.metrics["accuracy"] <= 1.0
    assert result.metrics["train_time_s"] > 0.0


def test_training_deterministic_for_seed(digits: DigitsTask, digits_data: LocalData) -> None:
    config = TrainConfig(seed=11, local_epochs=2)
    first = seeded_model(digits)
    second = seeded_model(digits)
    other_seed = seeded_model(digits)

    first_result = digits.train(first, digits_data, config)
    second_result = digits.train(second, digits_data, config)
    digits.train(other_seed, digits_data, TrainConfig(seed=12, local_epochs=2))

    assert states_equal(first.state_dict(), second.state_dict())
    assert first_result.metrics["loss"] == second_result.metrics["loss"]
    assert not states_equal(first.state_dict(), other_seed.state_dict())


def test_training_restores_global_rng(digits: DigitsTask, digits_data: LocalData) -> None:
    model = seeded_model(digits)
    torch.manual_seed(99)
    expected = torch.rand(3)
    torch.manual_seed(99)

    digits.train(model, digits_data, TrainConfig(max_steps=2))

    assert torch.equal(torch.rand(3), expected)


def test_dropout_deterministic_for_seed(digits_data: LocalData) -> None:
    task = DigitsTask()

    def train_with_dropout(global_seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 32), nn.Dropout(0.5), nn.Linear(32, 10))
        torch.manual_seed(global_seed)
        task.train(model, digits_data, TrainConfig(seed=3, max_steps=5))
        return clone_state(model)

    assert states_equal(train_with_dropout(1), train_with_dropout(2))


def test_proximal_term_pulls_toward_global(digits: DigitsTask, digits_data: LocalData) -> None:
    global_model = seeded_model(digits)
    global_params = clone_state(global_model)
    plain = seeded_model(digits)
    proximal = seeded_model(digits)

    digits.train(plain, digits_data, TrainConfig(local_epochs=3, seed=1), global_params=global_params)
    digits.train(
        proximal, digits_data, TrainConfig(local_epochs=3, seed=1, proximal_mu=1.0), global_params=global_params
    )

    assert not states_equal(plain.state_dict(), proximal.state_dict())
    assert parameters_distance(proximal, global_params) < 0.8 * parameters_distance(plain, global_params)


def test_proximal_term_gradient(digits: DigitsTask, digits_data: LocalData) -> None:
    # Both runs start from the same weights and draw the same first batch, so their
    # first gradients differ by exactly the proximal gradient mu * (w - w_global).
    global_params = clone_state(seeded_model(digits, seed=1))
    initial = clone_state(seeded_model(digits, seed=2))
    gradients: dict[str, dict[str, torch.Tensor]] = {}

    for label, mu in [("plain", 0.0), ("proximal", 2.0)]:
        model = digits.build_model()
        model.load_state_dict(initial)
        recorded: dict[str, torch.Tensor] = {}
        gradients[label] = recorded

        def record(hooked: nn.Module, recorded: dict[str, torch.Tensor] = recorded) -> None:
            for name, parameter in hooked.named_parameters():
                recorded[name] = parameter.grad.detach().clone()

        config = TrainConfig(max_steps=1, proximal_mu=mu)
        digits.train(model, digits_data, config, global_params=global_params, gradient_hook=record)

    for name in initial:
        expected = 2.0 * (initial[name] - global_params[name])
        assert torch.allclose(gradients["proximal"][name] - gradients["plain"][name], expected, atol=1e-5)


def test_proximal_needs_global_params(digits: DigitsTask, digits_data: LocalData) -> None:
    with pytest.raises(ConfigError, match="proximal_mu is 0.1 but global_params is None"):
        digits.train(seeded_model(digits), digits_data, TrainConfig(proximal_mu=0.1))


def test_proximal_global_params_mismatch(digits: DigitsTask, digits_data: LocalData) -> None:
    model = seeded_model(digits)
    missing = {name: tensor for name, tensor in clone_state(model).items() if name != "fc2.bias"}
    wrong_shape = clone_state(model) | {"fc2.bias": torch.zeros(3)}
    config = TrainConfig(proximal_mu=0.1)

    with pytest.raises(TaskError, match="global_params has no entry for the model parameter 'fc2.bias'"):
        digits.train(model, digits_data, config, global_params=missing)
    with pytest.raises(TaskError, match="global_params\\['fc2.bias'\\] must have shape \\(10,\\), but got \\(3,\\)"):
        digits.train(model, digits_data, config, global_params=wrong_shape)


def test_max_steps_caps_training(digits: DigitsTask, digits_data: LocalData) -> None:
    config = TrainConfig(local_epochs=5, batch_size=8, max_steps=4)

    result = digits.train(seeded_model(digits), digits_data, config)

    assert result.num_steps == 4
    assert result.num_samples == 32


def test_max_steps_beyond_first_epoch(digits: DigitsTask, digits_data: LocalData) -> None:
    steps_per_epoch = -(-digits_data.num_train // 32)

    result = digits.train(
        seeded_model(digits), digits_data, TrainConfig(local_epochs=3, max_steps=steps_per_epoch + 1)
    )

    assert result.num_steps == steps_per_epoch + 1
    assert result.num_samples == digits_data.num_train


def test_time_budget_caps_training(digits: DigitsTask, digits_data: LocalData) -> None:
    def slow_step(model: nn.Module) -> None:
        time.sleep(0.05)

    config = TrainConfig(local_epochs=10, batch_size=8, time_budget_s=0.2)
    full_steps = 10 * -(-digits_data.num_train // 8)

    result = digits.train(seeded_model(digits), digits_data, config, gradient_hook=slow_step)

    assert 1 <= result.num_steps <= 6
    assert result.num_steps < full_steps
    assert result.metrics["train_time_s"] < 2.0


def test_gradient_hook_runs_before_step(digits: DigitsTask, digits_data: LocalData) -> None:
    model = seeded_model(digits)
    before = clone_state(model)
    calls = []

    def zero_gradients(hooked: nn.Module) -> None:
        calls.append(hooked)
        for parameter in hooked.parameters():
            parameter.grad.zero_()

    result = digits.train(model, digits_data, TrainConfig(max_steps=3), gradient_hook=zero_gradients)

    assert len(calls) == 3
    assert all(hooked is model for hooked in calls)
    assert result.num_steps == 3
    assert states_equal(model.state_dict(), before)


def test_empty_local_data_untouched(digits: DigitsTask) -> None:
    model = seeded_model(digits)
    model.eval()
    before = clone_state(model)
    empty = LocalData(
        x_train=torch.empty(0, 64), y_train=torch.empty(0, dtype=torch.int64),
        x_test=torch.empty(0, 64), y_test=torch.empty(0, dtype=torch.int64),
    )

    result = digits.train(model, empty, TrainConfig(proximal_mu=1.0))

    assert result.num_samples == 0
    assert result.num_steps == 0
    assert result.metrics == {"loss": 0.0, "accuracy": 0.0, "train_time_s": 0.0}
    assert states_equal(model.state_dict(), before)
    assert not model.training


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"local_epochs": 0}, "TrainConfig.local_epochs must be an integer >= 1, but got 0"),
        ({"learning_rate": 0.0}, "TrainConfig.learning_rate must be a finite number > 0, but got 0.0"),
        ({"learning_rate": float("inf")}, "TrainConfig.learning_rate must be a finite number > 0, but got inf"),
        ({"batch_size": 0}, "TrainConfig.batch_size must be an integer >= 1, but got 0"),
        ({"batch_size": True}, "TrainConfig.batch_size must be an integer >= 1, but got True"),
        ({"momentum": 1.0}, "TrainConfig.momentum must be a finite number in [0, 1), but got 1.0"),
        ({"weight_decay": -0.1}, "TrainConfig.weight_decay must be a finite number >= 0, but got -0.1"),
        ({"seed": 2**64}, "TrainConfig.seed must be an integer in [0, 2**64), but got 18446744073709551616"),
        ({"max_steps": 0}, "TrainConfig.max_steps must be an integer >= 1, but got 0"),
        ({"time_budget_s": 0}, "TrainConfig.time_budget_s must be a finite number > 0, but got 0"),
        ({"proximal_mu": -1.0}, "TrainConfig.proximal_mu must be a finite number >= 0, but got -1.0"),
    ],
)
def test_train_config_validation(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        TrainConfig(**options)  # type: ignore[arg-type]

    assert str(caught.value) == message


# Evaluation


def test_evaluate_empty_input(digits: DigitsTask) -> None:
    metrics = digits.evaluate(seeded_model(digits), torch.empty(0, 64), torch.empty(0, dtype=torch.int64))

    assert metrics == {"loss": 0.0, "accuracy": 0.0, "num_samples": 0.0}


def test_evaluate_batches_agree(digits: DigitsTask) -> None:
    model = seeded_model(digits)
    x_test, y_test = digits.load_test_set()

    whole = digits.evaluate(model, x_test, y_test)
    batched = digits.evaluate(model, x_test, y_test, batch_size=7)

    with torch.no_grad():
        logits = model(x_test)
    expected_loss = float(nn.functional.cross_entropy(logits, y_test))
    expected_accuracy = float((logits.argmax(dim=1) == y_test).float().mean())
    assert whole["num_samples"] == 360
    assert whole["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert whole["accuracy"] == pytest.approx(expected_accuracy)
    assert batched["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert batched["accuracy"] == whole["accuracy"]


def test_evaluate_restores_training_mode(mnist: MnistTask) -> None:
    model = seeded_model(mnist)
    model.train()
    x_test, y_test = mnist.load_test_set()

    metrics = mnist.evaluate(model, x_test[:64], y_test[:64])

    assert model.training
    assert metrics["num_samples"] == 64
    assert int(model.state_dict()["bn1.num_batches_tracked"]) == 0


# Federated averaging


def test_digits_fedavg_reaches_target(digits: DigitsTask) -> None:
    """FedAvg with 10 workers on a Dirichlet(0.5) split reaches 95% test accuracy within 30 rounds."""
    num_workers = 10
    workers = [digits.load_local_data(index, num_workers, DIRICHLET) for index in range(num_workers)]
    x_test, y_test = digits.load_test_set()
    global_model = seeded_model(digits)
    base_config = digits.default_train_config()

    accuracy = 0.0
    for server_round in range(1, 31):
        global_state = clone_state(global_model)
        states, weights = [], []
        for index, data in enumerate(workers):
            local_model = digits.build_model()
            local_model.load_state_dict(global_state)
            config = dataclasses.replace(base_config, seed=server_round * 100 + index)
            result = digits.train(local_model, data, config)
            states.append(local_model.state_dict())
            weights.append(result.num_samples)

        total = sum(weights)
        averaged = {}
        for name in global_state:
            averaged[name] = sum(state[name] * (weight / total) for state, weight in zip(states, weights))
        global_model.load_state_dict(averaged)
        accuracy = digits.evaluate(global_model, x_test, y_test)["accuracy"]
        if accuracy >= 0.95:
            break

    assert accuracy >= 0.95
