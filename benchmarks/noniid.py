"""Strategies on non-IID workers: ``python -m benchmarks.noniid``.

Runs every strategy on the digits and MNIST-sample tasks with 10 workers and four
deterministic partitions: IID, Dirichlet 0.5, Dirichlet 0.1 and two label shards per
worker. A centralized baseline trains the same model with the same local optimizer
for the same number of passes over the union of the workers' training data. Two more
experiments follow: FedAvg against FedNova and SCAFFOLD when workers run different
numbers of local steps, and IFCA on a federation of two known groups of workers whose
labels differ by a permutation.

The runs are in-process simulations, without a broker: each round goes through the
same Strategy classes as the coordinator, the same ``worker.training.LocalTrainer``
as the workers, and the same message encoding and validation
(``encode_message``, ``decode_message``, ``decode_update``), with the lossless
float32 codec so that strategies are compared without compression error. What the
simulation leaves out is the broker, deadlines and dropouts.

Outputs go to ``--output`` (default ``runs/noniid``): ``results.json`` and
``results.md``. The plots go to ``docs/img``, and ``--write-docs`` replaces the
results section of ``docs/strategies.md`` with ``results.md``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coordinator.strategies import ClientUpdate, StrategyContext, load_strategy
from coordinator.strategies.common import split_personal
from coordinator.strategies.evaluation import worst_fraction_mean
from coordinator.validation import decode_aux, decode_update, expected_tensors
from fedmq.tasks import LocalData, PartitionSpec, Task, TrainConfig, load_task
from schemas.messages import RoundStart, Update, decode_message, encode_message
from schemas.tensors import encode_state
from worker.training import LocalOverrides, LocalTrainer

NUM_WORKERS = 10
SEED = 0
DOCS_DIR = Path("docs")
RESULTS_START = "<!-- noniid results start -->"
RESULTS_END = "<!-- noniid results end -->"

PARTITIONS: dict[str, PartitionSpec] = {
    "iid": PartitionSpec(scheme="iid", seed=SEED),
    "dirichlet-0.5": PartitionSpec(scheme="dirichlet", alpha=0.5, seed=SEED),
    "dirichlet-0.1": PartitionSpec(scheme="dirichlet", alpha=0.1, seed=SEED),
    "shards-2": PartitionSpec(scheme="shards", shards_per_worker=2, seed=SEED),
}


@dataclass(frozen=True)
class TaskPlan:
    """How long each task runs and what accuracy counts as reached."""

    rounds: int
    target_accuracy: float
    head: str
    batchnorm: str | None


TASKS: dict[str, TaskPlan] = {
    "digits": TaskPlan(rounds=30, target_accuracy=0.90, head="fc2.*", batchnorm=None),
    "mnist": TaskPlan(rounds=20, target_accuracy=0.90, head="fc.*", batchnorm="bn1.*"),
}


@dataclass(frozen=True)
class Variant:
    """One federated configuration: a strategy, its options, the personal layers and changes to the task's training config."""

    label: str
    strategy: str
    options: tuple[tuple[str, Any], ...] = ()
    personal_layers: tuple[str, ...] = ()
    train: tuple[tuple[str, Any], ...] = ()


def variants(task_name: str) -> list[Variant]:
    plan = TASKS[task_name]
    listed = [
        Variant("fedavg", "fedavg"),
        Variant("fedavgm", "fedavgm"),
        Variant("fedprox", "fedprox"),
        Variant("fedadam", "fedadam"),
        Variant("fedyogi", "fedyogi"),
        Variant("fedadagrad", "fedadagrad"),
        Variant("scaffold", "scaffold"),
        Variant("fednova", "fednova"),
        Variant("deltasgd", "deltasgd"),
        Variant("ifca", "ifca", (("num_clusters", 2),)),
        Variant("fedper", "fedavg", personal_layers=(plan.head,)),
    ]
    if plan.batchnorm is not None:
        listed.append(Variant("fedbn", "fedavg", personal_layers=(plan.batchnorm,)))
    return listed


# Simulation


@dataclass
class RunResult:
    """Per-round and final figures of one simulated run."""

    task: str
    partition: str
    label: str
    accuracy: list[float] = field(default_factory=list)
    worker_accuracy_mean: list[float] = field(default_factory=list)
    worker_accuracy_worst10: list[float] = field(default_factory=list)
    final_worker_accuracies: dict[str, float] = field(default_factory=dict)
    strategy_rounds: list[dict[str, Any]] = field(default_factory=list)
    wall_time_s: float = 0.0

    def rounds_to(self, target: float) -> int | None:
        return next((index + 1 for index, value in enumerate(self.accuracy) if value >= target), None)


