"""A user's own code in a run: ``"package.module:function"`` names for the model and the data.

The working directory is importable, as ``python -m`` makes it, so a ``model.py`` beside the
config works as ``model.factory = "model:make"``. Process workers inherit the path; Ray workers
and deployed clients resolve the name again in their own working directory.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
from torch import nn

from fedloom.config import DataConfig
from fedloom.data.dataset import FederatedDataset
from fedloom.data.partition import split, to_federated
from fedloom.errors import ConfigError, DataError

log = logging.getLogger("fedloom")


def load_object(spec: str, key: str) -> Callable[..., Any]:
    """The callable ``"package.module:name"`` names; a bad name is a :class:`ConfigError` on ``key``."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ConfigError(key, f"must be 'package.module:function', got {spec!r}")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        found = importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(key, f"cannot import {module!r} (from {cwd}): {exc}") from None
    obj = getattr(found, name, None)
    if not callable(obj):
        raise ConfigError(key, f"{module!r} has no function {name!r}")
    return obj


def _takes_an_argument(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params)


def user_model(spec: str, dataset: FederatedDataset) -> Callable[[], nn.Module]:
    """A zero-argument model builder from ``model.factory`` (given the dataset if the function takes an argument)."""
    fn = load_object(spec, "model.factory")
    with_data = _takes_an_argument(fn)

    def build() -> nn.Module:
        model = fn(dataset) if with_data else fn()
        if not isinstance(model, nn.Module):
            raise ConfigError("model.factory", f"{spec} returned a {type(model).__name__}, not a torch nn.Module")
        return model

    return build


def as_features(x: np.ndarray, where: str) -> np.ndarray:
    """Inputs as a model takes them: float32 features (float64 converted, said once), integer token ids kept."""
    x = np.asarray(x)
    if x.dtype.kind == "f":
        if x.dtype != np.float32:
            log.info("fedloom: %s: %s inputs converted to float32", where, x.dtype)
        return x.astype(np.float32, copy=False)
    if x.dtype.kind in "iu":
        return x.astype(np.int64, copy=False)
    raise DataError(f"{where}: inputs must be numbers (floats, or integer token ids), got dtype {x.dtype}")


def as_labels(y: np.ndarray, where: str) -> np.ndarray:
    """Class labels as int64 ``0..C-1``."""
    y = np.asarray(y)
    if y.dtype.kind == "f" and np.all(np.mod(y, 1) == 0):
        y = y.astype(np.int64)
    if y.dtype.kind not in "iu":
        raise DataError(f"{where}: labels must be whole class numbers 0..C-1, got dtype {y.dtype}")
    if y.size and y.min() < 0:
        raise DataError(f"{where}: labels must be class numbers 0..C-1, got {int(y.min())}")
    return y.astype(np.int64, copy=False)


def from_arrays(x: np.ndarray, y: np.ndarray, client_ids: np.ndarray, train_fraction: float,
                name: str = "custom") -> FederatedDataset:
    """A federation from arrays with a client-id column: one client per distinct id (in sorted order), each
    client's first ``train_fraction`` of samples for training."""
    x, y, ids = as_features(x, name), as_labels(y, name), np.asarray(client_ids)
    if not len(x) == len(y) == len(ids):
        raise DataError(f"{name}: x, y and client_ids need one row each; got {len(x)}, {len(y)} and {len(ids)}")
    if not len(x):
        raise DataError(f"{name}: no samples")
    keys, index = np.unique(ids, return_inverse=True)
    parts = [np.flatnonzero(index == k) for k in range(len(keys))]
    return to_federated(name, x, y, parts, int(y.max()) + 1, train_fraction, names=[str(k) for k in keys])


def user_data(spec: str, d: DataConfig, seed: int = 0) -> FederatedDataset:
    """The federation ``data.loader`` returns: a :class:`FederatedDataset`, ``(x, y, client_ids)`` arrays, or
    ``(x, y)`` arrays that ``data.partition`` splits among ``data.num_clients``."""
    out = load_object(spec, "data.loader")()
    if isinstance(out, FederatedDataset):
        return out
    if isinstance(out, tuple) and len(out) in (2, 3):
        return federate(out[0], out[1], out[2] if len(out) == 3 else None, d, seed, spec)
    raise ConfigError("data.loader", f"{spec} returned a {type(out).__name__}; return a FederatedDataset, "
                                     "(x, y, client_ids) or (x, y)")


def federate(x: np.ndarray, y: np.ndarray, client_ids: np.ndarray | None, d: DataConfig, seed: int,
             name: str) -> FederatedDataset:
    """Arrays as a federation: one client per id, or without ids the split ``data.partition`` names."""
    if client_ids is not None:
        return from_arrays(x, y, client_ids, d.train_fraction, name)
    if d.partition == "natural" or d.num_clients < 1:
        raise ConfigError("data.partition", f"{name} has no client ids: name a partition (iid, dirichlet, ...) "
                                            "and data.num_clients")
    x, y = as_features(x, name), as_labels(y, name)
    parts = split(d.partition, y, d.num_clients, seed, alpha=d.alpha, shards_per_client=d.shards_per_client,
                  classes_per_client=d.classes_per_client, size_skew=d.size_skew)
    return to_federated(name, x, y, parts, int(y.max()) + 1, d.train_fraction)
