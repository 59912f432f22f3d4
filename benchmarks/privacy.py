"""Privacy/utility trade-off and Byzantine robustness on digits: ``python -m benchmarks.privacy``.

Three experiments on the scikit-learn digits task:

1. Client-level DP-FedAvg: test accuracy and the epsilon spent, for several noise
   multipliers, with each of ``--dp-workers`` workers taking part in a round with
   probability ``--participation`` (Poisson sampling, as the accountant assumes).
2. Sample-level DP-SGD on every worker (Opacus): test accuracy and the largest
   per-record epsilon of any worker, for several noise multipliers.
3. Byzantine workers: 2 of 10 workers send their honest update scaled by -100,
   against FedAvg and the robust strategies, next to FedAvg without attackers.

The runs are in-process simulations without a broker. Each round goes through the
coordinator's Strategy classes, the workers' ``LocalTrainer`` (with its privacy
steps), and the message encoding and decoding (``encode_message``,
``decode_message``, ``decode_update``) with the float32 codec. The coordinator's
norm-outlier gate (``coordinator.validation.NormGate``) is not part of the
simulation, so the Byzantine updates reach the strategies. Over a broker the gate
would reject most of them, because a -100x update exceeds its default bound of 50
times the median honest norm.

Outputs go to ``--output`` (default ``runs/privacy``): ``results.json`` and
``results.md``. ``--write-docs`` replaces the results section of ``docs/privacy.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coordinator.aggregation import ZeroWeightError
from coordinator.privacy import PrivateStrategy
from coordinator.strategies import ClientUpdate, Strategy, StrategyContext, load_strategy
from coordinator.validation import decode_aux, decode_update, expected_tensors
from fedmq.errors import FedmqError
from fedmq.tasks import LocalData, PartitionSpec, Task, load_task
from schemas.messages import RoundStart, Update, decode_message, encode_message
from schemas.tensors import encode_state
from worker.privacy import METRIC_SAMPLE_EPSILON, SamplePrivacy, SamplePrivacySettings
from worker.training import LocalOverrides, LocalTrainer

logger = logging.getLogger("benchmarks.privacy")

DOCS_PATH = Path("docs/privacy.md")
RESULTS_START = "<!-- privacy results start -->"
RESULTS_END = "<!-- privacy results end -->"
SEED = 0


# Simulation


@dataclass(frozen=True)
class Attack:
    """Workers that send their honest update multiplied by ``scale`` instead of the update itself."""

    workers: frozenset[str]
    scale: float = -100.0


@dataclass
class SimulationResult:
    """Per-round test accuracy and the final privacy figures of one simulated run."""

    label: str
    accuracy: list[float] = field(default_factory=list)
    participants: list[int] = field(default_factory=list)
    privacy: dict[str, Any] | None = None
    max_sample_epsilon: float | None = None
    wall_time_s: float = 0.0

    @property
    def final_accuracy(self) -> float:
        return self.accuracy[-1] if self.accuracy else float("nan")


def worker_datas(task: Task, num_workers: int, partition: PartitionSpec) -> list[LocalData]:
    return [task.load_local_data(index, num_workers, partition) for index in range(num_workers)]


def simulate(
    task: Task,
    datas: Sequence[LocalData],
    strategy: Strategy,
    *,
    rounds: int,
    label: str,
    train_config: Mapping[str, Any],
    participation: float = 1.0,
    attack: Attack | None = None,
    sample_privacy: SamplePrivacySettings | None = None,
    seed: int = SEED,
) -> SimulationResult:
    """Run ``rounds`` rounds of ``strategy`` over workers holding ``datas``, in process.

    Every worker takes part in a round with probability ``participation``, drawn
    from a generator seeded with ``seed``. A round in which nobody takes part, or
    whose aggregate is not finite, leaves the model unchanged. A worker whose
    training raises is left out of the round, as over a broker. Updates of
    ``attack.workers`` are scaled after decoding, as a worker that sends arbitrary
    values would.
    """
    # One torch thread, as a worker uses by default. With two threads on a busy
    # 2-core machine the same run took more than ten times as long.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _simulate(task, datas, strategy, rounds=rounds, label=label, train_config=train_config, participation=participation, attack=attack, sample_privacy=sample_privacy, seed=seed)
    finally:
        torch.set_num_threads(threads)


def _simulate(
    task: Task,
    datas: Sequence[LocalData],
    strategy: Strategy,
    *,
    rounds: int,
    label: str,
    train_config: Mapping[str, Any],
    participation: float,
    attack: Attack | None,
    sample_privacy: SamplePrivacySettings | None,
    seed: int,
) -> SimulationResult:
    started = time.monotonic()
    strategy.setup(StrategyContext.from_task(task, train_config=train_config, seed=seed))
    torch.manual_seed(seed)
    global_state = {name: tensor.detach().clone() for name, tensor in task.build_model().state_dict().items()}
    expected = expected_tensors(global_state)
    trainers = [
        LocalTrainer(task, data, worker_id=f"worker-{index + 1}", state_dir=None, overrides=LocalOverrides())
        for index, data in enumerate(datas)
    ]
    if sample_privacy is not None:
        for index, trainer in enumerate(trainers):
            trainer.sample_privacy = SamplePrivacy(sample_privacy, seed=seed * 1000 + index * 7919)
    rng = np.random.default_rng(seed)
    test_x, test_y = task.load_test_set()
    model = task.build_model()
    result = SimulationResult(label=label)

    for round_number in range(1, rounds + 1):
        strategy.begin_round({name: global_state[name] for name in expected})
        start = _round_start(task, strategy, global_state, train_config, round_number)
        chosen = [trainer for trainer in trainers if rng.random() < participation]
        for trainer in chosen:
            try:
                body, _ = trainer.run_round(start)
            except FedmqError as exc:
                # A worker would send TrainingFailed, for example after the global model diverged.
                logger.debug("%s round %d: %s failed to train: %s", label, round_number, trainer.worker_id, exc)
                continue
            update = decode_message(body)
            assert isinstance(update, Update)
            values = decode_update(update, expected)
            if attack is not None and update.worker_id in attack.workers:
                values = {
                    name: (np.asarray(array, dtype=np.float32) * np.float32(attack.scale) if spec.is_floating else array)
                    for (name, array), spec in zip(values.items(), expected.values())
                }
            client_update = ClientUpdate(update.worker_id, update.num_samples, update.num_steps, values, aux=decode_aux(update), metrics=update.metrics)
            strategy.check_update(client_update)
            strategy.add_update(client_update)
        try:
            new_state = strategy.finish_round(global_state)
        except ZeroWeightError:
            new_state = global_state
        # Like the coordinator, a non-finite aggregate leaves the global model unchanged.
        if all(bool(torch.isfinite(tensor).all()) for tensor in new_state.values() if tensor.is_floating_point()):
            global_state = new_state
        model.load_state_dict(global_state)
        result.accuracy.append(float(task.evaluate(model, test_x, test_y)["accuracy"]))
        result.participants.append(len(chosen))

    if isinstance(strategy, PrivateStrategy):
        record = strategy.privacy_record()
        record.pop("last_round", None)
        result.privacy = record
    if sample_privacy is not None:
        result.max_sample_epsilon = max(trainer.sample_privacy.epsilon() for trainer in trainers if trainer.sample_privacy is not None)
    result.wall_time_s = time.monotonic() - started
    return result


def _round_start(task: Task, strategy: Strategy, global_state: Mapping[str, torch.Tensor], train_config: Mapping[str, Any], round_number: int) -> RoundStart:
    start = RoundStart(
        run_id="privacy-benchmark",
        round=round_number,
        attempt=0,
        model_version=round_number - 1,
        task=task.name,
        deadline_unix=time.time() + 3600.0,
        config={**train_config, **strategy.round_config(round_number)},
        weights=encode_state(dict(global_state)),
        aux=encode_state(strategy.round_aux(round_number, global_state)),
    )
    decoded = decode_message(encode_message(start))
    assert isinstance(decoded, RoundStart)
    return decoded


def train_config_for(task: Task, *, seed: int = SEED, **changes: Any) -> dict[str, Any]:
    """Return the round-start training config of the task's defaults with the float32 codec."""
    defaults = task.default_train_config()
    config = {
        "local_epochs": defaults.local_epochs,
        "learning_rate": defaults.learning_rate,
        "batch_size": defaults.batch_size,
        "momentum": defaults.momentum,
        "weight_decay": defaults.weight_decay,
        "proximal_mu": 0.0,
        "codec": "float32",
        "lossless": "none",
        "seed": seed,
        "eval_every": 0,
        "personal_layers": "",
    }
    config.update(changes)
    return config


