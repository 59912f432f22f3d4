"""Log handlers for the ``fedmq`` command: readable lines or JSON lines, both with the run's ids.

Every record gets the attributes ``run_id``, ``round``, ``worker_id`` and
``message_id``. A value passed with ``extra=`` wins. Otherwise the value comes from
the log context of the current thread. The services set that context with
``log_context`` and ``set_log_context`` while they handle a run, a round or a
message, so log calls keep their lazy ``%s`` arguments and pass no ids themselves.
An id that does not apply is None and is left out of the output.

The context lives in a ``contextvars.ContextVar``. A new thread starts with an empty
context, so a thread that logs for a run sets its own.

Only entry points call ``configure_logging``; library modules just log.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

LOG_IDS = ("run_id", "round", "worker_id", "message_id")
# Short names of the ids in readable lines.
_TEXT_LABELS = {"run_id": "run", "round": "round", "worker_id": "worker", "message_id": "message"}

_context: contextvars.ContextVar[Mapping[str, object]] = contextvars.ContextVar("fedmq_log_context", default={})


# The log context

def push_log_context(**ids: object) -> contextvars.Token[Mapping[str, object]]:
    """Add ids to the current thread's log context until ``pop_log_context(token)``.

    An id set to None removes it. Unknown names raise ValueError, because a typo would
    otherwise drop the id silently.
    """
    unknown = sorted(set(ids) - set(LOG_IDS))
    if unknown:
        raise ValueError(f"log context ids must be among {', '.join(LOG_IDS)}, but got {', '.join(unknown)}")
    merged = {**_context.get(), **ids}
    return _context.set({key: value for key, value in merged.items() if value is not None})


def pop_log_context(token: contextvars.Token[Mapping[str, object]]) -> None:
    """Restore the log context from before the ``push_log_context`` that returned ``token``."""
    _context.reset(token)


@contextlib.contextmanager
def log_context(**ids: object) -> Iterator[None]:
    """Add ids to the log context inside a ``with`` block."""
    token = push_log_context(**ids)
    try:
        yield
    finally:
        pop_log_context(token)


def set_log_context(**ids: object) -> None:
    """Add ids to the log context for the rest of the enclosing ``log_context`` block.

    Leaving that block restores the context from before it, ids set here included.
    """
    push_log_context(**ids)


def current_log_context() -> dict[str, object]:
    return dict(_context.get())


class ContextFilter(logging.Filter):
    """Set the id attributes of each record from ``extra=`` or the log context."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = _context.get()
        for key in LOG_IDS:
            if getattr(record, key, None) is None:
                setattr(record, key, context.get(key))
        return True


# Formatters

class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER [run=.. round=.. worker=.. message=..]: MESSAGE``, with only the ids that are set."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(fedmq_ids)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        ids = [f"{_TEXT_LABELS[key]}={getattr(record, key)}" for key in LOG_IDS if getattr(record, key, None) is not None]
        record.fedmq_ids = f" [{' '.join(ids)}]" if ids else ""
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the ids that are set, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in LOG_IDS:
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.threadName and record.threadName != "MainThread":
            entry["thread"] = record.threadName
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class CurrentStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes each record to the ``sys.stderr`` of that moment.

    The live progress view replaces ``sys.stderr`` while it runs, so that log lines
    print above the view. A handler that kept the original stream would draw over it.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        # Handler.handle holds the handler's lock here, so swapping the stream is safe.
        self.stream = sys.stderr
        super().emit(record)


def configure_logging(level: str = "INFO", *, json_lines: bool = False, stream: TextIO | None = None) -> logging.Handler:
    """Install one handler on the root logger: JSON lines or readable lines, with the ids.

    ``stream`` defaults to the current ``sys.stderr``. A handler installed by an earlier
    call is replaced. Returns the new handler.
    """
    handler: logging.Handler = CurrentStderrHandler() if stream is None else logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    handler.addFilter(ContextFilter())
    handler.set_name("fedmq")

    root = logging.getLogger()
    for existing in list(root.handlers):
        if existing.get_name() == "fedmq":
            root.removeHandler(existing)
            existing.close()
    root.addHandler(handler)
    root.setLevel(level)
    # pika logs every failed connection attempt at ERROR; fedmq logs each retry itself.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    # matplotlib logs font discovery at INFO and DEBUG.
    logging.getLogger("matplotlib").setLevel(max(logging.WARNING, root.level))
    return handler
