"""Each strategy's server update against an independent numpy computation on small tensors."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pytest
import torch

from coordinator.aggregation import ZeroWeightError
from coordinator.strategies import (
    STRATEGIES,
    ClientUpdate,
    DeltaSgd,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedNova,
    FedProx,
    FedYogi,
    Ifca,
    Scaffold,
    Strategy,
    StrategyContext,
    load_strategy,
    parse_strategy_options,
)
from coordinator.strategies.common import (
    IFCA_CHOICE,
    SCAFFOLD_CONTROL_PREFIX,
    SCAFFOLD_DELTA_PREFIX,
    effective_steps,
    ifca_cluster_name,
    parse_patterns,
    split_personal,
)
from coordinator.strategies.evaluation import summarize_local_evaluation, worst_fraction_mean
from coordinator.validation import RejectedUpdate
from fedmq.errors import CheckpointError, ConfigError

RNG = np.random.default_rng(7)


def global_state() -> dict[str, torch.Tensor]:
    """A model of two parameters, a floating buffer and an integer counter."""
    return {
        "layer.weight": torch.tensor(RNG.normal(size=(3, 2)), dtype=torch.float32),
        "layer.bias": torch.tensor(RNG.normal(size=(3,)), dtype=torch.float32),
        "norm.running_mean": torch.tensor(RNG.normal(size=(3,)), dtype=torch.float32),
        "norm.num_batches_tracked": torch.tensor(5, dtype=torch.int64),
    }


PARAMETERS = frozenset({"layer.weight", "layer.bias"})
CONTEXT = StrategyContext(train_config={"momentum": 0.0, "learning_rate": 0.1}, parameter_names=PARAMETERS, seed=0)


def random_update(worker: str, num_samples: int, *, num_steps: int = 4, counter: int = 9, aux: Mapping[str, np.ndarray] | None = None) -> ClientUpdate:
    state = global_state()
    values = {name: RNG.normal(size=tuple(tensor.shape)).astype(np.float32) for name, tensor in state.items() if tensor.is_floating_point()}
    values["norm.num_batches_tracked"] = np.array(counter, dtype=np.int64)
    return ClientUpdate(worker, num_samples, num_steps, values, aux=dict(aux or {}))


def run_round(strategy: Strategy, state: dict[str, torch.Tensor], updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
    strategy.begin_round(state)
    for update in updates:
        strategy.check_update(update)
        strategy.add_update(update)
    return strategy.finish_round(state)


def weighted_mean(updates: list[ClientUpdate], name: str) -> np.ndarray:
    return np.average(np.stack([u.values[name] for u in updates]).astype(np.float64), axis=0, weights=[u.num_samples for u in updates])


def numpy_state(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: tensor.numpy().astype(np.float64) for name, tensor in state.items()}


# FedAvg, FedProx, Δ-SGD


def test_fedavg_is_sample_weighted_mean() -> None:
    state = global_state()
    updates = [random_update("a", 10, counter=8), random_update("b", 30, counter=12)]
    strategy = FedAvg(server_learning_rate=0.5)
    strategy.setup(CONTEXT)
    new = run_round(strategy, state, updates)
    for name in ("layer.weight", "layer.bias", "norm.running_mean"):
        expected = state[name].numpy() + 0.5 * weighted_mean(updates, name)
        np.testing.assert_allclose(new[name].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert int(new["norm.num_batches_tracked"]) == 11  # round((8 * 10 + 12 * 30) / 40)


def test_fedavg_without_weight_raises() -> None:
    strategy = FedAvg()
    with pytest.raises(ZeroWeightError):
        run_round(strategy, global_state(), [random_update("a", 0)])


def test_fedprox_sends_mu() -> None:
    explicit = FedProx(proximal_mu=0.3)
    assert explicit.round_config(1) == {"strategy": "fedprox", "proximal_mu": 0.3}
    from_run = FedProx()
    from_run.setup(StrategyContext(train_config={"proximal_mu": 0.05}))
    assert from_run.round_config(1)["proximal_mu"] == 0.05
    default = FedProx()
    assert default.round_config(1)["proximal_mu"] == 0.01


def test_fedprox_aggregates_like_fedavg() -> None:
    state = global_state()
    updates = [random_update("a", 3), random_update("b", 5)]
    prox, avg = FedProx(proximal_mu=0.1), FedAvg()
    prox_state = run_round(prox, state, updates)
    avg_state = run_round(avg, state, updates)
    for name in state:
        assert torch.equal(prox_state[name], avg_state[name])


def test_deltasgd_sends_amplifier_and_plain_sgd() -> None:
    config = DeltaSgd(amplifier=0.2).round_config(3)
    assert config == {"strategy": "deltasgd", "delta_sgd_amplifier": 0.2, "momentum": 0.0}


# FedAvgM and the FedOpt family


def test_fedavgm_matches_reference_over_rounds() -> None:
    beta, lr = 0.8, 0.7
    strategy = FedAvgM(server_learning_rate=lr, server_momentum=beta)
    strategy.setup(CONTEXT)
    state = global_state()
    reference = numpy_state(state)
    velocity = {name: 0.0 for name in PARAMETERS}
    for round_number in range(3):
        updates = [random_update("a", 2 + round_number), random_update("b", 7)]
        state = run_round(strategy, state, updates)
        for name in PARAMETERS:
            velocity[name] = beta * velocity[name] + weighted_mean(updates, name)
            reference[name] = reference[name] + lr * velocity[name]
        # A floating buffer moves by the plain mean delta.
        reference["norm.running_mean"] = reference["norm.running_mean"] + weighted_mean(updates, "norm.running_mean")
        for name in (*PARAMETERS, "norm.running_mean"):
            np.testing.assert_allclose(state[name].numpy(), reference[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy_class", [FedAdam, FedYogi, FedAdagrad])
def test_fedopt_matches_reference_over_rounds(strategy_class: type[FedAdam]) -> None:
    lr, beta1, beta2, tau = 0.05, 0.85, 0.95, 0.01
    strategy = strategy_class(server_learning_rate=lr, beta1=beta1, beta2=beta2, tau=tau)
    strategy.setup(CONTEXT)
    state = global_state()
    reference = numpy_state(state)
    m = {name: np.zeros_like(reference[name]) for name in PARAMETERS}
    v = {name: np.full_like(reference[name], tau**2) for name in PARAMETERS}
    for round_number in range(4):
        updates = [random_update("a", 4), random_update("b", 1 + round_number)]
        state = run_round(strategy, state, updates)
        for name in PARAMETERS:
            delta = weighted_mean(updates, name)
            m[name] = beta1 * m[name] + (1 - beta1) * delta
            if strategy_class is FedAdagrad:
                v[name] = v[name] + delta**2
            elif strategy_class is FedYogi:
                v[name] = v[name] - (1 - beta2) * delta**2 * np.sign(v[name] - delta**2)
            else:
                v[name] = beta2 * v[name] + (1 - beta2) * delta**2
            reference[name] = reference[name] + lr * m[name] / (np.sqrt(v[name]) + tau)
        reference["norm.running_mean"] = reference["norm.running_mean"] + weighted_mean(updates, "norm.running_mean")
        for name in (*PARAMETERS, "norm.running_mean"):
            np.testing.assert_allclose(state[name].numpy(), reference[name], rtol=1e-4, atol=1e-5)


def test_fedopt_rejects_other_rule_checkpoint() -> None:
    adam = FedAdam()
    run_round(adam, global_state(), [random_update("a", 1)])
    yogi = FedYogi()
    with pytest.raises(CheckpointError, match="adam"):
        yogi.load_state(adam.state_tensors(), adam.state_scalars())


def test_fedopt_default_learning_rates() -> None:
    assert FedAdam().server_learning_rate == 0.03
    assert FedYogi().server_learning_rate == 0.03
    assert FedAdagrad().server_learning_rate == 0.1
    assert FedAdam(server_learning_rate=0.2).server_learning_rate == 0.2


# FedNova


def momentum_normalizer_by_sum(steps: int, beta: float) -> float:
    """FedNova's ||a_i||_1 for momentum SGD as the explicit sum over steps of (1 - beta**k) / (1 - beta)."""
    return sum((1 - beta**k) / (1 - beta) for k in range(1, steps + 1))


