"""Deterministic splits of a labelled dataset: held-out test set, worker partitions, local splits.

Every function is pure: the result depends only on its arguments, and the
randomness comes from a numpy generator seeded by them. Indices are int64 row
positions into the ``labels`` array that was passed in, sorted ascending.
"""

from __future__ import annotations

import numpy as np

from fedmq.errors import ConfigError
from fedmq.tasks.base import PartitionSpec

# The Dirichlet scheme redraws the class proportions up to this many times until every
# worker has its minimum number of samples, then moves samples to the workers still short.
MAX_DIRICHLET_DRAWS = 100


def partition_indices(labels: np.ndarray, num_workers: int, spec: PartitionSpec) -> list[np.ndarray]:
    """Split the rows of ``labels`` across ``num_workers`` workers by ``spec``.

    Returns one sorted index array per worker. Every row appears in exactly one of
    them, and the same labels, worker count and spec give the same partitions.

    - ``iid``: a random permutation cut into equal parts (sizes differ by at most one).
    - ``dirichlet``: for each class, the worker shares are drawn from
      Dir(alpha, ..., alpha) and the class's rows are cut by them. Each worker gets
      at least min(``spec.min_samples_per_worker``, N // num_workers) rows: the
      shares are redrawn up to ``MAX_DIRICHLET_DRAWS`` times, and if a worker is
      still short, randomly chosen rows move to it from the largest partitions.
    - ``shards``: rows sorted by label (in random order within a label) are cut
      into num_workers * ``spec.shards_per_worker`` contiguous shards, which are
      dealt out in random order, so each worker gets rows of about that many labels.

    Raises ConfigError when ``num_workers`` < 1, when there are fewer rows than
    workers (or than shards), or when ``labels`` is not a 1-D integer array.
    """
    labels = _validate_labels(labels)
    _validate_num_workers(num_workers, len(labels))
    rng = np.random.default_rng(spec.seed)

    if spec.scheme == "iid":
        parts = np.array_split(rng.permutation(len(labels)), num_workers)
    elif spec.scheme == "dirichlet":
        parts = _partition_dirichlet(labels, num_workers, spec, rng)
    else:
        parts = _partition_shards(labels, num_workers, spec.shards_per_worker, rng)
    return [np.sort(part).astype(np.int64) for part in parts]


def worker_partition(
    labels: np.ndarray, worker_index: int, num_workers: int, spec: PartitionSpec
) -> np.ndarray:
    """Return the sorted row indices of worker ``worker_index`` in ``partition_indices``.

    Raises ConfigError when ``worker_index`` is outside [0, num_workers).
    """
    _validate_num_workers(num_workers, len(labels))
    is_integer = isinstance(worker_index, int) and not isinstance(worker_index, bool)
    if not is_integer or not 0 <= worker_index < num_workers:
        raise ConfigError(
            f"worker_index must be an integer in [0, {num_workers}) for {num_workers} workers, "
            f"but got {worker_index!r}"
        )
    return partition_indices(labels, num_workers, spec)[worker_index]


