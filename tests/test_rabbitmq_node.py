"""Tests of the private RabbitMQ node against the real rabbitmq-server."""

from __future__ import annotations

import base64
import json
import os
import socket
import stat
import textwrap
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import pika
import pika.exceptions
import pytest

from fedmq.errors import BrokerError, ConfigError
from fedmq.rabbitmq_node import (
    INSTALL_HINT,
    SERVER_PATH_ENV,
    RabbitMQNode,
    RabbitMQNotInstalledError,
    rabbitmq_server_path,
)

MakeNode = Callable[..., RabbitMQNode]


# Helpers: sockets and processes read from /proc


def _process_stat(pid: int) -> tuple[str, int, int] | None:
    """Return (state, parent PID, process group id) of ``pid``, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2])


def _node_pids(group_id: int) -> set[int]:
    """Return the live processes of the node: its process group and all their descendants."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            found = _process_stat(int(entry.name))
            if found is not None and found[0] != "Z":
                table[int(entry.name)] = found
    pids = {pid for pid, (_, _, group) in table.items() if group == group_id}
    while True:
        children = {pid for pid, (_, parent, _) in table.items() if parent in pids} - pids
        if not children:
            return pids
        pids |= children


def _decode_address(hex_address: str) -> tuple[str, int]:
    host_hex, port_hex = hex_address.split(":")
    raw = bytes.fromhex(host_hex)
    # /proc/net/tcp* prints the address as 32-bit words in host (little-endian) order.
    host_bytes = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, host_bytes), int(port_hex, 16)


def _listening_addresses(pids: set[int]) -> set[tuple[str, int]]:
    """Return the (address, port) of every TCP socket in LISTEN state held by ``pids``."""
    inodes = set()
    for pid in pids:
        try:
            descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for descriptor in descriptors:
            try:
                target = os.readlink(descriptor)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])

    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text(encoding="ascii").splitlines()[1:]:
            fields = line.split()
            local_address, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:
                listening.add(_decode_address(local_address))
    return listening


# Helpers: AMQP


def _queue_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _publish_persistent(url: str, queue: str, body: bytes) -> None:
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.queue_declare(queue=queue, durable=True)
        channel.basic_publish(
            exchange="",
            routing_key=queue,
            body=body,
            properties=pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent),
            mandatory=True,
        )


def _get_one(url: str, queue: str) -> bytes | None:
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        channel = connection.channel()
        channel.queue_declare(queue=queue, passive=True)
        method, _, body = channel.basic_get(queue=queue, auto_ack=True)
        return None if method is None else body


def _write_fake_server(directory: Path, script: str) -> Path:
    path = directory / "rabbitmq-server"
    path.write_text("#!/bin/sh\n" + textwrap.dedent(script), encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


# Running node


def test_node_publish_and_consume(rabbitmq: RabbitMQNode) -> None:
    queue = _queue_name("roundtrip")
    with pika.BlockingConnection(pika.URLParameters(rabbitmq.url)) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.queue_declare(queue=queue, auto_delete=True)
        channel.basic_publish(exchange="", routing_key=queue, body=b"hello", mandatory=True)

        received = []
        for method, _, body in channel.consume(queue=queue, inactivity_timeout=10.0):
            if method is None:
                break
            channel.basic_ack(method.delivery_tag)
            received.append(body)
            break
        channel.cancel()

    assert received == [b"hello"]


def test_node_url_and_identity(rabbitmq: RabbitMQNode) -> None:
    assert rabbitmq.url == f"amqp://guest:guest@127.0.0.1:{rabbitmq.port}/%2F"
    assert rabbitmq.is_running
    assert rabbitmq.pid is not None
    assert rabbitmq.node_name.startswith(f"fedmq-{os.getpid()}-")
    assert rabbitmq.log_path.is_file()


def test_node_listens_on_loopback_only(rabbitmq: RabbitMQNode) -> None:
    assert rabbitmq.pid is not None
    listening = _listening_addresses(_node_pids(rabbitmq.pid))

    assert ("127.0.0.1", rabbitmq.port) in listening
    assert ("127.0.0.1", rabbitmq.dist_port) in listening
    assert {host for host, _ in listening} == {"127.0.0.1"}


def test_management_listens_on_loopback_only(make_rabbitmq: MakeNode) -> None:
    node = make_rabbitmq(management=True)
    assert node.pid is not None
    assert node.management_port is not None
    listening = _listening_addresses(_node_pids(node.pid))

    assert ("127.0.0.1", node.management_port) in listening
    assert {host for host, _ in listening} == {"127.0.0.1"}

    request = urllib.request.Request(f"{node.management_url}api/overview")
    request.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode("ascii"))
    with urllib.request.urlopen(request, timeout=10) as response:
        overview = json.load(response)
    assert overview["node"] == node.node_name


