"""The task interface: model, local data, local training and evaluation.

A task bundles what the coordinator and the workers must agree on: the model
architecture, how the dataset is split across workers, and how a worker trains
and evaluates. ``Task.train`` and ``Task.evaluate`` have default implementations
(SGD on cross-entropy, batched evaluation) that most classification tasks keep.
"""

from __future__ import annotations

import abc
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fedmq.errors import ConfigError, TaskError

logger = logging.getLogger(__name__)

PARTITION_SCHEMES = ("iid", "dirichlet", "shards")

# torch.Generator.manual_seed and numpy's SeedSequence both accept every value below 2**64.
_MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class PartitionSpec:
    """How a dataset is split across workers.

    ``scheme`` is one of:

    - ``"iid"``: a shuffled equal split.
    - ``"dirichlet"``: label skew. Each class is divided across the workers in
      proportions drawn from Dir(``alpha``), so a small ``alpha`` gives a strong skew.
    - ``"shards"``: the pathological non-IID split of McMahan et al. (2017). Rows are
      sorted by label, cut into ``shards_per_worker`` shards per worker and dealt
      out at random.

    ``min_samples_per_worker`` is the partition size that the Dirichlet scheme
    guarantees to each worker, capped at an equal share of the dataset.
    """

    scheme: str = "iid"
    alpha: float = 0.5
    shards_per_worker: int = 2
    seed: int = 0
    min_samples_per_worker: int = 10

    def __post_init__(self) -> None:
        if self.scheme not in PARTITION_SCHEMES:
            raise ConfigError(
                f"PartitionSpec.scheme must be one of {', '.join(PARTITION_SCHEMES)}, but got {self.scheme!r}"
            )
        _require_positive_float("PartitionSpec.alpha", self.alpha)
        _require_int("PartitionSpec.shards_per_worker", self.shards_per_worker, minimum=1)
        _require_seed("PartitionSpec.seed", self.seed)
        _require_int("PartitionSpec.min_samples_per_worker", self.min_samples_per_worker, minimum=1)


@dataclass
class LocalData:
    """A worker's local train and test tensors.

    Features are float32 with the sample dimension first, and labels are int64 class
    indices of shape (N,).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_train(self) -> int:
        return int(self.y_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.y_test.shape[0])


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one local training call.

    ``seed`` fixes the batch order and any randomness inside the model, so the same
    model, data and config give the same weights. ``max_steps`` caps the number of
    optimizer steps and ``time_budget_s`` the wall-clock time. Both are checked
    before each batch, so a budget spent before the first batch gives zero steps. With ``proximal_mu`` > 0, training adds the FedProx term
    mu/2 * ||w - w_global||^2 (Li et al., 2020) and needs the global parameters.
    """

    local_epochs: int = 1
    learning_rate: float = 0.05
    batch_size: int = 32
    momentum: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    max_steps: int | None = None
    time_budget_s: float | None = None
    proximal_mu: float = 0.0

    def __post_init__(self) -> None:
        _require_int("TrainConfig.local_epochs", self.local_epochs, minimum=1)
        _require_positive_float("TrainConfig.learning_rate", self.learning_rate)
        _require_int("TrainConfig.batch_size", self.batch_size, minimum=1)
        _require_float_in("TrainConfig.momentum", self.momentum, "in [0, 1)", lambda v: 0.0 <= v < 1.0)
        _require_float_in("TrainConfig.weight_decay", self.weight_decay, ">= 0", lambda v: v >= 0.0)
        _require_seed("TrainConfig.seed", self.seed)
        if self.max_steps is not None:
            _require_int("TrainConfig.max_steps", self.max_steps, minimum=1)
        if self.time_budget_s is not None:
            _require_positive_float("TrainConfig.time_budget_s", self.time_budget_s)
        _require_float_in("TrainConfig.proximal_mu", self.proximal_mu, ">= 0", lambda v: v >= 0.0)


@dataclass
class TrainResult:
    """The outcome of one local training call.

    ``num_samples`` is the FedAvg weight: the number of training samples seen at
    least once. It equals the local train set size unless ``max_steps`` or
    ``time_budget_s`` stopped training inside the first epoch. ``metrics`` contains
    at least ``loss`` and ``accuracy`` (mean cross-entropy and accuracy over the
    batches of the last epoch that ran, without the proximal term) and
    ``train_time_s``.
    """

    num_samples: int
    num_steps: int
    metrics: dict[str, float] = field(default_factory=dict)


GradientHook = Callable[[nn.Module], None]


