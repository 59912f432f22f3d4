"""Sample-weighted federated averaging as a streaming sum.

The coordinator adds each accepted update into one preallocated accumulator per
tensor as it arrives, so its memory grows with the model, not with the number of
workers. Pure maths: no broker, no logging.

Floating tensors: the accumulator holds ``sum_i n_i * delta_i`` in float32, and the
mean delta is that sum divided by ``sum_i n_i``.

Integer and bool tensors (for example BatchNorm's ``num_batches_tracked``) are not
deltas: each worker sends its new value. The accumulator holds the weighted sum of
those values in float64, and the mean is rounded half to even and cast back to the
tensor's dtype. For bool tensors that means a weighted majority, where a tie keeps
``False``. NOTE: float64 holds integers exactly only up to 2**53 in magnitude, so
int64 values beyond that come back rounded.

A worker with ``num_samples == 0`` adds nothing. When every accepted update has zero
weight, ``mean`` raises ZeroWeightError and the caller keeps the global model.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from schemas.tensors import read_only_torch


class ZeroWeightError(ArithmeticError):
    """Every update in the sum had zero weight, so no mean exists."""


class WeightedSum:
    """Running sample-weighted sum of updates over a fixed set of tensors.

    ``template`` maps each tensor name to the global tensor it updates; its shape
    and dtype decide how updates to that name are summed.
    """

    def __init__(self, template: Mapping[str, torch.Tensor]) -> None:
        self._dtypes = {name: tensor.dtype for name, tensor in template.items()}
        self._sums: dict[str, torch.Tensor] = {}
        for name, tensor in template.items():
            sum_dtype = torch.float32 if tensor.is_floating_point() else torch.float64
            self._sums[name] = torch.zeros(tensor.shape, dtype=sum_dtype)
        self.total_weight = 0.0
        self.count = 0
        self._consumed = False

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._sums)

    def add(self, values: Mapping[str, np.ndarray], weight: float) -> None:
        """Add ``weight`` times each array; the arrays must match the template's names and shapes."""
        if self._consumed:
            raise RuntimeError("this sum was turned into its mean in place; start a new WeightedSum")
        if weight < 0 or not np.isfinite(weight):
            raise ValueError(f"weight must be a finite number >= 0, but got {weight}")
        missing = self.names.difference(values)
        if missing:
            raise KeyError(f"update lacks tensors {sorted(missing)}")
        for name, total in self._sums.items():
            if tuple(np.shape(values[name])) != tuple(total.shape):
                raise ValueError(
                    f"tensor {name!r} must have shape {tuple(total.shape)}, but got {tuple(np.shape(values[name]))}; "
                    "validate updates before adding them"
                )
        self.count += 1
        if weight == 0:
            return
        for name, total in self._sums.items():
            source = read_only_torch(np.asarray(values[name]))
            if source.dtype != total.dtype:
                source = source.to(total.dtype)
            # add_ with alpha is one fused multiply-add pass with no temporary.
            total.add_(source.reshape(total.shape), alpha=weight)
        self.total_weight += weight

    def mean(self, *, in_place: bool = False) -> dict[str, torch.Tensor]:
        """Return the weighted mean per tensor: float32 for floating tensors, the original dtype otherwise.

        With ``in_place`` the floating accumulators are divided where they are and
        returned, which saves one model-sized allocation, and the sum accepts no more
        calls afterwards.
        """
        if self._consumed:
            raise RuntimeError("this sum was turned into its mean in place; start a new WeightedSum")
        if self.total_weight <= 0:
            raise ZeroWeightError(f"all {self.count} updates had zero weight")
        self._consumed = in_place
        result = {}
        for name, total in self._sums.items():
            if in_place and total.dtype == torch.float32 and self._dtypes[name].is_floating_point:
                result[name] = total.div_(self.total_weight)
                continue
            mean = total / self.total_weight
            dtype = self._dtypes[name]
            if dtype == torch.bool:
                result[name] = mean > 0.5
            elif not torch.empty((), dtype=dtype).is_floating_point():
                result[name] = torch.round(mean).to(dtype)
            else:
                result[name] = mean.to(torch.float32)
        return result


def apply_mean_delta(global_state: Mapping[str, torch.Tensor], mean: Mapping[str, torch.Tensor], *, learning_rate: float = 1.0) -> dict[str, torch.Tensor]:
    """Return the new global state: floating tensors move by ``learning_rate`` times the mean delta, others take the mean value.

    Tensors absent from ``mean`` (for example personalized layers) are copied unchanged.
    """
    new_state = {}
    for name, tensor in global_state.items():
        if name not in mean:
            new_state[name] = tensor.clone()
        elif tensor.is_floating_point():
            # float64 tensors add in float64, so the global value keeps its precision;
            # float16 and bfloat16 ones add in float32 and round once.
            compute_dtype = torch.promote_types(tensor.dtype, torch.float32)
            # One fused multiply-add: no model-sized temporary for learning_rate * mean.
            updated = torch.add(tensor.to(compute_dtype), mean[name].to(compute_dtype), alpha=learning_rate)
            new_state[name] = updated.to(tensor.dtype)
        else:
            new_state[name] = mean[name].to(tensor.dtype).clone()
    return new_state
