"""Two small classic datasets, shipped with the package (no scikit-learn needed), and their federated splits.

``digits.csv.gz`` and ``breast_cancer.csv`` are the UCI ML repository files as distributed with
scikit-learn (BSD-3-Clause); see ``files/README.md``.
"""

from __future__ import annotations

import gzip
import io
from importlib import resources

import numpy as np

from fedloom.data.dataset import FederatedDataset
from fedloom.data.partition import split, to_federated
from fedloom.errors import DataError

TABULAR = ("digits", "breast_cancer")


def _read(name: str) -> bytes:
    try:
        raw = resources.files("fedloom.data").joinpath(f"files/{name}").read_bytes()
        return gzip.decompress(raw) if name.endswith(".gz") else raw
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read shipped data file {name}: {e}") from e


def _table(text: str, name: str, columns: int) -> np.ndarray:
    try:
        table = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.float64, ndmin=2)
    except ValueError as e:
        raise DataError(f"{name} is not a numeric CSV table: {e}") from e
    if table.shape[1] != columns:
        raise DataError(f"{name} has {table.shape[1]} columns, expected {columns}")
    return table


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 8x8 handwritten digits: ``x`` float32 ``(1797, 1, 8, 8)`` in [0, 1] (pixel / 16), ``y`` int64 0-9.

    The one-channel image layout suits a CNN; other models flatten it.
    """
    table = _table(_read("digits.csv.gz").decode("ascii"), "digits.csv.gz", 65)
    x, y = table[:, :64], table[:, 64]
    if table.shape[0] != 1797 or not np.isin(y, np.arange(10)).all() or x.min() < 0 or x.max() > 16:
        raise DataError(f"digits.csv.gz has unexpected content: {table.shape[0]} rows, labels {np.unique(y)}")
    return (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8), y.astype(np.int64)


def load_breast_cancer() -> tuple[np.ndarray, np.ndarray]:
    """Wisconsin diagnostic breast cancer: ``x`` float32 ``(569, 30)``, ``y`` int64 (0 malignant, 1 benign).

    Each feature is standardized (z-score: minus its mean, over its standard deviation) computed over
    the whole set of 569 samples, before any split into clients.
    """
    header, _, body = _read("breast_cancer.csv").decode("ascii").partition("\n")
    fields = header.strip().split(",")  # n_samples, n_features, then the target names
    try:
        n, d = int(fields[0]), int(fields[1])
    except (ValueError, IndexError) as e:
        raise DataError(f"breast_cancer.csv header {header!r} is not 'n_samples,n_features,names...'") from e
    table = _table(body, "breast_cancer.csv", d + 1)
    x, y = table[:, :d], table[:, d]
    if (n, d) != (569, 30) or table.shape[0] != n or not np.isin(y, (0, 1)).all():
        raise DataError(f"breast_cancer.csv has unexpected content: header {header!r}, {table.shape[0]} rows")
    std = x.std(axis=0)
    x = (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)
    return x.astype(np.float32), y.astype(np.int64)


def tabular(name: str, num_clients: int, partition: str = "iid", alpha: float = 0.5, shards_per_client: int = 2,
            seed: int = 0, train_fraction: float = 0.8, classes_per_client: int = 2,
            size_skew: float = 1.0) -> FederatedDataset:
    """``digits`` or ``breast_cancer`` split among ``num_clients`` by a partition of :func:`partition.split`.

    See :mod:`fedloom.data.partition`; each client's first ``int(train_fraction * n)`` samples train.
    """
    if name not in TABULAR:
        raise DataError(f"unknown tabular dataset {name!r}; choose one of {', '.join(TABULAR)}")
    x, y = load_digits() if name == "digits" else load_breast_cancer()
    parts = split(partition, y, num_clients, seed, alpha=alpha, shards_per_client=shards_per_client,
                  classes_per_client=classes_per_client, size_skew=size_skew)
    dataset = to_federated(name, x, y, parts, 10 if name == "digits" else 2, train_fraction=train_fraction)
    dataset.info.update({"partition": partition, "seed": seed})
    if partition.startswith("dirichlet"):
        dataset.info["alpha"] = alpha
    if partition == "shards":
        dataset.info["shards_per_client"] = shards_per_client
    if partition == "classes":
        dataset.info["classes_per_client"] = classes_per_client
    if partition in ("lognormal", "power_law"):
        dataset.info["size_skew"] = size_skew
    return dataset