class Task(abc.ABC):
    """A federated learning task: a model, a data split and local training.

    Subclasses set ``name`` and implement ``build_model``, ``load_local_data`` and
    ``load_test_set``. The coordinator and every worker must build the task with the
    same options, because the split and the model architecture depend on them.
    """

    name: str

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """Build a freshly initialised model.

        The caller seeds torch beforehand, so the initial weights are deterministic.
        """

    @abc.abstractmethod
    def load_local_data(self, worker_index: int, num_workers: int, partition: PartitionSpec) -> LocalData:
        """Load the train and test data of worker ``worker_index`` out of ``num_workers``."""

    @abc.abstractmethod
    def load_test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Load the global test set, which is disjoint from every worker's data."""

    def default_train_config(self) -> TrainConfig:
        """Return the hyperparameters recommended for this task."""
        return TrainConfig()

    def train(
        self,
        model: nn.Module,
        data: LocalData,
        config: TrainConfig,
        *,
        global_params: dict[str, torch.Tensor] | None = None,
        gradient_hook: GradientHook | None = None,
    ) -> TrainResult:
        """Train ``model`` in place on the local train set with SGD on cross-entropy.

        Each epoch visits the train set in a random order drawn from a generator
        seeded with ``config.seed``. Batches are slices of the data tensors, which
        move to the device of the model's first parameter. ``gradient_hook`` runs
        after ``backward()`` and before each optimizer step, so it can read and
        change the gradients, which include the proximal term's. Randomness inside the
        model, such as dropout, draws from torch's global generator, which is seeded
        with ``config.seed`` during training and restored afterwards.

        Empty local data returns a result with zero samples and leaves the model
        untouched. Raises ConfigError when ``proximal_mu`` > 0 and ``global_params``
        is missing, and TaskError when the model has no trainable parameters or
        ``global_params`` lacks one of them or has the wrong shape.
        """
        if data.num_train == 0:
            return TrainResult(0, 0, {"loss": 0.0, "accuracy": 0.0, "train_time_s": 0.0})

        parameters = [p for p in model.parameters() if p.requires_grad]
        if not parameters:
            raise TaskError(f"task {self.name!r} cannot train a model without trainable parameters")
        device = parameters[0].device
        anchors = _proximal_anchors(model, config, global_params, device)

        devices_to_fork = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices_to_fork):
            seed_torch(config.seed)
            return _run_sgd(model, parameters, data, config, anchors, gradient_hook, device)

    def evaluate(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024
    ) -> dict[str, float]:
        """Compute the mean cross-entropy and the accuracy of ``model`` on ``x``, ``y``.

        Runs in eval mode without gradients, ``batch_size`` samples at a time, and
        restores the model's previous mode. Returns ``loss``, ``accuracy`` and
        ``num_samples``, all zero for empty input.
        """
        _require_int("batch_size", batch_size, minimum=1)
        num_samples = int(y.shape[0])
        if num_samples == 0:
            return {"loss": 0.0, "accuracy": 0.0, "num_samples": 0.0}

        device = _model_device(model)
        was_training = model.training
        model.eval()
        loss_sum = 0.0
        correct = 0
        try:
            with torch.no_grad():
                for start in range(0, num_samples, batch_size):
                    x_batch = x[start : start + batch_size].to(device)
                    y_batch = y[start : start + batch_size].to(device)
                    logits = model(x_batch)
                    loss_sum += F.cross_entropy(logits, y_batch, reduction="sum").item()
                    correct += int((logits.argmax(dim=1) == y_batch).sum().item())
        finally:
            model.train(was_training)

        return {
            "loss": loss_sum / num_samples,
            "accuracy": correct / num_samples,
            "num_samples": float(num_samples),
        }


def seed_torch(seed: int) -> None:
    """Seed torch's random number generators like ``torch.manual_seed``, faster on CPU-only machines.

    torch.manual_seed also queues lazy seeding calls for CUDA and the other backends,
    and it records a stack trace for each. That costs about 0.1 ms per call (torch 2.13,
    measured on a CPU build). Without CUDA, only the CPU generator matters.
    """
    if torch.cuda.is_available():
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


