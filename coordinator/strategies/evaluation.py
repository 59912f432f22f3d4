"""Aggregation of the federated evaluation that workers report in their updates.

Each worker evaluates on its own local test split the model the federation gives it
(metrics ``local_loss`` and ``local_accuracy``) and, with personal layers, its
personalized model (``personal_loss`` and ``personal_accuracy``), and reports the
split's size as ``local_test_samples``. Pure maths: no broker, no logging.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from coordinator.strategies.common import EVALUATED_MODELS, LOCAL_TEST_SAMPLES

# Share of the workers, by lowest accuracy, whose mean accuracy is the worst-case figure.
WORST_FRACTION = 0.1


def worst_fraction_mean(values: list[float], fraction: float = WORST_FRACTION) -> float:
    """Return the mean of the lowest ``ceil(fraction * n)`` values (at least one)."""
    if not values:
        raise ValueError("values must not be empty")
    count = max(1, math.ceil(fraction * len(values)))
    return float(np.mean(sorted(values)[:count]))


def summarize_local_evaluation(metrics_by_worker: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Summarize the workers' local evaluation metrics of one round.

    Covers each evaluated model (``local``, ``personal``) that at least one worker
    with a non-empty test split reported. ``<model>_workers`` counts those workers.
    Accuracy and loss get the plain mean over workers (``_mean``) and the mean
    weighted by ``local_test_samples`` (``_weighted``). Accuracy also gets the mean
    of the worst 10% of workers (``_worst10``). Returns an empty dict when no worker
    reported.
    """
    summary: dict[str, float] = {}
    for model in EVALUATED_MODELS:
        accuracy_key, loss_key = f"{model}_accuracy", f"{model}_loss"
        rows = [
            (float(metrics[accuracy_key]), float(metrics.get(loss_key, math.nan)), float(metrics[LOCAL_TEST_SAMPLES]))
            for metrics in metrics_by_worker.values()
            if accuracy_key in metrics and float(metrics.get(LOCAL_TEST_SAMPLES, 0.0)) > 0
        ]
        if not rows:
            continue
        accuracies = np.array([row[0] for row in rows])
        losses = np.array([row[1] for row in rows])
        weights = np.array([row[2] for row in rows])
        summary[f"{model}_workers"] = float(len(rows))
        summary[f"{accuracy_key}_mean"] = float(accuracies.mean())
        summary[f"{accuracy_key}_weighted"] = float(np.average(accuracies, weights=weights))
        summary[f"{accuracy_key}_worst10"] = worst_fraction_mean(accuracies.tolist())
        summary[f"{loss_key}_mean"] = float(losses.mean())
        summary[f"{loss_key}_weighted"] = float(np.average(losses, weights=weights))
    return summary
