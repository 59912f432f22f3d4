from __future__ import annotations

import numpy as np
import pytest

from fedmq.errors import ConfigError
from fedmq.tasks import partition
from fedmq.tasks.base import PartitionSpec
from fedmq.tasks.partition import (
    local_train_test_split,
    partition_indices,
    stratified_holdout,
    worker_partition,
)

SCHEMES = ["iid", "dirichlet", "shards"]


def balanced_labels(num_classes: int = 10, per_class: int = 100) -> np.ndarray:
    labels = np.repeat(np.arange(num_classes), per_class)
    return np.random.default_rng(123).permutation(labels)


def mean_label_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    entropies = []
    for part in parts:
        counts = np.bincount(labels[part], minlength=10)
        shares = counts[counts > 0] / counts.sum()
        entropies.append(float(-(shares * np.log(shares)).sum()))
    return float(np.mean(entropies))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("num_workers", [1, 7, 10, 50])
def test_partition_covers_each_index_once(scheme: str, num_workers: int) -> None:
    labels = balanced_labels()

    parts = partition_indices(labels, num_workers, PartitionSpec(scheme=scheme, seed=3))

    assert len(parts) == num_workers
    joined = np.concatenate(parts)
    assert len(joined) == len(labels)
    assert np.array_equal(np.sort(joined), np.arange(len(labels)))
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_partition_deterministic_for_seed(scheme: str) -> None:
    labels = balanced_labels()

    first = partition_indices(labels, 10, PartitionSpec(scheme=scheme, seed=7))
    second = partition_indices(labels, 10, PartitionSpec(scheme=scheme, seed=7))
    other = partition_indices(labels, 10, PartitionSpec(scheme=scheme, seed=8))

    for a, b in zip(first, second, strict=True):
        assert np.array_equal(a, b)
    differs = any(len(a) != len(c) or not np.array_equal(a, c) for a, c in zip(first, other, strict=True))
    assert differs


def test_iid_sizes_equal() -> None:
    parts = partition_indices(balanced_labels(), 7, PartitionSpec(scheme="iid"))

    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_small_alpha_skewed() -> None:
    labels = balanced_labels()
    iid = partition_indices(labels, 10, PartitionSpec(scheme="iid"))
    skewed = partition_indices(labels, 10, PartitionSpec(scheme="dirichlet", alpha=0.1))
    mild = partition_indices(labels, 10, PartitionSpec(scheme="dirichlet", alpha=100.0))

    iid_entropy = mean_label_entropy(labels, iid)
    skewed_entropy = mean_label_entropy(labels, skewed)
    mild_entropy = mean_label_entropy(labels, mild)

    assert iid_entropy > 0.95 * np.log(10)
    assert skewed_entropy < 0.6 * iid_entropy
    assert mild_entropy > 0.95 * iid_entropy


def test_dirichlet_guarantees_minimum_size() -> None:
    labels = balanced_labels()
    spec = PartitionSpec(scheme="dirichlet", alpha=0.05, min_samples_per_worker=30)

    parts = partition_indices(labels, 10, spec)

    assert min(len(part) for part in parts) >= 30


