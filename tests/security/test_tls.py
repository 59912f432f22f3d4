"""AMQPS with certificate verification on both sides, against a node with a TLS listener on loopback."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coordinator.service import Coordinator, CoordinatorSettings
from fedmq.broker import BrokerClient, BrokerSettings, tls_context
from fedmq.errors import BrokerError
from fedmq.rabbitmq_node import NodeTls, RabbitMQNode
from fedmq.tasks import PartitionSpec, load_task
from tests.privacy.federation import run_federation
from tests.security.certificates import CertificateAuthority, Issued
from worker.service import Worker, WorkerSettings


@dataclass
class TlsBroker:
    node: RabbitMQNode
    ca: CertificateAuthority
    client: Issued
    rogue_ca: CertificateAuthority
    rogue_client: Issued

    @property
    def url(self) -> str:
        return f"amqps://guest:guest@127.0.0.1:{self.node.tls_port}/%2F"

    def settings(self, *, ca_file: Path | None, client: Issued | None, federation: str = "tls", reconnect_timeout_s: float = 2.0) -> BrokerSettings:
        return BrokerSettings(
            url=self.url, federation=federation, ca_file=ca_file, reconnect_timeout_s=reconnect_timeout_s,
            cert_file=client.cert_file if client else None, key_file=client.key_file if client else None,
        )


@pytest.fixture(scope="module")
def tls_broker(rabbitmq_server: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    directory = tmp_path_factory.mktemp("certificates")
    ca = CertificateAuthority(directory, "fedmq")
    server = ca.issue("broker", server=True, dns_names=("localhost",), ip_addresses=("127.0.0.1",))
    client = ca.issue("worker-1", server=False)
    rogue_ca = CertificateAuthority(directory, "rogue")
    rogue_client = rogue_ca.issue("intruder", server=False)
    node = RabbitMQNode(
        base_dir=tmp_path_factory.mktemp("rabbitmq-tls"), tls=NodeTls(ca_file=ca.cert_file, cert_file=server.cert_file, key_file=server.key_file)
    )
    node.start()
    try:
        yield TlsBroker(node, ca, client, rogue_ca, rogue_client)
    finally:
        node.close()


def _connect(settings: BrokerSettings) -> None:
    client = BrokerClient(settings, client_name="tls-probe", declare=False)
    try:
        client.connect()
        assert client.connected
    finally:
        client.close()


def test_verified_connection_succeeds(tls_broker: TlsBroker) -> None:
    _connect(tls_broker.settings(ca_file=tls_broker.ca.cert_file, client=tls_broker.client))


def test_untrusted_broker_certificate_is_rejected(tls_broker: TlsBroker) -> None:
    with pytest.raises(BrokerError, match="could not connect"):
        _connect(tls_broker.settings(ca_file=tls_broker.rogue_ca.cert_file, client=tls_broker.client))


def test_system_cas_reject_test_broker(tls_broker: TlsBroker) -> None:
    with pytest.raises(BrokerError, match="could not connect"):
        _connect(tls_broker.settings(ca_file=None, client=tls_broker.client))


def test_broker_rejects_client_without_certificate(tls_broker: TlsBroker) -> None:
    with pytest.raises(BrokerError, match="could not connect"):
        _connect(tls_broker.settings(ca_file=tls_broker.ca.cert_file, client=None))


def test_broker_rejects_certificate_of_other_ca(tls_broker: TlsBroker) -> None:
    with pytest.raises(BrokerError, match="could not connect"):
        _connect(tls_broker.settings(ca_file=tls_broker.ca.cert_file, client=tls_broker.rogue_client))


def test_client_checks_broker_host_name(tls_broker: TlsBroker) -> None:
    context = tls_context(tls_broker.settings(ca_file=tls_broker.ca.cert_file, client=tls_broker.client))
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert tls_broker.node.tls_port is not None

    with socket.create_connection(("127.0.0.1", tls_broker.node.tls_port), timeout=10) as raw:
        with pytest.raises(ssl.SSLCertVerificationError, match="match"):
            context.wrap_socket(raw, server_hostname="broker.example")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"url": "amqp://guest:guest@127.0.0.1:5672/%2F", "ca_file": Path("ca.pem")}, "amqps"),
        ({"url": "amqps://guest:guest@127.0.0.1:5671/%2F", "cert_file": Path("c.pem")}, "together"),
    ],
)
def test_tls_settings_are_validated(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BrokerSettings(**changes)  # type: ignore[arg-type]


@pytest.mark.slow
def test_round_over_tls(tls_broker: TlsBroker, tmp_path: Path) -> None:
    task = load_task("digits")
    verified = tls_broker.settings(ca_file=tls_broker.ca.cert_file, client=tls_broker.client, federation="tls-run", reconnect_timeout_s=20)
    settings = CoordinatorSettings(
        broker=verified, task="digits", rounds=1, run_dir=tmp_path / "run", min_workers=1, min_updates=1,
        round_deadline_s=60.0, join_timeout_s=60.0, codec="q8", local_epochs=1, eval_every=0,
    )
    worker = Worker(
        WorkerSettings(broker=verified, task="digits", worker_id="tls-worker", shard_index=0, shard_count=1, partition=PartitionSpec(scheme="iid")),
        task=task,
    )

    result = run_federation(Coordinator(settings, task=task), [worker])

    assert result.rounds_completed == 1
    assert result.history[0]["accepted"] == 1
