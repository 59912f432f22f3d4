"""Checks of docker-compose.yml, the Dockerfile and .dockerignore without a Docker engine.

Compose commands are parsed by fedmq's real command-line parser, so a flag that the
CLI does not accept fails here before anyone runs the stack.
"""

from __future__ import annotations

import argparse
import re
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedmq.cli import build_parser

REPO_ROOT = Path(__file__).resolve().parent.parent
RABBITMQ_IMAGE = re.compile(r"rabbitmq:(3\.13|4\.\d+)(\.\d+)?-management")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    with open(REPO_ROOT / "docker-compose.yml", encoding="utf-8") as file:
        document = yaml.safe_load(file)
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


def _parse_command(service: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> argparse.Namespace:
    command = service["command"]
    assert isinstance(command, list)
    assert all(isinstance(part, str) for part in command)
    assert command[0] == "fedmq"
    try:
        return build_parser().parse_args(command[1:])
    except SystemExit as error:
        pytest.fail(f"fedmq rejected {command[1:]} with exit status {error.code}: {capsys.readouterr().err}")


def _broker_url(service: dict[str, Any]) -> urllib.parse.SplitResult:
    environment = service["environment"]
    assert isinstance(environment, dict)
    return urllib.parse.urlsplit(environment["FEDMQ_BROKER_URL"])


# Broker


def test_compose_has_services(services: dict[str, Any]) -> None:
    assert {"rabbitmq", "coordinator", "worker"} <= set(services)


def test_rabbitmq_image_has_management(services: dict[str, Any]) -> None:
    image = services["rabbitmq"]["image"]
    assert RABBITMQ_IMAGE.fullmatch(image), image


def test_rabbitmq_ports_on_loopback_only(services: dict[str, Any]) -> None:
    ports = services["rabbitmq"]["ports"]
    published = {}
    for mapping in ports:
        assert isinstance(mapping, str)
        host_ip, host_port, container_port = mapping.split(":")
        assert host_ip == "127.0.0.1", mapping
        published[int(container_port)] = int(host_port)
    assert published == {5672: 5672, 15672: 15672}


def test_rabbitmq_healthcheck_uses_diagnostics(services: dict[str, Any]) -> None:
    healthcheck = services["rabbitmq"]["healthcheck"]
    test = healthcheck["test"]
    assert test[0] == "CMD"
    assert test[1] == "rabbitmq-diagnostics"
    assert "retries" in healthcheck
    assert "interval" in healthcheck


def test_rabbitmq_user_is_not_guest(services: dict[str, Any]) -> None:
    environment = services["rabbitmq"]["environment"]
    assert environment["RABBITMQ_DEFAULT_USER"] not in ("", "guest")
    assert environment["RABBITMQ_DEFAULT_PASS"]


# Coordinator and workers


@pytest.mark.parametrize("name", ["coordinator", "worker"])
def test_fedmq_service_waits_for_healthy_broker(services: dict[str, Any], name: str) -> None:
    service = services[name]
    assert service["build"] == "."
    assert service["depends_on"]["rabbitmq"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", ["coordinator", "worker"])
def test_fedmq_service_broker_url_matches_broker(services: dict[str, Any], name: str) -> None:
    url = _broker_url(services[name])
    broker_environment = services["rabbitmq"]["environment"]

    assert url.scheme == "amqp"
    assert url.hostname == "rabbitmq"
    assert url.port == 5672
    assert url.username == broker_environment["RABBITMQ_DEFAULT_USER"]
    assert url.password == broker_environment["RABBITMQ_DEFAULT_PASS"]
    assert url.path == "/%2F"


def test_coordinator_command_parses(services: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    args = _parse_command(services["coordinator"], capsys)
    assert services["coordinator"]["command"][1] == "coordinator"
    assert args.task == "digits"
    assert args.rounds == 30
    assert args.min_workers == 3


def test_worker_command_parses(services: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    args = _parse_command(services["worker"], capsys)
    assert services["worker"]["command"][1] == "worker"
    assert args.task == "digits"
    assert args.worker_id == "auto"
    assert args.shard == "auto"


def test_worker_is_scalable(services: dict[str, Any]) -> None:
    worker = services["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker
    assert "hostname" not in worker


def test_worker_replicas_match_min_workers(services: dict[str, Any]) -> None:
    command = services["coordinator"]["command"]
    min_workers = int(command[command.index("--min-workers") + 1])
    assert services["worker"]["deploy"]["replicas"] == min_workers


# Image


def test_dockerfile_installs_cpu_torch_first() -> None:
    lines = [line.strip() for line in (REPO_ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines()]
    assert "FROM python:3.11-slim" in lines

    torch_line = next(i for i, line in enumerate(lines) if "torch==2.13.0" in line)
    package_line = next(i for i, line in enumerate(lines) if line == "RUN pip install .")
    assert "--index-url https://download.pytorch.org/whl/cpu" in lines[torch_line]
    assert torch_line < package_line


def test_dockerfile_runs_as_non_root() -> None:
    lines = (REPO_ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines()
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users
    assert users[-1] not in ("root", "0")


def test_dockerignore_excludes_local_state() -> None:
    entries = set((REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").split())
    assert {".git", ".venv", "runs"} <= entries