# Experiments


def client_level_sweep(
    *, num_workers: int, participation: float, rounds: int, noise_multipliers: Sequence[float], clip_norm: float, server_learning_rate: float
) -> list[SimulationResult]:
    """DP-FedAvg with server placement at each noise multiplier, and FedAvg with the same participation."""
    task = load_task("digits")
    datas = worker_datas(task, num_workers, PartitionSpec(scheme="iid", seed=SEED))
    config = train_config_for(task)
    expected_updates = max(1, round(participation * num_workers))
    results = [
        simulate(task, datas, load_strategy("fedavg"), rounds=rounds, label="fedavg (no DP)", train_config=config, participation=participation)
    ]
    for noise_multiplier in noise_multipliers:
        strategy = load_strategy(
            "dp-fedavg",
            noise_multiplier=noise_multiplier,
            clip_norm=clip_norm,
            expected_updates=expected_updates,
            population=num_workers,
            server_learning_rate=server_learning_rate,
            seed=SEED,
        )
        label = f"dp-fedavg z={noise_multiplier:g}"
        results.append(simulate(task, datas, strategy, rounds=rounds, label=label, train_config=config, participation=participation))
        logger.info("%s: accuracy %.4f, epsilon %.3g", label, results[-1].final_accuracy, results[-1].privacy["epsilon"] if results[-1].privacy else float("nan"))
    return results


