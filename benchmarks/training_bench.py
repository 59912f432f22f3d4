"""Section ``training``: a worker's local training step, against a plain torch loop over the same data.

fedmq: ``Task.train`` of the built-in tasks, which runs SGD over data held as
tensors, with batches gathered by index and the loss and accuracy summed on the
device. The worker's whole round (``LocalTrainer.run_round``: decode the round
start, load the weights, train, compute and encode the deltas) is timed too.

Reference: the loop anyone would write by hand over the same tensors: the same
model and initial weights, the same batch order, ``zero_grad``, forward,
cross-entropy, ``backward``, ``step``, and nothing else. Both train one epoch
over the task's whole training split with one torch thread, so that the figures
are per-step overheads and not thread scheduling. Best of several runs each.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import best_time_s, ratio
from fedmq.tasks import PartitionSpec, TrainConfig, load_task
from schemas.messages import DecodeLimits, RoundStart, decode_message, encode_message
from schemas.tensors import encode_state
from worker.training import LocalOverrides, LocalTrainer

TASKS = ("digits", "mnist")
BATCH_SIZES = (32, 128)
LEARNING_RATE = 0.05
SEED = 0


def plain_loop(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int, seed: int) -> int:
    """Train one epoch of plain SGD with the batch order that fedmq uses for ``seed``; return the steps taken."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    model.train()
    steps = 0
    for start in range(0, x.shape[0], batch_size):
        batch = order[start : start + batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[batch]), y[batch])
        loss.backward()
        optimizer.step()
        steps += 1
    return steps


def _round_start(state: dict[str, torch.Tensor], task_name: str, batch_size: int) -> bytes:
    start = RoundStart(
        run_id="bench", round=1, attempt=0, model_version=0, task=task_name, deadline_unix=time.time() + 3600,
        config={"local_epochs": 1, "learning_rate": LEARNING_RATE, "batch_size": batch_size, "seed": SEED, "codec": "float32", "lossless": "none"},
        weights=encode_state(state),
    )
    return encode_message(start)


def _measure(task_name: str, batch_size: int, repeats: int) -> dict[str, Any]:
    task = load_task(task_name)
    data = task.load_local_data(0, 1, PartitionSpec())
    torch.manual_seed(SEED)
    model = task.build_model()
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    config = TrainConfig(local_epochs=1, learning_rate=LEARNING_RATE, batch_size=batch_size, seed=SEED)

    def fedmq_train() -> None:
        model.load_state_dict(initial)
        task.train(model, data, config)

    def plain_train() -> None:
        model.load_state_dict(initial)
        plain_loop(model, data.x_train, data.y_train, batch_size=batch_size, seed=SEED)

    trainer = LocalTrainer(task, data, worker_id="bench", state_dir=None, overrides=LocalOverrides())
    body = _round_start(initial, task_name, batch_size)

    def worker_round() -> None:
        start = decode_message(body, DecodeLimits())
        assert isinstance(start, RoundStart)
        trainer.run_round(start)

    # Interleaved, so that a slow spell of a shared machine hits both alike.
    plain_s = fedmq_s = round_s = float("inf")
    for _ in range(repeats):
        plain_s = min(plain_s, best_time_s(plain_train, repeats=1))
        fedmq_s = min(fedmq_s, best_time_s(fedmq_train, repeats=1))
        round_s = min(round_s, best_time_s(worker_round, repeats=1))
    steps = -(-data.num_train // batch_size)
    return {
        "task": task_name,
        "batch_size": batch_size,
        "samples": data.num_train,
        "steps": steps,
        "plain_s": round(plain_s, 5),
        "fedmq_train_s": round(fedmq_s, 5),
        "worker_round_s": round(round_s, 5),
        "fedmq_train_vs_plain": ratio(plain_s, fedmq_s),
        "worker_round_vs_plain": ratio(plain_s, round_s),
        "overhead_per_step_us": round((fedmq_s - plain_s) / steps * 1e6, 1),
    }


def run(*, quick: bool) -> dict[str, Any]:
    started = time.monotonic()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = [
            _measure(task_name, batch_size, repeats=2 if quick else 5)
            for task_name in (TASKS[:1] if quick else TASKS)
            for batch_size in (BATCH_SIZES[:1] if quick else BATCH_SIZES)
        ]
    finally:
        torch.set_num_threads(threads)
    return {
        "reference": "a plain torch SGD loop over the same tensors, batch order and model, one epoch, one torch thread",
        "results": results,
        "duration_s": round(time.monotonic() - started, 1),
    }