def train_config_dict(task: Task) -> dict[str, Any]:
    """Return the round-start training config the coordinator would send for ``task``'s defaults."""
    defaults = task.default_train_config()
    return {
        "local_epochs": defaults.local_epochs,
        "learning_rate": defaults.learning_rate,
        "batch_size": defaults.batch_size,
        "momentum": defaults.momentum,
        "weight_decay": defaults.weight_decay,
        "proximal_mu": 0.0,
        "codec": "float32",
        "lossless": "none",
        "seed": SEED,
        "eval_every": 1,
        "personal_layers": "",
    }


def simulate(
    task: Task,
    datas: Sequence[LocalData],
    variant: Variant,
    *,
    rounds: int,
    partition: str = "",
    overrides: Sequence[LocalOverrides] | None = None,
) -> RunResult:
    """Run ``rounds`` rounds of ``variant`` over workers holding ``datas``, in process.

    Each round follows the coordinator's steps: round start through the message codec,
    local training by LocalTrainer, update decoding and validation, the strategy's
    aggregation, evaluation on the global test set. After the last round every worker
    evaluates the final model on its local test split.
    """
    started = time.monotonic()
    train_config = {**train_config_dict(task), **dict(variant.train), "personal_layers": ",".join(variant.personal_layers)}
    strategy = load_strategy(variant.strategy, **dict(variant.options))
    strategy.setup(StrategyContext.from_task(task, train_config=train_config, seed=SEED))
    torch.manual_seed(SEED)
    global_state = {name: tensor.detach().clone() for name, tensor in task.build_model().state_dict().items()}
    expected = expected_tensors(split_personal(global_state, variant.personal_layers)[0])
    trainers = [
        LocalTrainer(task, data, worker_id=f"worker-{index + 1}", state_dir=None, overrides=(overrides[index] if overrides else LocalOverrides()))
        for index, data in enumerate(datas)
    ]
    test_x, test_y = task.load_test_set()
    model = task.build_model()
    result = RunResult(task=task.name, partition=partition, label=variant.label)

    for round_number in range(1, rounds + 1):
        strategy.begin_round({name: global_state[name] for name in expected})
        start = _round_start(task, strategy, global_state, expected, train_config, round_number)
        worker_metrics: dict[str, dict[str, float]] = {}
        for trainer in trainers:
            body, _ = trainer.run_round(start)
            update = decode_message(body)
            assert isinstance(update, Update)
            client_update = ClientUpdate(
                update.worker_id, update.num_samples, update.num_steps,
                decode_update(update, expected), aux=decode_aux(update), metrics=update.metrics,
            )
            strategy.check_update(client_update)
            strategy.add_update(client_update)
            worker_metrics[update.worker_id] = dict(update.metrics)
        global_state = strategy.finish_round(global_state)
        model.load_state_dict(global_state)
        result.accuracy.append(float(task.evaluate(model, test_x, test_y)["accuracy"]))
        result.strategy_rounds.append(strategy.round_summary())
        if round_number > 1:
            # Round r's updates evaluate the model of round r - 1.
            _record_worker_accuracy(result, worker_metrics)

    # The final model, evaluated by every worker on its local test split.
    final_start = _round_start(task, strategy, global_state, expected, train_config, rounds + 1)
    final_metrics = {trainer.worker_id: trainer.plan_round(final_start, evaluate=True).metrics for trainer in trainers}
    _record_worker_accuracy(result, final_metrics)
    result.final_worker_accuracies = {worker: worker_accuracy(metrics) for worker, metrics in final_metrics.items()}
    result.wall_time_s = time.monotonic() - started
    return result


def _round_start(
    task: Task,
    strategy: Any,
    global_state: Mapping[str, torch.Tensor],
    expected: Mapping[str, Any],
    train_config: Mapping[str, Any],
    round_number: int,
) -> RoundStart:
    start = RoundStart(
        run_id="noniid",
        round=round_number,
        attempt=0,
        model_version=round_number - 1,
        task=task.name,
        deadline_unix=time.time() + 3600.0,
        config={**train_config, **strategy.round_config(round_number)},
        weights=encode_state({name: global_state[name] for name in expected}),
        aux=encode_state(strategy.round_aux(round_number, global_state)),
    )
    decoded = decode_message(encode_message(start))
    assert isinstance(decoded, RoundStart)
    return decoded


