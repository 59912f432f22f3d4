"""Checks that split incoming updates into valid ones and rejected ones before any maths.

An update is valid for a round when it belongs to the run, the round and the model
version, carries exactly the expected tensors with the expected shapes, decodes
with its declared codec, and holds only finite values. Every rejection names its
reason, which the coordinator counts and writes into the dead-letter header.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedmq.errors import ConfigError, MessageError
from schemas import tensors as wire_tensors
from schemas.codecs import all_finite
from schemas.messages import Update


class RejectedUpdate(Exception):
    """An update that must not be aggregated; ``reason`` is a short category, ``detail`` the specifics."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True)
class ExpectedTensor:
    shape: tuple[int, ...]
    dtype: str

    @property
    def is_floating(self) -> bool:
        return self.dtype in wire_tensors.FLOAT_DTYPES


def expected_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, ExpectedTensor]:
    return {name: ExpectedTensor(tuple(tensor.shape), wire_tensors.wire_dtype(tensor)) for name, tensor in state.items()}


def decode_update(update: Update, expected: Mapping[str, ExpectedTensor]) -> dict[str, np.ndarray]:
    """Decode an update's tensors, checking names, shapes, codecs and finiteness.

    Returns float32 deltas for floating tensors and values of the tensor's dtype for
    integer and bool tensors. Raises RejectedUpdate.
    """
    names = set(update.deltas)
    missing = sorted(set(expected) - names)
    extra = sorted(names - set(expected))
    if missing:
        raise RejectedUpdate("missing_tensors", f"update lacks tensors {missing[:5]}")
    if extra:
        raise RejectedUpdate("unexpected_tensors", f"update carries unknown tensors {extra[:5]}")

    decoded: dict[str, np.ndarray] = {}
    for name, spec in expected.items():
        tensor = update.deltas[name]
        if tuple(tensor.shape) != spec.shape:
            raise RejectedUpdate("wrong_shape", f"tensor {name!r} has shape {list(tensor.shape)}, expected {list(spec.shape)}")
        if not spec.is_floating and (tensor.codec != wire_tensors.RAW or tensor.dtype != spec.dtype):
            raise RejectedUpdate(
                "wrong_dtype",
                f"tensor {name!r} must travel exactly as {spec.dtype} (codec raw), but came as {tensor.dtype} with codec {tensor.codec}",
            )
        if spec.is_floating and tensor.dtype not in wire_tensors.FLOAT_DTYPES:
            raise RejectedUpdate("wrong_dtype", f"tensor {name!r} must be floating, but came as {tensor.dtype}")
        try:
            values = wire_tensors.decode(tensor, name=name)
        except MessageError as exc:
            raise RejectedUpdate("invalid_codec", str(exc)) from exc
        # The update codecs reject NaN and infinity while decoding (as invalid_codec), and
        # their float32 output is finite by construction, so only raw tensors need the check.
        if spec.is_floating and tensor.codec == wire_tensors.RAW:
            # float64 values beyond the float32 range become infinite here and are rejected below.
            with np.errstate(over="ignore"):
                values = wire_tensors.as_float32(values, tensor.dtype)
            if not all_finite(values):
                raise RejectedUpdate("non_finite", f"tensor {name!r} contains NaN or Inf, or values beyond the float32 range")
        decoded[name] = values
    return decoded


def update_norm(decoded: Mapping[str, np.ndarray], expected: Mapping[str, ExpectedTensor]) -> float:
    """Return the L2 norm of an update's floating deltas, summed in float64 over float32 slices."""
    total = 0.0
    for name, spec in expected.items():
        if spec.is_floating:
            values = decoded[name].reshape(-1)
            # float32 dot products over slices of 16K values, summed in float64: one pass
            # without model-sized copies. A slice whose squares overflow float32 is redone
            # in float64.
            for start in range(0, values.size, _NORM_CHUNK):
                chunk = values[start : start + _NORM_CHUNK]
                with np.errstate(over="ignore"):
                    square_sum = float(np.dot(chunk, chunk))
                if not math.isfinite(square_sum):
                    wide = chunk.astype(np.float64)
                    square_sum = float(np.dot(wide, wide))
                total += square_sum
    return math.sqrt(total)


_NORM_CHUNK = 1 << 14


class NormGate:
    """Rejects updates whose norm is far beyond the others in the round.

    An update is rejected when its norm exceeds ``max_norm`` (when set), or when it
    exceeds ``factor`` times the median of the norms accepted so far in the round.
    Until the round has ``min_history`` norms, the median of ``reference_norms``
    (the previous round's accepted norms) is used instead, so an outlier that
    arrives first in a round is caught too.

    NOTE: in the first round of a run there is no reference, so the first
    ``min_history`` updates pass unless ``max_norm`` is set.
    """

    def __init__(
        self,
        *,
        factor: float = 50.0,
        max_norm: float | None = None,
        min_history: int = 2,
        reference_norms: Sequence[float] = (),
    ) -> None:
        if not factor > 1:
            raise ConfigError(f"factor must be > 1, but got {factor!r}")
        if max_norm is not None and not max_norm > 0:
            raise ConfigError(f"max_norm must be > 0 or None, but got {max_norm!r}")
        if isinstance(min_history, bool) or not isinstance(min_history, int) or min_history < 1:
            raise ConfigError(f"min_history must be an int >= 1, but got {min_history!r}")
        self.factor = factor
        self.max_norm = max_norm
        self.min_history = min_history
        self.reference_norms = [float(norm) for norm in reference_norms if math.isfinite(norm)]
        self.norms: list[float] = []

    def check(self, norm: float) -> None:
        if self.max_norm is not None and norm > self.max_norm:
            raise RejectedUpdate("norm_too_large", f"update norm {norm:.4g} exceeds the maximum {self.max_norm:.4g}")
        if len(self.norms) >= self.min_history:
            history, source = self.norms, "this round's"
        else:
            history, source = self.reference_norms, "the previous round's"
        if len(history) >= self.min_history:
            median = float(np.median(history))
            if median > 0 and norm > self.factor * median:
                raise RejectedUpdate(
                    "norm_outlier",
                    f"update norm {norm:.4g} exceeds {self.factor:g} times the median {median:.4g} of {source} {len(history)} accepted updates",
                )

    def record(self, norm: float) -> None:
        self.norms.append(norm)


def decode_aux(update: Update) -> dict[str, np.ndarray]:
    """Decode an update's strategy tensors, rejecting any that fail to decode or hold NaN or Inf."""
    decoded: dict[str, np.ndarray] = {}
    for name, tensor in update.aux.items():
        try:
            values = wire_tensors.decode(tensor, name=f"aux/{name}")
        except MessageError as exc:
            raise RejectedUpdate("invalid_codec", str(exc)) from exc
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise RejectedUpdate("non_finite", f"strategy tensor {name!r} contains NaN or Inf")
        decoded[name] = values
    return decoded
