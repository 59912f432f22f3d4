"""The message kinds of the fedmq protocol, each with its fields and its codec.

Every message travels as one frame (see ``schemas.wire``) whose header names the
kind and the schema version. The kind's fields travel as an array, in the order of
the kind's FIELDS table. Decoding checks the kind, the version, each field's
presence and type, and each tensor's parts, and raises MessageError naming the
field that is wrong.

Kinds:

- ``round_start``: coordinator to workers. The global weights of one round and the
  training settings for it.
- ``update``: worker to coordinator. The worker's update for one round (weight
  deltas for floating tensors, new values for integer and bool tensors), its sample
  count and training metrics.
- ``join``: worker to coordinator, sent when a worker connects. It asks for the
  current round if one is open.
- ``leave``: worker to coordinator, sent when a worker shuts down cleanly.
- ``train_failed``: worker to coordinator, sent when the task's code raised during
  a round, so the coordinator counts a dropout at once instead of at the deadline.
- ``shard_assignment``: coordinator to one worker, the answer to a Join whose
  ``shard_count`` is 0. It names the data shard the worker trains on, for
  deployments such as ``docker compose --scale`` where workers have no index.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

from fedmq.errors import MessageError
from schemas.tensors import check_layout
from schemas.wire import Frame, WireTensor, pack_frame, unpack_frame

SCHEMA_VERSION = 1

# Field type names used in the field tables below.
_STR, _INT, _FLOAT, _MAP = "str", "int", "float", "map"


def _check_field(kind: str, name: str, value: Any, type_name: str) -> Any:
    path = f"{kind}.{name}"
    if type_name == _STR and not isinstance(value, str):
        raise MessageError(path, "a string", value)
    if type_name == _INT and (isinstance(value, bool) or not isinstance(value, int)):
        raise MessageError(path, "an int", value)
    if type_name == _FLOAT:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MessageError(path, "a number", value)
        value = float(value)
    if type_name == _MAP:
        if not isinstance(value, dict):
            raise MessageError(path, "a map", value)
        for key in value:
            if not isinstance(key, str):
                raise MessageError(path, "a map with string keys", key)
    return value


def _check_fields(kind: str, fields: Mapping[str, Any], table: Mapping[str, str]) -> dict[str, Any]:
    checked = {}
    for name, type_name in table.items():
        if name not in fields:
            raise MessageError(f"{kind}.{name}", f"a field of type {type_name}", "nothing (the field is missing)")
        checked[name] = _check_field(kind, name, fields[name], type_name)
    unknown = sorted(set(fields) - set(table))
    if unknown:
        raise MessageError(f"{kind}.{unknown[0]}", f"only the fields {sorted(table)}", f"unknown fields {unknown}")
    return checked


def _fields_from_values(kind: str, values: list[Any], table: Mapping[str, str]) -> dict[str, Any]:
    """Map a frame's field values to the names of the kind's field table, in order.

    A shorter array leaves out the fields from its end on, which _check_fields then
    reports as missing. A longer one raises MessageError.
    """
    if len(values) > len(table):
        raise MessageError(f"{kind}.fields", f"only the {len(table)} fields {list(table)}", f"{len(values)} values")
    return dict(zip(table, values))


def _check_scalars(path: str, mapping: Mapping[str, Any], allow_str: bool) -> None:
    allowed: tuple[type, ...] = (int, float, bool, str, type(None)) if allow_str else (int, float)
    for key, value in mapping.items():
        if not isinstance(value, allowed) or (not allow_str and isinstance(value, bool)):
            expected = "numbers, strings, booleans or nil" if allow_str else "numbers"
            raise MessageError(f"{path}.{key}", expected, value)


def _split_tensors(kind: str, tensors: Mapping[str, WireTensor], groups: tuple[str, ...]) -> dict[str, dict[str, WireTensor]]:
    split: dict[str, dict[str, WireTensor]] = {group: {} for group in groups}
    for name, tensor in tensors.items():
        group, _, short = name.partition("/")
        if group not in split or not short:
            raise MessageError(f"{kind}.tensors.{name}", f"a name starting with one of {[g + '/' for g in groups]}", name)
        split[group][short] = tensor
    return split


def _join_tensors(groups: Mapping[str, Mapping[str, WireTensor]]) -> dict[str, WireTensor]:
    return {f"{group}/{name}": tensor for group, tensors in groups.items() for name, tensor in tensors.items()}


@dataclass
class RoundStart:
    """The global model of one round and how to train on it.

    ``weights`` holds the full state dict when ``weights_kind`` is ``"full"``, or
    the difference to model version ``base_version`` when it is ``"delta"``.
    ``aux`` holds strategy tensors such as SCAFFOLD's server control variate.
    ``config`` holds the training settings (see ``worker.training``) and
    ``deadline_unix`` the time, in seconds since the epoch, after which the
    coordinator stops waiting for updates of this round.
    """

    KIND: ClassVar[str] = "round_start"
    FIELDS: ClassVar[dict[str, str]] = {
        "run_id": _STR,
        "round": _INT,
        "attempt": _INT,
        "model_version": _INT,
        "task": _STR,
        "deadline_unix": _FLOAT,
        "config": _MAP,
        "weights_kind": _STR,
        "base_version": _INT,
    }

    run_id: str
    round: int
    attempt: int
    model_version: int
    task: str
    deadline_unix: float
    config: dict[str, Any]
    weights: dict[str, WireTensor]
    weights_kind: str = "full"
    base_version: int = -1
    aux: dict[str, WireTensor] = field(default_factory=dict)

    def validate(self) -> None:
        _check_scalars("round_start.config", self.config, allow_str=True)
        if self.weights_kind not in ("full", "delta"):
            raise MessageError("round_start.weights_kind", "'full' or 'delta'", self.weights_kind)
        if self.weights_kind == "delta" and self.base_version < 0:
            raise MessageError("round_start.base_version", "a model version >= 0 for a delta", self.base_version)
        if self.round < 1 or self.attempt < 0 or self.model_version < 0:
            raise MessageError("round_start.round", "round >= 1, attempt >= 0 and model_version >= 0", (self.round, self.attempt, self.model_version))


@dataclass
class Update:
    """One worker's result for one round.

    ``deltas`` holds, for each shared floating tensor, the trained value minus the
    global value the worker started from, and for each integer or bool tensor its
    new value. ``num_samples`` is the FedAvg weight. ``codec`` names the uplink codec
    the floating tensors were encoded with.
    """

    KIND: ClassVar[str] = "update"
    FIELDS: ClassVar[dict[str, str]] = {
        "run_id": _STR,
        "round": _INT,
        "attempt": _INT,
        "model_version": _INT,
        "worker_id": _STR,
        "num_samples": _INT,
        "num_steps": _INT,
        "metrics": _MAP,
        "codec": _STR,
        "sent_unix": _FLOAT,
    }

    run_id: str
    round: int
    attempt: int
    model_version: int
    worker_id: str
    num_samples: int
    num_steps: int
    metrics: dict[str, float]
    deltas: dict[str, WireTensor]
    codec: str = "float32"
    sent_unix: float = field(default_factory=time.time)
    aux: dict[str, WireTensor] = field(default_factory=dict)

    def validate(self) -> None:
        _check_scalars("update.metrics", self.metrics, allow_str=False)
        if self.num_samples < 0:
            raise MessageError("update.num_samples", "a count >= 0", self.num_samples)
        if self.num_steps < 0:
            raise MessageError("update.num_steps", "a count >= 0", self.num_steps)
        if not self.worker_id:
            raise MessageError("update.worker_id", "a non-empty string", self.worker_id)


@dataclass
class Join:
    """A worker announcing itself.

    ``model_version`` is the newest global model the worker holds, or -1.
    ``shard_count`` is 0 while the worker waits for the coordinator to assign its
    data shard, and the number of shards once it trains on one.
    """

    KIND: ClassVar[str] = "join"
    FIELDS: ClassVar[dict[str, str]] = {
        "worker_id": _STR,
        "task": _STR,
        "num_samples": _INT,
        "model_version": _INT,
        "shard_count": _INT,
        "sent_unix": _FLOAT,
    }

    worker_id: str
    task: str
    num_samples: int
    model_version: int = -1
    shard_count: int = 1
    sent_unix: float = field(default_factory=time.time)

    def validate(self) -> None:
        if not self.worker_id:
            raise MessageError("join.worker_id", "a non-empty string", self.worker_id)
        if self.shard_count < 0:
            raise MessageError("join.shard_count", "a count >= 0", self.shard_count)


@dataclass
class ShardAssignment:
    """The data shard ``shard_index`` of ``shard_count`` that one worker trains on."""

    KIND: ClassVar[str] = "shard_assignment"
    FIELDS: ClassVar[dict[str, str]] = {
        "worker_id": _STR,
        "shard_index": _INT,
        "shard_count": _INT,
        "sent_unix": _FLOAT,
    }

    worker_id: str
    shard_index: int
    shard_count: int
    sent_unix: float = field(default_factory=time.time)

    def validate(self) -> None:
        if not 0 <= self.shard_index < self.shard_count:
            raise MessageError("shard_assignment.shard_index", f"an index in [0, {self.shard_count})", self.shard_index)


@dataclass
class Leave:
    """A worker shutting down cleanly."""

    KIND: ClassVar[str] = "leave"
    FIELDS: ClassVar[dict[str, str]] = {"worker_id": _STR, "reason": _STR, "sent_unix": _FLOAT}

    worker_id: str
    reason: str
    sent_unix: float = field(default_factory=time.time)

    def validate(self) -> None:
        if not self.worker_id:
            raise MessageError("leave.worker_id", "a non-empty string", self.worker_id)


@dataclass
class TrainingFailed:
    """A worker whose task code raised during a round."""

    KIND: ClassVar[str] = "train_failed"
    FIELDS: ClassVar[dict[str, str]] = {
        "run_id": _STR,
        "round": _INT,
        "attempt": _INT,
        "model_version": _INT,
        "worker_id": _STR,
        "error_type": _STR,
        "error_message": _STR,
        "sent_unix": _FLOAT,
    }

    run_id: str
    round: int
    attempt: int
    model_version: int
    worker_id: str
    error_type: str
    error_message: str
    sent_unix: float = field(default_factory=time.time)

    def validate(self) -> None:
        if not self.worker_id:
            raise MessageError("train_failed.worker_id", "a non-empty string", self.worker_id)


Message = Union[RoundStart, Update, Join, Leave, TrainingFailed, ShardAssignment]
MESSAGE_TYPES: dict[str, Any] = {
    cls.KIND: cls for cls in (RoundStart, Update, Join, Leave, TrainingFailed, ShardAssignment)
}

_TENSOR_GROUPS: dict[str, tuple[str, ...]] = {
    RoundStart.KIND: ("weights", "aux"),
    Update.KIND: ("deltas", "aux"),
}


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds that a decoder enforces before it allocates.

    ``max_raw_bytes`` bounds a message's data region after any lossless stage, and
    ``max_elements`` the elements of one decoded tensor.
    """

    max_raw_bytes: int = 1 << 30
    max_elements: int = 1 << 28