def stratified_holdout(
    labels: np.ndarray, *, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split the rows into a pool and a held-out test set with the same class proportions.

    Returns ``(pool, holdout)``, sorted, disjoint, and covering every row. The
    holdout gets ``test_fraction`` of the rows, rounded up, as in
    ``sklearn.model_selection.train_test_split`` which does the split. ``seed``
    must be in [0, 2**32). Raises ConfigError when a class has too few rows to
    appear on both sides.
    """
    labels = _validate_labels(labels)
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), but got {test_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError(f"the held-out split seed must be an integer in [0, 2**32), but got {seed!r}")

    # scikit-learn takes over a second to import, so only the callers that split pay for it.
    from sklearn.model_selection import train_test_split

    try:
        pool, holdout = train_test_split(
            np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels
        )
    except ValueError as error:
        raise ConfigError(
            f"cannot hold out a stratified {test_fraction:.0%} of {len(labels)} rows: {error}"
        ) from error
    return np.sort(pool).astype(np.int64), np.sort(holdout).astype(np.int64)


def local_train_test_split(
    num_samples: int, *, test_fraction: float, seed: int, worker_index: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split positions 0..num_samples-1 of a worker's partition into local train and test sets.

    The split is random, seeded by ``seed`` and ``worker_index`` together, so
    workers that share a partition seed still split differently. The test set gets
    ``test_fraction`` of the samples, rounded, but at least one sample when there
    are two or more and ``test_fraction`` > 0. The train set always keeps at least
    one sample when ``num_samples`` >= 1. Returns ``(train, test)``, sorted.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in [0, 1), but got {test_fraction!r}")
    if num_samples < 0:
        raise ConfigError(f"num_samples must be >= 0, but got {num_samples!r}")

    num_test = int(round(num_samples * test_fraction))
    if test_fraction > 0.0 and num_samples >= 2:
        num_test = max(num_test, 1)
    num_test = min(num_test, max(num_samples - 1, 0))

    rng = np.random.default_rng([seed, worker_index])
    order = rng.permutation(num_samples)
    test = np.sort(order[:num_test]).astype(np.int64)
    train = np.sort(order[num_test:]).astype(np.int64)
    return train, test


def _partition_dirichlet(
    labels: np.ndarray, num_workers: int, spec: PartitionSpec, rng: np.random.Generator
) -> list[np.ndarray]:
    minimum = min(spec.min_samples_per_worker, len(labels) // num_workers)
    parts: list[np.ndarray] = []
    for _ in range(MAX_DIRICHLET_DRAWS):
        parts = _draw_dirichlet(labels, num_workers, spec.alpha, rng)
        if min(len(part) for part in parts) >= minimum:
            return parts
    return _top_up_partitions(parts, minimum, rng)


def _draw_dirichlet(
    labels: np.ndarray, num_workers: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    pieces: list[list[np.ndarray]] = [[] for _ in range(num_workers)]
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(num_workers, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(np.int64)
        for worker, piece in enumerate(np.split(rows, cuts)):
            pieces[worker].append(piece)
    return [np.concatenate(worker_pieces) for worker_pieces in pieces]


def _top_up_partitions(parts: list[np.ndarray], minimum: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Move random rows from the largest partitions to those below ``minimum``.

    ``minimum`` is at most N // num_workers, so the donors always have rows to spare.
    """
    parts = [part.copy() for part in parts]
    for receiver in range(len(parts)):
        while len(parts[receiver]) < minimum:
            donor = int(np.argmax([len(part) for part in parts]))
            count = min(minimum - len(parts[receiver]), len(parts[donor]) - minimum)
            moved = rng.choice(len(parts[donor]), size=count, replace=False)
            parts[receiver] = np.concatenate([parts[receiver], parts[donor][moved]])
            parts[donor] = np.delete(parts[donor], moved)
    return parts


def _partition_shards(
    labels: np.ndarray, num_workers: int, shards_per_worker: int, rng: np.random.Generator
) -> list[np.ndarray]:
    num_shards = num_workers * shards_per_worker
    if num_shards > len(labels):
        raise ConfigError(
            f"the shards scheme needs at least num_workers * shards_per_worker = {num_shards} rows, "
            f"but got {len(labels)}; use fewer workers or fewer shards per worker"
        )

    shuffled = rng.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(by_label, num_shards)
    deal = rng.permutation(num_shards).reshape(num_workers, shards_per_worker)
    return [np.concatenate([shards[shard] for shard in worker_shards]) for worker_shards in deal]


def _validate_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(
            f"labels must be a 1-D integer array, but got shape {labels.shape} and dtype {labels.dtype}"
        )
    return labels


def _validate_num_workers(num_workers: int, num_samples: int) -> None:
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ConfigError(f"num_workers must be an integer >= 1, but got {num_workers!r}")
    if num_workers > num_samples:
        raise ConfigError(
            f"num_workers must be at most the number of samples to partition ({num_samples}), "
            f"but got {num_workers}; use fewer workers"
        )