@pytest.mark.parametrize("steps", [0, 1, 2, 7, 40])
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
def test_effective_steps_is_sum_of_momentum_factors(steps: int, beta: float) -> None:
    assert effective_steps(steps, beta) == pytest.approx(momentum_normalizer_by_sum(steps, beta), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fednova_matches_paper_formula(momentum: float) -> None:
    lr_server = 0.9
    strategy = FedNova(server_learning_rate=lr_server)
    strategy.setup(StrategyContext(train_config={"momentum": momentum, "learning_rate": 0.1}, parameter_names=PARAMETERS))
    state = global_state()
    updates = [random_update("slow", 10, num_steps=2), random_update("fast", 30, num_steps=12), random_update("mid", 20, num_steps=5)]
    new = run_round(strategy, state, updates)

    samples = np.array([u.num_samples for u in updates], dtype=np.float64)
    p = samples / samples.sum()
    a = np.array([momentum_normalizer_by_sum(u.num_steps, momentum) for u in updates])
    tau_eff = float((p * a).sum())
    for name in PARAMETERS:
        direction = sum(p_i * u.values[name].astype(np.float64) / a_i for p_i, a_i, u in zip(p, a, updates))
        expected = state[name].numpy() + lr_server * tau_eff * direction
        np.testing.assert_allclose(new[name].numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["norm.running_mean"].numpy(), state["norm.running_mean"].numpy() + weighted_mean(updates, "norm.running_mean"), rtol=1e-5)
    assert strategy.round_summary()["tau_eff"] == pytest.approx(tau_eff)


def test_fednova_equals_fedavg_for_equal_steps() -> None:
    state = global_state()
    updates = [random_update("a", 4, num_steps=6), random_update("b", 9, num_steps=6)]
    nova, avg = FedNova(), FedAvg()
    nova.setup(CONTEXT)
    nova_state, avg_state = run_round(nova, state, updates), run_round(avg, state, updates)
    for name in PARAMETERS:
        np.testing.assert_allclose(nova_state[name].numpy(), avg_state[name].numpy(), rtol=1e-5, atol=1e-6)


def test_fednova_slow_worker_keeps_its_share() -> None:
    # Two workers with opposite directions of the same per-step size: FedAvg follows
    # the one with more steps, FedNova cancels them out.
    state = {"w": torch.zeros(2)}
    per_step = np.array([1.0, -1.0], dtype=np.float32)
    updates = [
        ClientUpdate("slow", 10, 1, {"w": per_step * 1}),
        ClientUpdate("fast", 10, 9, {"w": -per_step * 9}),
    ]
    nova = FedNova()
    nova.setup(StrategyContext(train_config={"momentum": 0.0}, parameter_names=frozenset({"w"})))
    np.testing.assert_allclose(run_round(nova, state, updates)["w"].numpy(), [0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(run_round(FedAvg(), state, updates)["w"].numpy(), [-4.0, 4.0], atol=1e-6)


def test_fednova_proximal_normalizer() -> None:
    strategy = FedNova()
    strategy.setup(StrategyContext(train_config={"momentum": 0.0, "learning_rate": 0.1, "proximal_mu": 0.5}, parameter_names=PARAMETERS))
    strategy.begin_round(global_state())
    strategy.add_update(random_update("a", 3, num_steps=4))
    shrink = 0.1 * 0.5
    assert strategy.round_summary()["normalizers"] == [round((1 - (1 - shrink) ** 4) / shrink, 4)]


# SCAFFOLD


def scaffold_update(worker: str, num_samples: int, state: Mapping[str, torch.Tensor]) -> ClientUpdate:
    aux = {SCAFFOLD_DELTA_PREFIX + name: RNG.normal(size=tuple(state[name].shape)).astype(np.float32) for name in PARAMETERS}
    return random_update(worker, num_samples, aux=aux)


def test_scaffold_server_matches_paper() -> None:
    strategy = Scaffold(server_learning_rate=0.8, num_clients=5)
    strategy.setup(CONTEXT)
    state = global_state()
    control = {name: np.zeros(tuple(state[name].shape)) for name in PARAMETERS}
    for round_number in range(2):
        strategy.begin_round(state)
        aux = strategy.round_aux(round_number + 1, state)
        assert set(aux) == {SCAFFOLD_CONTROL_PREFIX + name for name in PARAMETERS}
        for name in PARAMETERS:
            np.testing.assert_allclose(aux[SCAFFOLD_CONTROL_PREFIX + name].numpy(), control[name], atol=1e-6)
        updates = [scaffold_update("a", 6, state), scaffold_update("b", 2, state), scaffold_update("c", 2, state)]
        for update in updates:
            strategy.check_update(update)
            strategy.add_update(update)
        new = strategy.finish_round(state)
        for name in PARAMETERS:
            # x <- x + lr_g * mean(delta_y); c <- c + |S| / N * mean(delta_c) = c + sum(delta_c) / N.
            expected_x = state[name].numpy() + 0.8 * weighted_mean(updates, name)
            np.testing.assert_allclose(new[name].numpy(), expected_x, rtol=1e-5, atol=1e-6)
            control[name] = control[name] + sum(u.aux[SCAFFOLD_DELTA_PREFIX + name] for u in updates) / 5
            np.testing.assert_allclose(strategy.control[name].numpy(), control[name], rtol=1e-5, atol=1e-6)
        state = new
    assert "norm.running_mean" not in strategy.control


def test_scaffold_counts_workers_seen() -> None:
    strategy = Scaffold()
    strategy.setup(CONTEXT)
    state = global_state()
    strategy.begin_round(state)
    updates = [scaffold_update(worker, 1, state) for worker in ("a", "b", "c", "d")]
    for update in updates:
        strategy.add_update(update)
    strategy.finish_round(state)
    assert strategy.total_clients() == 4
    expected = sum(u.aux[SCAFFOLD_DELTA_PREFIX + "layer.bias"] for u in updates) / 4
    np.testing.assert_allclose(strategy.control["layer.bias"].numpy(), expected, rtol=1e-5)


def test_scaffold_rejects_update_without_control_variate() -> None:
    strategy = Scaffold()
    strategy.setup(CONTEXT)
    state = global_state()
    strategy.begin_round(state)
    with pytest.raises(RejectedUpdate) as missing:
        strategy.check_update(random_update("a", 1))
    assert missing.value.reason == "missing_control_variate"
    bad = scaffold_update("b", 1, state)
    bad.aux = {**bad.aux, SCAFFOLD_DELTA_PREFIX + "layer.bias": np.zeros(7, dtype=np.float32)}  # type: ignore[misc]
    with pytest.raises(RejectedUpdate) as wrong:
        strategy.check_update(bad)
    assert wrong.value.reason == "wrong_shape"


def test_scaffold_sets_local_momentum() -> None:
    assert Scaffold().round_config(1)["momentum"] == 0.0
    assert Scaffold(local_momentum=0.9).round_config(1)["momentum"] == 0.9


# IFCA


def ifca_context() -> StrategyContext:
    def build_state(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return {name: torch.randn(tensor.shape).to(tensor.dtype) if tensor.is_floating_point() else tensor.clone() for name, tensor in global_state().items()}

    return StrategyContext(parameter_names=PARAMETERS, seed=3, build_state=build_state)


def ifca_update(worker: str, num_samples: int, choice: int) -> ClientUpdate:
    return random_update(worker, num_samples, aux={IFCA_CHOICE: np.array([choice], dtype=np.int64)})


def test_ifca_aggregates_each_cluster_separately() -> None:
    strategy = Ifca(num_clusters=3)
    strategy.setup(ifca_context())
    state = global_state()
    strategy.begin_round(state)
    initial = [{name: tensor.clone() for name, tensor in cluster.items()} for cluster in strategy.clusters]
    assert torch.equal(initial[0]["layer.weight"], state["layer.weight"])
    assert not torch.equal(initial[1]["layer.weight"], initial[2]["layer.weight"])

    # Round start: cluster 0 in the weights, the others in aux.
    config = strategy.round_config(1)
    assert config["ifca_clusters"] == 3 and config["ifca_weights_cluster"] == 0
    aux = strategy.round_aux(1, state)
    assert set(aux) == {ifca_cluster_name(k, name) for k in (1, 2) for name in state}

    updates = [ifca_update("a", 2, 2), ifca_update("b", 6, 2), ifca_update("c", 3, 0)]
    for update in updates:
        strategy.check_update(update)
        strategy.add_update(update)
    new = strategy.finish_round(state)

    for name in PARAMETERS:
        np.testing.assert_allclose(strategy.clusters[2][name].numpy(), initial[2][name].numpy() + weighted_mean(updates[:2], name), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(strategy.clusters[0][name].numpy(), initial[0][name].numpy() + updates[2].values[name], rtol=1e-5, atol=1e-6)
        assert torch.equal(strategy.clusters[1][name], initial[1][name])
    # Cluster 2 had the most samples, so it becomes the global model and the weights of the next round start.
    assert strategy.weights_cluster == 2
    for name in PARAMETERS:
        assert torch.equal(new[name], strategy.clusters[2][name])
    assert strategy.round_summary()["members"] == {"0": ["c"], "1": [], "2": ["a", "b"]}
    assert strategy.round_summary()["cluster_samples"] == [3, 0, 8]


@pytest.mark.parametrize(
    "aux",
    [{}, {IFCA_CHOICE: np.array([3], dtype=np.int64)}, {IFCA_CHOICE: np.array([0.0], dtype=np.float32)}, {IFCA_CHOICE: np.array([0, 1], dtype=np.int64)}],
)
def test_ifca_rejects_invalid_choice(aux: dict[str, np.ndarray]) -> None:
    strategy = Ifca(num_clusters=3)
    strategy.setup(ifca_context())
    strategy.begin_round(global_state())
    with pytest.raises(RejectedUpdate):
        strategy.check_update(random_update("a", 1, aux=aux))


def test_ifca_needs_model_factory() -> None:
    strategy = Ifca()
    with pytest.raises(ConfigError, match="build_state"):
        strategy.begin_round(global_state())


def test_ifca_checkpoint_keeps_every_cluster() -> None:
    strategy = Ifca(num_clusters=2)
    strategy.setup(ifca_context())
    run_round(strategy, global_state(), [ifca_update("a", 1, 1)])
    restored = Ifca(num_clusters=2)
    restored.load_state(strategy.state_tensors(), strategy.state_scalars())
    assert restored.weights_cluster == 1
    for index in range(2):
        for name, tensor in strategy.clusters[index].items():
            assert torch.equal(restored.clusters[index][name], tensor)
    with pytest.raises(CheckpointError, match="num_clusters"):
        Ifca(num_clusters=3).load_state(strategy.state_tensors(), strategy.state_scalars())


# Personal layers and registry


def test_personal_tensors_stay_out_of_aggregation() -> None:
    state = global_state()
    shared, personal = split_personal(state, parse_patterns("layer.bias,norm.*"))
    assert set(shared) == {"layer.weight"}
    assert set(personal) == {"layer.bias", "norm.running_mean", "norm.num_batches_tracked"}
    strategy = FedAdam()
    strategy.setup(CONTEXT)
    updates = [ClientUpdate("a", 1, 1, {"layer.weight": np.ones((3, 2), dtype=np.float32)})]
    strategy.begin_round(shared)
    strategy.add_update(updates[0])
    new = strategy.finish_round(state)
    for name in personal:
        assert torch.equal(new[name], state[name])
    assert not torch.equal(new["layer.weight"], state["layer.weight"])


def test_registry_and_options() -> None:
    assert set(STRATEGIES) >= {"fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "scaffold", "fednova", "deltasgd", "ifca"}
    options = parse_strategy_options(["num_clusters=3", "server-learning-rate=0.5", "flag=true", "name=abc"])
    assert options == {"num_clusters": 3, "server_learning_rate": 0.5, "flag": True, "name": "abc"}
    assert isinstance(load_strategy("ifca", **{"num_clusters": 3}), Ifca)
    with pytest.raises(ConfigError, match="must be one of"):
        load_strategy("fedsomething")
    with pytest.raises(ConfigError, match="invalid options"):
        load_strategy("fedavgm", server_momentum=1.5)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_strategy_options(["novalue"])


# Federated evaluation summary


def test_local_evaluation_summary() -> None:
    metrics = {
        f"w{index}": {"local_accuracy": accuracy, "local_loss": 1 - accuracy, "local_test_samples": samples}
        for index, (accuracy, samples) in enumerate([(0.5, 10.0), (0.9, 30.0), (0.7, 20.0), (1.0, 5.0), (0.8, 0.0)])
    }
    metrics["w1"]["personal_accuracy"] = 0.95
    metrics["w1"]["personal_loss"] = 0.1
    summary = summarize_local_evaluation(metrics)
    # The worker with an empty test split is left out.
    assert summary["local_workers"] == 4
    assert summary["local_accuracy_mean"] == pytest.approx((0.5 + 0.9 + 0.7 + 1.0) / 4)
    assert summary["local_accuracy_weighted"] == pytest.approx((0.5 * 10 + 0.9 * 30 + 0.7 * 20 + 1.0 * 5) / 65)
    assert summary["local_accuracy_worst10"] == pytest.approx(0.5)
    assert summary["local_loss_weighted"] == pytest.approx((0.5 * 10 + 0.1 * 30 + 0.3 * 20 + 0.0 * 5) / 65)
    assert summary["personal_workers"] == 1
    assert summary["personal_accuracy_mean"] == pytest.approx(0.95)
    assert summarize_local_evaluation({"w": {"loss": 1.0}}) == {}


def test_worst_fraction_takes_lowest_decile() -> None:
    values = [float(v) for v in range(1, 21)]
    assert worst_fraction_mean(values) == pytest.approx(1.5)
    assert worst_fraction_mean([0.3]) == 0.3
    assert math.isclose(worst_fraction_mean(list(range(11))), 0.5)
