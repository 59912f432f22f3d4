"""Log lines, readable and JSON, carry the run, round, worker and message ids."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
from collections.abc import Iterator

import pytest

from fedmq.logging_setup import (
    configure_logging,
    current_log_context,
    log_context,
    pop_log_context,
    push_log_context,
    set_log_context,
)


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    buffer = io.StringIO()
    handler = configure_logging("DEBUG", json_lines=True, stream=buffer)
    try:
        yield buffer
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def json_lines(buffer: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_json_line_has_context_ids(stream: io.StringIO) -> None:
    logger = logging.getLogger("tests.ops.context")

    with log_context(run_id="run-1", round=3):
        with log_context(worker_id="w-2", message_id="m-9"):
            logger.info("accepted update of %d bytes", 1200)

    [entry] = json_lines(stream)
    assert entry["message"] == "accepted update of 1200 bytes"
    assert entry["level"] == "INFO"
    assert entry["logger"] == "tests.ops.context"
    assert entry["run_id"] == "run-1"
    assert entry["round"] == 3
    assert entry["worker_id"] == "w-2"
    assert entry["message_id"] == "m-9"


def test_json_line_omits_unset_ids(stream: io.StringIO) -> None:
    logging.getLogger("tests.ops.context").warning("no ids here")

    [entry] = json_lines(stream)
    for key in ("run_id", "round", "worker_id", "message_id"):
        assert key not in entry


def test_extra_wins_over_context(stream: io.StringIO) -> None:
    with log_context(run_id="run-1", round=3):
        logging.getLogger("tests.ops.context").info("late update", extra={"round": 2})

    [entry] = json_lines(stream)
    assert entry["round"] == 2
    assert entry["run_id"] == "run-1"


def test_json_line_carries_exception(stream: io.StringIO) -> None:
    try:
        raise ValueError("bad tensor")
    except ValueError:
        logging.getLogger("tests.ops.context").error("training failed", exc_info=True)

    [entry] = json_lines(stream)
    assert "ValueError: bad tensor" in str(entry["exception"])


def test_context_restored_after_block() -> None:
    before = current_log_context()

    with log_context(run_id="run-1"):
        set_log_context(round=4)
        assert current_log_context() == {**before, "run_id": "run-1", "round": 4}

    assert current_log_context() == before


def test_push_and_pop_context() -> None:
    token = push_log_context(worker_id="w-1")
    assert current_log_context()["worker_id"] == "w-1"

    pop_log_context(token)

    assert "worker_id" not in current_log_context()


def test_none_removes_id() -> None:
    with log_context(run_id="run-1", worker_id="w-1"):
        with log_context(worker_id=None):
            assert current_log_context() == {"run_id": "run-1"}


def test_unknown_id_rejected() -> None:
    with pytest.raises(ValueError, match="log context ids must be among"):
        push_log_context(runid="run-1")


def test_new_thread_starts_without_ids(stream: io.StringIO) -> None:
    def log_from_thread() -> None:
        logging.getLogger("tests.ops.context").info("from a thread")

    with log_context(run_id="run-1"):
        thread = threading.Thread(target=log_from_thread, name="worker-thread")
        thread.start()
        thread.join()

    [entry] = json_lines(stream)
    assert "run_id" not in entry
    assert entry["thread"] == "worker-thread"


def test_text_line_shows_ids() -> None:
    buffer = io.StringIO()
    handler = configure_logging("INFO", stream=buffer)
    try:
        with log_context(run_id="run-1", round=2, worker_id="w-3"):
            logging.getLogger("tests.ops.text").info("round summary")
        logging.getLogger("tests.ops.text").info("no ids")
    finally:
        logging.getLogger().removeHandler(handler)

    first, second = buffer.getvalue().splitlines()
    assert first.endswith("INFO tests.ops.text [run=run-1 round=2 worker=w-3]: round summary")
    assert second.endswith("INFO tests.ops.text: no ids")


def test_configure_replaces_own_handler() -> None:
    first = configure_logging("INFO", stream=io.StringIO())
    second = configure_logging("INFO", stream=io.StringIO())
    try:
        handlers = logging.getLogger().handlers
        assert second in handlers
        assert first not in handlers
    finally:
        logging.getLogger().removeHandler(second)


def test_default_handler_follows_sys_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    handler = configure_logging("INFO")
    replacement = io.StringIO()
    try:
        monkeypatch.setattr(sys, "stderr", replacement)
        logging.getLogger("tests.ops.stderr").info("to the current stderr")
    finally:
        logging.getLogger().removeHandler(handler)

    assert "to the current stderr" in replacement.getvalue()
