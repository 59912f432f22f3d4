"""Fixtures that give tests private RabbitMQ nodes on 127.0.0.1.

Tests that need RabbitMQ run against a real node. When ``rabbitmq-server`` is missing,
the fixtures install it with apt-get if they can (as root, or through sudo without a
password) and fail otherwise: they never skip. Every node a fixture starts is closed
at the end, also when the test fails. Node data and logs stay under pytest's base
temporary directory for inspection after a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fedmq.errors import BrokerError
from fedmq.rabbitmq_node import INSTALL_HINT, SERVER_PATH_ENV, RabbitMQNode, rabbitmq_server_path

APT_TIMEOUT_S = 1200.0


@pytest.fixture(scope="session")
def rabbitmq_server() -> Path:
    """Path of the ``rabbitmq-server`` script, installed with apt-get first if it is missing."""
    path = rabbitmq_server_path()
    if path is not None:
        return path

    override = os.environ.get(SERVER_PATH_ENV)
    if override:
        pytest.fail(
            f"{SERVER_PATH_ENV}={override} is not an executable file; unset it or point it at rabbitmq-server",
            pytrace=False,
        )
    _install_rabbitmq_server()

    path = rabbitmq_server_path()
    if path is None:
        pytest.fail(f"apt-get installed rabbitmq-server, but it is still not found; run: {INSTALL_HINT}", pytrace=False)
    return path


@pytest.fixture(scope="session")
def rabbitmq(rabbitmq_server: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQNode]:
    """A node shared by the whole session, with RabbitMQ's default settings.

    Tests that share it use queue and exchange names of their own. Tests that stop the
    node or need other settings use ``make_rabbitmq``.
    """
    node = RabbitMQNode(base_dir=tmp_path_factory.mktemp("rabbitmq-session"))
    try:
        node.start()
        yield node
    finally:
        node.close()


@pytest.fixture(scope="session")
def broker_url(rabbitmq: RabbitMQNode) -> str:
    """AMQP URL of the session's shared node."""
    return rabbitmq.url


@pytest.fixture
def make_rabbitmq(
    rabbitmq_server: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., RabbitMQNode]]:
    """Factory of nodes owned by one test: ``make_rabbitmq(start=True, **RabbitMQNode kwargs)``.

    The node is started unless ``start=False``. The test may stop, kill and restart it.
    Every node the factory made is closed when the test ends.
    """
    nodes: list[RabbitMQNode] = []

    def make(*, start: bool = True, **kwargs: Any) -> RabbitMQNode:
        kwargs.setdefault("base_dir", tmp_path_factory.mktemp("rabbitmq"))
        node = RabbitMQNode(**kwargs)
        nodes.append(node)
        if start:
            node.start()
        return node

    yield make

    failures = []
    for node in reversed(nodes):
        try:
            node.close()
        except BrokerError as error:
            failures.append(f"{node.node_name}: {error}")
    if failures:
        pytest.fail("closing RabbitMQ nodes failed:\n" + "\n".join(failures), pytrace=False)


def _install_rabbitmq_server() -> None:
    if shutil.which("apt-get") is None:
        pytest.fail(
            "rabbitmq-server is not installed and apt-get is not available; install RabbitMQ "
            f"(on Debian or Ubuntu: {INSTALL_HINT}) and rerun the tests",
            pytrace=False,
        )

    if os.geteuid() == 0:
        prefix: list[str] = []
    elif _has_passwordless_sudo():
        prefix = ["sudo", "-n"]
    else:
        pytest.fail(
            f"rabbitmq-server is not installed and the tests cannot install it without root; run: {INSTALL_HINT}",
            pytrace=False,
        )

    apt = [*prefix, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]
    for arguments in (["update"], ["install", "-y", "rabbitmq-server"]):
        command = [*apt, *arguments]
        print(f"rabbitmq-server is missing; running: {' '.join(command)}", file=sys.stderr)
        try:
            completed = subprocess.run(
                command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=APT_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"{' '.join(command)} timed out after {APT_TIMEOUT_S:.0f} s; run: {INSTALL_HINT}", pytrace=False)
        if completed.returncode != 0:
            output = (completed.stderr.strip() or completed.stdout.strip())[-3000:]
            pytest.fail(
                f"{' '.join(command)} failed with exit status {completed.returncode}:\n{output}\n"
                f"Install RabbitMQ with: {INSTALL_HINT}",
                pytrace=False,
            )


def _has_passwordless_sudo() -> bool:
    if shutil.which("sudo") is None:
        return False
    try:
        completed = subprocess.run(
            ["sudo", "-n", "true"], stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False
        )
    except subprocess.TimeoutExpired:
        return False
    return completed.returncode == 0
