"""The ``fedmq`` command as a user runs it: help text, and exit status 2 with a clear error for invalid flags."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedmq.cli import build_parser

REPO_ROOT = Path(__file__).resolve().parent.parent
# Nothing listens on port 1, so a command that got as far as connecting would fail differently.
UNREACHABLE_BROKER_URL = "amqp://guest:guest@127.0.0.1:1/%2F"
COMMAND_TIMEOUT_S = 120


def _run_fedmq(*arguments: str) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("FEDMQ_")}
    env["FEDMQ_BROKER_URL"] = UNREACHABLE_BROKER_URL
    return subprocess.run(
        [sys.executable, "-m", "fedmq", *arguments],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )


def test_help_lists_commands() -> None:
    result = _run_fedmq("--help")

    assert result.returncode == 0, result.stderr
    for command in ("coordinator", "worker", "demo"):
        assert command in result.stdout
    assert "--log-level" in result.stdout


@pytest.mark.parametrize("command", ["coordinator", "worker", "demo"])
def test_command_help_exits_zero(command: str) -> None:
    result = _run_fedmq(command, "--help")

    assert result.returncode == 0, result.stderr
    assert f"usage: fedmq {command}" in result.stdout
    assert "--task" in result.stdout


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["worker", "--task", "digits", "--shard", "5/3"], ["--shard", "'5/3'"]),
        (["worker", "--task", "digits", "--shard", "two/3"], ["--shard", "'two/3'"]),
        (["coordinator", "--task", "digits", "--rounds", "3", "--codec", "nonsense"], ["'nonsense'", "float16", "q8"]),
        (["coordinator", "--task", "digits", "--rounds", "0"], ["--rounds", "'0'"]),
        (["coordinator", "--task", "digits", "--rounds", "many"], ["--rounds", "'many'"]),
        (["coordinator", "--task", "digits"], ["--rounds"]),
        (["worker", "--shard", "0/1"], ["--task"]),
    ],
    ids=["shard-index-too-large", "shard-not-a-number", "unknown-codec", "zero-rounds", "rounds-not-a-number", "rounds-missing", "task-missing"],
)
def test_invalid_flag_exits_2_with_message(arguments: list[str], expected: list[str]) -> None:
    result = _run_fedmq(*arguments)

    assert result.returncode == 2, result.stderr
    for text in expected:
        assert text in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_unknown_command_exits_2() -> None:
    result = _run_fedmq("train")

    assert result.returncode == 2
    assert "invalid choice: 'train'" in result.stderr


def test_missing_command_exits_2() -> None:
    result = _run_fedmq()

    assert result.returncode == 2
    assert "usage: fedmq" in result.stderr


def test_parser_declares_commands() -> None:
    parser = build_parser()

    namespace = parser.parse_args(["worker", "--task", "digits", "--worker-id", "worker-1"])

    assert namespace.command == "worker"
    assert namespace.task == "digits"
    assert namespace.worker_id == "worker-1"
    with pytest.raises(SystemExit) as caught:
        parser.parse_args(["coordinator", "--task", "digits", "--rounds", "-1"])
    assert caught.value.code == 2