def worker_accuracy(metrics: Mapping[str, float]) -> float:
    """Return the accuracy of the model a worker uses: its personalized one where it has one."""
    return float(metrics.get("personal_accuracy", metrics["local_accuracy"]))


def _record_worker_accuracy(result: RunResult, metrics_by_worker: Mapping[str, Mapping[str, float]]) -> None:
    accuracies = [worker_accuracy(metrics) for metrics in metrics_by_worker.values() if metrics.get("local_test_samples", 0) > 0]
    result.worker_accuracy_mean.append(float(np.mean(accuracies)))
    result.worker_accuracy_worst10.append(worst_fraction_mean(accuracies))


def centralized(task: Task, datas: Sequence[LocalData], *, rounds: int, partition: str = "") -> RunResult:
    """Train one model on the union of the workers' training data, ``local_epochs`` passes per round."""
    started = time.monotonic()
    defaults = task.default_train_config()
    union = LocalData(
        x_train=torch.cat([data.x_train for data in datas]),
        y_train=torch.cat([data.y_train for data in datas]),
        x_test=torch.cat([data.x_test for data in datas]),
        y_test=torch.cat([data.y_test for data in datas]),
    )
    torch.manual_seed(SEED)
    model = task.build_model()
    test_x, test_y = task.load_test_set()
    result = RunResult(task=task.name, partition=partition, label="centralized")
    for round_number in range(1, rounds + 1):
        config = TrainConfig(
            local_epochs=defaults.local_epochs, learning_rate=defaults.learning_rate, batch_size=defaults.batch_size,
            momentum=defaults.momentum, weight_decay=defaults.weight_decay, seed=SEED * 1000 + round_number,
        )
        task.train(model, union, config)
        result.accuracy.append(float(task.evaluate(model, test_x, test_y)["accuracy"]))
    accuracies = {f"worker-{index + 1}": float(task.evaluate(model, data.x_test, data.y_test)["accuracy"]) for index, data in enumerate(datas) if data.num_test}
    result.final_worker_accuracies = accuracies
    result.worker_accuracy_mean.append(float(np.mean(list(accuracies.values()))))
    result.worker_accuracy_worst10.append(worst_fraction_mean(list(accuracies.values())))
    result.wall_time_s = time.monotonic() - started
    return result


# Data


@functools.lru_cache(maxsize=4)
def cached_task(name: str) -> Task:
    return load_task(name)


def worker_datas(task_name: str, partition: str) -> list[LocalData]:
    task = cached_task(task_name)
    return [task.load_local_data(index, NUM_WORKERS, PARTITIONS[partition]) for index in range(NUM_WORKERS)]


def permuted_label_datas(task_name: str, *, permuted_workers: Sequence[int], permutation: Sequence[int]) -> list[LocalData]:
    """Return IID worker data where the listed workers see every label y as ``permutation[y]``."""
    datas = worker_datas(task_name, "iid")
    mapping = torch.tensor(list(permutation), dtype=torch.int64)
    for index in permuted_workers:
        data = datas[index]
        datas[index] = LocalData(data.x_train, mapping[data.y_train], data.x_test, mapping[data.y_test])
    return datas


# Jobs


@dataclass(frozen=True)
class Job:
    task: str
    partition: str
    variant: Variant | None  # None: the centralized baseline


def run_job(job: Job) -> RunResult:
    torch.set_num_threads(1)
    task = cached_task(job.task)
    datas = worker_datas(job.task, job.partition)
    rounds = TASKS[job.task].rounds
    if job.variant is None:
        result = centralized(task, datas, rounds=rounds, partition=job.partition)
    else:
        result = simulate(task, datas, job.variant, rounds=rounds, partition=job.partition)
    print(
        f"{job.task:7s} {job.partition:14s} {result.label:12s} final accuracy {result.accuracy[-1]:.4f} "
        f"worst-10% {result.worker_accuracy_worst10[-1]:.4f} ({result.wall_time_s:.1f} s)",
        flush=True,
    )
    return result


def grid_jobs(task_names: Sequence[str], partitions: Sequence[str]) -> list[Job]:
    jobs = []
    for task_name in task_names:
        for partition in partitions:
            jobs.append(Job(task_name, partition, None))
            jobs.extend(Job(task_name, partition, variant) for variant in variants(task_name))
    # The slow MNIST jobs first, so the pool finishes evenly.
    return sorted(jobs, key=lambda job: job.task != "mnist")


