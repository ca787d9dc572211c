"""Splitting one centralised dataset into clients, and building a federation from the split.

Each partitioner returns one int64 array of sample indices per client; together they hold
every index exactly once. All randomness comes from ``np.random.RandomState(seed)``, so the
same arguments always give the same split. Within a client the indices are in random order,
so a leading train split (see :func:`to_federated`) is representative of the client's data.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedloom.data.dataset import ClientDataset, FederatedDataset
from fedloom.errors import DataError

DIRICHLET_MAX_TRIES = 1000


def _check_clients(num_samples: int, num_clients: int) -> None:
    if num_clients < 1:
        raise DataError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > num_samples:
        raise DataError(f"cannot split {num_samples} samples among {num_clients} clients")


def _labels(labels: np.ndarray | Sequence[int]) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise DataError(f"labels must be one-dimensional, got shape {arr.shape}")
    return arr


def iid(num_samples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle the sample indices and cut them into ``num_clients`` near-equal parts (sizes differ by <= 1)."""
    _check_clients(num_samples, num_clients)
    order = np.random.RandomState(seed).permutation(num_samples).astype(np.int64)
    return list(np.array_split(order, num_clients))


def dirichlet(labels: np.ndarray | Sequence[int], num_clients: int, alpha: float, seed: int,
              min_size: int = 1) -> list[np.ndarray]:
    """Label-skewed split (Hsu et al. 2019, "Measuring the effects of non-identical data distribution").

    For each class, client shares are drawn from Dir(alpha) and the class's shuffled indices are
    cut in those proportions. Smaller ``alpha`` means more skew. The draw is repeated (up to
    ``DIRICHLET_MAX_TRIES`` times) until every client holds at least ``min_size`` samples.
    """
    y = _labels(labels)
    _check_clients(len(y), num_clients)
    if not alpha > 0:
        raise DataError(f"Dirichlet alpha must be > 0, got {alpha}")
    if min_size < 0 or min_size * num_clients > len(y):
        raise DataError(f"min_size {min_size} is impossible for {len(y)} samples and {num_clients} clients")
    rng = np.random.RandomState(seed)
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    for _ in range(DIRICHLET_MAX_TRIES):
        pieces: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            shares = rng.dirichlet(np.full(num_clients, float(alpha)))
            if not np.isfinite(shares).all():  # tiny alpha can underflow to 0/0; count it as a failed draw
                break
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
            for k, part in enumerate(np.split(idx, cuts)):
                pieces[k].append(part)
        else:
            parts = [np.concatenate(p) for p in pieces]
            if min(len(p) for p in parts) >= min_size:
                return [rng.permutation(p).astype(np.int64) for p in parts]
    raise DataError(f"no Dirichlet(alpha={alpha}) split of {len(y)} samples gave all {num_clients} clients "
                    f">= {min_size} samples in {DIRICHLET_MAX_TRIES} tries; raise alpha or use fewer clients")


def shards(labels: np.ndarray | Sequence[int], num_clients: int, shards_per_client: int, seed: int) -> list[np.ndarray]:
    """Pathological non-IID split (McMahan et al. 2017, "Communication-efficient learning ... from decentralized data").

    Sort the samples by label (stably), cut them into ``num_clients * shards_per_client`` shards of
    equal size (the last shard also takes the remainder), and give each client
    ``shards_per_client`` shards chosen at random.
    """
    y = _labels(labels)
    if shards_per_client < 1:
        raise DataError(f"shards_per_client must be >= 1, got {shards_per_client}")
    _check_clients(len(y), num_clients)
    num_shards = num_clients * shards_per_client
    if num_shards > len(y):
        raise DataError(f"cannot cut {len(y)} samples into {num_shards} shards")
    rng = np.random.RandomState(seed)
    order = np.argsort(y, kind="stable").astype(np.int64)
    size = len(y) // num_shards
    bounds = [i * size for i in range(num_shards)] + [len(y)]
    cut = [order[bounds[i] : bounds[i + 1]] for i in range(num_shards)]
    assignment = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [rng.permutation(np.concatenate([cut[s] for s in row])) for row in assignment]


def natural(keys: np.ndarray | Sequence[object]) -> tuple[list[object], list[np.ndarray]]:
    """Group samples by a natural key (a speaking role, a user id).

    Returns ``(sorted_unique_keys, parts)``: ``parts[i]`` holds the indices of the samples whose
    key is ``sorted_unique_keys[i]``, in their original order.
    """
    arr = np.asarray(keys)
    if arr.ndim != 1:
        raise DataError(f"keys must be one-dimensional, got shape {arr.shape}")
    if len(arr) == 0:
        return [], []
    unique, inverse, counts = np.unique(arr, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable").astype(np.int64)
    return unique.tolist(), list(np.split(order, np.cumsum(counts)[:-1]))


def split_client(client_id: int, x: np.ndarray, y: np.ndarray, train_fraction: float, name: str = "") -> ClientDataset:
    """One client from its samples in order: the first ``int(train_fraction * n)`` train, the rest test."""
    if not 0.0 < train_fraction <= 1.0:
        raise DataError(f"train_fraction must be in (0, 1], got {train_fraction}")
    n_train = int(train_fraction * len(y))
    return ClientDataset(client_id, x[:n_train], y[:n_train], x[n_train:], y[n_train:], name=name)


def to_federated(name: str, x: np.ndarray, y: np.ndarray, parts: Sequence[np.ndarray], num_classes: int,
                 train_fraction: float = 0.8, names: Sequence[str] | None = None,
                 seed: int | None = None) -> FederatedDataset:
    """A :class:`FederatedDataset` with client ``k`` holding samples ``parts[k]``.

    Per client, the first ``int(train_fraction * n)`` of its indices (in the order given) are its
    train split and the rest its test split. With ``seed`` set, each client's indices are first
    shuffled with ``RandomState([seed, k])``; ``None`` keeps the given order. ``names`` optionally
    names the clients. A client with no samples, or an index out of range, is a :class:`DataError`.
    """
    if len(x) != len(y):
        raise DataError(f"{len(x)} inputs but {len(y)} labels")
    if names is not None and len(names) != len(parts):
        raise DataError(f"{len(names)} client names for {len(parts)} clients")
    clients = []
    for k, part in enumerate(parts):
        idx = np.asarray(part, dtype=np.int64)
        if idx.ndim != 1:
            raise DataError(f"client {k}: indices must be one-dimensional, got shape {idx.shape}")
        if len(idx) == 0:
            raise DataError(f"client {k} has no samples")
        if idx.min() < 0 or idx.max() >= len(y):
            raise DataError(f"client {k} has sample indices outside 0..{len(y) - 1}")
        if seed is not None:
            idx = np.random.RandomState([seed, k]).permutation(idx)
        clients.append(split_client(k, x[idx], y[idx], train_fraction, names[k] if names is not None else ""))
    return FederatedDataset(name, clients, num_classes)
