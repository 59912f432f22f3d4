"""Message kinds through encode_message and decode_message, and rejection of invalid fields."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import numpy as np
import pytest

from fedmq.errors import CodecError, MessageError
from schemas import codecs
from schemas import tensors as wire_tensors
from schemas.messages import (
    MESSAGE_TYPES,
    SCHEMA_VERSION,
    Join,
    Leave,
    RoundStart,
    TrainingFailed,
    Update,
    decode_message,
    encode_message,
)
from schemas.wire import PREFIX, WireTensor, pack_frame

SPECS = [
    codecs.CodecSpec("float32"),
    codecs.CodecSpec("float16"),
    codecs.CodecSpec("bfloat16"),
    codecs.CodecSpec("q8", block_size=64),
    codecs.CodecSpec("q4", block_size=32),
    codecs.CodecSpec("topk", topk_fraction=0.05),
    codecs.CodecSpec("topk_q8", topk_fraction=0.1, block_size=16),
]


def _raw(array: np.ndarray, dtype: str | None = None) -> WireTensor:
    return wire_tensors.encode_raw(array, dtype or array.dtype.name)


def _update(**changes: Any) -> Update:
    fields: dict[str, Any] = {
        "run_id": "run-messages",
        "round": 3,
        "attempt": 1,
        "model_version": 2,
        "worker_id": "worker-1",
        "num_samples": 250,
        "num_steps": 16,
        "metrics": {"loss": 0.25, "accuracy": 0.9},
        "deltas": {"fc.weight": _raw(np.ones((2, 3), np.float32)), "bn.num_batches_tracked": _raw(np.array(5))},
        "codec": "float32",
        "sent_unix": 1_700_000_000.5,
    }
    fields.update(changes)
    return Update(**fields)


def _fields_of(message: Any) -> dict[str, Any]:
    return {name: getattr(message, name) for name in message.FIELDS}


def _frame(kind: str, fields: dict[str, Any], tensors: dict[str, WireTensor] | None = None, schema: int = SCHEMA_VERSION) -> bytes:
    """Pack a frame by hand; the field values travel in the order of ``fields``."""
    return pack_frame(kind, schema, list(fields.values()), tensors or {})


def _decode_error(body: bytes) -> MessageError:
    with pytest.raises(MessageError) as caught:
        decode_message(body)
    return caught.value


# Round trips


@pytest.mark.parametrize(
    "message",
    [
        Join(worker_id="worker-7", task="digits", num_samples=321, model_version=4, sent_unix=12.5),
        Leave(worker_id="worker-7", reason="shutdown", sent_unix=13.0),
        TrainingFailed(
            run_id="run-1",
            round=2,
            attempt=0,
            model_version=1,
            worker_id="worker-7",
            error_type="RuntimeError",
            error_message="CUDA out of memory",
            sent_unix=14.0,
        ),
    ],
    ids=lambda message: message.KIND,
)
def test_message_without_tensors_round_trip(message: Any) -> None:
    decoded = decode_message(encode_message(message))

    assert type(decoded) is type(message)
    assert decoded == message


def test_round_start_round_trip() -> None:
    weights = {"fc.weight": _raw(np.arange(6, dtype=np.float32).reshape(2, 3)), "fc.bias": _raw(np.zeros(3, np.float32))}
    aux = {"control.fc.weight": _raw(np.full((2, 3), 0.5, np.float32))}
    message = RoundStart(
        run_id="run-1",
        round=4,
        attempt=2,
        model_version=3,
        task="digits",
        deadline_unix=1_700_000_060.25,
        config={"learning_rate": 0.1, "local_epochs": 2, "codec": "q8:block=64", "momentum": None, "shuffle": True},
        weights=weights,
        weights_kind="delta",
        base_version=2,
        aux=aux,
    )

    decoded = decode_message(encode_message(message))

    assert isinstance(decoded, RoundStart)
    assert _fields_of(decoded) == _fields_of(message)
    assert sorted(decoded.weights) == ["fc.bias", "fc.weight"]
    assert sorted(decoded.aux) == ["control.fc.weight"]
    assert np.array_equal(wire_tensors.decode(decoded.weights["fc.weight"]), np.arange(6, dtype=np.float32).reshape(2, 3))
    assert np.array_equal(wire_tensors.decode(decoded.aux["control.fc.weight"]), np.full((2, 3), 0.5, np.float32))


def test_integer_deadline_decodes_as_float() -> None:
    fields = _fields_of(Leave(worker_id="worker-1", reason="shutdown"))
    fields["sent_unix"] = 1_700_000_000

    decoded = decode_message(_frame("leave", fields))

    assert isinstance(decoded, Leave)
    assert isinstance(decoded.sent_unix, float)


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.to_text())
@pytest.mark.parametrize("lossless_method", ["none", "auto"])
def test_update_codec_round_trip(spec: codecs.CodecSpec, lossless_method: str) -> None:
    rng = np.random.default_rng(7)
    delta = rng.normal(scale=0.01, size=(33, 17)).astype(np.float32)
    encoded = codecs.encode(delta, spec, rng=np.random.default_rng(1))
    deltas = {
        "fc.weight": WireTensor(encoded.codec, encoded.shape, encoded.dtype, encoded.arrays, dict(encoded.params)),
        "bn.num_batches_tracked": _raw(np.array(17, dtype=np.int64)),
    }
    update = _update(deltas=deltas, codec=spec.to_text())

    decoded = decode_message(encode_message(update, lossless_method=lossless_method))

    assert isinstance(decoded, Update)
    assert _fields_of(decoded) == _fields_of(update)
    tensor = decoded.deltas["fc.weight"]
    assert tensor.codec == spec.name
    assert tensor.params == spec.params()
    assert tensor.shape == (33, 17)
    assert tensor.dtype == "float32"
    assert sorted(tensor.arrays) == sorted(encoded.arrays)
    for part_name, part in encoded.arrays.items():
        assert tensor.arrays[part_name].dtype == part.dtype
        assert np.array_equal(tensor.arrays[part_name], part)
    local = codecs.decode(encoded.codec, encoded.params, encoded.shape, encoded.arrays)
    received = wire_tensors.decode(tensor, name="fc.weight")
    assert received.dtype == np.float32
    assert np.array_equal(received, local)
    assert wire_tensors.decode(decoded.deltas["bn.num_batches_tracked"]).item() == 17


def test_update_bfloat16_source_dtype_survives() -> None:
    delta = np.linspace(-1, 1, 40, dtype=np.float32)
    encoded = codecs.encode(delta, codecs.CodecSpec("q8", block_size=16), rng=np.random.default_rng(0), dtype="bfloat16")
    update = _update(deltas={"w": WireTensor(encoded.codec, encoded.shape, encoded.dtype, encoded.arrays, dict(encoded.params))})

    decoded = decode_message(encode_message(update))

    assert isinstance(decoded, Update)
    assert decoded.deltas["w"].dtype == "bfloat16"


# Rejections


def test_unknown_kind_rejected() -> None:
    error = _decode_error(_frame("gradient_push", {"worker_id": "worker-1"}))

    assert error.field == "kind"
    assert "gradient_push" in str(error)
    for kind in MESSAGE_TYPES:
        assert kind in error.expected


def test_unknown_schema_version_rejected() -> None:
    fields = _fields_of(Leave(worker_id="worker-1", reason="shutdown"))

    error = _decode_error(_frame("leave", fields, schema=SCHEMA_VERSION + 1))

    assert error.field == "schema"
    assert str(SCHEMA_VERSION + 1) in str(error)


def test_schema_version_checked_before_kind() -> None:
    error = _decode_error(_frame("kind_of_a_future_schema", {}, schema=SCHEMA_VERSION + 1))

    assert error.field == "schema"


@pytest.mark.parametrize("missing", list(Update.FIELDS))
def test_update_fields_cut_short_rejected(missing: str) -> None:
    update = _update()
    position = list(Update.FIELDS).index(missing)
    fields = dict(list(_fields_of(update).items())[:position])
    tensors = {f"deltas/{name}": tensor for name, tensor in update.deltas.items()}

    error = _decode_error(_frame("update", fields, tensors))

    assert error.field == f"update.{missing}"
    assert "missing" in str(error)


def test_update_field_left_out_shifts_and_is_rejected() -> None:
    update = _update()
    fields = _fields_of(update)
    del fields["num_samples"]
    tensors = {f"deltas/{name}": tensor for name, tensor in update.deltas.items()}

    error = _decode_error(_frame("update", fields, tensors))

    # num_steps moves into the num_samples slot, so the first mismatch is metrics in num_steps.
    assert error.field == "update.num_steps"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("run_id", 17),
        ("round", "3"),
        ("round", 3.0),
        ("round", True),
        ("num_samples", None),
        ("metrics", [0.5]),
        ("metrics", {b"loss": 0.5}),
        ("sent_unix", "yesterday"),
        ("sent_unix", False),
        ("codec", b"q8"),
    ],
)
def test_update_field_of_wrong_type_rejected(field: str, value: Any) -> None:
    update = _update()
    fields = _fields_of(update)
    fields[field] = value
    tensors = {f"deltas/{name}": tensor for name, tensor in update.deltas.items()}

    error = _decode_error(_frame("update", fields, tensors))

    assert error.field == f"update.{field}"
    assert repr(f"update.{field}") in str(error)


def test_integer_map_keys_rejected() -> None:
    update = _update()
    fields = {**_fields_of(update), "metrics": {1: 0.5}}
    tensors = {f"deltas/{name}": tensor for name, tensor in update.deltas.items()}

    error = _decode_error(_frame("update", fields, tensors))

    assert error.field == "header"


def test_extra_field_value_rejected() -> None:
    fields = _fields_of(Join(worker_id="worker-1", task="digits", num_samples=10))
    fields["admin"] = True

    error = _decode_error(_frame("join", fields))

    assert error.field == "join.fields"
    assert f"only the {len(Join.FIELDS)} fields" in str(error)
    assert f"{len(Join.FIELDS) + 1} values" in str(error)


def test_fields_travel_in_table_order() -> None:
    message = Leave(worker_id="worker-1", reason="shutdown", sent_unix=3.0)
    header_length = PREFIX.unpack_from(encode_message(message))[2]

    header = msgpack.unpackb(encode_message(message)[PREFIX.size : PREFIX.size + header_length])

    assert header[2] == ["worker-1", "shutdown", 3.0]


@pytest.mark.parametrize(
    ("path", "value"),
    [("metrics", {"loss": "low"}), ("metrics", {"converged": True}), ("metrics", {"loss": [1.0]})],
)
def test_non_numeric_metric_rejected(path: str, value: Any) -> None:
    update = _update()
    fields = _fields_of(update)
    fields[path] = value
    tensors = {f"deltas/{name}": tensor for name, tensor in update.deltas.items()}

    error = _decode_error(_frame("update", fields, tensors))

    assert error.field.startswith("update.metrics.")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"num_samples": -1}, "update.num_samples"),
        ({"num_steps": -5}, "update.num_steps"),
        ({"worker_id": ""}, "update.worker_id"),
    ],
)
def test_update_invalid_value_rejected(changes: dict[str, Any], field: str) -> None:
    update = _update()
    fields = {**_fields_of(update), **changes}
    tensors = {f"deltas/{name}": tensor for name, tensor in update.deltas.items()}

    error = _decode_error(_frame("update", fields, tensors))

    assert error.field == field


def test_encode_validates_before_sending() -> None:
    with pytest.raises(MessageError) as caught:
        encode_message(_update(num_samples=-3))

    assert caught.value.field == "update.num_samples"


def test_round_start_config_with_nested_value_rejected() -> None:
    message = RoundStart(
        run_id="run-1",
        round=1,
        attempt=0,
        model_version=0,
        task="digits",
        deadline_unix=1.0,
        config={"schedule": [0.1, 0.01]},
        weights={},
    )

    with pytest.raises(MessageError) as caught:
        encode_message(message)

    assert caught.value.field == "round_start.config.schedule"


def test_tensors_on_message_without_tensors_rejected() -> None:
    fields = _fields_of(Leave(worker_id="worker-1", reason="shutdown"))

    error = _decode_error(_frame("leave", fields, {"deltas/w": _raw(np.zeros(2, np.float32))}))

    assert error.field == "leave.tensors"


@pytest.mark.parametrize("name", ["w", "weights/w", "deltas/", "/w"])
def test_update_tensor_outside_its_groups_rejected(name: str) -> None:
    fields = _fields_of(_update())

    error = _decode_error(_frame("update", fields, {name: _raw(np.zeros(2, np.float32))}))

    assert error.field == f"update.tensors.{name}"


def test_update_part_count_not_matching_shape_rejected() -> None:
    tensor = WireTensor("float16", (4, 4), "float32", {"values": np.zeros(15, np.float16)})
    fields = _fields_of(_update())

    error = _decode_error(_frame("update", fields, {"deltas/fc.weight": tensor}))

    assert isinstance(error, CodecError)
    assert error.field == "tensors.deltas/fc.weight.parts.values.count"
    assert "16 elements" in str(error)


def test_update_codec_params_invalid_rejected() -> None:
    encoded = codecs.encode(np.ones(64, np.float32), codecs.CodecSpec("q8", block_size=16), rng=np.random.default_rng(0))
    tensor = WireTensor("q8", (64,), "float32", encoded.arrays, {"block_size": 17})
    fields = _fields_of(_update())

    error = _decode_error(_frame("update", fields, {"deltas/fc.weight": tensor}))

    assert error.field == "tensors.deltas/fc.weight.params.block_size"


def test_round_start_without_base_version_for_delta_rejected() -> None:
    message = RoundStart(
        run_id="run-1", round=2, attempt=0, model_version=1, task="digits", deadline_unix=1.0, config={}, weights={},
        weights_kind="delta", base_version=-1,
    )
    fields = {name: getattr(message, name) for name in RoundStart.FIELDS}

    error = _decode_error(_frame("round_start", fields))

    assert error.field == "round_start.base_version"


def test_message_classes_declare_every_field() -> None:
    for kind, message_type in MESSAGE_TYPES.items():
        declared = {item.name for item in dataclasses.fields(message_type)}
        assert set(message_type.FIELDS) <= declared, kind
        assert message_type.KIND == kind
