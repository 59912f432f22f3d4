"""Update validation before aggregation: every rejection reason of decode_update, the norm and NormGate."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from coordinator.validation import NormGate, RejectedUpdate, decode_update, expected_tensors, update_norm
from fedmq.errors import ConfigError
from schemas import codecs
from schemas import tensors as wire_tensors
from schemas.messages import Update
from schemas.wire import WireTensor

GLOBAL_STATE = {
    "fc.weight": torch.zeros(4, 8),
    "fc.bias": torch.zeros(4),
    "half.weight": torch.zeros(3, dtype=torch.bfloat16),
    "bn.num_batches_tracked": torch.tensor(0, dtype=torch.int64),
    "mask": torch.zeros(2, dtype=torch.bool),
}
EXPECTED = expected_tensors(GLOBAL_STATE)


def _encoded(values: np.ndarray, spec: codecs.CodecSpec, dtype: str = "float32") -> WireTensor:
    encoded = codecs.encode(values, spec, rng=np.random.default_rng(0), dtype=dtype)
    return WireTensor(encoded.codec, encoded.shape, encoded.dtype, encoded.arrays, dict(encoded.params))


def _deltas(spec: codecs.CodecSpec = codecs.CodecSpec("float32")) -> dict[str, WireTensor]:
    rng = np.random.default_rng(1)
    return {
        "fc.weight": _encoded(rng.normal(size=(4, 8)).astype(np.float32), spec),
        "fc.bias": _encoded(np.array([0.5, -0.5, 0.0, 1.0], np.float32), spec),
        "half.weight": _encoded(np.array([1.0, 2.0, -2.0], np.float32), spec, dtype="bfloat16"),
        "bn.num_batches_tracked": wire_tensors.encode_raw(np.array(12, dtype=np.int64), "int64"),
        "mask": wire_tensors.encode_raw(np.array([True, False]), "bool"),
    }


def _update(deltas: dict[str, WireTensor]) -> Update:
    return Update(
        run_id="run-validation",
        round=1,
        attempt=0,
        model_version=0,
        worker_id="worker-1",
        num_samples=10,
        num_steps=2,
        metrics={},
        deltas=deltas,
    )


def _rejection(deltas: dict[str, WireTensor]) -> RejectedUpdate:
    with pytest.raises(RejectedUpdate) as caught:
        decode_update(_update(deltas), EXPECTED)
    return caught.value


@pytest.mark.parametrize(
    "spec",
    [codecs.CodecSpec(name) for name in ("float32", "float16", "bfloat16", "q8", "q4")]
    + [codecs.CodecSpec("topk", topk_fraction=0.5), codecs.CodecSpec("topk_q8", topk_fraction=0.5, block_size=16)],
    ids=lambda spec: spec.name,
)
def test_valid_update_decodes(spec: codecs.CodecSpec) -> None:
    deltas = _deltas(spec)

    decoded = decode_update(_update(deltas), EXPECTED)

    assert sorted(decoded) == sorted(GLOBAL_STATE)
    for name in ("fc.weight", "fc.bias", "half.weight"):
        assert decoded[name].dtype == np.float32
        assert decoded[name].shape == tuple(GLOBAL_STATE[name].shape)
    assert decoded["bn.num_batches_tracked"].dtype == np.int64
    assert decoded["bn.num_batches_tracked"].item() == 12
    assert decoded["mask"].tolist() == [True, False]


def test_raw_float_deltas_decode_to_float32() -> None:
    deltas = _deltas()
    deltas["fc.bias"] = wire_tensors.encode_raw(np.array([1, 2, 3, 4], np.float64), "float64")
    deltas["half.weight"] = wire_tensors.encode_raw(codecs.bf16_from_float32(np.array([1.0, 2.0, 3.0], np.float32)), "bfloat16")

    decoded = decode_update(_update(deltas), EXPECTED)

    assert decoded["fc.bias"].dtype == np.float32
    assert decoded["half.weight"].tolist() == [1.0, 2.0, 3.0]


def test_missing_tensor_rejected() -> None:
    deltas = _deltas()
    del deltas["fc.bias"]

    rejection = _rejection(deltas)

    assert rejection.reason == "missing_tensors"
    assert "fc.bias" in rejection.detail


def test_extra_tensor_rejected() -> None:
    deltas = _deltas()
    deltas["backdoor.weight"] = wire_tensors.encode_raw(np.zeros(2, np.float32), "float32")

    rejection = _rejection(deltas)

    assert rejection.reason == "unexpected_tensors"
    assert "backdoor.weight" in rejection.detail


def test_wrong_shape_rejected() -> None:
    deltas = _deltas()
    deltas["fc.weight"] = _encoded(np.zeros((8, 4), np.float32), codecs.CodecSpec("float32"))

    rejection = _rejection(deltas)

    assert rejection.reason == "wrong_shape"
    assert "[8, 4]" in rejection.detail
    assert "[4, 8]" in rejection.detail


@pytest.mark.parametrize(
    ("name", "tensor"),
    [
        ("bn.num_batches_tracked", wire_tensors.encode_raw(np.array(12, dtype=np.int32), "int32")),
        ("bn.num_batches_tracked", wire_tensors.encode_raw(np.array(12.0, dtype=np.float32), "float32")),
        ("bn.num_batches_tracked", WireTensor("float16", (), "float32", {"values": np.array([12.0], np.float16)})),
        ("mask", wire_tensors.encode_raw(np.array([1, 0], dtype=np.uint8), "uint8")),
        ("fc.bias", wire_tensors.encode_raw(np.array([1, 2, 3, 4], dtype=np.int64), "int64")),
    ],
    ids=["int32-for-int64", "float-for-int64", "codec-for-int64", "uint8-for-bool", "int-for-float"],
)
def test_wrong_dtype_rejected(name: str, tensor: WireTensor) -> None:
    deltas = _deltas()
    deltas[name] = tensor

    rejection = _rejection(deltas)

    assert rejection.reason == "wrong_dtype"
    assert repr(name) in rejection.detail


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"block_size": 100}, "params.block_size"),
        ({"block_size": 64, "topk_fraction": 0.1}, "params"),
        ({}, "params.block_size"),
        ({"block_size": "64"}, "params.block_size"),
    ],
)
def test_invalid_codec_params_rejected(params: dict[str, Any], field: str) -> None:
    deltas = _deltas()
    tensor = _encoded(np.ones((4, 8), np.float32), codecs.CodecSpec("q8", block_size=64))
    deltas["fc.weight"] = WireTensor(tensor.codec, tensor.shape, tensor.dtype, tensor.arrays, params)

    rejection = _rejection(deltas)

    assert rejection.reason == "invalid_codec"
    assert f"tensors.fc.weight.{field}" in rejection.detail


@pytest.mark.parametrize(
    ("part", "value"),
    [("scales", np.float32(np.nan)), ("scales", np.float32(-1.0)), ("codes", np.int8(-128))],
)
def test_invalid_codec_data_rejected(part: str, value: Any) -> None:
    deltas = _deltas()
    tensor = _encoded(np.ones((4, 8), np.float32), codecs.CodecSpec("q8", block_size=16))
    arrays = {name: array.copy() for name, array in tensor.arrays.items()}
    arrays[part][0] = value
    deltas["fc.weight"] = WireTensor(tensor.codec, tensor.shape, tensor.dtype, arrays, tensor.params)

    rejection = _rejection(deltas)

    assert rejection.reason == "invalid_codec"
    assert f"tensors.fc.weight.arrays.{part}" in rejection.detail


def test_unknown_codec_rejected() -> None:
    deltas = _deltas()
    deltas["fc.bias"] = WireTensor("zip", (4,), "float32", {"values": np.zeros(4, np.float32)})

    rejection = _rejection(deltas)

    assert rejection.reason == "invalid_codec"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("codec", ["raw-float32", "raw-float64", "float16", "topk"])
def test_non_finite_values_rejected(bad: float, codec: str) -> None:
    deltas = _deltas()
    values = np.array([0.5, bad, 0.0, 1.0])
    if codec == "raw-float32":
        tensor = wire_tensors.encode_raw(values.astype(np.float32), "float32")
    elif codec == "raw-float64":
        tensor = wire_tensors.encode_raw(values, "float64")
    elif codec == "float16":
        tensor = WireTensor("float16", (4,), "float32", {"values": values.astype(np.float16)})
    else:
        indices = np.array([0, 1], dtype=codecs.index_dtype(4))
        tensor = WireTensor("topk", (4,), "float32", {"indices": indices, "values": values[:2].astype(np.float32)}, {"topk_fraction": 0.5})
    deltas["fc.bias"] = tensor

    rejection = _rejection(deltas)

    # The update codecs reject NaN and infinity while decoding; raw tensors are checked after.
    assert rejection.reason == ("non_finite" if codec.startswith("raw") else "invalid_codec")
    assert "fc.bias" in rejection.detail


@pytest.mark.parametrize("codec", ["q8", "q4", "topk_q8"])
def test_scale_decoding_to_infinity_rejected(codec: str) -> None:
    deltas = _deltas(codecs.CodecSpec(codec, block_size=16, topk_fraction=1.0))
    tensor = deltas["fc.weight"]
    scales = tensor.arrays["scales"].copy()
    scales[0] = np.float32(3.4028235e38) if codec != "q4" else np.float32(np.inf)
    deltas["fc.weight"] = WireTensor(tensor.codec, tensor.shape, tensor.dtype, {**tensor.arrays, "scales": scales}, tensor.params)

    rejection = _rejection(deltas)

    assert rejection.reason == "invalid_codec"
    assert "fc.weight" in rejection.detail
    assert "scales" in rejection.detail


@pytest.mark.parametrize(
    "spec",
    [codecs.CodecSpec(name, block_size=16, topk_fraction=0.5) for name in codecs.CODEC_NAMES],
    ids=lambda spec: spec.name,
)
def test_decoded_codec_tensors_are_finite(spec: codecs.CodecSpec) -> None:
    # The largest magnitudes each codec can carry: decode_update relies on the codecs
    # for finiteness and checks only raw tensors itself.
    rng = np.random.default_rng(5)
    deltas = _deltas(spec)
    extreme = (rng.choice([-1.0, 1.0], size=(4, 8)) * 3.0e38).astype(np.float32)
    if spec.name == "float16":
        extreme = np.full((4, 8), 65504.0, dtype=np.float32)
    elif spec.name in ("q8", "topk_q8"):
        extreme = np.full((4, 8), 3.3e38, dtype=np.float32)
    deltas["fc.weight"] = _encoded(extreme, spec)

    decoded = decode_update(_update(deltas), EXPECTED)

    for name in ("fc.weight", "fc.bias", "half.weight"):
        assert np.isfinite(decoded[name]).all(), name


def test_raw_float64_beyond_float32_range_rejected() -> None:
    deltas = _deltas()
    deltas["fc.bias"] = wire_tensors.encode_raw(np.array([1e300, 0, 0, 0], np.float64), "float64")

    rejection = _rejection(deltas)

    assert rejection.reason == "non_finite"


# Norm


def test_update_norm_counts_floating_tensors_only() -> None:
    decoded: dict[str, np.ndarray] = {
        "fc.weight": np.full((4, 8), 0.5, np.float32),
        "fc.bias": np.array([3.0, 4.0, 0.0, 0.0], np.float32),
        "half.weight": np.zeros(3, np.float32),
        "bn.num_batches_tracked": np.array(10**9, np.int64),
        "mask": np.array([True, True]),
    }

    norm = update_norm(decoded, EXPECTED)

    assert norm == pytest.approx(math.sqrt(32 * 0.25 + 25.0))


def test_norm_gate_rejects_above_max_norm() -> None:
    gate = NormGate(max_norm=10.0)

    gate.check(10.0)
    with pytest.raises(RejectedUpdate) as caught:
        gate.check(10.5)

    assert caught.value.reason == "norm_too_large"


def test_norm_gate_rejects_outlier_after_history() -> None:
    gate = NormGate(factor=10.0, min_history=2)

    gate.check(1000.0)  # no history yet: accepted
    gate.record(1.0)
    gate.check(1000.0)  # one norm is below min_history: accepted
    gate.record(2.0)
    gate.record(3.0)
    gate.check(20.0)  # median 2, factor 10: 20 is the limit and passes
    with pytest.raises(RejectedUpdate) as caught:
        gate.check(20.5)

    assert caught.value.reason == "norm_outlier"
    assert "median 2" in caught.value.detail


def test_norm_gate_uses_previous_round_first() -> None:
    gate = NormGate(factor=10.0, min_history=2, reference_norms=[1.0, 3.0, float("nan")])

    gate.check(20.0)  # the previous round's median is 2
    with pytest.raises(RejectedUpdate) as caught:
        gate.check(21.0)

    assert caught.value.reason == "norm_outlier"
    assert "previous round" in caught.value.detail


def test_norm_gate_with_zero_median_accepts() -> None:
    gate = NormGate(factor=2.0)
    gate.record(0.0)
    gate.record(0.0)

    gate.check(5.0)


@pytest.mark.parametrize(
    "kwargs",
    [{"factor": 1.0}, {"factor": float("nan")}, {"max_norm": 0.0}, {"max_norm": -1.0}, {"min_history": 0}, {"min_history": 1.5}],
)
def test_norm_gate_invalid_settings_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        NormGate(**kwargs)


def test_expected_tensors_records_shape_and_dtype() -> None:
    assert EXPECTED["fc.weight"].shape == (4, 8)
    assert EXPECTED["fc.weight"].is_floating
    assert EXPECTED["half.weight"].dtype == "bfloat16"
    assert EXPECTED["half.weight"].is_floating
    assert EXPECTED["bn.num_batches_tracked"].dtype == "int64"
    assert not EXPECTED["bn.num_batches_tracked"].is_floating
    assert not EXPECTED["mask"].is_floating