def test_ctl_lists_declared_queue(rabbitmq: RabbitMQNode) -> None:
    queue = _queue_name("ctl")
    with pika.BlockingConnection(pika.URLParameters(rabbitmq.url)) as connection:
        channel = connection.channel()
        channel.queue_declare(queue=queue)
        channel.basic_publish(exchange="", routing_key=queue, body=b"x")
        channel.basic_publish(exchange="", routing_key=queue, body=b"y")
        connection.process_data_events(time_limit=0.5)

        output = rabbitmq.ctl("list_queues", "name", "messages", "--no-table-headers", "--quiet")
        channel.queue_delete(queue=queue)

    rows = dict(line.split() for line in output.splitlines() if line.strip())
    assert rows[queue] == "2"


def test_ctl_failure_raises_broker_error(rabbitmq: RabbitMQNode) -> None:
    with pytest.raises(BrokerError, match="rabbitmqctl no_such_command .* failed with exit status"):
        rabbitmq.ctl("no_such_command")


def test_settings_reach_node(make_rabbitmq: MakeNode) -> None:
    node = make_rabbitmq(consumer_timeout_ms=5000, max_message_size=4096, heartbeat_s=7)

    assert node.ctl("eval", "application:get_env(rabbit, consumer_timeout).").strip() == "{ok,5000}"
    assert node.ctl("eval", "application:get_env(rabbit, max_message_size).").strip() == "{ok,4096}"
    assert node.ctl("eval", "application:get_env(rabbit, heartbeat).").strip() == "{ok,7}"

    queue = _queue_name("size")
    with pika.BlockingConnection(pika.URLParameters(node.url)) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.queue_declare(queue=queue)
        channel.basic_publish(exchange="", routing_key=queue, body=b"s" * 4000)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as raised:
            channel.basic_publish(exchange="", routing_key=queue, body=b"L" * 8192)
    assert raised.value.reply_code == 406


# Stop, kill and restart


def test_stop_start_keeps_persistent_message(make_rabbitmq: MakeNode) -> None:
    node = make_rabbitmq()
    queue = _queue_name("durable")
    url_before = node.url
    _publish_persistent(node.url, queue, b"survives a restart")

    node.stop()
    assert not node.is_running
    assert node.pid is None
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(pika.URLParameters(node.url + "?connection_attempts=1&socket_timeout=2"))

    node.start()
    assert node.url == url_before
    assert _get_one(node.url, queue) == b"survives a restart"


def test_kill_leaves_no_process(make_rabbitmq: MakeNode) -> None:
    node = make_rabbitmq()
    group_id = node.pid
    assert group_id is not None
    assert len(_node_pids(group_id)) >= 2

    node.kill()

    assert node.pid is None
    assert _node_pids(group_id) == set()


def test_kill_then_start_recovers_confirmed_message(make_rabbitmq: MakeNode) -> None:
    node = make_rabbitmq()
    queue = _queue_name("crash")
    # A confirmed persistent message in a durable queue is on disk (RabbitMQ's
    # publisher confirms contract), so it must survive SIGKILL.
    _publish_persistent(node.url, queue, b"survives a crash")

    node.kill()
    node.start()

    assert node.is_running
    assert _get_one(node.url, queue) == b"survives a crash"


def test_start_twice_raises(rabbitmq: RabbitMQNode) -> None:
    pid = rabbitmq.pid
    with pytest.raises(BrokerError, match="already running"):
        rabbitmq.start()
    assert rabbitmq.pid == pid


def test_two_nodes_side_by_side(make_rabbitmq: MakeNode) -> None:
    first = make_rabbitmq()
    queue = _queue_name("only-first")
    _publish_persistent(first.url, queue, b"first")

    with RabbitMQNode() as second:
        assert second.port != first.port
        assert second.dist_port != first.dist_port
        assert second.node_name != first.node_name
        assert second.is_running

        with pika.BlockingConnection(pika.URLParameters(second.url)) as connection:
            channel = connection.channel()
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as raised:
                channel.queue_declare(queue=queue, passive=True)
        assert raised.value.reply_code == 404
        assert _get_one(first.url, queue) == b"first"

    assert not second.is_running
    assert not second.base_dir.exists()
    assert first.is_running


# Failures to start


