"""Broker passwords: read from the environment or a file, never from the command line, never logged.

A password reaches fedmq in one of three ways, highest precedence first:

1. a file named by ``--broker-password-file`` (``FEDMQ_BROKER_PASSWORD_FILE``), whose
   content without its trailing newline is the password;
2. the ``FEDMQ_BROKER_PASSWORD`` environment variable;
3. the password part of a broker URL from ``FEDMQ_BROKER_URL`` or a config file.

A URL given as a command-line flag must not contain a password, because any user of
the machine can read a process's command line; ``check_command_line`` rejects it.

Every password that fedmq reads is registered with ``register_secret``. The CLI
puts a ``RedactingFilter`` on its log handlers, which replaces registered secrets in
every formatted record with ``***``, as a second line of defence behind the rule that
no log call and no error message includes a password.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from fedmq.errors import ConfigError

logger = logging.getLogger(__name__)

PASSWORD_ENV = "FEDMQ_BROKER_PASSWORD"
REDACTED = "***"
# Settings whose URL value must not carry a password when it comes from a flag.
URL_OPTIONS = ("broker_url",)

_secrets: set[str] = set()
_secrets_lock = threading.Lock()


# Reading

def read_secret_file(path: Path, *, what: str) -> str:
    """Return the content of ``path`` without its trailing newline.

    Raises ConfigError when the file cannot be read or is empty. Warns when other
    users may read it. The message names the file, never its content.
    """
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the {what} from {path}: {type(exc).__name__}: {exc.strerror if isinstance(exc, OSError) else 'not UTF-8 text'}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("the %s file %s is readable by other users (mode %o); restrict it with chmod 600", what, path, stat.S_IMODE(mode))
    secret = text.removesuffix("\n").removesuffix("\r")
    if not secret:
        raise ConfigError(f"the {what} file {path} is empty; write the {what} into it")
    register_secret(secret)
    return secret


def broker_password(password_file: Path | None, environ: Mapping[str, str] | None = None) -> str | None:
    """Return the broker password from ``password_file``, else from ``FEDMQ_BROKER_PASSWORD``, else None."""
    if password_file is not None:
        return read_secret_file(password_file, what="broker password")
    environ = os.environ if environ is None else environ
    password = environ.get(PASSWORD_ENV)
    if password is None:
        return None
    if not password:
        raise ConfigError(f"{PASSWORD_ENV} is set but empty; unset it or set the password")
    register_secret(password)
    return password


# URLs

def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """Split ``scheme://user:password@host/...`` into the URL without credentials, the user and the password.

    User and password come back percent-decoded, None where the URL has none.
    """
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None, None
    credentials, _, host = parts.netloc.rpartition("@")
    user_text, has_password, password_text = credentials.partition(":")
    user = unquote(user_text) if user_text else None
    password = unquote(password_text) if has_password else None
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment)), user, password


def url_has_password(url: str) -> bool:
    return split_credentials(url)[2] is not None


def with_user(url: str, user: str) -> str:
    """Return ``url`` with ``user`` (percent-encoded) as its user and no password."""
    bare, _, _ = split_credentials(url)
    parts = urlsplit(bare)
    return urlunsplit((parts.scheme, f"{quote(user, safe='')}@{parts.netloc}", parts.path, parts.query, parts.fragment))


def check_command_line(sources: Mapping[str, str], values: Mapping[str, Any]) -> None:
    """Raise ConfigError when a URL option set by a command-line flag contains a password.

    ``sources`` maps option names to where their value came from (``flag --name`` for
    a flag) and ``values`` to the values. The error names the option, never the value.
    """
    for name in URL_OPTIONS:
        value = values.get(name)
        if not isinstance(value, str) or not sources.get(name, "").startswith("flag"):
            continue
        if url_has_password(value):
            flag = "--" + name.replace("_", "-")
            raise ConfigError(
                f"{flag} must not contain a password, because other users of the machine can read command lines; "
                f"give the URL without it (amqp://USER@HOST:PORT/VHOST) and put the password in {PASSWORD_ENV} "
                "or in a file named by --broker-password-file"
            )


# Redaction in logs

def register_secret(value: str) -> None:
    """Add a value that RedactingFilter replaces in every log record from now on."""
    if value:
        with _secrets_lock:
            _secrets.add(value)


def redact(text: str, secrets: Iterable[str] | None = None) -> str:
    """Return ``text`` with every registered secret (or every one of ``secrets``) replaced by ``***``."""
    if secrets is None:
        with _secrets_lock:
            secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


class RedactingFilter(logging.Filter):
    """Replaces registered secrets in a record's message and traceback text with ``***``.

    The record's message is formatted here, so the arguments are dropped afterwards.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        with _secrets_lock:
            secrets = sorted(_secrets, key=len, reverse=True)
        if not secrets:
            return True
        message = record.getMessage()
        redacted = redact(message, secrets)
        if redacted != message:
            record.msg = redacted
            record.args = None
        if record.exc_info and record.exc_text is None:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, secrets)
        return True


def install_redaction(handlers: Iterable[logging.Handler]) -> None:
    """Put one RedactingFilter on each handler that has none."""
    for handler in handlers:
        if not any(isinstance(existing, RedactingFilter) for existing in handler.filters):
            handler.addFilter(RedactingFilter())
