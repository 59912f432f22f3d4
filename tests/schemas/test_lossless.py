"""Tests of the lossless stage: bounded zstd decompression and the compressibility probe."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zstandard
from sklearn.datasets import load_digits

from fedmq.errors import CodecError, ConfigError
from schemas.codecs import CodecSpec, encode
from schemas.lossless import PROBE_BYTES, compress, decompress, pays_off

RANDOM_BYTES = np.random.default_rng(0).integers(0, 256, size=100_000, dtype=np.uint8).tobytes()
TEXT_BYTES = b"federated averaging over rabbitmq " * 3000


def _zstd_saving(data: bytes) -> float:
    return 1.0 - len(compress(data, "zstd", level=1)) / len(data)


# Round trips


@pytest.mark.parametrize("method", ["none", "zstd"])
@pytest.mark.parametrize("payload", [b"", b"x", RANDOM_BYTES, TEXT_BYTES], ids=["empty", "one", "random", "text"])
def test_round_trip(method: str, payload: bytes) -> None:
    compressed = compress(memoryview(payload), method)

    restored = decompress(compressed, method, expected_size=len(payload), max_size=len(payload))

    assert bytes(restored) == payload


def test_zstd_shrinks_repetitive_text() -> None:
    assert len(compress(TEXT_BYTES, "zstd")) < len(TEXT_BYTES) // 20


def test_none_returns_input_without_copy() -> None:
    payload = memoryview(TEXT_BYTES)

    assert decompress(payload, "none", expected_size=len(TEXT_BYTES), max_size=len(TEXT_BYTES)) is payload


# Decompression limits


def test_decompress_checks_size_first() -> None:
    # The payload is not a zstd frame at all, so only the size check can produce this message.
    with pytest.raises(CodecError, match="at most 1000 bytes") as caught:
        decompress(b"not zstd", "zstd", expected_size=1001, max_size=1000)

    assert caught.value.field == "lossless"


@pytest.mark.parametrize("method", ["none", "zstd"])
def test_decompress_rejects_wrong_size(method: str) -> None:
    compressed = compress(TEXT_BYTES, method)

    for declared in (len(TEXT_BYTES) - 1, len(TEXT_BYTES) + 1):
        with pytest.raises(CodecError) as caught:
            decompress(compressed, method, expected_size=declared, max_size=10 * len(TEXT_BYTES))
        assert caught.value.field == "lossless"
        assert str(declared) in str(caught.value)


def test_decompress_frame_without_content_size() -> None:
    compressed = zstandard.ZstdCompressor(write_content_size=False).compress(TEXT_BYTES)
    size = len(TEXT_BYTES)

    assert decompress(compressed, "zstd", expected_size=size, max_size=size) == TEXT_BYTES
    for declared in (size - 1, size + 1):
        with pytest.raises(CodecError) as caught:
            decompress(compressed, "zstd", expected_size=declared, max_size=2 * size)
        assert caught.value.field == "lossless"


def test_decompress_bounds_unsized_bomb() -> None:
    # 64 MiB of zeros compress to a few KiB. Without a recorded size, the output must stay bounded.
    bomb = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(64 * 1024 * 1024))

    with pytest.raises(CodecError) as caught:
        decompress(bomb, "zstd", expected_size=4096, max_size=1 << 20)

    assert caught.value.field == "lossless"


@pytest.mark.parametrize(
    "payload",
    [b"", b"garbage that is no zstd frame", compress(TEXT_BYTES, "zstd")[:-5], compress(TEXT_BYTES, "zstd") + b"\x00"],
    ids=["empty", "garbage", "truncated", "trailing"],
)
def test_decompress_rejects_corrupt_frames(payload: bytes) -> None:
    with pytest.raises(CodecError) as caught:
        decompress(payload, "zstd", expected_size=len(TEXT_BYTES), max_size=len(TEXT_BYTES))

    assert caught.value.field == "lossless"


@pytest.mark.parametrize("declared", [-1, 1.5, True, "10"])
def test_decompress_rejects_invalid_declared_size(declared: object) -> None:
    with pytest.raises(CodecError) as caught:
        decompress(b"", "none", expected_size=declared, max_size=100)  # type: ignore[arg-type]

    assert caught.value.field == "lossless"


def test_unknown_method_rejected() -> None:
    with pytest.raises(ConfigError, match="none, zstd"):
        compress(b"x", "gzip")
    with pytest.raises(CodecError, match="none, zstd") as caught:
        decompress(b"x", "gzip", expected_size=1, max_size=1)
    assert caught.value.field == "lossless"


@pytest.mark.parametrize("level", [0, 23, 1.0, True])
def test_compress_rejects_invalid_level(level: object) -> None:
    with pytest.raises(ConfigError, match="level"):
        compress(b"x", "zstd", level=level)  # type: ignore[arg-type]


# Compressibility probe


def test_pays_off_for_repetitive_data() -> None:
    assert pays_off(TEXT_BYTES)
    assert pays_off(memoryview(np.zeros(1000, dtype=np.float32)))


def test_pays_off_not_for_random_data() -> None:
    assert not pays_off(RANDOM_BYTES)
    assert not pays_off(b"")


def test_pays_off_reads_only_probe_prefix() -> None:
    noise = np.random.default_rng(1).integers(0, 256, size=PROBE_BYTES, dtype=np.uint8).tobytes()

    assert not pays_off(noise + bytes(10 * PROBE_BYTES))


def test_pays_off_threshold() -> None:
    saving = _zstd_saving(TEXT_BYTES)

    assert pays_off(TEXT_BYTES, min_saving=saving - 0.01)
    assert not pays_off(TEXT_BYTES, min_saving=min(1.0, saving + 0.01))


@pytest.mark.parametrize("min_saving", [-0.1, 1.5, float("nan")])
def test_pays_off_rejects_invalid_min_saving(min_saving: float) -> None:
    with pytest.raises(ConfigError, match="min_saving"):
        pays_off(b"x", min_saving=min_saving)


# Measured savings by payload kind


def _digits_mlp_delta() -> np.ndarray:
    """Return the flat float32 update of one local epoch of a 64-256-10 MLP trained on sklearn digits."""
    torch.manual_seed(0)
    features, labels = load_digits(return_X_y=True)
    inputs = torch.tensor(features / 16.0, dtype=torch.float32)
    targets = torch.tensor(labels)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def train_epoch(order: torch.Tensor) -> None:
        for start in range(0, len(order), 32):
            batch = order[start : start + 32]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(inputs[batch]), targets[batch]).backward()
            optimizer.step()

    # Five epochs of central training, then one local epoch on a fifth of the data.
    order = torch.randperm(len(inputs))
    for _ in range(5):
        train_epoch(order)
    before = torch.cat([parameter.detach().flatten().clone() for parameter in model.parameters()])
    train_epoch(order[:360])
    after = torch.cat([parameter.detach().flatten() for parameter in model.parameters()])
    return (after - before).numpy()


def test_zstd_savings_by_payload_kind() -> None:
    rng = np.random.default_rng(0)
    digits_delta = _digits_mlp_delta()
    gaussian = rng.standard_normal(1_000_000).astype(np.float32)
    indices = encode(gaussian, CodecSpec("topk", topk_fraction=0.01), rng=rng).arrays["indices"]
    small_indices = encode(gaussian[:100_000], CodecSpec("topk", topk_fraction=0.01), rng=rng).arrays["indices"]
    gaps = np.diff(indices, prepend=np.uint32(0))

    digits_saving = _zstd_saving(digits_delta.tobytes())
    digits_nonzero_saving = _zstd_saving(digits_delta[digits_delta != 0].tobytes())
    gaussian_saving = _zstd_saving(gaussian.tobytes())
    index_saving = _zstd_saving(indices.tobytes())
    small_index_saving = _zstd_saving(small_indices.tobytes())
    gap_saving = _zstd_saving(gaps.tobytes())

    # Figures recorded in the docstring of schemas.lossless, with slack for other zstd versions.
    assert 0.20 < digits_saving < 0.35
    assert 0.12 < np.mean(digits_delta == 0) < 0.16
    assert digits_nonzero_saving < 0.25
    assert gaussian_saving < 0.12
    assert 0.15 < index_saving < 0.30
    assert 0.25 < small_index_saving < 0.40
    assert gap_saving > 0.55
    assert index_saving > gaussian_saving