# Heterogeneous local work


HETEROGENEOUS_STEPS = (2, 2, 4, 4, 8, 8, 16, 16, 32, 32)


HETEROGENEOUS_VARIANTS = (
    Variant("fedavg", "fedavg"),
    Variant("fednova", "fednova"),
    Variant("scaffold", "scaffold"),
    Variant("fedavg, plain SGD", "fedavg", train=(("momentum", 0.0),)),
    Variant("fednova, plain SGD", "fednova", train=(("momentum", 0.0),)),
)


def heterogeneous_work(task_name: str = "digits", partition: str = "dirichlet-0.1") -> dict[str, RunResult]:
    """Run FedAvg, FedNova and SCAFFOLD where worker i may run at most ``HETEROGENEOUS_STEPS[i]`` local steps."""
    torch.set_num_threads(1)
    task = cached_task(task_name)
    datas = worker_datas(task_name, partition)
    overrides = [LocalOverrides(local_epochs=8, max_steps=steps) for steps in HETEROGENEOUS_STEPS]
    results = {}
    for variant in HETEROGENEOUS_VARIANTS:
        results[variant.label] = simulate(task, datas, variant, rounds=TASKS[task_name].rounds, partition=partition, overrides=overrides)
        print(f"heterogeneous work {variant.label:18s} final accuracy {results[variant.label].accuracy[-1]:.4f}", flush=True)
    return results


# Known clusters


CLUSTER_PERMUTATION = (9, 8, 7, 6, 5, 4, 3, 2, 1, 0)
PERMUTED_WORKERS = (1, 3, 5, 7, 9)


def cluster_recovery(task_name: str = "digits") -> dict[str, Any]:
    """Run IFCA with two clusters and FedAvg on two groups of workers with permuted labels.

    Returns, per round, the share of workers whose IFCA cluster agrees with the true
    group up to renaming the clusters, and the final per-worker accuracies.
    """
    torch.set_num_threads(1)
    task = cached_task(task_name)
    datas = permuted_label_datas(task_name, permuted_workers=PERMUTED_WORKERS, permutation=CLUSTER_PERMUTATION)
    truth = {f"worker-{index + 1}": int(index in PERMUTED_WORKERS) for index in range(NUM_WORKERS)}
    rounds = TASKS[task_name].rounds
    ifca = simulate(task, datas, Variant("ifca", "ifca", (("num_clusters", 2),)), rounds=rounds, partition="permuted-labels")
    fedavg = simulate(task, datas, Variant("fedavg", "fedavg"), rounds=rounds, partition="permuted-labels")
    agreement = [cluster_agreement(summary["members"], truth) for summary in ifca.strategy_rounds]
    print(f"cluster recovery: agreement per round {agreement}", flush=True)
    return {"ifca": ifca, "fedavg": fedavg, "agreement": agreement, "truth": truth}


def cluster_agreement(members: Mapping[str, Sequence[str]], truth: Mapping[str, int]) -> float:
    """Return the share of workers assigned like ``truth``, under the better of the two namings of two clusters."""
    assigned = {worker: int(cluster) for cluster, workers in members.items() for worker in workers}
    if not assigned:
        return 0.0
    same = sum(assigned[worker] == truth[worker] for worker in assigned)
    return max(same, len(assigned) - same) / len(assigned)


# Report


