"""Process control, waiting, broker inspection and a test-driven worker for the fault tests.

Every process is started by ``Services`` and is killed by its PID when the test
ends, also when it fails. Coordinators and workers log at DEBUG to one file each,
whose tail goes into the failure message of any wait that times out.

``python -m tests.faults.helpers coordinator SETTINGS_JSON`` runs a coordinator with
settings the command line does not expose (used for the decode size limit).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import safetensors.torch
import torch

from fedmq.broker import BrokerClient, BrokerSettings, Delivery
from fedmq.rabbitmq_node import RabbitMQNode
from schemas.messages import DecodeLimits, Join, RoundStart, Update, decode_message, encode_message
from schemas.tensors import encode_raw
from schemas.wire import WireTensor

REPO_ROOT = Path(__file__).resolve().parents[2]
FAULTY_TASK = "tests.faults.tasks:FaultyDigitsTask"
WIDE_TASK = "tests.faults.tasks:WideDigitsTask"

_LOG_TAIL_CHARS = 4000

T = TypeVar("T")


# Processes


@dataclass
class Service:
    """A coordinator or worker process that a test started."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self) -> str:
        return f"--- {self.name} (pid {self.pid}, exit {self.process.poll()}) {self.log_path} ---\n{self.log()[-_LOG_TAIL_CHARS:]}"

    def kill(self) -> None:
        """Send SIGKILL, as a crash would, and reap the process."""
        if self.running:
            os.kill(self.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def terminate(self) -> None:
        if self.running:
            os.kill(self.pid, signal.SIGTERM)

    def wait(self, timeout_s: float) -> int:
        """Wait for the exit status; raise AssertionError with the log tail when it does not come in time."""
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit within {timeout_s:.0f} s\n{self.log_tail()}") from None


class Services:
    """Starts fedmq processes against one broker and federation, and kills the ones left at exit."""

    def __init__(self, log_dir: Path, url: str, federation: str) -> None:
        self.log_dir = log_dir
        self.url = url
        self.federation = federation
        self.started: list[Service] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Services:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self, name: str, command: list[str], env: Mapping[str, str] | None = None) -> Service:
        environment = {
            **os.environ,
            "PYTHONPATH": str(REPO_ROOT),
            "PYTHONUNBUFFERED": "1",
            "FEDMQ_BROKER_URL": self.url,
            **(env or {}),
        }
        # A restarted service of the same name appends to its log.
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                command, cwd=REPO_ROOT, env=environment, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        service = Service(name, process, log_path)
        self.started.append(service)
        return service

    def coordinator(self, run_dir: Path, *args: str, name: str = "coordinator", task: str = FAULTY_TASK) -> Service:
        command = fedmq_command(
            "coordinator", "--task", task, "--federation", self.federation, "--run-dir", str(run_dir), *args
        )
        return self.start(name, command)

    def worker(
        self,
        worker_id: str,
        shard: str,
        *args: str,
        task: str = FAULTY_TASK,
        env: Mapping[str, str] | None = None,
    ) -> Service:
        command = fedmq_command(
            "worker", "--task", task, "--federation", self.federation, "--worker-id", worker_id,
            "--shard", shard, "--partition", "iid", *args,
        )
        return self.start(worker_id, command, env)

    def custom_coordinator(self, settings: Mapping[str, Any], *, name: str = "coordinator") -> Service:
        """Start ``python -m tests.faults.helpers coordinator`` with CoordinatorSettings fields."""
        command = [sys.executable, "-m", "tests.faults.helpers", "coordinator", json.dumps(dict(settings))]
        return self.start(name, command)

    def logs(self) -> str:
        return "\n".join(service.log_tail() for service in self.started)

    def close(self) -> None:
        """Kill every service still running with SIGKILL; tests that check a clean stop send SIGTERM themselves."""
        for service in self.started:
            service.kill()


def fedmq_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedmq", "--log-level", "DEBUG", *args]


# Waiting