def sample_level_sweep(*, num_workers: int, rounds: int, noise_multipliers: Sequence[float], max_grad_norm: float) -> list[SimulationResult]:
    """DP-SGD on every worker at each noise multiplier, aggregated with FedAvg."""
    task = load_task("digits")
    datas = worker_datas(task, num_workers, PartitionSpec(scheme="iid", seed=SEED))
    config = train_config_for(task)
    results = [simulate(task, datas, load_strategy("fedavg"), rounds=rounds, label="fedavg (no DP)", train_config=config)]
    for noise_multiplier in noise_multipliers:
        settings = SamplePrivacySettings(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm)
        label = f"dp-sgd z={noise_multiplier:g}"
        results.append(simulate(task, datas, load_strategy("fedavg"), rounds=rounds, label=label, train_config=config, sample_privacy=settings))
        logger.info("%s: accuracy %.4f, per-record epsilon %.3g", label, results[-1].final_accuracy, results[-1].max_sample_epsilon or float("nan"))
    return results


ROBUST_STRATEGIES: dict[str, dict[str, Any]] = {
    "norm-bounding": {"max_norm": 1.0},
    "median": {},
    "trimmed-mean": {"trim_fraction": 0.2},
    "krum": {"byzantine_workers": 2},
    "multi-krum": {"byzantine_workers": 2},
}


