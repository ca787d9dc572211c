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


def quantity(num_samples: int, num_clients: int, seed: int, sizes: str = "lognormal",
             skew: float = 1.0) -> list[np.ndarray]:
    """Quantity skew: IID samples, client sizes drawn from a heavy-tailed law (every client gets at least one).

    ``sizes = "lognormal"``: shares proportional to LogNormal(0, ``skew``) (the unbalanced splits of
    FedLab and of Li et al. 2022, "Federated Learning on Non-IID Data Silos: An Experimental Study");
    ``"power_law"``: shares proportional to Pareto(``skew``) + 1, a power law with exponent
    ``skew + 1`` (LEAF's and FedProx's user sizes). Larger ``skew`` means a heavier tail for
    log-normal and a lighter one for the power law.
    """
    _check_clients(num_samples, num_clients)
    if not skew > 0:
        raise DataError(f"the size skew must be > 0, got {skew}")
    rng = np.random.RandomState(seed)
    if sizes == "lognormal":
        shares = rng.lognormal(0.0, skew, num_clients)
    elif sizes == "power_law":
        shares = rng.pareto(skew, num_clients) + 1.0
    else:
        raise DataError(f"unknown size law {sizes!r}; choose lognormal or power_law")
    counts = 1 + np.floor(shares / shares.sum() * (num_samples - num_clients)).astype(np.int64)
    counts[np.argsort(-shares, kind="stable")[: num_samples - int(counts.sum())]] += 1  # the remainder, largest first
    order = rng.permutation(num_samples).astype(np.int64)
    return list(np.split(order, np.cumsum(counts)[:-1]))


def classes(labels: np.ndarray | Sequence[int], num_clients: int, classes_per_client: int,
            seed: int) -> list[np.ndarray]:
    """Pathological label skew: each client holds exactly ``classes_per_client`` classes.

    Client ``i`` gets classes ``perm[(i * k + j) % C]`` for ``j < k`` (``perm`` a random order of the
    ``C`` classes), so every class has a holder; each class's shuffled samples are cut evenly among
    its holders (the "pathological" partition of McMahan et al. 2017, by classes instead of shards).
    """
    y = _labels(labels)
    _check_clients(len(y), num_clients)
    values = np.unique(y)
    k = classes_per_client
    if not 1 <= k <= len(values):
        raise DataError(f"classes_per_client must be between 1 and the {len(values)} classes, got {k}")
    if num_clients * k < len(values):
        raise DataError(f"{num_clients} clients with {k} classes each cannot hold all {len(values)} classes")
    rng = np.random.RandomState(seed)
    perm = rng.permutation(len(values))
    held = [[int(perm[(i * k + j) % len(values)]) for j in range(k)] for i in range(num_clients)]
    pieces: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c, value in enumerate(values):
        holders = [i for i in range(num_clients) if c in held[i]]
        for i, part in zip(holders, np.array_split(rng.permutation(np.flatnonzero(y == value)), len(holders))):
            pieces[i].append(part)
    parts = [rng.permutation(np.concatenate(p)).astype(np.int64) for p in pieces]
    if min(len(p) for p in parts) == 0:
        raise DataError(f"some of the {num_clients} clients got no sample: use fewer clients or more classes each")
    return parts


def dirichlet_balanced(labels: np.ndarray | Sequence[int], num_clients: int, alpha: float,
                       seed: int) -> list[np.ndarray]:
    """Label skew with equal client sizes: each client's class mix is drawn from Dir(``alpha``) and its
    near-equal share of the samples is filled from that mix (a class that runs out is left out of the
    mix for the rest; Flower's inner-Dirichlet partition with balanced sizes)."""
    y = _labels(labels)
    _check_clients(len(y), num_clients)
    if not alpha > 0:
        raise DataError(f"Dirichlet alpha must be > 0, got {alpha}")
    rng = np.random.RandomState(seed)
    values = np.unique(y)
    pools = [list(rng.permutation(np.flatnonzero(y == v))) for v in values]
    sizes = [len(p) for p in np.array_split(np.arange(len(y)), num_clients)]
    parts = []
    for size in sizes:
        mix = rng.dirichlet(np.full(len(values), float(alpha)))
        taken: list[int] = []
        while len(taken) < size:
            left = np.array([len(p) for p in pools], dtype=np.float64)
            weights = np.where(left > 0, np.nan_to_num(mix), 0.0)
            weights = weights if weights.sum() > 0 else left  # the mix's classes are gone: take what is left
            for c, n in enumerate(rng.multinomial(size - len(taken), weights / weights.sum())):
                n = min(int(n), len(pools[c]))
                taken += pools[c][:n]
                del pools[c][:n]
        parts.append(rng.permutation(np.array(taken, dtype=np.int64)))
    return parts


def split(partition: str, labels: np.ndarray, num_clients: int, seed: int, alpha: float = 0.5,
          shards_per_client: int = 2, classes_per_client: int = 2, size_skew: float = 1.0) -> list[np.ndarray]:
    """The split ``partition`` names (``iid``, ``dirichlet``, ``dirichlet_balanced``, ``shards``, ``classes``,
    ``lognormal``, ``power_law``) of samples with ``labels``."""
    if partition == "iid":
        return iid(len(labels), num_clients, seed)
    if partition == "dirichlet":
        return dirichlet(labels, num_clients, alpha, seed)
    if partition == "dirichlet_balanced":
        return dirichlet_balanced(labels, num_clients, alpha, seed)
    if partition == "shards":
        return shards(labels, num_clients, shards_per_client, seed)
    if partition == "classes":
        return classes(labels, num_clients, classes_per_client, seed)
    if partition in ("lognormal", "power_law"):
        return quantity(len(labels), num_clients, seed, partition, size_skew)
    raise DataError(f"unknown partition {partition!r}")


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