def wait_until(
    probe: Callable[[], T | None],
    *,
    timeout_s: float,
    what: str,
    watch: Iterable[Service] = (),
    services: Services | None = None,
    poll_s: float = 0.1,
) -> T:
    """Poll ``probe`` until it returns a true value, and return that value.

    Fails with the logs when ``timeout_s`` passes, or when a service in ``watch``
    exits first, because a fault test must never wait on a process that is gone.
    """
    watched = list(watch)
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        for service in watched:
            if not service.running:
                logs = services.logs() if services is not None else service.log_tail()
                raise AssertionError(f"{service.name} exited with {service.process.poll()} while waiting for {what}\n{logs}")
        if time.monotonic() >= deadline:
            logs = services.logs() if services is not None else "\n".join(s.log_tail() for s in watched)
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{logs}")
        time.sleep(poll_s)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                # The coordinator is writing this line right now.
                break
    return records


def wait_for_round(run_dir: Path, round_number: int, *, timeout_s: float, watch: Iterable[Service] = (), services: Services | None = None) -> list[dict[str, Any]]:
    """Wait until metrics.jsonl holds round ``round_number`` and return all records."""
    return wait_until(
        lambda: (records := read_metrics(run_dir)) and records[-1]["round"] >= round_number and records,
        timeout_s=timeout_s, what=f"round {round_number} in {run_dir}", watch=watch, services=services,
    )


def wait_for_checkpoint(run_dir: Path, completed_rounds: int, *, timeout_s: float, watch: Iterable[Service] = (), services: Services | None = None) -> dict[str, Any]:
    """Wait until the checkpoint covers ``completed_rounds`` and return its state.

    The coordinator writes a round's metrics before its checkpoint, so a test that
    reads the checkpoint waits for it rather than for the metrics.
    """

    def probe() -> dict[str, Any] | None:
        try:
            state = checkpoint_state(run_dir)
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return state if state["completed_rounds"] >= completed_rounds else None

    return wait_until(probe, timeout_s=timeout_s, what=f"the checkpoint after round {completed_rounds} in {run_dir}", watch=watch, services=services)


def count_lines(service: Service, text: str) -> int:
    return sum(1 for line in service.log().splitlines() if text in line)


# Checkpoints


def checkpoint_model(run_dir: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(run_dir / "checkpoint" / "model.safetensors"))


def checkpoint_state(run_dir: Path) -> dict[str, Any]:
    state: dict[str, Any] = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    return state


# Broker inspection


def queue_table(node: RabbitMQNode, *columns: str) -> dict[str, list[str]]:
    """Return ``rabbitmqctl list_queues name COLUMNS`` as a mapping from queue name to the column values."""
    output = node.ctl("list_queues", "--quiet", "--no-table-headers", "name", *columns)
    table = {}
    for line in output.splitlines():
        fields = line.split("\t")
        if len(fields) == len(columns) + 1:
            table[fields[0]] = fields[1:]
    return table


def consumer_counts(node: RabbitMQNode, federation: str) -> dict[str, int]:
    """Return the number of consumers of each queue of ``federation`` that has any, from ``rabbitmqctl list_consumers``."""
    output = node.ctl("list_consumers", "--quiet", "--no-table-headers", "queue_name", "consumer_tag")
    counts: dict[str, int] = {}
    for line in output.splitlines():
        name = line.split("\t")[0]
        if name.startswith(federation + "."):
            counts[name] = counts.get(name, 0) + 1
    return counts


def dead_letters(url: str, federation: str) -> list[tuple[dict[str, Any], bytes]]:
    """Take every message off ``<federation>.dead`` and return its headers and body."""
    client = BrokerClient(BrokerSettings(url=url, federation=federation), client_name="fault-test-dead-letters")
    client.connect()
    try:
        messages = []
        while True:
            method, properties, body = client.channel.basic_get(client.topology.dead_letter_queue, auto_ack=True)
            if method is None:
                return messages
            messages.append((dict(properties.headers or {}), body))
    finally:
        client.close()


def queue_depth(url: str, federation: str, queue_name: str) -> int:
    client = BrokerClient(BrokerSettings(url=url, federation=federation), client_name="fault-test-depth", declare=False)
    client.connect()
    try:
        return client.queue_depth(queue_name)
    finally:
        client.close()


# A worker played by the test


