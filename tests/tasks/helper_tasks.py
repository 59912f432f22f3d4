"""Small tasks that the load_task tests import by 'module:attr' spec."""

from __future__ import annotations

import torch
from torch import nn

from fedmq.tasks import LocalData, PartitionSpec, Task


class TinyTask(Task):
    """A two-class task on a fixed random dataset with a linear model."""

    name = "tiny"

    def __init__(self, *, num_features: int = 4) -> None:
        self.num_features = num_features

    def build_model(self) -> nn.Module:
        return nn.Linear(self.num_features, 2)

    def load_local_data(self, worker_index: int, num_workers: int, partition: PartitionSpec) -> LocalData:
        generator = torch.Generator().manual_seed(worker_index)
        x = torch.randn(8, self.num_features, generator=generator)
        y = (x[:, 0] > 0).long()
        return LocalData(x_train=x[:6], y_train=y[:6], x_test=x[6:], y_test=y[6:])

    def load_test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(4, self.num_features, generator=torch.Generator().manual_seed(1000))
        return x, (x[:, 0] > 0).long()


class NamelessTask(TinyTask):
    name = ""


class IncompleteTask(Task):
    """A Task subclass that leaves the abstract methods unimplemented."""

    name = "incomplete"


class NotATask:
    name = "not-a-task"


def make_tiny_task(num_features: int = 4) -> TinyTask:
    return TinyTask(num_features=num_features)


def make_string() -> str:
    return "tiny"


def failing_factory() -> Task:
    raise RuntimeError("the dataset directory is missing")


TINY_TASK = TinyTask(num_features=3)
TASK_COUNT = 3


class Holder:
    task_class = TinyTask
