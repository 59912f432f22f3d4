"""Fixtures of the fault tests: a RabbitMQ node per test, a federation name and the processes."""

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
def services(tmp_path: Path, node: RabbitMQNode, federation: str) -> Iterator[Services]:
    """Starts coordinators and workers on ``node``; kills those still running when the test ends."""
    with Services(tmp_path / "logs", node.url, federation) as started:
        yield started
