"""Helpers of the operations tests: fedmq processes on the test broker, and headless Chromium."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
APT_TIMEOUT_S = 1200.0
STOP_TIMEOUT_S = 30.0


def fedmq_env(broker_url: str) -> dict[str, str]:
    """The test process's environment without FEDMQ_* settings, plus the broker URL."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("FEDMQ_")}
    env["FEDMQ_BROKER_URL"] = broker_url
    env["PYTHONUNBUFFERED"] = "1"
    return env


class FedmqProcesses:
    """fedmq commands started as child processes; every one still running is stopped at the end."""

    def __init__(self, log_dir: Path, broker_url: str) -> None:
        self.log_dir = log_dir
        self.env = fedmq_env(broker_url)
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """Run ``python -m fedmq ARGS``; stdout goes to NAME.out and stderr to NAME.log in the log folder."""
        stdout = (self.log_dir / f"{name}.out").open("wb")
        stderr = (self.log_dir / f"{name}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "fedmq", *args], cwd=REPO_ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr
        )
        stdout.close()
        stderr.close()
        self.processes.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def fedmq_processes(tmp_path: Path, broker_url: str) -> Iterator[FedmqProcesses]:
    processes = FedmqProcesses(tmp_path, broker_url)
    try:
        yield processes
    finally:
        processes.stop_all()


# Chromium


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of Debian's chromium, installed with apt-get first when it is missing and the tests run as root."""
    found = shutil.which("chromium")
    if found is not None:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.fail("chromium is not installed; install it with: apt-get install -y chromium (scripts/setup.sh does)", pytrace=False)

    apt = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]
    for arguments in (["update"], ["install", "-y", "chromium"]):
        command = [*apt, *arguments]
        print(f"chromium is missing; running: {' '.join(command)}", file=sys.stderr)
        try:
            completed = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=APT_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{' '.join(command)} timed out after {APT_TIMEOUT_S:.0f} s", pytrace=False)
        if completed.returncode != 0:
            output = (completed.stderr.strip() or completed.stdout.strip())[-3000:]
            pytest.fail(f"{' '.join(command)} failed with exit status {completed.returncode}:\n{output}", pytrace=False)

    found = shutil.which("chromium")
    if found is None:
        pytest.fail("apt-get installed chromium, but the chromium command is still not found", pytrace=False)
    return found


def chromium_command(chromium: str, profile_dir: Path, *args: str) -> list[str]:
    """A headless Chromium command line that reaches no network service of its own."""
    return [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile_dir}",
        *args,
    ]
