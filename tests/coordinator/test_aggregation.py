"""FedAvg maths (WeightedSum and apply_mean_delta) against an independent float64 numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coordinator.aggregation import WeightedSum, ZeroWeightError, apply_mean_delta


def _template(**tensors: torch.Tensor) -> dict[str, torch.Tensor]:
    return dict(tensors)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float_mean_matches_numpy_average(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shapes = {"conv.weight": (4, 3, 3, 3), "fc.weight": (10, 64), "fc.bias": (10,), "scale": ()}
    template = {name: torch.zeros(shape) for name, shape in shapes.items()}
    workers = int(rng.integers(2, 9))
    weights = rng.integers(1, 5000, size=workers).astype(np.float64)
    updates = [{name: rng.normal(scale=0.1, size=shape).astype(np.float32) for name, shape in shapes.items()} for _ in range(workers)]

    total = WeightedSum(template)
    for update, weight in zip(updates, weights):
        total.add(update, float(weight))
    mean = total.mean()

    assert total.count == workers
    assert total.total_weight == pytest.approx(weights.sum())
    for name in shapes:
        stacked = np.stack([update[name].astype(np.float64) for update in updates])
        expected = np.average(stacked, axis=0, weights=weights)
        assert mean[name].dtype == torch.float32
        assert mean[name].shape == torch.Size(shapes[name])
        np.testing.assert_allclose(mean[name].numpy(), expected, rtol=1e-5, atol=1e-7)


def test_apply_mean_delta_matches_reference() -> None:
    rng = np.random.default_rng(3)
    global_state = {"w": torch.from_numpy(rng.normal(size=(5, 4)).astype(np.float32))}
    deltas = [rng.normal(size=(5, 4)).astype(np.float32) for _ in range(3)]
    weights = np.array([10.0, 30.0, 60.0])

    total = WeightedSum(global_state)
    for delta, weight in zip(deltas, weights):
        total.add({"w": delta}, float(weight))
    new_state = apply_mean_delta(global_state, total.mean(), learning_rate=0.5)

    expected = global_state["w"].numpy().astype(np.float64) + 0.5 * np.average(np.stack(deltas), axis=0, weights=weights)
    np.testing.assert_allclose(new_state["w"].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert new_state["w"].dtype == torch.float32


def test_apply_mean_delta_keeps_float64_precision() -> None:
    value = torch.tensor([1.0 + 2.0**-40, -3.0 + 2.0**-45], dtype=torch.float64)
    mean = {"w": torch.zeros(2, dtype=torch.float32)}

    new_state = apply_mean_delta({"w": value}, mean)

    assert new_state["w"].dtype == torch.float64
    assert torch.equal(new_state["w"], value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_apply_mean_delta_keeps_half_dtypes(dtype: torch.dtype) -> None:
    value = torch.tensor([1.0, -2.0, 0.5], dtype=dtype)
    mean = {"w": torch.tensor([0.25, 0.5, -0.25])}

    new_state = apply_mean_delta({"w": value}, mean)

    assert new_state["w"].dtype == dtype
    assert torch.equal(new_state["w"], torch.tensor([1.25, -1.5, 0.25], dtype=dtype))


def test_apply_mean_delta_copies_tensors_without_mean() -> None:
    global_state = {"shared": torch.ones(2), "personal": torch.full((2,), 7.0)}

    new_state = apply_mean_delta(global_state, {"shared": torch.ones(2)})

    assert torch.equal(new_state["personal"], global_state["personal"])
    assert new_state["personal"].data_ptr() != global_state["personal"].data_ptr()
    assert torch.equal(new_state["shared"], torch.full((2,), 2.0))


@pytest.mark.parametrize(
    ("values", "weights", "expected"),
    [
        ([1, 2], [1, 1], 2),  # 1.5 rounds half to even: 2
        ([2, 3], [1, 1], 2),  # 2.5 rounds half to even: 2
        ([3, 4], [1, 1], 4),  # 3.5 rounds half to even: 4
        ([10, 20], [3, 1], 12),  # 12.5 rounds half to even: 12
        ([100, 200, 400], [1, 1, 2], 275),
        ([-3, -4], [1, 1], -4),  # -3.5 rounds half to even: -4
    ],
)
def test_integer_mean_rounds_half_to_even(values: list[int], weights: list[float], expected: int) -> None:
    total = WeightedSum({"steps": torch.tensor(0, dtype=torch.int64)})
    for value, weight in zip(values, weights):
        total.add({"steps": np.array(value, dtype=np.int64)}, weight)

    mean = total.mean()["steps"]

    assert mean.dtype == torch.int64
    assert mean.item() == expected
    assert mean.item() == int(np.round(np.average(values, weights=weights)))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8])
def test_integer_buffers_keep_dtype(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(5)
    numpy_dtype = torch.empty((), dtype=dtype).numpy().dtype
    info = np.iinfo(numpy_dtype)
    values = [rng.integers(max(info.min, -100), min(info.max, 100), size=(3, 4)).astype(numpy_dtype) for _ in range(4)]
    weights = [5.0, 1.0, 2.0, 8.0]

    total = WeightedSum({"buffer": torch.zeros(3, 4, dtype=dtype)})
    for value, weight in zip(values, weights):
        total.add({"buffer": value}, weight)
    mean = total.mean()["buffer"]
    new_state = apply_mean_delta({"buffer": torch.zeros(3, 4, dtype=dtype)}, {"buffer": mean})

    expected = np.round(np.average(np.stack(values).astype(np.float64), axis=0, weights=weights)).astype(numpy_dtype)
    assert mean.dtype == dtype
    assert new_state["buffer"].dtype == dtype
    assert np.array_equal(new_state["buffer"].numpy(), expected)


def test_integer_buffer_takes_mean_value_not_delta() -> None:
    global_state = {"bn.num_batches_tracked": torch.tensor(100, dtype=torch.int64)}
    total = WeightedSum(global_state)
    total.add({"bn.num_batches_tracked": np.array(110, dtype=np.int64)}, 1.0)
    total.add({"bn.num_batches_tracked": np.array(130, dtype=np.int64)}, 1.0)

    new_state = apply_mean_delta(global_state, total.mean())

    assert new_state["bn.num_batches_tracked"].item() == 120


def test_bool_mean_is_weighted_majority() -> None:
    total = WeightedSum({"mask": torch.zeros(4, dtype=torch.bool)})
    total.add({"mask": np.array([True, True, False, True])}, 3.0)
    total.add({"mask": np.array([False, True, True, False])}, 2.0)
    total.add({"mask": np.array([False, False, True, True])}, 1.0)

    mean = total.mean()["mask"]

    # The weighted share of True per entry is 3/6, 5/6, 3/6 and 4/6. Exactly one half is a tie and stays False.
    assert mean.dtype == torch.bool
    assert mean.tolist() == [False, True, False, True]


def test_zero_sample_worker_changes_nothing() -> None:
    rng = np.random.default_rng(9)
    template = {"w": torch.zeros(6), "steps": torch.tensor(0, dtype=torch.int64)}
    first: dict[str, np.ndarray] = {"w": rng.normal(size=6).astype(np.float32), "steps": np.array(4, dtype=np.int64)}
    second: dict[str, np.ndarray] = {"w": rng.normal(size=6).astype(np.float32), "steps": np.array(8, dtype=np.int64)}
    empty_worker: dict[str, np.ndarray] = {"w": np.full(6, np.nan, dtype=np.float32), "steps": np.array(10**6, dtype=np.int64)}

    without = WeightedSum(template)
    without.add(first, 30.0)
    without.add(second, 10.0)
    with_empty = WeightedSum(template)
    with_empty.add(first, 30.0)
    with_empty.add(empty_worker, 0.0)
    with_empty.add(second, 10.0)

    expected = without.mean()
    mean = with_empty.mean()
    assert with_empty.count == 3
    assert with_empty.total_weight == 40.0
    assert not torch.isnan(mean["w"]).any()
    assert torch.equal(mean["w"], expected["w"])
    assert torch.equal(mean["steps"], expected["steps"])


def test_all_zero_weights_raise() -> None:
    global_state = {"w": torch.ones(3), "steps": torch.tensor(2, dtype=torch.int64)}
    total = WeightedSum(global_state)
    total.add({"w": np.ones(3, np.float32), "steps": np.array(5)}, 0.0)
    total.add({"w": np.ones(3, np.float32), "steps": np.array(6)}, 0.0)

    with pytest.raises(ZeroWeightError, match="all 2 updates had zero weight"):
        total.mean()

    assert torch.equal(global_state["w"], torch.ones(3))


def test_empty_sum_raises() -> None:
    with pytest.raises(ZeroWeightError):
        WeightedSum({"w": torch.zeros(2)}).mean()


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf")])
def test_invalid_weight_rejected(weight: float) -> None:
    total = WeightedSum({"w": torch.zeros(2)})

    with pytest.raises(ValueError, match="finite number >= 0"):
        total.add({"w": np.ones(2, np.float32)}, weight)

    assert total.count == 0


def test_update_missing_tensor_rejected() -> None:
    total = WeightedSum({"w": torch.zeros(2), "b": torch.zeros(1)})

    with pytest.raises(KeyError, match="'b'"):
        total.add({"w": np.ones(2, np.float32)}, 1.0)


def test_update_of_wrong_shape_rejected() -> None:
    total = WeightedSum({"w": torch.zeros(2, 3)})

    with pytest.raises(ValueError, match=r"must have shape \(2, 3\), but got \(3, 2\)"):
        total.add({"w": np.ones((3, 2), np.float32)}, 1.0)

    assert total.count == 0


def test_read_only_update_arrays_accepted() -> None:
    body = np.arange(4, dtype=np.float32).tobytes()
    read_only = np.frombuffer(body, dtype=np.float32)
    total = WeightedSum({"w": torch.zeros(4)})

    total.add({"w": read_only}, 2.0)

    assert torch.equal(total.mean()["w"], torch.arange(4, dtype=torch.float32))
