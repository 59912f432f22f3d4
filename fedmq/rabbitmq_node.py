"""A private RabbitMQ node on loopback, started and stopped by PID.

The demo and the tests use this node instead of a system broker. It runs the
``rabbitmq-server`` script of the local RabbitMQ installation as the current user, with
its data, logs, configuration and Erlang cookie under one base directory, so it never
touches the system service or another node. Its AMQP, Erlang distribution and
management listeners bind 127.0.0.1 only. ``rabbitmqctl`` runs with the same
environment, so it finds the node through the same cookie.

The process runs in a new session, so the node's PID is also the id of its process
group, and :meth:`RabbitMQNode.stop` and :meth:`RabbitMQNode.kill` signal that group
only. epmd, which the first node on a machine starts, detaches into its own session
and is shared by every Erlang node of the machine, so it is left running.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import string
import subprocess
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pika
import pika.exceptions
from pika.adapters.utils.connection_workflow import AMQPConnectorException

from fedmq.errors import BrokerError, ConfigError

logger = logging.getLogger(__name__)

INSTALL_HINT = "sudo apt-get update && sudo apt-get install -y rabbitmq-server"
"""Command that installs RabbitMQ on Debian and Ubuntu."""

SERVER_PATH_ENV = "FEDMQ_RABBITMQ_SERVER"
"""Environment variable that overrides where the ``rabbitmq-server`` script is looked up."""

DEBIAN_SERVER_PATH = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
"""The server script of Debian's and Ubuntu's package.