def test_missing_server_raises_install_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "rabbitmq-server"
    monkeypatch.setenv(SERVER_PATH_ENV, str(missing))
    node = RabbitMQNode(base_dir=tmp_path / "node")

    assert rabbitmq_server_path() is None
    with pytest.raises(RabbitMQNotInstalledError) as raised:
        node.start()
    assert isinstance(raised.value, BrokerError)
    assert INSTALL_HINT in str(raised.value)
    assert str(missing) in str(raised.value)
    assert not node.is_running


def test_exit_during_start_reports_log_tail(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = _write_fake_server(tmp_path, "echo 'simulated boot failure: eaddrinuse'\nexit 3\n")
    monkeypatch.setenv(SERVER_PATH_ENV, str(fake))
    node = RabbitMQNode(base_dir=tmp_path / "node")

    with pytest.raises(BrokerError) as raised:
        node.start(timeout_s=30.0)
    assert "exited with status 3" in str(raised.value)
    assert "simulated boot failure: eaddrinuse" in str(raised.value)
    assert not node.is_running


def test_start_timeout_kills_process_group(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    child_pid_file = tmp_path / "child.pid"
    fake = _write_fake_server(
        tmp_path,
        f"""\
        sleep 300 &
        echo $! > {child_pid_file}
        echo 'booting slowly'
        exec sleep 300
        """,
    )
    monkeypatch.setenv(SERVER_PATH_ENV, str(fake))
    node = RabbitMQNode(base_dir=tmp_path / "node")

    with pytest.raises(BrokerError) as raised:
        node.start(timeout_s=1.5)
    assert "did not accept an AMQP login" in str(raised.value)
    assert "booting slowly" in str(raised.value)
    assert not node.is_running

    child = _process_stat(int(child_pid_file.read_text(encoding="ascii")))
    assert child is None or child[0] == "Z"


def test_port_in_use_raises(rabbitmq_server: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        node = RabbitMQNode(port=port)
        try:
            with pytest.raises(BrokerError, match=f"AMQP port 127.0.0.1:{port} .* is already in use"):
                node.start()
            assert not node.is_running
        finally:
            node.close()


# Settings and lifecycle without a running node


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"port": 0}, "port must be an int from 1 to 65535"),
        ({"port": 70000}, "port must be an int from 1 to 65535"),
        ({"port": True}, "port must be an int from 1 to 65535"),
        ({"consumer_timeout_ms": 0}, "consumer_timeout_ms must be an int of at least 1"),
        ({"max_message_size": 0}, "max_message_size must be an int of at least 1"),
        ({"max_message_size": 536_870_913}, "at most 536870912"),
        ({"heartbeat_s": -1}, "heartbeat_s must be an int of at least 0"),
        ({"management_port": 15672}, "management_port must be None unless management=True"),
        ({"node_name": "bad name"}, "node_name must look like 'name@host'"),
    ],
)
def test_invalid_settings_raise_config_error(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RabbitMQNode(**kwargs)  # type: ignore[arg-type]


def test_close_removes_only_owned_base_dir(tmp_path: Path) -> None:
    owned = RabbitMQNode()
    owned_dir = owned.base_dir
    assert owned_dir.is_dir()
    owned.close()
    assert not owned_dir.exists()

    given_dir = tmp_path / "given"
    given = RabbitMQNode(base_dir=given_dir)
    given.close()
    given.close()
    assert given.base_dir == given_dir.resolve()
    with pytest.raises(BrokerError, match="was closed"):
        given.start()


def test_node_name_gets_localhost_host() -> None:
    node = RabbitMQNode(node_name="fedmq-named")
    try:
        assert node.node_name == "fedmq-named@localhost"
    finally:
        node.close()


@pytest.mark.parametrize("role", ["port", "dist_port"])
def test_taken_picked_port_is_picked_again(rabbitmq_server: Path, monkeypatch: pytest.MonkeyPatch, role: str) -> None:
    node = RabbitMQNode()
    checks = 0
    original_check = node._check_ports_free

    def check_after_first_start(self: RabbitMQNode) -> None:
        # The first start skips the check, as when another process binds the port
        # after the check and before the node does.
        nonlocal checks
        checks += 1
        if checks > 1:
            original_check()

    monkeypatch.setattr(node, "_check_ports_free", check_after_first_start.__get__(node))
    taken = getattr(node, role)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        # A listener that accepts TCP and never speaks AMQP, as a foreign server would.
        listener.bind(("127.0.0.1", taken))
        listener.listen()
        try:
            node.start()
            assert node.is_running
            assert checks == 2
            assert getattr(node, role) != taken
            _publish_persistent(node.url, "after-repick", b"payload")
            assert _get_one(node.url, "after-repick") == b"payload"
        finally:
            node.close()
