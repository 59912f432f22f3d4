"""Federated learning tasks: models, data splits, local training and evaluation.

``load_task("digits")`` and ``load_task("mnist")`` build the built-in tasks, and
``load_task("package.module:attr")`` imports a custom one.
"""

from fedmq.tasks.base import LocalData, PartitionSpec, Task, TrainConfig, TrainResult
from fedmq.tasks.dataset import ArrayDatasetTask
from fedmq.tasks.digits import DigitsTask
from fedmq.tasks.mnist import MnistTask
from fedmq.tasks.partition import partition_indices, worker_partition
from fedmq.tasks.registry import BUILTIN_TASKS, load_task

__all__ = [
    "BUILTIN_TASKS",
    "ArrayDatasetTask",
    "DigitsTask",
    "LocalData",
    "MnistTask",
    "PartitionSpec",
    "Task",
    "TrainConfig",
    "TrainResult",
    "load_task",
    "partition_indices",
    "worker_partition",
]
