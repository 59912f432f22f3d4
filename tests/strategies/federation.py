"""A coordinator and its workers as threads of the test process, over a real broker.

Each service keeps its own connection on its own thread, as the processes of a real
run do. ``Federation.run_coordinator`` returns when the coordinator finishes.
``Federation.stop_workers`` then asks the workers to stop and joins them, and a
worker thread still alive after the timeout fails the test.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.service import Coordinator, CoordinatorSettings, RunResult
from fedmq.broker import BrokerClient, BrokerSettings, Delivery
from fedmq.tasks import PartitionSpec, Task
from schemas.messages import Message, decode_message
from worker.service import Worker, WorkerSettings

# Seconds a test waits for a thread before it fails.
THREAD_TIMEOUT_S = 300.0


def federation_name(prefix: str) -> str:
    return f"strategies-{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass
class Federation:
    """Settings shared by the coordinator and the workers of one test run."""

    broker_url: str
    run_dir: Path
    task: Task
    federation: str
    workers: int = 3
    partition: PartitionSpec = PartitionSpec(scheme="iid", seed=0)
    worker_max_steps: Sequence[int | None] = ()
    worker_threads: list[threading.Thread] = field(default_factory=list)
    worker_services: list[Worker] = field(default_factory=list)

    @property
    def broker(self) -> BrokerSettings:
        return BrokerSettings(url=self.broker_url, federation=self.federation, heartbeat_s=30)

    def coordinator_settings(self, **overrides: Any) -> CoordinatorSettings:
        values: dict[str, Any] = {
            "broker": self.broker,
            "task": self.task.name,
            "rounds": 4,
            "run_dir": self.run_dir,
            "min_workers": self.workers,
            "min_updates": self.workers,
            "round_deadline_s": 120.0,
            "join_timeout_s": 60.0,
            "max_round_retries": 0,
            "codec": "float32",
            "lossless": "none",
            "downlink_codec": "full",
            "seed": 0,
        }
        defaults = self.task.default_train_config()
        values.update(local_epochs=defaults.local_epochs, learning_rate=defaults.learning_rate, batch_size=defaults.batch_size, momentum=defaults.momentum)
        values.update(overrides)
        return CoordinatorSettings(**values)

    def start_workers(self) -> None:
        for index in range(self.workers):
            max_steps = self.worker_max_steps[index] if index < len(self.worker_max_steps) else None
            settings = WorkerSettings(
                broker=self.broker,
                task=self.task.name,
                worker_id=f"worker-{index + 1}",
                shard_index=index,
                shard_count=self.workers,
                partition=self.partition,
                state_dir=self.run_dir.parent / f"{self.run_dir.name}-workers" / f"worker-{index + 1}",
                max_steps=max_steps,
            )
            worker = Worker(settings, task=self.task)
            thread = threading.Thread(target=worker.run, name=f"test-worker-{index + 1}", daemon=True)
            self.worker_services.append(worker)
            self.worker_threads.append(thread)
            thread.start()

    def run_coordinator(self, settings: CoordinatorSettings, *, stop_after_round: int | None = None) -> tuple[RunResult, Coordinator]:
        """Run a coordinator on a thread of its own and return its result.

        With ``stop_after_round``, the coordinator is asked to stop once that round is
        aggregated, as a SIGTERM would, so it writes its checkpoint without marking the
        run finished.
        """
        coordinator = Coordinator(settings, task=self.task)
        if stop_after_round is not None:
            summarize = coordinator.strategy.round_summary

            def summarize_then_stop() -> dict[str, Any]:
                if coordinator.current is not None and coordinator.current.round >= stop_after_round:
                    coordinator.stop_requested = True
                return summarize()

            coordinator.strategy.round_summary = summarize_then_stop  # type: ignore[method-assign]
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["result"] = coordinator.run()
            except BaseException as exc:  # re-raised on the test's thread below
                outcome["error"] = exc

        thread = threading.Thread(target=target, name="test-coordinator", daemon=True)
        thread.start()
        thread.join(THREAD_TIMEOUT_S)
        if thread.is_alive():
            coordinator.stop_requested = True
            thread.join(30)
            raise AssertionError(f"the coordinator did not finish {settings.rounds} rounds within {THREAD_TIMEOUT_S:.0f} s")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"], coordinator

    def stop_workers(self) -> None:
        for worker in self.worker_services:
            worker.stop_requested = True
        for thread in self.worker_threads:
            thread.join(60)
        alive = [thread.name for thread in self.worker_threads if thread.is_alive()]
        assert not alive, f"worker threads {alive} did not stop within 60 s"


class Recorder:
    """Copies of every message that crossed the federation's exchanges, read from queues bound next to the real ones.

    One queue is bound to the rounds exchange with ``#`` (every round start, broadcast
    or addressed to one worker) and one to the results exchange with the results
    queue's routing key (every update, join and leave).
    """

    def __init__(self, settings: BrokerSettings) -> None:
        self.client = BrokerClient(settings, client_name="test-recorder")
        self.client.connect()
        names = self.client.topology
        self.rounds_queue = f"{settings.federation}.test.rounds-copy"
        self.results_queue = f"{settings.federation}.test.results-copy"
        channel = self.client.channel
        channel.queue_declare(self.rounds_queue, durable=False, auto_delete=False)
        channel.queue_bind(self.rounds_queue, names.rounds_exchange, routing_key="#")
        channel.queue_declare(self.results_queue, durable=False, auto_delete=False)
        channel.queue_bind(self.results_queue, names.results_exchange, routing_key=names.results_queue)
        self.bodies: dict[str, list[bytes]] = {self.rounds_queue: [], self.results_queue: []}

    def drain(self) -> dict[str, list[Message]]:
        """Consume both copy queues until they are empty and return the decoded messages of each."""
        for queue_name in (self.rounds_queue, self.results_queue):
            self.client.consume(queue_name, lambda delivery, name=queue_name: self._keep(name, delivery), prefetch=256)
        while any(self.client.queue_depth(name) for name in self.bodies):
            self.client.process_events(0.2)
        self.client.process_events(0.5)
        return {name: [decode_message(body) for body in bodies] for name, bodies in self.bodies.items()}

    def _keep(self, queue_name: str, delivery: Delivery) -> None:
        self.bodies[queue_name].append(bytes(delivery.body))
        self.client.ack(delivery)

    def close(self) -> None:
        self.client.close()