``/usr/sbin/rabbitmq-server`` in those packages is a wrapper that switches to the
``rabbitmq`` user, which cannot write to a base directory owned by the caller.
"""

LOOPBACK = "127.0.0.1"
MAX_MESSAGE_SIZE_LIMIT = 536_870_912
"""Largest ``max_message_size`` that RabbitMQ accepts (512 MiB, rabbit.schema of 3.10)."""

_LOOPBACK_ERL_ARGS = "-kernel inet_dist_use_interface {127,0,0,1}"
_NODE_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]+@[A-Za-z0-9.-]+")
_READY_POLL_INTERVAL_S = 0.2
_PORT_RELEASE_WAIT_S = 5.0
# Number of first starts, each with freshly picked ports, before a port conflict is raised.
_PORT_ATTEMPTS = 3
_PORT_IN_USE_PATTERN = re.compile(r"eaddrinuse|already_used", re.IGNORECASE)
_LOG_TAIL_LINES = 40
_node_counter = itertools.count(1)


@dataclass(frozen=True)
class NodeTls:
    """PEM files of a node's TLS listener: the CA that client certificates must chain to, and the server's certificate and key.

    With ``require_client_cert`` the node refuses a TLS client that presents no
    certificate signed by that CA.
    """

    ca_file: Path
    cert_file: Path
    key_file: Path
    require_client_cert: bool = True


class RabbitMQNotInstalledError(BrokerError):
    """The ``rabbitmq-server`` script was not found, so no node can start."""


class _PortInUseError(BrokerError):
    """A port of the node was taken by another process when the node started.

    ``picked`` is False when the port is one the caller chose, so picking new ports cannot help.
    """

    def __init__(self, message: str, *, picked: bool = True) -> None:
        super().__init__(message)
        self.picked = picked


def rabbitmq_server_path() -> Path | None:
    """Find the ``rabbitmq-server`` script that a private node can run as the current user.

    ``$FEDMQ_RABBITMQ_SERVER`` wins when it is set, and is returned only if it names an
    executable file. Otherwise the Debian package's script is tried, then a
    ``rabbitmq-server`` on ``PATH`` that sits next to ``rabbitmq-env``, which is how the
    real script (not Debian's user-switching wrapper) finds its settings. Returns None
    when none is found.
    """
    override = os.environ.get(SERVER_PATH_ENV)
    if override:
        path = Path(override)
        return path if _is_executable_file(path) else None

    if _is_executable_file(DEBIAN_SERVER_PATH):
        return DEBIAN_SERVER_PATH

    found = shutil.which("rabbitmq-server")
    if found is not None and (Path(found).parent / "rabbitmq-env").exists():
        return Path(found)
    return None


class RabbitMQNode:
    """A RabbitMQ node on 127.0.0.1 that this object starts, stops and kills by PID.

    Ports that are not given are picked once, free at construction time, and kept for the
    life of the object, so :meth:`stop` then :meth:`start` (or :meth:`kill` then
    :meth:`start`) brings the node back on the same URL with the same data: durable
    queues and their persistent messages survive. :meth:`close` stops the node and
    removes the base directory if this object created it.

    ``consumer_timeout_ms``, ``max_message_size`` (bytes) and ``heartbeat_s`` go into the
    node's ``rabbitmq.conf``; None keeps RabbitMQ's default. ``management=True`` enables
    the management plugin, whose HTTP API listens on ``management_port``.

    ``advanced_config`` is the text of the node's ``advanced.config``, Erlang terms
    ending in a period, for settings that ``rabbitmq.conf`` does not accept. For
    example ``"[{rabbit, [{channel_tick_interval, 500}]}]."`` makes RabbitMQ 3.10 check
    ``consumer_timeout`` every 500 ms instead of every 60 s.

    ``tls`` adds an AMQPS listener on 127.0.0.1:``tls_port`` next to the plain one,
    which the readiness check keeps using.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        base_dir: Path | None = None,
        node_name: str | None = None,
        consumer_timeout_ms: int | None = None,
        max_message_size: int | None = None,
        heartbeat_s: int | None = None,
        management: bool = False,
        management_port: int | None = None,
        advanced_config: str | None = None,
        tls: NodeTls | None = None,
        tls_port: int | None = None,
    ) -> None:
        _check_port("port", port)
        _check_port("tls_port", tls_port)
        if tls_port is not None and tls is None:
            raise ConfigError(f"tls_port must be None unless tls is set, but got {tls_port} without tls")
        self._tls = tls
        _check_port("management_port", management_port)
        _check_optional_int("consumer_timeout_ms", consumer_timeout_ms, minimum=1)
        _check_optional_int("max_message_size", max_message_size, minimum=1, maximum=MAX_MESSAGE_SIZE_LIMIT)
        _check_optional_int("heartbeat_s", heartbeat_s, minimum=0)
        if management_port is not None and not management:
            raise ConfigError(
                f"management_port must be None unless management=True, but got {management_port} with management=False"
            )
        self._node_name = _resolve_node_name(node_name)

        self._consumer_timeout_ms = consumer_timeout_ms
        self._max_message_size = max_message_size
        self._heartbeat_s = heartbeat_s
        self._management = management
        if advanced_config is not None and (not isinstance(advanced_config, str) or not advanced_config.strip().endswith(".")):
            raise ConfigError(
                f"advanced_config must be Erlang terms ending in a period, or None, but got {advanced_config!r}"
            )
        self._advanced_config = advanced_config

        # Ports given by the caller stay fixed. The others are picked now, and picked
        # again when the first start finds one of them taken.
        self._requested_ports = {"port": port, "management_port": management_port, "tls_port": tls_port}
        self._port = 0
        self._dist_port = 0
        self._management_port: int | None = None
        self._tls_port: int | None = None
        self._pick_ports()
        self._has_started = False

        self._owns_base_dir = base_dir is None
        if base_dir is None:
            self._base_dir = Path(tempfile.mkdtemp(prefix="fedmq-rabbitmq-"))
        else:
            self._base_dir = Path(base_dir).resolve()
        self._process: subprocess.Popen[bytes] | None = None
        self._closed = False

        # Kills a running node and removes an owned base directory if the object is
        # garbage-collected or the interpreter exits without close().
        self._state = _ProcessState()
        self._finalizer = weakref.finalize(
            self, _release, self._state, self._base_dir if self._owns_base_dir else None
        )

    def __repr__(self) -> str:
        return (
            f"RabbitMQNode(node_name={self._node_name!r}, port={self._port}, "
            f"base_dir={str(self._base_dir)!r}, running={self.is_running})"
        )

    def __enter__(self) -> RabbitMQNode:
        if not self.is_running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # Properties

    @property
    def url(self) -> str:
        """AMQP URL of the node, as the default ``guest`` user on the default vhost."""
        return f"amqp://guest:guest@{LOOPBACK}:{self._port}/%2F"

    @property
    def port(self) -> int:
        """TCP port of the AMQP listener on 127.0.0.1."""
        return self._port

    @property
    def dist_port(self) -> int:
        """TCP port of the Erlang distribution listener on 127.0.0.1."""
        return self._dist_port

    @property
    def management_port(self) -> int | None:
        """TCP port of the management HTTP API on 127.0.0.1, or None without management."""
        return self._management_port

    @property
    def management_url(self) -> str | None:
        """Base URL of the management HTTP API, or None without management."""
        if self._management_port is None:
            return None
        return f"http://{LOOPBACK}:{self._management_port}/"

    @property
    def tls_port(self) -> int | None:
        """TCP port of the AMQPS listener on 127.0.0.1, or None without TLS."""
        return self._tls_port

    @property
    def node_name(self) -> str:
        """Erlang node name, such as ``fedmq-1234-1@localhost``."""
        return self._node_name

    @property
    def base_dir(self) -> Path:
        """Directory that contains the node's data, logs, configuration and cookie."""
        return self._base_dir

    @property
    def log_path(self) -> Path:
        """The node's main log file."""
        return self._base_dir / "log" / f"{self._node_name}.log"

    @property
    def pid(self) -> int | None:
        """PID of the running node's ``rabbitmq-server`` script, or None when stopped.

        The script is the leader of the node's process group, so its PID is also the
        group id, and the Erlang VM is its child. The script forwards SIGTERM to the VM
        and exits when the VM does.
        """
        if self._process is None or self._has_exited():
            return None
        return self._process.pid

    @property
    def is_running(self) -> bool:
        """Whether the node's process was started and has not exited."""
        return self.pid is not None

    # Lifecycle

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the node and wait until it accepts an AMQP login as ``guest``.

        Raises RabbitMQNotInstalledError with the install command when no
        ``rabbitmq-server`` is found, and BrokerError when a port is taken, or when the
        node exits or does not accept a login within ``timeout_s`` seconds. In the
        last two cases the node is killed and the message ends with the tail of its logs.
        """
        if timeout_s <= 0:
            raise ConfigError(f"timeout_s must be positive, but got {timeout_s}")
        if self._closed:
            raise BrokerError(f"RabbitMQ node {self._node_name} was closed and cannot start again; create a new node")
        if self.is_running:
            raise BrokerError(
                f"RabbitMQ node {self._node_name} is already running with pid {self.pid}; call stop() before start()"
            )
        self._reap()

        server = self._require_server_path()
        # Another process can take a picked port between the pick and the node's bind.
        # Only the first start picks again: a restarted node keeps the ports its clients know.
        attempts = 1 if self._has_started else _PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            try:
                self._start_process(server, timeout_s)
            except _PortInUseError as error:
                if attempt == attempts or not error.picked:
                    raise
                logger.warning("RabbitMQ node %s: %s; picking new ports [%d/%d]", self._node_name, error, attempt, attempts)
                self._pick_ports()
                continue
            self._has_started = True
            return

    def _start_process(self, server: Path, timeout_s: float) -> None:
        self._check_ports_free()
        self._write_node_files()

        started = time.monotonic()
        logger.debug("Starting RabbitMQ node %s on %s:%d from %s", self._node_name, LOOPBACK, self._port, server)
        try:
            with open(self._console_log_path, "ab") as console_log:
                self._process = subprocess.Popen(
                    [str(server)],
                    env=self._environment(),
                    cwd=self._base_dir,
                    stdin=subprocess.DEVNULL,
                    stdout=console_log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        except OSError as error:
            raise BrokerError(f"could not run {server} for RabbitMQ node {self._node_name}: {error}") from error
        self._state.process = self._process

        try:
            self._wait_until_ready(started + timeout_s, timeout_s)
        except BaseException:
            self._kill_process_group()
            raise
        logger.info(
            "RabbitMQ node %s (pid %d) accepts AMQP on %s:%d after %.1f s",
            self._node_name,
            self._process.pid,
            LOOPBACK,
            self._port,
            time.monotonic() - started,
        )

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the node: SIGTERM to its PID, then SIGKILL to its process group after ``timeout_s`` seconds.

        RabbitMQ shuts down cleanly on SIGTERM. The base directory is kept, so
        :meth:`start` brings the node back with the same data. Does nothing when the
        node is not running.
        """
        if timeout_s <= 0:
            raise ConfigError(f"timeout_s must be positive, but got {timeout_s}")
        process = self._process
        if process is None:
            return

        if not self._has_exited():
            logger.debug("Stopping RabbitMQ node %s (pid %d) with SIGTERM", self._node_name, process.pid)
            try:
                os.kill(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            if not self._wait_for_exit(time.monotonic() + timeout_s):
                logger.warning(
                    "RabbitMQ node %s (pid %d) did not stop within %.1f s of SIGTERM; sending SIGKILL to its process group",
                    self._node_name,
                    process.pid,
                    timeout_s,
                )

        # Child processes of the node (erl_child_setup, port programs) can outlive it
        # briefly. The exited leader is not reaped yet, so its group id is still ours.
        self._kill_process_group()
        logger.info("RabbitMQ node %s stopped", self._node_name)

    def kill(self) -> None:
        """Kill the node's process group with SIGKILL, as a crash would; the base directory is kept."""
        process = self._process
        if process is None:
            return
        logger.info("Killing RabbitMQ node %s (pid %d) with SIGKILL", self._node_name, process.pid)
        self._kill_process_group()

    def close(self) -> None:
        """Stop the node and remove the base directory if this object created it.

        The node cannot start again afterwards. Calling close() twice does nothing.
        """
        if self._closed:
            return
        self.stop()
        self._closed = True
        self._finalizer()

    def ctl(self, *args: str, timeout_s: float = 30.0) -> str:
        """Run ``rabbitmqctl`` with ``args`` against this node and return its standard output.

        Raises BrokerError with rabbitmqctl's error output when it exits with a
        non-zero status or runs longer than ``timeout_s`` seconds.
        """
        if timeout_s <= 0:
            raise ConfigError(f"timeout_s must be positive, but got {timeout_s}")
        ctl_path = self._require_server_path().parent / "rabbitmqctl"
        command = [str(ctl_path), "-n", self._node_name, *args]
        command_text = " ".join(["rabbitmqctl", *args])

        try:
            completed = subprocess.run(
                command,
                env=self._environment(),
                cwd=self._base_dir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as error:
            raise BrokerError(
                f"{command_text} against node {self._node_name} timed out after {timeout_s:.1f} s and was killed"
            ) from error
        except OSError as error:
            raise BrokerError(f"{command_text} could not run from {ctl_path}: {error}") from error

        if completed.returncode != 0:
            output = completed.stderr.strip() or completed.stdout.strip()
            raise BrokerError(
                f"{command_text} against node {self._node_name} failed with exit status {completed.returncode}: {output}"
            )
        return completed.stdout

    # Start-up helpers

    @property
    def _console_log_path(self) -> Path:
        return self._base_dir / "log" / "console.log"

    def _require_server_path(self) -> Path:
        server = rabbitmq_server_path()
        if server is not None:
            return server

        override = os.environ.get(SERVER_PATH_ENV)
        if override:
            looked_at = f"{SERVER_PATH_ENV}={override}, which is not an executable file"
        else:
            looked_at = f"{DEBIAN_SERVER_PATH} and rabbitmq-server on PATH"
        raise RabbitMQNotInstalledError(
            f"rabbitmq-server was not found (looked at {looked_at}), so RabbitMQ node "
            f"{self._node_name} cannot start; install it with: {INSTALL_HINT}"
        )

    def _pick_ports(self) -> None:
        """Pick a free port for every port the caller left unset, holding each bound until all differ."""
        requested = self._requested_ports
        reserved: list[socket.socket] = []
        try:
            self._port = requested["port"] if requested["port"] is not None else _bind_free_port(reserved)
            self._dist_port = _bind_free_port(reserved)
            if self._management:
                picked = requested["management_port"]
                self._management_port = picked if picked is not None else _bind_free_port(reserved)
            if self._tls is not None:
                picked = requested["tls_port"]
                self._tls_port = picked if picked is not None else _bind_free_port(reserved)
        finally:
            for sock in reserved:
                sock.close()

    def _check_ports_free(self) -> None:
        requested = self._requested_ports
        ports = {"AMQP": (self._port, requested["port"] is None), "Erlang distribution": (self._dist_port, True)}
        if self._management_port is not None:
            ports["management"] = (self._management_port, requested["management_port"] is None)
        if self._tls_port is not None:
            ports["AMQPS"] = (self._tls_port, requested["tls_port"] is None)
        # A killed node's listening sockets can outlive its processes for a moment. Before
        # the first start no node of ours has held a picked port, so that one is picked again at once.
        deadline = time.monotonic() + _PORT_RELEASE_WAIT_S
        for role, (port, picked) in ports.items():
            while not _port_is_free(port):
                if time.monotonic() >= deadline or (picked and not self._has_started):
                    raise _PortInUseError(
                        f"{role} port {LOOPBACK}:{port} of RabbitMQ node {self._node_name} is already in use, "
                        "so the node was not started; stop whatever listens there or choose another port",
                        picked=picked,
                    )
                time.sleep(0.1)

    def _write_node_files(self) -> None:
        try:
            for directory in (self._base_dir, self._base_dir / "mnesia", self._base_dir / "log"):
                directory.mkdir(parents=True, exist_ok=True)
            (self._base_dir / "rabbitmq.conf").write_text(self._config_text(), encoding="utf-8")
            advanced_path = self._base_dir / "advanced.config"
            if self._advanced_config is None:
                advanced_path.unlink(missing_ok=True)
            else:
                advanced_path.write_text(self._advanced_config.strip() + "\n", encoding="utf-8")
            plugins = "[rabbitmq_management].\n" if self._management else "[].\n"
            (self._base_dir / "enabled_plugins").write_text(plugins, encoding="utf-8")
            _write_cookie(self._base_dir / ".erlang.cookie")
        except OSError as error:
            raise BrokerError(
                f"could not prepare the base directory {self._base_dir} of RabbitMQ node {self._node_name}: {error}"
            ) from error

    def _config_text(self) -> str:
        lines = [
            f"# Written by fedmq.rabbitmq_node for node {self._node_name} on every start.",
            f"listeners.tcp.1 = {LOOPBACK}:{self._port}",
        ]
        if self._consumer_timeout_ms is not None:
            lines.append(f"consumer_timeout = {self._consumer_timeout_ms}")
        if self._max_message_size is not None:
            lines.append(f"max_message_size = {self._max_message_size}")
        if self._heartbeat_s is not None:
            lines.append(f"heartbeat = {self._heartbeat_s}")
        if self._management_port is not None:
            lines.append(f"management.tcp.ip = {LOOPBACK}")
            lines.append(f"management.tcp.port = {self._management_port}")
        if self._tls is not None:
            lines += [
                f"listeners.ssl.1 = {LOOPBACK}:{self._tls_port}",
                f"ssl_options.cacertfile = {Path(self._tls.ca_file).resolve()}",
                f"ssl_options.certfile = {Path(self._tls.cert_file).resolve()}",
                f"ssl_options.keyfile = {Path(self._tls.key_file).resolve()}",
                "ssl_options.verify = verify_peer",
                f"ssl_options.fail_if_no_peer_cert = {'true' if self._tls.require_client_cert else 'false'}",
            ]
        return "\n".join(lines) + "\n"

    def _environment(self) -> dict[str, str]:
        # RABBITMQ_* and ERL_* settings of the caller would leak into this node. The
        # env and advanced config files point into the base directory, where the env file
        # never exists and the advanced one only with advanced_config, so /etc/rabbitmq is
        # not read either.
        env = {name: value for name, value in os.environ.items() if not name.startswith(("RABBITMQ_", "ERL_"))}
        base = self._base_dir
        env.update(
            {
                "HOME": str(base),
                "LANG": "C.UTF-8",
                "LC_ALL": "C.UTF-8",
                "RABBITMQ_NODENAME": self._node_name,
                "RABBITMQ_NODE_IP_ADDRESS": LOOPBACK,
                "RABBITMQ_NODE_PORT": str(self._port),
                "RABBITMQ_DIST_PORT": str(self._dist_port),
                "ERL_EPMD_ADDRESS": LOOPBACK,
                "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
                "RABBITMQ_LOG_BASE": str(base / "log"),
                "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
                "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": _LOOPBACK_ERL_ARGS,
                "RABBITMQ_CTL_ERL_ARGS": _LOOPBACK_ERL_ARGS,
            }
        )
        return env

    def _wait_until_ready(self, deadline: float, timeout_s: float) -> None:
        while True:
            if self._has_exited():
                status = self._exit_status()
                tail = self._log_tail()
                # RabbitMQ 3.10 logs eaddrinuse for a taken listener port and
                # dist_port_already_used for a taken Erlang distribution port.
                error_type = _PortInUseError if _PORT_IN_USE_PATTERN.search(tail) else BrokerError
                raise error_type(
                    f"RabbitMQ node {self._node_name} exited with status {status} while starting; "
                    f"the last lines of its logs:\n{tail}"
                )
            if self._accepts_login():
                return
            if time.monotonic() >= deadline:
                raise BrokerError(
                    f"RabbitMQ node {self._node_name} did not accept an AMQP login on {LOOPBACK}:{self._port} "
                    f"within {timeout_s:.1f} s and was killed; the last lines of its logs:\n{self._log_tail()}"
                )
            time.sleep(_READY_POLL_INTERVAL_S)

    def _accepts_login(self) -> bool:
        # A plain TCP probe first, so pika is not asked (and does not log errors)
        # while the listener is still closed.
        if not _accepts_tcp(self._port):
            return False
        if self._management_port is not None and not _accepts_tcp(self._management_port):
            return False
        if self._tls_port is not None and not _accepts_tcp(self._tls_port):
            return False

        parameters = pika.ConnectionParameters(
            host=LOOPBACK,
            port=self._port,
            credentials=pika.PlainCredentials("guest", "guest"),
            connection_attempts=1,
            socket_timeout=2.0,
            stack_timeout=5.0,
        )
        try:
            connection = pika.BlockingConnection(parameters)
        except (pika.exceptions.AMQPError, AMQPConnectorException) as error:
            # A handshake timeout (AMQPConnectorStackTimeout) is no AMQPError: it comes
            # from something on the port that accepts TCP and never speaks AMQP.
            logger.debug("RabbitMQ node %s does not accept a login yet: %r", self._node_name, error)
            return False
        connection.close()
        return True

    def _log_tail(self) -> str:
        parts = []
        for path in (self._console_log_path, self.log_path):
            parts.append(f"--- {path} ---\n{_tail(path, _LOG_TAIL_LINES)}")
        return "\n".join(parts)

    # Process helpers. The leader is reaped only after its group was signalled, because
    # an exited but unreaped leader keeps its PID, and so the group id, from reuse.

    def _has_exited(self) -> bool:
        process = self._process
        if process is None:
            return True
        if process.returncode is not None:
            return True
        try:
            result = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return result is not None

    def _exit_status(self) -> int | str:
        process = self._process
        if process is None:
            return "unknown"
        if process.returncode is not None:
            return process.returncode
        try:
            result = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return "unknown"
        if result is None:
            return "unknown"
        if result.si_code == os.CLD_EXITED:
            return result.si_status
        return f"signal {result.si_status}"

    def _wait_for_exit(self, deadline: float) -> bool:
        while not self._has_exited():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    def _kill_process_group(self) -> None:
        process = self._process
        if process is None:
            return
        _kill_and_reap(process)
        self._process = None
        self._state.process = None

    def _reap(self) -> None:
        # An exited node (one that crashed by itself) still has to be reaped.
        if self._process is not None and self._has_exited():
            self._kill_process_group()


class _ProcessState:
    """The running process of a node, shared with the node's finalizer."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None


def _release(state: _ProcessState, base_dir: Path | None) -> None:
    if state.process is not None:
        _kill_and_reap(state.process)
        state.process = None
    if base_dir is not None:
        shutil.rmtree(base_dir, ignore_errors=True)


def _kill_and_reap(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGKILL the process group led by ``process``, reap the leader and wait until the group is gone.

    The leader is the ``rabbitmq-server`` script and the Erlang VM is its child, so the
    VM can still hold its listening sockets for a moment after the leader was reaped.
    """
    # start_new_session=True made the leader's PID the process group id.
    group_id = process.pid
    try:
        os.killpg(group_id, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()

    deadline = time.monotonic() + timeout_s
    while members := _live_group_members(group_id):
        if time.monotonic() >= deadline:
            raise BrokerError(
                f"processes {members} of RabbitMQ process group {group_id} still run {timeout_s:.1f} s after SIGKILL"
            )
        time.sleep(0.05)


def _live_group_members(group_id: int) -> list[int]:
    """Return the PIDs of the processes in process group ``group_id`` that have not exited.

    Zombies are left out: they hold no sockets, and where PID 1 does not reap orphans
    (in some containers) they would never leave.
    """
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        # The command name in parentheses can contain spaces, so split after its end.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 3 and fields[0] not in ("Z", "X") and int(fields[2]) == group_id:
            members.append(int(entry.name))
    return members


def _resolve_node_name(node_name: str | None) -> str:
    if node_name is None:
        return f"fedmq-{os.getpid()}-{next(_node_counter)}@localhost"
    if "@" not in node_name:
        node_name = f"{node_name}@localhost"
    if not _NODE_NAME_PATTERN.fullmatch(node_name):
        raise ConfigError(
            "node_name must look like 'name@host' with letters, digits, '_', '-' and '.', "
            f"but got {node_name!r}"
        )
    return node_name


def _check_port(name: str, port: int | None) -> None:
    if port is None:
        return
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"{name} must be an int from 1 to 65535 or None, but got {port!r}")


def _check_optional_int(name: str, value: int | None, *, minimum: int, maximum: int | None = None) -> None:
    if value is None:
        return
    too_large = maximum is not None and isinstance(value, int) and value > maximum
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or too_large:
        upper = f" and at most {maximum}" if maximum is not None else ""
        raise ConfigError(f"{name} must be an int of at least {minimum}{upper}, or None, but got {value!r}")


def _bind_free_port(reserved: list[socket.socket]) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    reserved.append(sock)
    sock.bind((LOOPBACK, 0))
    port: int = sock.getsockname()[1]
    return port


def _port_is_free(port: int) -> bool:
    # SO_REUSEADDR matches what the node does, so a port in TIME_WAIT from the
    # node's previous run counts as free, and one with a listener does not.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _accepts_tcp(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1.0):
            return True
    except OSError:
        return False


def _write_cookie(path: Path) -> None:
    # Erlang creates a cookie itself when none exists, but the server and a
    # concurrent rabbitmqctl could then race to write two different ones.
    if path.exists():
        return
    alphabet = string.ascii_uppercase
    cookie = "".join(secrets.choice(alphabet) for _ in range(32))
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    with os.fdopen(descriptor, "w", encoding="ascii") as file:
        file.write(cookie)


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            size = file.tell()
            file.seek(max(0, size - 16_384))
            text = file.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return "(no such file)"
    except OSError as error:
        return f"(could not read: {error})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def _is_executable_file(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)