def encode_message(message: Message, *, lossless_method: str = "none") -> bytes:
    """Validate a message and serialize it into one frame."""
    message.validate()
    kind = message.KIND
    fields = {name: getattr(message, name) for name in message.FIELDS}
    _check_fields(kind, fields, message.FIELDS)
    groups = _TENSOR_GROUPS.get(kind, ())
    tensors = _join_tensors({group: getattr(message, group) for group in groups})
    return pack_frame(kind, SCHEMA_VERSION, list(fields.values()), tensors, lossless_method=lossless_method)


def decode_message(body: bytes | bytearray | memoryview, limits: DecodeLimits = DecodeLimits()) -> Message:
    """Decode and validate one frame; raises MessageError naming the field that is wrong."""
    frame: Frame = unpack_frame(body, max_raw_bytes=limits.max_raw_bytes, max_elements=limits.max_elements)
    # The schema version comes first: a newer schema may also bring new kinds.
    if frame.schema != SCHEMA_VERSION:
        raise MessageError("schema", f"schema version {SCHEMA_VERSION}", frame.schema)
    message_type = MESSAGE_TYPES.get(frame.kind)
    if message_type is None:
        raise MessageError("kind", f"one of {sorted(MESSAGE_TYPES)}", frame.kind)

    fields = _check_fields(frame.kind, _fields_from_values(frame.kind, frame.fields, message_type.FIELDS), message_type.FIELDS)
    groups = _TENSOR_GROUPS.get(frame.kind, ())
    if groups:
        for name, tensor in frame.tensors.items():
            check_layout(tensor, name=name)
        fields.update(_split_tensors(frame.kind, frame.tensors, groups))
    elif frame.tensors:
        raise MessageError(f"{frame.kind}.tensors", "no tensors", sorted(frame.tensors))
    message: Message = message_type(**fields)
    message.validate()
    return message
