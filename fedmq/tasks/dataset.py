"""A task base class for a labelled dataset that fits in memory."""

from __future__ import annotations

import abc
import functools
import math

import numpy as np
import torch

from fedmq.errors import ConfigError, TaskError
from fedmq.tasks.base import LocalData, PartitionSpec, Task
from fedmq.tasks.partition import local_train_test_split, stratified_holdout, worker_partition


class ArrayDatasetTask(Task):
    """A task whose dataset is one features tensor and one labels tensor in memory.

    The rows are split in three seeded steps, so the coordinator and every worker
    compute the same split without exchanging data:

    1. A stratified ``holdout_fraction`` of the rows, chosen by ``holdout_seed``,
       is the global test set that ``load_test_set`` returns.
    2. The remaining rows are partitioned across the workers by a PartitionSpec.
    3. Each worker splits its partition into a local train set and a local test
       set of ``local_test_fraction``, seeded by the partition seed and the worker
       index.

    ``holdout_indices`` and ``worker_indices`` return the dataset rows behind each
    part. Subclasses implement ``load_dataset`` and ``build_model``.
    """

    def __init__(
        self,
        *,
        holdout_fraction: float = 0.2,
        local_test_fraction: float = 0.2,
        holdout_seed: int = 0,
    ) -> None:
        if not _is_number(holdout_fraction) or not 0.0 < holdout_fraction < 1.0:
            raise ConfigError(f"holdout_fraction must be a number in (0, 1), but got {holdout_fraction!r}")
        if not _is_number(local_test_fraction) or not 0.0 <= local_test_fraction < 1.0:
            raise ConfigError(
                f"local_test_fraction must be a number in [0, 1), but got {local_test_fraction!r}"
            )
        is_integer = isinstance(holdout_seed, int) and not isinstance(holdout_seed, bool)
        if not is_integer or not 0 <= holdout_seed < 2**32:
            raise ConfigError(f"holdout_seed must be an integer in [0, 2**32), but got {holdout_seed!r}")
        self.holdout_fraction = float(holdout_fraction)
        self.local_test_fraction = float(local_test_fraction)
        self.holdout_seed = holdout_seed

    def __repr__(self) -> str:
        arguments = ", ".join(f"{name}={value!r}" for name, value in self.options().items())
        return f"{type(self).__name__}({arguments})"

    def options(self) -> dict[str, object]:
        """Return the constructor options, which ``load_task(name, **options)`` accepts."""
        return {
            "holdout_fraction": self.holdout_fraction,
            "local_test_fraction": self.local_test_fraction,
            "holdout_seed": self.holdout_seed,
        }

    @abc.abstractmethod
    def load_dataset(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Load every row of the dataset.

        Returns float32 features with the sample dimension first and int64 labels of shape (N,).
        """

    def holdout_indices(self) -> np.ndarray:
        """Return the sorted dataset rows of the global test set."""
        return self._split[1].copy()

    def worker_indices(
        self, worker_index: int, num_workers: int, partition: PartitionSpec
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return the sorted dataset rows of a worker's local train set and local test set.

        Raises ConfigError when ``worker_index`` is outside [0, num_workers) or there
        are more workers than rows outside the global test set.
        """
        pool, _ = self._split
        _, labels = self._dataset
        positions = worker_partition(labels[pool].numpy(), worker_index, num_workers, partition)
        rows = pool[positions]
        train, test = local_train_test_split(
            len(rows),
            test_fraction=self.local_test_fraction,
            seed=partition.seed,
            worker_index=worker_index,
        )
        return rows[train], rows[test]

    def load_local_data(self, worker_index: int, num_workers: int, partition: PartitionSpec) -> LocalData:
        train_rows, test_rows = self.worker_indices(worker_index, num_workers, partition)
        features, labels = self._dataset
        train_index = torch.from_numpy(train_rows)
        test_index = torch.from_numpy(test_rows)
        return LocalData(
            x_train=features[train_index],
            y_train=labels[train_index],
            x_test=features[test_index],
            y_test=labels[test_index],
        )

    def load_test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        features, labels = self._dataset
        index = torch.from_numpy(self._split[1])
        return features[index], labels[index]

    @functools.cached_property
    def _dataset(self) -> tuple[torch.Tensor, torch.Tensor]:
        features, labels = self.load_dataset()
        if labels.dtype != torch.int64 or labels.dim() != 1:
            raise TaskError(
                f"task {self.name!r} must load int64 labels of shape (N,), "
                f"but got dtype {labels.dtype} and shape {tuple(labels.shape)}"
            )
        if features.dim() < 1 or features.shape[0] != labels.shape[0]:
            raise TaskError(
                f"task {self.name!r} must load one feature row per label ({labels.shape[0]}), "
                f"but got features of shape {tuple(features.shape)}"
            )
        return features, labels

    @functools.cached_property
    def _split(self) -> tuple[np.ndarray, np.ndarray]:
        _, labels = self._dataset
        return stratified_holdout(labels.numpy(), test_fraction=self.holdout_fraction, seed=self.holdout_seed)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