def _run_sgd(
    model: nn.Module,
    parameters: list[nn.Parameter],
    data: LocalData,
    config: TrainConfig,
    anchors: list[tuple[nn.Parameter, torch.Tensor]],
    gradient_hook: GradientHook | None,
    device: torch.device,
) -> TrainResult:
    num_train = data.num_train
    x_train = data.x_train.to(device)
    y_train = data.y_train.to(device)
    optimizer = torch.optim.SGD(
        parameters,
        lr=config.learning_rate,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    generator = torch.Generator().manual_seed(config.seed)
    model.train()

    started = time.monotonic()
    num_steps = 0
    first_epoch_seen = 0
    last_loss = 0.0
    last_accuracy = 0.0
    stopped = False
    for epoch in range(config.local_epochs):
        order = torch.randperm(num_train, generator=generator).to(device)
        # Each batch keeps its loss and predictions on the device, and the epoch's
        # metrics come from them in two operations after the last batch, so a batch
        # adds neither a host synchronisation nor a chain of small tensor operations.
        batch_losses: list[torch.Tensor] = []
        batch_sizes: list[int] = []
        predictions: list[torch.Tensor] = []
        epoch_seen = 0
        for start in range(0, num_train, config.batch_size):
            if _budget_spent(config, num_steps, started):
                stopped = True
                break

            batch = order[start : start + config.batch_size]
            x_batch = x_train[batch]
            y_batch = y_train[batch]
            optimizer.zero_grad(set_to_none=True)
            logits = model(x_batch)
            loss = F.cross_entropy(logits, y_batch)
            if anchors:
                (loss + _proximal_term(anchors, config.proximal_mu)).backward()
            else:
                loss.backward()
            if gradient_hook is not None:
                gradient_hook(model)
            optimizer.step()
            num_steps += 1

            # Metrics come from the logits of the forward pass, so they cost no extra pass.
            batch_size = int(batch.shape[0])
            batch_losses.append(loss.detach())
            batch_sizes.append(batch_size)
            predictions.append(logits.detach().argmax(dim=1))
            epoch_seen += batch_size

        if epoch == 0:
            first_epoch_seen = epoch_seen
        if epoch_seen > 0:
            sizes = torch.tensor(batch_sizes, dtype=torch.float32, device=device)
            last_loss = float(torch.dot(torch.stack(batch_losses).float(), sizes)) / epoch_seen
            correct = torch.cat(predictions) == y_train[order[:epoch_seen]]
            last_accuracy = int(correct.sum()) / epoch_seen
        if stopped:
            break

    train_time_s = time.monotonic() - started
    if not math.isfinite(last_loss):
        logger.warning("Local training of %d steps ended with a non-finite loss %s", num_steps, last_loss)
    return TrainResult(
        num_samples=first_epoch_seen,
        num_steps=num_steps,
        metrics={"loss": last_loss, "accuracy": last_accuracy, "train_time_s": train_time_s},
    )


def _budget_spent(config: TrainConfig, num_steps: int, started: float) -> bool:
    if config.max_steps is not None and num_steps >= config.max_steps:
        return True
    if config.time_budget_s is not None and time.monotonic() - started >= config.time_budget_s:
        return True
    return False


def _proximal_anchors(
    model: nn.Module,
    config: TrainConfig,
    global_params: dict[str, torch.Tensor] | None,
    device: torch.device,
) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Pair each trainable parameter with its global value for the FedProx term."""
    if config.proximal_mu == 0.0:
        return []
    if global_params is None:
        raise ConfigError(
            f"TrainConfig.proximal_mu is {config.proximal_mu} but global_params is None; "
            "pass the global model's state dict or set proximal_mu to 0"
        )

    anchors = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if name not in global_params:
            raise TaskError(f"global_params has no entry for the model parameter {name!r}")
        anchor = global_params[name]
        if tuple(anchor.shape) != tuple(parameter.shape):
            raise TaskError(
                f"global_params[{name!r}] must have shape {tuple(parameter.shape)}, "
                f"but got {tuple(anchor.shape)}"
            )
        anchors.append((parameter, anchor.detach().to(device=device, dtype=parameter.dtype)))
    return anchors


def _proximal_term(anchors: list[tuple[nn.Parameter, torch.Tensor]], mu: float) -> torch.Tensor:
    squared_distances = [(parameter - anchor).pow(2).sum() for parameter, anchor in anchors]
    return 0.5 * mu * torch.stack(squared_distances).sum()


def _model_device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def _require_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, but got {value!r}")


def _require_seed(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_SEED:
        raise ConfigError(f"{name} must be an integer in [0, 2**64), but got {value!r}")


def _require_positive_float(name: str, value: object) -> None:
    _require_float_in(name, value, "> 0", lambda v: v > 0.0)


def _require_float_in(name: str, value: object, expected: str, accept: Callable[[float], bool]) -> None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value) or not accept(float(value)):  # type: ignore[arg-type]
        raise ConfigError(f"{name} must be a finite number {expected}, but got {value!r}")
