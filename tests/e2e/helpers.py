"""Run ``python -m fedmq`` coordinators and workers as processes for end-to-end tests.

``FedmqProcesses`` starts each process from the repository root with its output in a
log file of its own, signals only the PIDs it started, and stops every process that
still runs when it closes. ``wait_for`` polls a condition with a bounded timeout and
fails with the tails of the logs, so a failed end-to-end test shows what the
processes did.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

REPO_ROOT = Path(__file__).resolve().parents[2]
STOP_TIMEOUT_S = 15.0
LOG_TAIL_LINES = 30

T = TypeVar("T")


def unique_federation(prefix: str) -> str:
    """Return a federation name that no other test uses, so queues and exchanges never collide."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass
class FedmqProcess:
    """One ``python -m fedmq`` process and the file that receives its output."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait(self, timeout_s: float) -> int:
        """Wait for the process to exit and return its exit status, or fail with its log after ``timeout_s``."""
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} (pid {self.pid}) still runs after {timeout_s:.0f} s; last lines of {self.log_path}:\n"
                f"{self.log_tail()}"
            ) from None

    def kill(self) -> int:
        """Send SIGKILL, as a crash or an OOM kill would, and return the exit status."""
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        return self.popen.wait(timeout=STOP_TIMEOUT_S)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Send SIGTERM, then SIGKILL after ``timeout_s`` seconds, and return the exit status."""
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                return self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
        return self.popen.wait(timeout=STOP_TIMEOUT_S)


class FedmqProcesses:
    """The fedmq processes of one test, all in one federation on one broker.

    Use it as a context manager, or call ``close()``, which stops every process that
    still runs. ``env`` adds environment variables to every process. Inherited
    ``FEDMQ_*`` variables are dropped, so the caller's settings never leak in.
    """

    def __init__(
        self,
        *,
        log_dir: Path,
        broker_url: str,
        federation: str,
        env: Mapping[str, str] | None = None,
        log_level: str = "DEBUG",
    ) -> None:
        self.log_dir = log_dir
        self.broker_url = broker_url
        self.federation = federation
        self.log_level = log_level
        self.processes: list[FedmqProcess] = []
        self._env = {name: value for name, value in os.environ.items() if not name.startswith("FEDMQ_")}
        self._env.update(
            {
                "FEDMQ_BROKER_URL": broker_url,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
                "PYTHONUNBUFFERED": "1",
            }
        )
        self._env.update(env or {})
        log_dir.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> FedmqProcesses:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def start(self, name: str, arguments: Sequence[str], *, env: Mapping[str, str] | None = None) -> FedmqProcess:
        """Start ``python -m fedmq --log-level LEVEL ARGUMENTS`` with its output in ``<log_dir>/<name>.log``."""
        log_path = self.log_dir / f"{name}.log"
        command = [sys.executable, "-m", "fedmq", "--log-level", self.log_level, *arguments]
        with open(log_path, "ab") as log_file:
            popen = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env={**self._env, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        process = FedmqProcess(name, popen, log_path)
        self.processes.append(process)
        return process

    def start_coordinator(
        self,
        *,
        task: str,
        rounds: int,
        run_dir: Path,
        arguments: Sequence[str] = (),
        name: str = "coordinator",
    ) -> FedmqProcess:
        """Start a coordinator of this federation, with its Prometheus endpoint off.

        ``arguments`` adds flags such as ``--min-updates 2``. The endpoint is off
        because coordinators of tests that run at once would contend for its port.
        """
        return self.start(
            name,
            [
                "coordinator", "--task", task, "--rounds", str(rounds), "--run-dir", str(run_dir),
                "--federation", self.federation, "--metrics-address", "0", *arguments,
            ],
        )

    def start_worker(
        self,
        worker_id: str,
        *,
        task: str,
        shard: str,
        arguments: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> FedmqProcess:
        """Start a worker of this federation with data shard ``shard`` (``INDEX/COUNT``)."""
        return self.start(
            worker_id,
            ["worker", "--task", task, "--worker-id", worker_id, "--shard", shard, "--federation", self.federation, *arguments],
            env=env,
        )

    def log_tails(self, lines: int = LOG_TAIL_LINES) -> str:
        """Return the last lines of every process's log, for assertion messages."""
        parts = []
        for process in self.processes:
            status = "running" if process.returncode is None else f"exit status {process.returncode}"
            parts.append(f"--- {process.name} (pid {process.pid}, {status}) ---\n{process.log_tail(lines)}")
        return "\n".join(parts)

    def close(self) -> None:
        """Stop every process that still runs: SIGTERM, then SIGKILL after a timeout."""
        for process in reversed(self.processes):
            process.stop()


def wait_for(
    condition: Callable[[], T | None],
    *,
    timeout_s: float,
    description: str,
    interval_s: float = 0.2,
    diagnostics: Callable[[], str] | None = None,
) -> T:
    """Poll ``condition`` until it returns a truthy value, and return that value.

    Fails after ``timeout_s`` seconds with ``description`` and the output of
    ``diagnostics``, such as ``FedmqProcesses.log_tails``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            details = f"\n{diagnostics()}" if diagnostics is not None else ""
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {description}{details}")
        time.sleep(interval_s)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Return the records of a run's ``metrics.jsonl``, one per finished round, or [] before the first."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
