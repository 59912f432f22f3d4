"""Broker passwords come from the environment or files, and never show up in logs, errors or run files."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pika
import pytest

from fedmq.broker import BrokerSettings, connection_parameters
from fedmq.cli import main
from fedmq.errors import ConfigError
from fedmq.provision import ManagementClient, provision_worker
from fedmq.rabbitmq_node import RabbitMQNode
from fedmq.secrets import RedactingFilter, broker_password, check_command_line, read_secret_file, register_secret, split_credentials

REPO_ROOT = Path(__file__).resolve().parents[2]
PROCESS_TIMEOUT_S = 240.0


def _environment(**extra: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("FEDMQ_")}
    env.update(extra)
    return env


def _fedmq(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedmq", "--log-level", "DEBUG", *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S, check=False,
    )


def _secret_file(path: Path, secret: str) -> Path:
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return path


# Where passwords may come from


def test_password_in_url_flag_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    secret = "flag-secret-Zr81"

    code = main(["worker", "--task", "digits", "--broker-url", f"amqp://w1:{secret}@127.0.0.1:5672/fed"])

    captured = capsys.readouterr()
    assert code == 2
    assert "--broker-url must not contain a password" in captured.err
    assert "FEDMQ_BROKER_PASSWORD" in captured.err
    assert "--broker-password-file" in captured.err
    assert secret not in captured.err + captured.out


def test_password_in_url_from_environment_is_allowed() -> None:
    url = "amqp://w1:env-secret@127.0.0.1:5672/fed"

    check_command_line({"broker_url": "env FEDMQ_BROKER_URL"}, {"broker_url": url})
    with pytest.raises(ConfigError):
        check_command_line({"broker_url": "flag --broker-url"}, {"broker_url": url})


def test_password_file_wins_over_environment(tmp_path: Path) -> None:
    path = _secret_file(tmp_path / "password", "from-file")

    assert broker_password(path, {"FEDMQ_BROKER_PASSWORD": "from-env"}) == "from-file"
    assert broker_password(None, {"FEDMQ_BROKER_PASSWORD": "from-env"}) == "from-env"
    assert broker_password(None, {}) is None


def test_unreadable_password_file_error_names_file_only(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")

    with pytest.raises(ConfigError, match="is empty"):
        read_secret_file(empty, what="broker password")
    with pytest.raises(ConfigError, match="cannot read"):
        read_secret_file(tmp_path / "missing", what="broker password")


def test_split_credentials_decodes_user_and_password() -> None:
    assert split_credentials("amqps://us%40er:p%3Ass@host:5671/v%2Fh?heartbeat=5") == ("amqps://host:5671/v%2Fh?heartbeat=5", "us@er", "p:ss")
    assert split_credentials("amqp://w1@host/fed") == ("amqp://host/fed", "w1", None)
    assert split_credentials("amqp://host/fed") == ("amqp://host/fed", None, None)


def test_broker_settings_keep_password_apart() -> None:
    settings = BrokerSettings(url="amqp://w1@127.0.0.1:5672/fed", password="apart-secret-5")

    parameters = connection_parameters(settings)

    assert parameters.credentials.username == "w1"
    assert parameters.credentials.password == "apart-secret-5"
    assert parameters.virtual_host == "fed"
    assert parameters.ssl_options is None
    assert "apart-secret-5" not in repr(settings)
    assert "apart-secret-5" not in repr(parameters)


def test_redacting_filter_hides_registered_secrets() -> None:
    register_secret("filter-secret-77")
    record = logging.LogRecord("fedmq", logging.ERROR, __file__, 1, "login %s failed for %r", ("filter-secret-77", "x"), None)
    try:
        raise RuntimeError("the broker refused filter-secret-77")
    except RuntimeError:
        record.exc_info = sys.exc_info()

    assert RedactingFilter().filter(record)

    text = logging.Formatter().format(record)
    assert "filter-secret-77" not in text
    assert "login *** failed for 'x'" in text


# Real processes over a real broker


def test_failed_logins_never_show_the_password(make_rabbitmq: Callable[..., RabbitMQNode], tmp_path: Path) -> None:
    node = make_rabbitmq()
    secret = "wrong-secret-Qp4"
    base = ["worker", "--task", "digits", "--worker-id", "w1", "--no-declare", "--reconnect-timeout-s", "3", "--metrics-address", ""]
    attempts = {
        "password file": (
            [*base, "--broker-url", f"amqp://w1@127.0.0.1:{node.port}/%2F", "--broker-password-file", str(_secret_file(tmp_path / "pw", secret))],
            _environment(),
        ),
        "password variable": ([*base, "--broker-url", f"amqp://w1@127.0.0.1:{node.port}/%2F"], _environment(FEDMQ_BROKER_PASSWORD=secret)),
        "URL variable": (base, _environment(FEDMQ_BROKER_URL=f"amqp://w1:{secret}@127.0.0.1:{node.port}/%2F")),
    }
    for name, (args, env) in attempts.items():
        completed = _fedmq(*args, env=env)

        output = completed.stdout + completed.stderr
        assert completed.returncode == 4, f"{name}: {output[-2000:]}"
        assert "could not connect" in output, name
        assert secret not in output, f"{name} leaked the password:\n{output[-2000:]}"


@pytest.mark.slow
def test_run_never_shows_the_passwords(make_rabbitmq: Callable[..., RabbitMQNode], tmp_path: Path) -> None:
    node = make_rabbitmq(management=True)
    assert node.management_url is not None
    coordinator_secret = "coordinator-secret-Lm3"
    worker_secret = "worker-secret-Hv9"
    client = ManagementClient(node.management_url, user="guest", password="guest")
    client.put("/api/users/coord", {"password": coordinator_secret, "tags": ""})
    provision_worker(
        client, federation="quiet", worker_id="w1", password=worker_secret, coordinator_user="coord", broker_url=f"amqp://127.0.0.1:{node.port}/"
    )
    run_dir = tmp_path / "run"
    common = ["--task", "digits", "--federation", "quiet", "--metrics-address", ""]
    coordinator = subprocess.Popen(
        [
            sys.executable, "-m", "fedmq", "--log-level", "DEBUG", "coordinator", *common, "--rounds", "1", "--run-dir", str(run_dir),
            "--min-workers", "1", "--min-updates", "1", "--join-timeout-s", "120", "--round-deadline-s", "120", "--progress", "off",
            "--require-user-id", "--broker-url", f"amqp://coord@127.0.0.1:{node.port}/quiet",
        ],
        cwd=REPO_ROOT, env=_environment(FEDMQ_BROKER_PASSWORD=coordinator_secret), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        worker = _fedmq(
            "worker", *common, "--worker-id", "w1", "--shard", "0/1", "--no-declare", "--exit-after-rounds", "1",
            "--broker-url", f"amqp://w1@127.0.0.1:{node.port}/quiet", "--broker-password-file", str(_secret_file(tmp_path / "pw", worker_secret)),
            env=_environment(),
        )
        coordinator_output, _ = coordinator.communicate(timeout=PROCESS_TIMEOUT_S)
    finally:
        if coordinator.poll() is None:
            coordinator.kill()
            coordinator.wait()

    worker_output = worker.stdout + worker.stderr
    assert coordinator.returncode == 0, coordinator_output[-3000:]
    assert worker.returncode == 0, worker_output[-3000:]
    assert "round 1/1" in coordinator_output
    assert re.search(r"DEBUG", worker_output)
    run_files = "".join(path.read_text(errors="replace") for path in run_dir.rglob("*") if path.is_file() and path.suffix in (".json", ".jsonl"))
    assert run_files
    for secret in (coordinator_secret, worker_secret):
        assert secret not in coordinator_output
        assert secret not in worker_output
        assert secret not in run_files


def test_provision_cli_prints_generated_password_once(make_rabbitmq: Callable[..., RabbitMQNode]) -> None:
    node = make_rabbitmq(management=True)
    assert node.management_url is not None

    completed = _fedmq(
        "provision-worker", "--worker-id", "w7", "--federation", "cli-fed", "--management-url", node.management_url,
        "--broker-url", f"amqp://127.0.0.1:{node.port}/", "--task", "digits",
        env=_environment(FEDMQ_ADMIN_PASSWORD="guest"),
    )

    assert completed.returncode == 0, completed.stderr[-2000:]
    match = re.search(r"FEDMQ_BROKER_PASSWORD=(\S+)", completed.stdout)
    assert match is not None, completed.stdout
    password = match.group(1)
    assert len(password) >= 32
    assert completed.stdout.count(password) == 1
    assert password not in completed.stderr
    assert f"FEDMQ_BROKER_URL=amqp://w7@127.0.0.1:{node.port}/cli-fed" in completed.stdout
    assert "--no-declare" in completed.stdout

    # The printed settings work.
    parameters = pika.ConnectionParameters(
        host="127.0.0.1", port=node.port, virtual_host="cli-fed", credentials=pika.PlainCredentials("w7", password), connection_attempts=1
    )
    pika.BlockingConnection(parameters).close()


def test_provision_cli_needs_admin_password(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDMQ_ADMIN_PASSWORD", raising=False)

    code = main(["provision-worker", "--worker-id", "w1"])

    assert code == 2
    assert "FEDMQ_ADMIN_PASSWORD" in capsys.readouterr().err
