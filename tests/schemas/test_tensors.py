"""State dicts through encode_message and decode_message: every dtype bit-exact, raw parts zero-copy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmq.errors import CodecError
from schemas import tensors as wire_tensors
from schemas.messages import RoundStart, decode_message, encode_message
from schemas.wire import WireTensor

# Integer views of the same width, so that comparisons see every bit, NaN payloads and -0.0 included.
_BIT_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dtype == torch.bool:
        return tensor.to(torch.uint8)
    return tensor.view(_BIT_VIEWS[tensor.element_size()])


def _assert_bit_exact(expected: torch.Tensor, actual: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert torch.equal(_bits(actual), _bits(expected))


def _special_floats(dtype: torch.dtype) -> torch.Tensor:
    """Values where a lossy or sloppy conversion shows: NaN with a payload, infinities, -0.0, subnormals."""
    finfo = torch.finfo(dtype)
    values = torch.tensor(
        [0.0, -0.0, float("inf"), float("-inf"), finfo.max, -finfo.max, finfo.tiny, finfo.tiny / 4, 1.0 / 3.0],
        dtype=dtype,
    )
    nan_bits = {torch.float32: 0x7FC0_1234, torch.float64: 0x7FF8_0000_0000_1234, torch.float16: 0x7E12, torch.bfloat16: 0x7FC5}
    width = _BIT_VIEWS[values.element_size()]
    nan = torch.tensor([nan_bits[dtype]], dtype=torch.int64).to(width).view(dtype)
    return torch.cat([values, nan])


def _state_dict() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        name = str(dtype).removeprefix("torch.")
        state[f"{name}.random"] = torch.randn(7, 5, generator=generator).to(dtype)
        state[f"{name}.special"] = _special_floats(dtype)
        state[f"{name}.scalar"] = torch.tensor(-2.5, dtype=dtype)
        state[f"{name}.empty"] = torch.empty(0, 3, dtype=dtype)
    state["bn.num_batches_tracked"] = torch.tensor(123_456_789_012, dtype=torch.int64)
    state["int64.extremes"] = torch.tensor([torch.iinfo(torch.int64).min, -1, 0, torch.iinfo(torch.int64).max])
    state["int64.empty"] = torch.empty(0, dtype=torch.int64)
    state["int32"] = torch.tensor([[-(2**31), 2**31 - 1]], dtype=torch.int32)
    state["int16"] = torch.tensor([-(2**15), 7], dtype=torch.int16)
    state["int8"] = torch.tensor([-128, 127], dtype=torch.int8)
    state["uint8"] = torch.tensor([0, 255], dtype=torch.uint8)
    state["bool.mask"] = torch.tensor([[True, False, True], [False, False, True]])
    state["bool.scalar"] = torch.tensor(True)
    state["bool.empty"] = torch.empty(2, 0, dtype=torch.bool)
    return state


def _round_start(weights: dict[str, WireTensor]) -> RoundStart:
    return RoundStart(
        run_id="run-tensors",
        round=1,
        attempt=0,
        model_version=0,
        task="digits",
        deadline_unix=1.0e9,
        config={},
        weights=weights,
    )


@pytest.mark.parametrize("lossless_method", ["none", "zstd"])
def test_state_dict_round_trip_bit_exact(lossless_method: str) -> None:
    state = _state_dict()

    body = encode_message(_round_start(wire_tensors.encode_state(state)), lossless_method=lossless_method)
    message = decode_message(body)
    assert isinstance(message, RoundStart)
    decoded = wire_tensors.decode_state(message.weights)

    assert list(decoded) == list(state)
    for name, expected in state.items():
        _assert_bit_exact(expected, decoded[name])


def test_raw_decode_shares_message_body() -> None:
    state = _state_dict()
    body = encode_message(_round_start(wire_tensors.encode_state(state)), lossless_method="none")
    body_array = np.frombuffer(body, dtype=np.uint8)

    message = decode_message(body)
    assert isinstance(message, RoundStart)
    for name, tensor in message.weights.items():
        array = wire_tensors.decode(tensor, name=name)
        if array.size:
            assert np.shares_memory(array, body_array), name


def test_zstd_decode_copies_out_of_body() -> None:
    weights = {"zeros": wire_tensors.encode_raw(np.zeros(4096, dtype=np.float32), "float32")}
    body = encode_message(_round_start(weights), lossless_method="zstd")

    message = decode_message(body)
    assert isinstance(message, RoundStart)
    array = wire_tensors.decode(message.weights["zeros"], name="zeros")

    assert not np.shares_memory(array, np.frombuffer(body, dtype=np.uint8))
    assert len(body) < 4096
    assert np.array_equal(array, np.zeros(4096, dtype=np.float32))


def test_decode_state_returns_writable_copies() -> None:
    state = {"weight": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    body = encode_message(_round_start(wire_tensors.encode_state(state)))
    message = decode_message(body)
    assert isinstance(message, RoundStart)

    decoded = wire_tensors.decode_state(message.weights)
    decoded["weight"].add_(1.0)

    again = wire_tensors.decode(message.weights["weight"], name="weight")
    assert np.array_equal(again, np.arange(6, dtype=np.float32).reshape(2, 3))


def test_to_numpy_rejects_complex_dtype() -> None:
    with pytest.raises(CodecError) as caught:
        wire_tensors.to_numpy(torch.zeros(2, dtype=torch.complex64))

    assert caught.value.field == "dtype"
    assert "complex64" in str(caught.value)


def test_encode_raw_rejects_mismatched_part_dtype() -> None:
    with pytest.raises(CodecError) as caught:
        wire_tensors.encode_raw(np.zeros(3, dtype=np.float64), "float32")

    assert caught.value.field == "values"


@pytest.mark.parametrize(
    ("tensor", "field"),
    [
        (WireTensor("raw", (3,), "complex64", {"values": np.zeros(3, np.float32)}), "tensors.w.dtype"),
        (WireTensor("raw", (3,), "float32", {"values": np.zeros(2, np.float32)}), "tensors.w.parts.values.count"),
        (WireTensor("raw", (3,), "float32", {"values": np.zeros(3, np.float64)}), "tensors.w.parts.values.dtype"),
        (WireTensor("raw", (3,), "float32", {"data": np.zeros(3, np.float32)}), "tensors.w.parts"),
        (WireTensor("q8", (3,), "int64", {}), "tensors.w.dtype"),
        (WireTensor("nonsense", (3,), "float32", {}), "tensors.w.codec"),
        (WireTensor("q8", (3,), "float32", {}, {"block_size": 100}), "tensors.w.params.block_size"),
        (
            WireTensor("float16", (4,), "float32", {"values": np.zeros(3, np.float16)}),
            "tensors.w.parts.values.count",
        ),
        (
            WireTensor("topk", (100,), "float32", {"indices": np.zeros(1, np.uint16), "values": np.zeros(1, np.float64)}, {"topk_fraction": 0.01}),
            "tensors.w.parts.values.dtype",
        ),
    ],
)
def test_check_layout_names_invalid_field(tensor: WireTensor, field: str) -> None:
    with pytest.raises(CodecError) as caught:
        wire_tensors.check_layout(tensor, name="w")

    assert caught.value.field == field
    assert repr(field) in str(caught.value)