def byzantine_comparison(*, rounds: int, partition: PartitionSpec, num_workers: int = 10, attackers: int = 2) -> list[SimulationResult]:
    """FedAvg without attackers, then FedAvg and every robust strategy with ``attackers`` workers sending -100x updates."""
    task = load_task("digits")
    datas = worker_datas(task, num_workers, partition)
    config = train_config_for(task)
    attack = Attack(frozenset(f"worker-{index + 1}" for index in range(attackers)))
    results = [simulate(task, datas, load_strategy("fedavg"), rounds=rounds, label="fedavg, no attack", train_config=config)]
    results.append(simulate(task, datas, load_strategy("fedavg"), rounds=rounds, label="fedavg", train_config=config, attack=attack))
    for name, options in ROBUST_STRATEGIES.items():
        results.append(simulate(task, datas, load_strategy(name, **options), rounds=rounds, label=name, train_config=config, attack=attack))
    return results


# Report


def results_markdown(
    client: Sequence[SimulationResult], sample: Sequence[SimulationResult], byzantine: Mapping[str, Sequence[SimulationResult]], settings: Mapping[str, Any]
) -> str:
    lines = [
        f"Measured by `python -m benchmarks.privacy` on {settings['machine']} in {settings['wall_time_s']:.0f} s "
        f"(torch {torch.__version__}, in-process simulation, float32 codec, seed {SEED}).",
        "",
        f"**Client-level DP-FedAvg** (server placement): {settings['dp_workers']} workers with IID shares of digits, each taking "
        f"part in a round with probability {settings['participation']:g} (Poisson), clip norm {settings['clip_norm']:g}, "
        f"server learning rate {settings['server_learning_rate']:g}, {settings['dp_rounds']} rounds, delta {settings['delta']:g}. "
        "Epsilon from Opacus's RDP accountant with sampling rate q = participation.",
        "",
        "| run | test accuracy | epsilon |",
        "| --- | --- | --- |",
    ]
    for result in client:
        epsilon = f"{result.privacy['epsilon']:.3g}" if result.privacy else "no guarantee"
        lines.append(f"| {result.label} | {result.final_accuracy:.4f} | {epsilon} |")
    lines += [
        "",
        f"**Sample-level DP-SGD** on every worker (Opacus, Poisson batches of expected size 16, per-sample clip norm "
        f"{settings['max_grad_norm']:g}): {settings['sgd_workers']} workers with IID shares, FedAvg, {settings['sgd_rounds']} rounds. "
        "The epsilon is the largest per-record epsilon of any worker, at delta 1e-5.",
        "",
        "| run | test accuracy | per-record epsilon |",
        "| --- | --- | --- |",
    ]
    for result in sample:
        epsilon = f"{result.max_sample_epsilon:.3g}" if result.max_sample_epsilon is not None else "no guarantee"
        lines.append(f"| {result.label} | {result.final_accuracy:.4f} | {epsilon} |")
    lines += [
        "",
        f"**Byzantine workers**: 2 of 10 workers send their honest update times -100, {settings['byzantine_rounds']} rounds, "
        "without the norm-outlier gate. Robust options: "
        + ", ".join(_with_options(name, options) for name, options in ROBUST_STRATEGIES.items())
        + ".",
        "",
        "| strategy | " + " | ".join(f"accuracy ({partition})" for partition in byzantine) + " |",
        "| --- | " + " | ".join("---" for _ in byzantine) + " |",
    ]
    labels = [result.label for result in next(iter(byzantine.values()))]
    for index, label in enumerate(labels):
        cells = " | ".join(f"{results[index].final_accuracy:.4f}" for results in byzantine.values())
        lines.append(f"| {label} | {cells} |")
    return "\n".join(lines) + "\n"


def _with_options(name: str, options: Mapping[str, Any]) -> str:
    if not options:
        return f"`{name}`"
    return f"`{name}` (" + ", ".join(f"{key}={value}" for key, value in options.items()) + ")"


