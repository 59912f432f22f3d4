"""The worker's noise share of DP-FedAvg and its DP-SGD training, against numpy and Opacus references."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants.analysis import rdp as opacus_rdp

from coordinator.privacy import CONFIG_CLIP_NORM, CONFIG_COUNT_NOISE_STD, CONFIG_NOISE_STD, METRIC_NOISE_STD, METRIC_UNCLIPPED_SHARE
from fedmq.errors import ConfigError
from fedmq.tasks import LocalData, PartitionSpec, load_task
from worker.privacy import METRIC_SAMPLE_EPSILON, SamplePrivacy, SamplePrivacySettings, privatize_trained_state

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def _states(size: int, delta_value: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    start = {"w": torch.linspace(-1, 1, size), "b": torch.ones(3), "count": torch.tensor(4, dtype=torch.int64)}
    trained = {"w": start["w"] + delta_value, "b": start["b"] + delta_value, "count": torch.tensor(9, dtype=torch.int64)}
    return start, trained


def _delta(start: dict[str, torch.Tensor], private: dict[str, torch.Tensor]) -> np.ndarray:
    return np.concatenate([(private[name] - start[name]).numpy().astype(np.float64).reshape(-1) for name in ("w", "b")])


def test_privatize_without_dp_config_changes_nothing() -> None:
    start, trained = _states(10, 0.5)

    private, metrics = privatize_trained_state(start, trained, {"codec": "float32"})

    assert metrics == {}
    for name in trained:
        assert torch.equal(private[name], trained[name])


def test_privatize_clips_update_to_bound() -> None:
    start, trained = _states(100, 0.5)
    config = {CONFIG_CLIP_NORM: 1.0, CONFIG_NOISE_STD: 0.0}

    private, metrics = privatize_trained_state(start, trained, config, rng=np.random.default_rng(0))

    delta = _delta(start, private)
    original = _delta(start, trained)
    assert float(np.linalg.norm(delta)) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(delta, original / np.linalg.norm(original), rtol=1e-4, atol=1e-6)
    assert int(private["count"]) == 9
    assert metrics == {METRIC_NOISE_STD: 0.0}


def test_privatize_adds_noise_of_configured_std() -> None:
    size = 200_000
    start, trained = _states(size, 0.0)
    config = {CONFIG_CLIP_NORM: 1.0, CONFIG_NOISE_STD: 0.03}

    private, metrics = privatize_trained_state(start, trained, config, rng=np.random.default_rng(1))

    noise = _delta(start, private)
    # Subtracting the start again rounds in float32, far below the 1% tolerance.
    assert float(noise.std()) == pytest.approx(0.03, rel=0.01)
    assert metrics[METRIC_NOISE_STD] == 0.03


def test_privatize_sends_noisy_unclipped_share() -> None:
    start, small = _states(10, 1e-4)
    _, large = _states(10, 10.0)
    config = {CONFIG_CLIP_NORM: 1.0, CONFIG_NOISE_STD: 0.0, CONFIG_COUNT_NOISE_STD: 1e-9}

    _, small_metrics = privatize_trained_state(start, small, config, rng=np.random.default_rng(2))
    _, large_metrics = privatize_trained_state(start, large, config, rng=np.random.default_rng(2))

    assert small_metrics[METRIC_UNCLIPPED_SHARE] == pytest.approx(0.5, abs=1e-6)
    assert large_metrics[METRIC_UNCLIPPED_SHARE] == pytest.approx(-0.5, abs=1e-6)


@pytest.mark.parametrize("config", [{CONFIG_NOISE_STD: 0.1}, {CONFIG_NOISE_STD: -1.0, CONFIG_CLIP_NORM: 1.0}, {CONFIG_NOISE_STD: "x", CONFIG_CLIP_NORM: 1.0}])
def test_privatize_rejects_invalid_config(config: dict[str, object]) -> None:
    start, trained = _states(4, 0.1)

    with pytest.raises(ConfigError):
        privatize_trained_state(start, trained, config)


# DP-SGD


@pytest.fixture(scope="module")
def digits_data() -> LocalData:
    return load_task("digits").load_local_data(0, 10, PartitionSpec(scheme="iid"))


def test_dp_sgd_epsilon_matches_opacus_analysis(digits_data: LocalData, tmp_path: Path) -> None:
    task = load_task("digits")
    torch.manual_seed(0)
    model = task.build_model()
    config = task.default_train_config()
    settings = SamplePrivacySettings(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-5)
    privacy = SamplePrivacy(settings, state_dir=tmp_path, seed=0)

    first = privacy.train(task, model, digits_data, config)
    second = privacy.train(task, model, digits_data, config)

    batches = math.ceil(digits_data.num_train / config.batch_size)
    steps = 2 * config.local_epochs * batches
    rdp = opacus_rdp.compute_rdp(q=1 / batches, noise_multiplier=1.1, steps=steps, orders=ORDERS)
    expected, _ = opacus_rdp.get_privacy_spent(orders=ORDERS, rdp=rdp, delta=1e-5)
    assert first.num_steps + second.num_steps == steps
    assert second.metrics[METRIC_SAMPLE_EPSILON] == pytest.approx(expected, rel=1e-9)
    assert first.metrics[METRIC_SAMPLE_EPSILON] < second.metrics[METRIC_SAMPLE_EPSILON]
    assert second.num_samples == digits_data.num_train

    # A restarted worker continues from the stored history.
    restarted = SamplePrivacy(settings, state_dir=tmp_path)
    assert restarted.epsilon() == pytest.approx(expected, rel=1e-9)


def test_dp_sgd_leaves_no_hooks(digits_data: LocalData) -> None:
    task = load_task("digits")
    model = task.build_model()
    privacy = SamplePrivacy(SamplePrivacySettings(noise_multiplier=1.0), seed=1)

    privacy.train(task, model, digits_data, task.default_train_config())

    assert all(not module._forward_hooks and not module._backward_hooks for module in model.modules())
    assert set(model.state_dict()) == set(task.build_model().state_dict())


def test_dp_sgd_rejects_proximal_term(digits_data: LocalData) -> None:
    task = load_task("digits")
    privacy = SamplePrivacy(SamplePrivacySettings(noise_multiplier=1.0))
    config = task.default_train_config()

    with pytest.raises(ConfigError, match="proximal"):
        privacy.train(task, task.build_model(), digits_data, type(config)(**{**config.__dict__, "proximal_mu": 0.1}))


def test_dp_sgd_reports_epsilon_in_update_metrics() -> None:
    from benchmarks.privacy import simulate, train_config_for, worker_datas
    from coordinator.strategies import load_strategy

    task = load_task("digits")
    datas = worker_datas(task, 3, PartitionSpec(scheme="iid"))
    seen: list[float] = []
    strategy = load_strategy("fedavg")
    add_update = strategy.add_update

    def record(update):  # type: ignore[no-untyped-def]
        seen.append(update.metrics[METRIC_SAMPLE_EPSILON])
        add_update(update)

    strategy.add_update = record  # type: ignore[method-assign]
    result = simulate(
        task, datas, strategy, rounds=2, label="dp-sgd", train_config=train_config_for(task),
        sample_privacy=SamplePrivacySettings(noise_multiplier=1.0),
    )

    assert len(seen) == 6
    assert all(epsilon > 0 for epsilon in seen)
    assert max(seen[3:]) > max(seen[:3])
    assert result.max_sample_epsilon == pytest.approx(max(seen[3:]))
