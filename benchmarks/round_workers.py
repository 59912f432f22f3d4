"""Worker side of the ``rounds`` section: N worker threads in one process, fedmq or raw pika.

``fedmq`` mode runs real ``worker.service.Worker`` objects on a task whose training is a
no-op, so a round costs only the protocol: receive and decode the model, encode a
model-sized update, publish it. ``raw`` mode runs pika consumers that reply to each
message with the same number of bytes, published with the same delivery settings
(persistent, publisher confirms, mandatory) to a results queue of the same type.

Both print ``ready`` once every worker is connected and subscribed, and exit after
the given number of rounds.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import pika
import torch
from torch import nn

from fedmq.broker import BrokerSettings
from fedmq.tasks import LocalData, PartitionSpec, Task, TrainConfig, TrainResult
from fedmq.tuning import tune_allocator, tune_pika_reads

RAW_EXCHANGE = "bench.raw.rounds"
RAW_RESULTS = "bench.raw.results"


class NoOpModel(nn.Module):
    """One flat float32 parameter of the requested size."""

    def __init__(self, num_params: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_params))


class NoOpTask(Task):
    """A task whose training changes nothing and whose evaluation records when it ran.

    The coordinator evaluates right after it computes the new global model, so
    ``evaluated_unix`` holds, per round, the time at which that model existed.
    """

    name = "noop"

    def __init__(self, num_params: int) -> None:
        self.num_params = num_params
        self.evaluated_unix: list[float] = []

    def build_model(self) -> nn.Module:
        return NoOpModel(self.num_params)

    def load_local_data(self, worker_index: int, num_workers: int, partition: PartitionSpec) -> LocalData:
        x = torch.zeros(4, 1)
        y = torch.zeros(4, dtype=torch.int64)
        return LocalData(x_train=x, y_train=y, x_test=x[:0], y_test=y[:0])

    def load_test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(0, 1), torch.zeros(0, dtype=torch.int64)

    def train(self, model: nn.Module, data: LocalData, config: TrainConfig, **kwargs: object) -> TrainResult:  # type: ignore[override]
        return TrainResult(num_samples=data.num_train, num_steps=0, metrics={"loss": 0.0, "accuracy": 0.0})

    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024) -> dict[str, float]:
        self.evaluated_unix.append(time.time())
        return {"loss": 0.0, "accuracy": 0.0, "num_samples": 0.0}


def _run_fedmq(args: argparse.Namespace) -> None:
    from worker.service import Worker, WorkerSettings

    task = NoOpTask(args.params)
    broker = BrokerSettings(url=args.url, federation=args.federation, heartbeat_s=120)
    workers = [
        Worker(
            WorkerSettings(broker=broker, task=task.name, worker_id=f"w{index}", shard_index=index, shard_count=args.workers, exit_after_rounds=args.rounds),
            task=task,
        )
        for index in range(args.workers)
    ]
    threads = [threading.Thread(target=worker.run, name=worker.worker_id, daemon=True) for worker in workers]
    for thread in threads:
        thread.start()
    print("ready", flush=True)
    for thread in threads:
        thread.join()


def _run_raw(args: argparse.Namespace) -> None:
    reply = bytes(args.bytes)
    ready = threading.Barrier(args.workers + 1)
    failures: list[BaseException] = []

    def serve(index: int) -> None:
        try:
            connection = pika.BlockingConnection(pika.URLParameters(args.url))
            channel = connection.channel()
            channel.confirm_delivery()
            queue_name = f"bench.raw.worker.{index}"
            channel.queue_declare(queue_name, durable=True)
            channel.queue_bind(queue_name, RAW_EXCHANGE)
            channel.basic_qos(prefetch_count=2)
            answered = 0

            def on_message(ch: object, method: pika.spec.Basic.Deliver, properties: object, body: bytes) -> None:
                nonlocal answered
                channel.basic_ack(method.delivery_tag)
                channel.basic_publish("", RAW_RESULTS, reply, pika.BasicProperties(delivery_mode=2), mandatory=True)
                answered += 1
                if answered >= args.rounds:
                    channel.stop_consuming()

            channel.basic_consume(queue_name, on_message)
            ready.wait()
            channel.start_consuming()
            connection.close()
        except BaseException as exc:  # reported after the threads end
            failures.append(exc)
            ready.abort()

    threads = [threading.Thread(target=serve, args=(index,), daemon=True) for index in range(args.workers)]
    for thread in threads:
        thread.start()
    ready.wait()
    print("ready", flush=True)
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(f"{len(failures)} raw workers failed, first: {failures[0]!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run benchmark workers as threads of one process.")
    parser.add_argument("mode", choices=("fedmq", "raw"))
    parser.add_argument("--url", required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--params", type=int, default=0, help="fedmq mode: model parameters")
    parser.add_argument("--bytes", type=int, default=0, help="raw mode: reply size in bytes")
    parser.add_argument("--federation", default="bench")
    parser.add_argument("--untuned", action="store_true", help="keep glibc's and pika's defaults")
    args = parser.parse_args(argv)
    if not args.untuned:
        tune_allocator()
        tune_pika_reads()
    if args.mode == "fedmq":
        _run_fedmq(args)
    else:
        _run_raw(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
