"""A custom fedmq task: breast cancer diagnosis from 30 cell measurements, with a small MLP.

The data is scikit-learn's copy of the Wisconsin diagnostic breast cancer dataset
(569 rows, classes malignant and benign), so the task needs no download. Put this
file's folder on the Python path and name the task by import path:

    export PYTHONPATH=docs/examples
    fedmq coordinator --task my_task:CancerTask --rounds 20 --min-workers 2
    fedmq worker --task my_task:CancerTask --worker-id w1 --shard 0/2
    fedmq worker --task my_task:CancerTask --worker-id w2 --shard 1/2

The coordinator and every worker must build the task with the same options, because
the data split and the model's shape depend on them.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from fedmq.errors import ConfigError
from fedmq.tasks import ArrayDatasetTask, TrainConfig

NUM_FEATURES = 30
NUM_CLASSES = 2


class CancerTask(ArrayDatasetTask):
    """Classify tumours as malignant (0) or benign (1) with a one-hidden-layer MLP.

    ArrayDatasetTask does the splitting: a stratified 20% of the rows is the global
    test set that the coordinator evaluates on, and the rest is partitioned across the
    workers by ``--partition``, ``--alpha`` and ``--data-seed``.
    """

    # The name travels in every message; workers ignore rounds of another task.
    name = "breast-cancer"

    def __init__(self, *, hidden_units: int = 32, holdout_fraction: float = 0.2, holdout_seed: int = 0) -> None:
        super().__init__(holdout_fraction=holdout_fraction, holdout_seed=holdout_seed)
        if isinstance(hidden_units, bool) or not isinstance(hidden_units, int) or hidden_units < 1:
            raise ConfigError(f"hidden_units must be an integer >= 1, but got {hidden_units!r}")
        self.hidden_units = hidden_units

    def options(self) -> dict[str, object]:
        return {**super().options(), "hidden_units": self.hidden_units}

    def build_model(self) -> nn.Module:
        return nn.Sequential(
            nn.Linear(NUM_FEATURES, self.hidden_units),
            nn.ReLU(),
            nn.Linear(self.hidden_units, NUM_CLASSES),
        )

    def default_train_config(self) -> TrainConfig:
        # The coordinator sends these to the workers unless --local-epochs,
        # --learning-rate, --batch-size or --momentum override them.
        return TrainConfig(local_epochs=2, learning_rate=0.05, batch_size=16, momentum=0.9)

    def load_dataset(self) -> tuple[torch.Tensor, torch.Tensor]:
        features, labels = _load_arrays()
        return torch.from_numpy(features), torch.from_numpy(labels)


@functools.lru_cache(maxsize=1)
def _load_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    features = data.data.astype(np.float64)
    # NOTE: these scaling statistics come from the whole dataset, which no single
    # party of a real federation can read. A real task fixes them in advance or
    # computes them with a federated round of its own.
    features = (features - features.mean(axis=0)) / features.std(axis=0)
    return features.astype(np.float32), data.target.astype(np.int64)
