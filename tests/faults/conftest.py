"""Fixtures of the fault tests: RabbitMQ nodes, a federation name and the processes.

Tests that only kill or stop fedmq processes share the session's node, each in its
own federation. Tests that stop, reconfigure or disconnect the broker get a node of
their own.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedmq.rabbitmq_node import RabbitMQNode
from tests.faults.helpers import Services


@pytest.fixture
def node(make_rabbitmq: Callable[..., RabbitMQNode]) -> RabbitMQNode:
    """A started RabbitMQ node that only this test uses, so the test may stop or kill it."""
    return make_rabbitmq()


@pytest.fixture
def federation(request: pytest.FixtureRequest) -> str:
    short = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:30].strip("-")
    return f"faults-{short}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def services(tmp_path: Path, rabbitmq: RabbitMQNode, federation: str) -> Iterator[Services]:
    """Starts coordinators and workers on the session's node; kills those still running when the test ends."""
    with Services(tmp_path / "logs", rabbitmq.url, federation) as started:
        yield started


@pytest.fixture
def own_services(tmp_path: Path, node: RabbitMQNode, federation: str) -> Iterator[Services]:
    """Like ``services``, on the test's own node from the ``node`` fixture."""
    with Services(tmp_path / "logs", node.url, federation) as started:
        yield started