def replace_docs_section(path: Path, markdown: str) -> None:
    text = path.read_text(encoding="utf-8")
    start = text.index(RESULTS_START) + len(RESULTS_START)
    end = text.index(RESULTS_END)
    path.write_text(text[:start] + "\n" + markdown + text[end:], encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.privacy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("runs/privacy"), help="folder for results.json and results.md (default: runs/privacy)")
    parser.add_argument("--dp-workers", type=int, default=200, help="workers of the client-level experiment (default: 200)")
    parser.add_argument("--participation", type=float, default=0.5, help="probability that a worker takes part in a DP round (default: 0.5)")
    parser.add_argument("--dp-rounds", type=int, default=40, help="rounds of the client-level experiment (default: 40)")
    parser.add_argument("--noise-multipliers", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0, 8.0], help="DP-FedAvg noise multipliers (default: 0.5 1 2 4 8)")
    parser.add_argument("--clip-norm", type=float, default=1.0, help="DP-FedAvg clip norm (default: 1.0)")
    parser.add_argument("--server-learning-rate", type=float, default=1.0, help="DP-FedAvg server learning rate (default: 1.0)")
    parser.add_argument("--sgd-workers", type=int, default=10, help="workers of the DP-SGD experiment (default: 10)")
    parser.add_argument("--sgd-rounds", type=int, default=20, help="rounds of the DP-SGD experiment (default: 20)")
    parser.add_argument("--sgd-noise-multipliers", type=float, nargs="+", default=[0.6, 1.0, 2.0], help="DP-SGD noise multipliers (default: 0.6 1.0 2.0)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="DP-SGD per-sample clip norm (default: 1.0)")
    parser.add_argument("--byzantine-rounds", type=int, default=15, help="rounds of the Byzantine experiment (default: 15)")
    parser.add_argument("--write-docs", action="store_true", help=f"replace the results section of {DOCS_PATH}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    started = time.monotonic()
    client = client_level_sweep(
        num_workers=args.dp_workers, participation=args.participation, rounds=args.dp_rounds,
        noise_multipliers=args.noise_multipliers, clip_norm=args.clip_norm, server_learning_rate=args.server_learning_rate,
    )
    sample = sample_level_sweep(num_workers=args.sgd_workers, rounds=args.sgd_rounds, noise_multipliers=args.sgd_noise_multipliers, max_grad_norm=args.max_grad_norm)
    byzantine = {
        "IID": byzantine_comparison(rounds=args.byzantine_rounds, partition=PartitionSpec(scheme="iid", seed=SEED)),
        "Dirichlet 0.5": byzantine_comparison(rounds=args.byzantine_rounds, partition=PartitionSpec(scheme="dirichlet", alpha=0.5, seed=SEED)),
    }
    settings = {
        "machine": _machine(),
        "wall_time_s": time.monotonic() - started,
        "dp_workers": args.dp_workers,
        "participation": args.participation,
        "clip_norm": args.clip_norm,
        "server_learning_rate": args.server_learning_rate,
        "dp_rounds": args.dp_rounds,
        "delta": 1e-5,
        "sgd_workers": args.sgd_workers,
        "sgd_rounds": args.sgd_rounds,
        "max_grad_norm": args.max_grad_norm,
        "byzantine_rounds": args.byzantine_rounds,
    }

    args.output.mkdir(parents=True, exist_ok=True)
    document = {
        "settings": settings,
        "client_level": [asdict(result) for result in client],
        "sample_level": [asdict(result) for result in sample],
        "byzantine": {partition: [asdict(result) for result in results] for partition, results in byzantine.items()},
    }
    (args.output / "results.json").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    markdown = results_markdown(client, sample, byzantine, settings)
    (args.output / "results.md").write_text(markdown, encoding="utf-8")
    if args.write_docs:
        replace_docs_section(DOCS_PATH, markdown)
    print(markdown)
    return 0


def _machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{os.cpu_count()} cores of {model}"


if __name__ == "__main__":
    sys.exit(main())
