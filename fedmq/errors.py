"""The exceptions that fedmq raises.

    FedmqError
    ├── ConfigError            invalid settings or command-line values
    ├── TaskError              a task could not be loaded, or its code failed
    ├── MessageError           a message failed to decode or validate
    │   └── CodecError         an encoded tensor has invalid codec parameters or data
    ├── BrokerError            the broker failed or rejected an operation
    │   ├── PublishError       a publish was not confirmed, was returned, or timed out
    │   └── PayloadTooLargeError   a payload exceeds the configured maximum size
    ├── CheckpointError        a checkpoint is missing pieces or does not match the run
    └── RoundFailedError       a round did not reach its minimum number of updates

pika, msgpack, zstandard and safetensors errors are translated into these where they
are caught, and chained with ``from``.
"""

from __future__ import annotations


class FedmqError(Exception):
    """Base class of every error that fedmq raises on purpose."""


class ConfigError(FedmqError, ValueError):
    """Invalid settings or command-line values."""


class TaskError(FedmqError):
    """A task could not be loaded, or its code raised."""


class MessageError(FedmqError, ValueError):
    """A message failed to decode or validate.

    ``field`` names the offending field (dotted for nested fields, such as
    ``tensors.fc1.weight.shape``), ``expected`` describes what was allowed and ``got``
    what arrived. The text carries all three.
    """

    def __init__(self, field: str, expected: str, got: object) -> None:
        self.field = field
        self.expected = expected
        self.got = got
        super().__init__(f"invalid field {field!r}: expected {expected}, but got {_describe(got)}")


class CodecError(MessageError):
    """An encoded tensor has invalid codec parameters or inconsistent data."""


class BrokerError(FedmqError):
    """The broker failed or rejected an operation."""


class PublishError(BrokerError):
    """A publish was nacked, returned as unroutable, or not confirmed in time."""


class PayloadTooLargeError(BrokerError):
    """A payload exceeds the configured maximum size and was not sent."""

    def __init__(self, size_bytes: int, limit_bytes: int, what: str = "payload") -> None:
        self.size_bytes = size_bytes
        self.limit_bytes = limit_bytes
        super().__init__(
            f"{what} of {size_bytes} bytes exceeds the limit of {limit_bytes} bytes and was not sent"
        )


class CheckpointError(FedmqError):
    """A checkpoint is missing pieces, is corrupt, or belongs to another run."""


class RoundFailedError(FedmqError):
    """A round ended without the minimum number of updates after all its retries."""


def _describe(value: object) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"