def results_markdown(grid: list[RunResult], hetero: Mapping[str, RunResult], clusters: Mapping[str, Any], wall_time_s: float) -> str:
    lines = []
    by_key: dict[tuple[str, str], list[RunResult]] = {}
    for result in grid:
        by_key.setdefault((result.task, result.partition), []).append(result)

    for task_name, plan in TASKS.items():
        partitions = [partition for partition in PARTITIONS if (task_name, partition) in by_key]
        if not partitions:
            continue
        lines.append(f"### {task_name} ({plan.rounds} rounds, {NUM_WORKERS} workers, target accuracy {plan.target_accuracy:.0%})")
        lines.append("")
        lines.append("Final global accuracy / worst-10% worker accuracy / rounds to the target (— when not reached):")
        lines.append("")
        lines.append("| strategy | " + " | ".join(partitions) + " |")
        lines.append("| --- | " + " | ".join("---" for _ in partitions) + " |")
        labels = [result.label for result in by_key[(task_name, partitions[0])]]
        for label in labels:
            cells = []
            for partition in partitions:
                result = next(r for r in by_key[(task_name, partition)] if r.label == label)
                reached = result.rounds_to(plan.target_accuracy)
                cells.append(f"{result.accuracy[-1]:.3f} / {result.worker_accuracy_worst10[-1]:.3f} / {reached if reached else '—'}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
        for partition in partitions:
            lines.append(f"![{task_name} {partition}](img/noniid_{task_name}_{partition}.png)")
        lines.append("")

    if hetero:
        lines.append("### Different amounts of local work (digits, Dirichlet 0.1)")
        lines.append("")
        lines.append(f"Worker i runs at most {list(HETEROGENEOUS_STEPS)} local steps per round.")
        lines.append("")
        lines.append("| strategy | final global accuracy | worst-10% worker accuracy |")
        lines.append("| --- | --- | --- |")
        for label, result in hetero.items():
            lines.append(f"| {label} | {result.accuracy[-1]:.3f} | {result.worker_accuracy_worst10[-1]:.3f} |")
        lines.append("")

    if clusters:
        ifca, fedavg = clusters["ifca"], clusters["fedavg"]
        agreement = clusters["agreement"]
        first_full = next((index + 1 for index, value in enumerate(agreement) if value == 1.0), None)
        lines.append("### Known clusters (digits, labels permuted on workers 2, 4, 6, 8 and 10)")
        lines.append("")
        lines.append(
            f"IFCA with two clusters assigned every worker to its true group from round {first_full} on"
            if first_full is not None and all(value == 1.0 for value in agreement[first_full - 1 :])
            else f"IFCA's cluster agreement with the true groups per round: {agreement}"
        )
        lines.append("")
        lines.append("| strategy | mean worker accuracy | worst-10% worker accuracy |")
        lines.append("| --- | --- | --- |")
        for label, result in (("ifca", ifca), ("fedavg", fedavg)):
            lines.append(f"| {label} | {result.worker_accuracy_mean[-1]:.3f} | {result.worker_accuracy_worst10[-1]:.3f} |")
        lines.append("")
        lines.append("![cluster recovery](img/noniid_clusters.png)")
        lines.append("")

    lines.append(f"Wall time of the whole command: {wall_time_s / 60:.1f} minutes.")
    return "\n".join(lines) + "\n"


def plot_grid(grid: list[RunResult], image_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    image_dir.mkdir(parents=True, exist_ok=True)
    by_key: dict[tuple[str, str], list[RunResult]] = {}
    for result in grid:
        by_key.setdefault((result.task, result.partition), []).append(result)
    colors = plt.get_cmap("tab20")
    for (task_name, partition), results in by_key.items():
        figure, axis = plt.subplots(figsize=(7, 4.5))
        for index, result in enumerate(results):
            rounds = range(1, len(result.accuracy) + 1)
            if result.label == "centralized":
                axis.plot(rounds, result.accuracy, "k--", label=result.label, linewidth=1.2)
            else:
                style = "-" if index % 2 else "-."
                axis.plot(rounds, result.accuracy, style, color=colors(index % colors.N), label=result.label, linewidth=1.2)
        axis.set_xlabel("round")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel("global test accuracy")
        axis.set_title(f"{task_name}, {partition}, {NUM_WORKERS} workers")
        axis.set_ylim(0.0, 1.0)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, ncol=2, loc="lower right")
        figure.tight_layout()
        figure.savefig(image_dir / f"noniid_{task_name}_{partition}.png", dpi=90)
        plt.close(figure)


def plot_clusters(clusters: Mapping[str, Any], image_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    agreement = clusters["agreement"]
    axis.plot(range(1, len(agreement) + 1), agreement, label="IFCA cluster agreement with the true groups")
    for label in ("ifca", "fedavg"):
        values = clusters[label].worker_accuracy_mean
        axis.plot(range(1, len(values) + 1), values, label=f"{label}: mean worker accuracy on the local test splits")
    axis.set_xlabel("round")
    axis.set_ylim(0.0, 1.05)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(image_dir / "noniid_clusters.png", dpi=90)
    plt.close(figure)


def replace_docs_section(path: Path, markdown: str) -> None:
    text = path.read_text()
    start, end = text.find(RESULTS_START), text.find(RESULTS_END)
    if start < 0 or end < start:
        raise SystemExit(f"{path} lacks the markers {RESULTS_START} and {RESULTS_END}; cannot write the results there")
    path.write_text(text[: start + len(RESULTS_START)] + "\n\n" + markdown + "\n" + text[end:])


# Entry point


def run_all(task_names: Sequence[str], partitions: Sequence[str], *, processes: int, extra: bool) -> tuple[list[RunResult], dict[str, RunResult], dict[str, Any]]:
    """Run the grid, and unless ``extra`` is False the two extra experiments, in a pool of ``processes``."""
    jobs = grid_jobs(task_names, partitions)
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes=max(1, processes)) as pool:
        pending_extra = None
        if extra and "digits" in task_names:
            pending_extra = (pool.apply_async(heterogeneous_work), pool.apply_async(cluster_recovery))
        grid = pool.map(run_job, jobs, chunksize=1)
        hetero, clusters = (pending_extra[0].get(), pending_extra[1].get()) if pending_extra else ({}, {})
    return grid, hetero, clusters


def load_results(path: Path) -> tuple[list[RunResult], dict[str, RunResult], dict[str, Any], float]:
    """Read back what ``main`` wrote to results.json."""
    payload = json.loads(path.read_text())
    grid = [RunResult(**result) for result in payload["grid"]]
    hetero = {label: RunResult(**result) for label, result in payload["heterogeneous_work"].items()}
    stored = payload["clusters"]
    clusters: dict[str, Any] = {}
    if stored.get("ifca"):
        clusters = {"agreement": stored["agreement"], "ifca": RunResult(**stored["ifca"]), "fedavg": RunResult(**stored["fedavg"])}
    return grid, hetero, clusters, float(payload["wall_time_s"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.noniid", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="digits,mnist", help="comma-separated tasks (default: digits,mnist)")
    parser.add_argument("--partitions", default=",".join(PARTITIONS), help=f"comma-separated partitions (default: {','.join(PARTITIONS)})")
    parser.add_argument("--processes", type=int, default=2, help="worker processes for the grid (default: 2)")
    parser.add_argument("--output", type=Path, default=Path("runs/noniid"), help="folder for results.json and results.md (default: runs/noniid)")
    parser.add_argument("--skip-extra", action="store_true", help="skip the heterogeneous-work and known-cluster experiments")
    parser.add_argument("--write-docs", action="store_true", help="write the plots to docs/img and the results into docs/strategies.md")
    parser.add_argument("--from-json", type=Path, default=None, help="rebuild the report and the plots from the results.json of an earlier run instead of running")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    started = time.monotonic()
    task_names = [name for name in args.tasks.split(",") if name]
    partitions = [name for name in args.partitions.split(",") if name]
    unknown = sorted(set(task_names) - set(TASKS)) + sorted(set(partitions) - set(PARTITIONS))
    if unknown:
        parser.error(f"unknown tasks or partitions {unknown}; choose from {sorted(TASKS)} and {sorted(PARTITIONS)}")

    if args.from_json is not None:
        grid, hetero, clusters, wall_time_s = load_results(args.from_json)
    else:
        grid, hetero, clusters = run_all(task_names, partitions, processes=args.processes, extra=not args.skip_extra)
        wall_time_s = time.monotonic() - started

    markdown = results_markdown(grid, hetero, clusters, wall_time_s)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.md").write_text(markdown)
    if args.from_json is None:
        payload = {
            "grid": [asdict(result) for result in grid],
            "heterogeneous_work": {label: asdict(result) for label, result in hetero.items()},
            "clusters": {"agreement": clusters.get("agreement", []), "ifca": asdict(clusters["ifca"]) if clusters else None, "fedavg": asdict(clusters["fedavg"]) if clusters else None},
            "wall_time_s": wall_time_s,
            "load_average": list(os.getloadavg()),
            "cpu_count": os.cpu_count(),
        }
        (args.output / "results.json").write_text(json.dumps(payload, indent=1))
    image_dir = DOCS_DIR / "img" if args.write_docs else args.output / "img"
    plot_grid(grid, image_dir)
    if clusters:
        plot_clusters(clusters, image_dir)
    if args.write_docs:
        replace_docs_section(DOCS_DIR / "strategies.md", markdown)
    print(markdown)
    print(f"wrote {args.output / 'results.md'}, {args.output / 'results.json'} and the plots in {image_dir} in {wall_time_s:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