def test_dirichlet_fallback_tops_up_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    labels = balanced_labels()
    spec = PartitionSpec(scheme="dirichlet", alpha=0.01, min_samples_per_worker=20, seed=1)
    top_up_calls = []
    top_up = partition._top_up_partitions

    def spy(*args: object) -> list[np.ndarray]:
        top_up_calls.append(args)
        return top_up(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(partition, "_top_up_partitions", spy)
    parts = partition_indices(labels, 50, spec)

    assert len(top_up_calls) == 1
    assert min(len(part) for part in parts) == 20
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    assert mean_label_entropy(labels, parts) < 0.5 * np.log(10)


def test_dirichlet_minimum_capped_at_equal_share() -> None:
    labels = balanced_labels(num_classes=10, per_class=3)
    spec = PartitionSpec(scheme="dirichlet", alpha=0.1, min_samples_per_worker=10)

    parts = partition_indices(labels, 10, spec)

    assert [len(part) for part in parts] == [3] * 10


def test_shards_give_few_labels_per_worker() -> None:
    labels = balanced_labels()

    parts = partition_indices(labels, 10, PartitionSpec(scheme="shards", shards_per_worker=2))

    label_counts = [len(np.unique(labels[part])) for part in parts]
    assert all(1 <= count <= 2 for count in label_counts)
    assert np.mean(label_counts) >= 1.5
    assert all(len(part) == 100 for part in parts)


def test_shards_uneven_labels_stay_bounded() -> None:
    labels = np.random.default_rng(0).integers(0, 10, size=997)

    parts = partition_indices(labels, 13, PartitionSpec(scheme="shards", shards_per_worker=3, seed=2))

    # A shard that crosses a label boundary adds one label, so a worker gets rows of at most 2 * 3 labels.
    label_counts = [len(np.unique(labels[part])) for part in parts]
    assert max(label_counts) <= 6
    assert np.mean(label_counts) <= 4.5


def test_shards_more_than_rows() -> None:
    labels = np.zeros(20, dtype=np.int64)
    spec = PartitionSpec(scheme="shards", shards_per_worker=3)

    with pytest.raises(ConfigError, match="needs at least num_workers \\* shards_per_worker = 30 rows, but got 20"):
        partition_indices(labels, 10, spec)


@pytest.mark.parametrize("num_workers", [0, -1, True, 2.0])
def test_invalid_num_workers(num_workers: object) -> None:
    with pytest.raises(ConfigError, match="num_workers must be an integer >= 1"):
        partition_indices(balanced_labels(), num_workers, PartitionSpec())  # type: ignore[arg-type]


def test_more_workers_than_samples() -> None:
    with pytest.raises(ConfigError, match="at most the number of samples to partition \\(5\\), but got 6"):
        partition_indices(np.arange(5), 6, PartitionSpec())


@pytest.mark.parametrize("labels", [np.zeros((4, 2), dtype=np.int64), np.zeros(8, dtype=np.float32)])
def test_invalid_labels(labels: np.ndarray) -> None:
    with pytest.raises(ConfigError, match="labels must be a 1-D integer array"):
        partition_indices(labels, 2, PartitionSpec())


def test_worker_partition_matches_full_split() -> None:
    labels = balanced_labels()
    spec = PartitionSpec(scheme="dirichlet", seed=4)
    parts = partition_indices(labels, 5, spec)

    for worker_index in range(5):
        assert np.array_equal(worker_partition(labels, worker_index, 5, spec), parts[worker_index])


@pytest.mark.parametrize("worker_index", [-1, 5, 100])
def test_worker_index_out_of_range(worker_index: int) -> None:
    expected = f"worker_index must be an integer in \\[0, 5\\) for 5 workers, but got {worker_index}"

    with pytest.raises(ConfigError, match=expected):
        worker_partition(balanced_labels(), worker_index, 5, PartitionSpec())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"scheme": "pathological"}, "PartitionSpec.scheme must be one of iid, dirichlet, shards, but got 'pathological'"),
        ({"alpha": 0.0}, "PartitionSpec.alpha must be a finite number > 0, but got 0.0"),
        ({"alpha": float("nan")}, "PartitionSpec.alpha must be a finite number > 0, but got nan"),
        ({"shards_per_worker": 0}, "PartitionSpec.shards_per_worker must be an integer >= 1, but got 0"),
        ({"seed": -1}, "PartitionSpec.seed must be an integer in [0, 2**64), but got -1"),
        ({"seed": 1.5}, "PartitionSpec.seed must be an integer in [0, 2**64), but got 1.5"),
        ({"min_samples_per_worker": 0}, "PartitionSpec.min_samples_per_worker must be an integer >= 1, but got 0"),
    ],
)
def test_partition_spec_validation(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        PartitionSpec(**options)  # type: ignore[arg-type]

    assert str(caught.value) == message


def test_stratified_holdout_keeps_class_shares() -> None:
    labels = np.repeat(np.arange(4), [100, 200, 300, 400])

    pool, holdout = stratified_holdout(labels, test_fraction=0.2, seed=0)

    assert len(holdout) == 200
    assert np.intersect1d(pool, holdout).size == 0
    assert np.array_equal(np.sort(np.concatenate([pool, holdout])), np.arange(len(labels)))
    assert np.bincount(labels[holdout]).tolist() == [20, 40, 60, 80]


def test_stratified_holdout_seeded() -> None:
    labels = balanced_labels()

    first = stratified_holdout(labels, test_fraction=0.2, seed=1)[1]
    second = stratified_holdout(labels, test_fraction=0.2, seed=1)[1]
    other = stratified_holdout(labels, test_fraction=0.2, seed=2)[1]

    assert np.array_equal(first, second)
    assert not np.array_equal(first, other)


def test_stratified_holdout_rejects_tiny_class() -> None:
    labels = np.array([0, 0, 0, 0, 1], dtype=np.int64)

    with pytest.raises(ConfigError, match="cannot hold out a stratified 20% of 5 rows"):
        stratified_holdout(labels, test_fraction=0.2, seed=0)


@pytest.mark.parametrize(
    ("num_samples", "expected_train", "expected_test"),
    [(0, 0, 0), (1, 1, 0), (2, 1, 1), (3, 2, 1), (10, 8, 2), (101, 81, 20)],
)
def test_local_split_sizes(num_samples: int, expected_train: int, expected_test: int) -> None:
    train, test = local_train_test_split(num_samples, test_fraction=0.2, seed=0, worker_index=0)

    assert len(train) == expected_train
    assert len(test) == expected_test
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(num_samples))


def test_local_split_depends_on_worker() -> None:
    first = local_train_test_split(50, test_fraction=0.2, seed=0, worker_index=0)[1]
    again = local_train_test_split(50, test_fraction=0.2, seed=0, worker_index=0)[1]
    other_worker = local_train_test_split(50, test_fraction=0.2, seed=0, worker_index=1)[1]

    assert np.array_equal(first, again)
    assert not np.array_equal(first, other_worker)