class FakeWorker:
    """A worker whose messages the test writes by hand: it joins, takes round starts and publishes bytes.

    It lives on the test's thread, like any BrokerClient user, and processes broker
    events only inside its own calls.
    """

    def __init__(self, url: str, federation: str, worker_id: str, *, task: str, num_samples: int) -> None:
        self.worker_id = worker_id
        self.task = task
        self.num_samples = num_samples
        self.starts: list[RoundStart] = []
        self.client = BrokerClient(BrokerSettings(url=url, federation=federation), client_name=f"fake-worker-{worker_id}")
        self.client.add_setup_step(lambda: self.client.declare_worker_queue(worker_id))
        self.client.consume(self.client.topology.worker_queue(worker_id), self._on_delivery)
        self.client.connect()

    def _on_delivery(self, delivery: Delivery) -> None:
        self.client.ack(delivery)
        message = decode_message(delivery.body, DecodeLimits())
        if isinstance(message, RoundStart):
            self.starts.append(message)

    def join(self) -> None:
        join = Join(worker_id=self.worker_id, task=self.task, num_samples=self.num_samples, model_version=-1)
        self.publish(encode_message(join))

    def wait_for_round(self, round_number: int, *, timeout_s: float, watch: Iterable[Service] = ()) -> RoundStart:
        """Process events until a round start of ``round_number`` arrived, and return the newest such start."""

        def probe() -> RoundStart | None:
            self.client.process_events(0.05)
            matching = [start for start in self.starts if start.round == round_number]
            return matching[-1] if matching else None

        return wait_until(probe, timeout_s=timeout_s, what=f"round {round_number} at {self.worker_id}", watch=watch, poll_s=0.0)

    def publish(self, body: bytes, *, message_id: str | None = None, headers: dict[str, Any] | None = None) -> str:
        return self.client.publish_result(self.worker_id, body, message_id=message_id, headers=headers)

    def update_body(
        self,
        start: RoundStart,
        deltas: Mapping[str, np.ndarray],
        *,
        num_samples: int | None = None,
        round_number: int | None = None,
        model_version: int | None = None,
    ) -> bytes:
        """Encode an Update with float32 ``deltas`` (names without the ``deltas/`` prefix) for ``start``."""
        wire: dict[str, WireTensor] = {name: encode_raw(np.ascontiguousarray(values, dtype=np.float32), "float32") for name, values in deltas.items()}
        update = Update(
            run_id=start.run_id,
            round=start.round if round_number is None else round_number,
            attempt=start.attempt,
            model_version=start.model_version if model_version is None else model_version,
            worker_id=self.worker_id,
            num_samples=self.num_samples if num_samples is None else num_samples,
            num_steps=1,
            metrics={"loss": 0.5},
            deltas=wire,
            codec="float32",
        )
        return encode_message(update)

    def close(self) -> None:
        self.client.close()


def random_deltas(start: RoundStart, seed: int, scale: float = 0.01) -> dict[str, np.ndarray]:
    """Float32 deltas with the shapes of the round start's model, named as in the state dict."""
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(tensor.shape) * scale).astype(np.float32) for name, tensor in start.weights.items()}


def apply_mean(model: Mapping[str, torch.Tensor], weighted: list[tuple[int, dict[str, np.ndarray]]]) -> dict[str, torch.Tensor]:
    """FedAvg in float64: ``model`` plus the sample-weighted mean of the deltas."""
    total = sum(weight for weight, _ in weighted)
    return {
        name: value.double() + sum(weight * torch.from_numpy(deltas[name]).double() for weight, deltas in weighted) / total
        for name, value in model.items()
    }


# Custom coordinator entry point


def _run_custom_coordinator(settings_json: str) -> int:
    from coordinator.service import Coordinator, CoordinatorSettings
    from fedmq.cli import EXIT_ROUND_FAILED, configure_logging
    from fedmq.errors import RoundFailedError

    configure_logging("DEBUG")
    fields = json.loads(settings_json)
    broker_fields = fields.pop("broker")
    broker_fields.setdefault("url", os.environ["FEDMQ_BROKER_URL"])
    settings = CoordinatorSettings(broker=BrokerSettings(**broker_fields), run_dir=Path(fields.pop("run_dir")), **fields)
    coordinator = Coordinator(settings)
    coordinator.install_signal_handlers()
    try:
        coordinator.run()
    except RoundFailedError:
        return EXIT_ROUND_FAILED
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "coordinator":
        sys.exit("usage: python -m tests.faults.helpers coordinator SETTINGS_JSON")
    sys.exit(_run_custom_coordinator(sys.argv[2]))
