"""The downlink: what the coordinator sends so that every worker holds the same global model.

A worker that holds the previous model version receives the new one as a delta
against it (``RoundStart.weights_kind == "delta"``), encoded with the downlink codec.
A worker that holds another version, or none, receives the full model.

When the downlink codec is lossy, the model a worker rebuilds from a delta differs a
little from the coordinator's global model. The coordinator therefore keeps the
*worker view*: the model that workers hold after applying the deltas sent so far.
Each new delta is ``global - view``, and the view then advances by the decoded delta,
exactly as the workers compute it with ``apply_model_delta``. The rounding error of
one delta is carried into the next one instead of adding up, and every worker, fed
deltas or full models, holds the view bit for bit. Full models are the view too.

Floating tensors travel as deltas. Integer and bool tensors travel as new values, as
in updates.

Threading rule: a Downlink belongs to the coordinator's thread.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from fedmq.errors import CodecError, ConfigError, MessageError
from schemas import codecs
from schemas import tensors as wire_tensors
from schemas.wire import WireTensor

logger = logging.getLogger(__name__)

FULL = "full"
"""Downlink codec name that turns deltas off: every round start carries the full model."""

DEFAULT_DOWNLINK_CODEC = "float16"


def parse_downlink_codec(text: str) -> codecs.CodecSpec | None:
    """Parse a downlink codec: ``full`` (returns None) or a codec as CodecSpec.parse reads it.

    Raises ConfigError for anything else.
    """
    if text.strip() == FULL:
        return None
    try:
        return codecs.CodecSpec.parse(text)
    except ConfigError as exc:
        raise ConfigError(f"invalid downlink codec {text!r}: expected {FULL!r} or an update codec ({exc})") from exc


def encode_model_delta(
    target: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    spec: codecs.CodecSpec,
    *,
    rng: np.random.Generator,
) -> dict[str, WireTensor]:
    """Encode ``target - base`` for floating tensors with ``spec``, and the new values of the others.

    Both state dicts must have the same names, shapes and dtypes.
    """
    encoded: dict[str, WireTensor] = {}
    for name, value in target.items():
        dtype = wire_tensors.wire_dtype(value)
        if not value.is_floating_point():
            encoded[name] = wire_tensors.encode_raw(wire_tensors.to_numpy(value), dtype)
            continue
        delta = torch.sub(value.detach().to(torch.float32), base[name].detach().to(torch.float32)).numpy()
        tensor = codecs.encode(delta, spec, rng=rng, dtype=dtype)
        encoded[name] = WireTensor(
            codec=tensor.codec, shape=tuple(tensor.shape), dtype=dtype, arrays=tensor.arrays, params=dict(tensor.params)
        )
    return encoded


def apply_model_delta(base: Mapping[str, torch.Tensor], delta: Mapping[str, WireTensor]) -> dict[str, torch.Tensor]:
    """Return the model that ``delta`` (as encode_model_delta builds it) makes of ``base``.

    Floating tensors become ``base + decoded delta``, added in float32 and rounded once
    to the tensor's dtype. Others take the values that travelled. The coordinator and
    the workers both call this, so they compute the same bits. Raises MessageError when
    the names, shapes or dtypes do not match ``base``.
    """
    missing = sorted(set(base) - set(delta))
    extra = sorted(set(delta) - set(base))
    if missing or extra:
        raise MessageError("round_start.weights", f"the tensors of the held model {sorted(base)[:5]}", f"missing {missing[:5]}, unexpected {extra[:5]}")

    result: dict[str, torch.Tensor] = {}
    for name, held in base.items():
        tensor = delta[name]
        if tuple(tensor.shape) != tuple(held.shape):
            raise MessageError(f"round_start.weights.{name}.shape", str(list(held.shape)), list(tensor.shape))
        dtype = wire_tensors.wire_dtype(held)
        if tensor.dtype != dtype:
            raise MessageError(f"round_start.weights.{name}.dtype", dtype, tensor.dtype)
        values = wire_tensors.decode(tensor, name=name)
        if not held.is_floating_point():
            result[name] = wire_tensors.to_torch(values, dtype)
            continue
        if tensor.codec == wire_tensors.RAW:
            values = wire_tensors.as_float32(values, dtype)
        step = wire_tensors.read_only_torch(np.ascontiguousarray(values)).reshape(held.shape)
        result[name] = torch.add(held.to(torch.float32), step).to(held.dtype)
    return result


class Downlink:
    """The worker view of the global model, and the round-start weights that lead to it.

    ``advance`` moves the view to a new model version once per version. After it,
    ``delta_weights`` returns the encoded delta from the previous version (None when
    there is none: the first version, after a restart, or with the ``full`` codec) and
    ``full_weights`` the view itself. ``held_version`` records, per worker, which
    version the coordinator believes the worker holds, from its Join messages and from
    what it was sent.
    """

    def __init__(self, *, codec: codecs.CodecSpec | None, seed: int = 0) -> None:
        self.codec = codec
        self.version = -1
        self.base_version = -1
        self._view: dict[str, torch.Tensor] | None = None
        self._delta: dict[str, WireTensor] | None = None
        self._full: dict[str, WireTensor] | None = None
        self._held: dict[str, int] = {}
        self._rng = np.random.default_rng(seed)

    @property
    def view(self) -> dict[str, torch.Tensor]:
        """The model that workers hold at ``version``; raises RuntimeError before the first advance()."""
        if self._view is None:
            raise RuntimeError("the downlink has no model yet; call advance() first")
        return self._view

    def advance(self, global_state: Mapping[str, torch.Tensor], version: int) -> None:
        """Make the view of model ``version`` from ``global_state``; repeating a version changes nothing."""
        if version == self.version and self._view is not None:
            return
        if self._view is None or self.codec is None or version != self.version + 1:
            # No view of the previous version: this version goes out as a full model.
            self._view = {name: tensor.detach().clone() for name, tensor in global_state.items()}
            self._delta = None
            self.base_version = -1
        else:
            delta = encode_model_delta(global_state, self._view, self.codec, rng=self._rng)
            try:
                self._view = apply_model_delta(self._view, delta)
            except (CodecError, MessageError) as exc:
                raise RuntimeError(f"the downlink delta for model version {version} does not decode: {exc}") from exc
            self._delta = delta
            self.base_version = self.version
        self.version = version
        self._full = None

    def delta_weights(self) -> dict[str, WireTensor] | None:
        """Return the delta from ``base_version`` to ``version``, or None when this version has none."""
        return self._delta

    def full_weights(self) -> dict[str, WireTensor]:
        """Return the view, encoded exactly; the encoding is kept until the next version."""
        if self._full is None:
            self._full = wire_tensors.encode_state(self.view)
        return self._full

    def held_version(self, worker_id: str) -> int:
        """Return the version a worker holds as far as the coordinator knows, or -1."""
        return self._held.get(worker_id, -1)

    def note_held(self, worker_id: str, version: int) -> None:
        self._held[worker_id] = version

    def forget(self, worker_id: str) -> None:
        self._held.pop(worker_id, None)

    def needs_full(self, worker_id: str) -> bool:
        """Return whether a worker must get the full model of ``version`` rather than the delta."""
        if self._delta is None:
            return True
        return self.held_version(worker_id) not in (self.base_version, self.version)

    def note_sent(self, worker_ids: Iterable[str]) -> None:
        """Record that these workers were sent ``version``, as a delta they can apply or in full."""
        for worker_id in worker_ids:
            self._held[worker_id] = self.version
