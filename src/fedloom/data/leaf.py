"""LEAF's JSON format (Caldas et al. 2018, "LEAF: A Benchmark for Federated Settings"), one client per user.

A LEAF split is a ``.json`` file, or a folder of them, each holding
``{"users": [...], "num_samples": [...], "user_data": {user: {"x": [...], "y": [...]}}}``.
Read with :mod:`json` only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedloom.data.dataset import ClientDataset, FederatedDataset
from fedloom.data.partition import split_client
from fedloom.data.text import encode, vocabulary
from fedloom.errors import DataError

Samples = dict[str, tuple[list, list, Path]]  # user -> (x, y, file it came from)


def _files(path: str | Path) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.glob("*.json") if f.is_file())
        if not files:
            raise DataError(f"LEAF folder {p} has no .json files")
        return files
    if not p.is_file():
        raise DataError(f"LEAF path {p} does not exist")
    return [p]


def _read_split(path: str | Path) -> Samples:
    """Every user's raw ``(x, y)`` lists from a LEAF file or folder, checked for form."""
    users: Samples = {}
    for f in _files(path):
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{f}: not a readable JSON file: {e}") from e
        if not isinstance(doc, dict) or not {"users", "num_samples", "user_data"} <= doc.keys():
            raise DataError(f"{f}: expected an object with keys 'users', 'num_samples' and 'user_data'")
        names, counts, data = doc["users"], doc["num_samples"], doc["user_data"]
        if not isinstance(names, list) or not isinstance(counts, list) or not isinstance(data, dict):
            raise DataError(f"{f}: 'users' and 'num_samples' must be lists and 'user_data' an object")
        if len(names) != len(counts):
            raise DataError(f"{f}: {len(names)} users but {len(counts)} entries in 'num_samples'")
        for user, count in zip(names, counts, strict=True):
            where = f"{f}, user {user!r}"
            if not isinstance(user, str):
                raise DataError(f"{where}: user ids must be strings")
            if user in users:
                raise DataError(f"{where}: user also appears in {users[user][2]}")
            entry = data.get(user)
            if not isinstance(entry, dict) or "x" not in entry or "y" not in entry:
                raise DataError(f"{where}: missing from 'user_data' or without 'x' and 'y'")
            x, y = entry["x"], entry["y"]
            if not isinstance(x, list) or not isinstance(y, list):
                raise DataError(f"{where}: 'x' and 'y' must be lists")
            if not (len(x) == len(y) == count):
                raise DataError(f"{where}: num_samples says {count} but x has {len(x)} and y has {len(y)} entries")
            users[user] = (x, y, f)
    return users


def _text_arrays(x: list, y: list, vocab: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Each window and, as the target, the next character at every position: the window shifted by one
    with LEAF's next character appended (the form of the built-in Shakespeare data and ``char_lstm``)."""
    lengths = {len(s) for s in x}
    if len(lengths) > 1:
        raise DataError(f"{where}: input strings have different lengths {sorted(lengths)}")
    if not all(isinstance(c, str) and len(c) == 1 for c in y):
        raise DataError(f"{where}: inputs are text, so each target must be a single character")
    try:
        xs = encode("".join(x), vocab).reshape(len(x), lengths.pop() if lengths else 0)
        ys = encode("".join(y), vocab)
    except DataError as e:
        raise DataError(f"{where}: {e.message}") from e
    return xs, np.concatenate([xs[:, 1:], ys[:, None]], axis=1)


def _numeric_arrays(x: list, y: list, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        xs = np.asarray(x, dtype=np.float32)
        ys_raw = np.asarray(y, dtype=np.float64)
    except (ValueError, TypeError) as e:
        raise DataError(f"{where}: inputs must be equally shaped numbers and targets integers ({e})") from e
    if ys_raw.ndim != 1 or not np.all(ys_raw == np.round(ys_raw)) or (len(ys_raw) and ys_raw.min() < 0):
        raise DataError(f"{where}: targets must be non-negative integers, one per sample")
    return xs, ys_raw.astype(np.int64)


def load_leaf(train_path: str | Path, test_path: str | Path | None = None, train_fraction: float = 0.8,
              vocab: str | None = None) -> FederatedDataset:
    """A federation with one client per LEAF user, ordered by sorted user id.

    With ``test_path``, a user's test split is its samples there (a user found in only one of the
    two gets an empty other split); without, each user's first ``int(train_fraction * n)`` samples
    train and the rest test. String inputs (LEAF Shakespeare: 80-character strings, one-character
    targets) are encoded with ``vocab`` (default: the sorted set of all characters in train and
    test) into int64 ``(n, length)`` inputs and ``(n,)`` targets; numeric inputs become float32
    ``(n, ...)`` with int64 targets. Malformed files raise :class:`DataError` naming the file and user.
    """
    if not 0.0 < train_fraction <= 1.0:
        raise DataError(f"train_fraction must be in (0, 1], got {train_fraction}")
    splits = [_read_split(train_path)] + ([_read_split(test_path)] if test_path is not None else [])
    kinds = {isinstance(v, str) for split in splits for x, _, _ in split.values() for v in x}
    if len(kinds) > 1:
        raise DataError(f"LEAF inputs at {train_path} mix strings and numbers")
    text = kinds == {True}
    if text and vocab is None:
        vocab = vocabulary("".join(v for split in splits for x, y, _ in split.values() for v in (*x, *y)
                                   if isinstance(v, str)))
    arrays: list[dict[str, tuple[np.ndarray, np.ndarray]]] = []
    for split in splits:
        arrays.append({})
        for user, (x, y, f) in split.items():
            where = f"{f}, user {user!r}"
            arrays[-1][user] = _text_arrays(x, y, vocab, where) if text else _numeric_arrays(x, y, where)
    shapes = {xs.shape[1:] for split in arrays for xs, _ in split.values() if len(xs)}
    if len(shapes) > 1:
        raise DataError(f"LEAF users' inputs at {train_path} have different shapes {sorted(shapes)}")
    shape = shapes.pop() if shapes else ()
    users = sorted(set().union(*arrays))
    if not users:
        raise DataError(f"LEAF data at {train_path} has no users")

    def get(split: dict[str, tuple[np.ndarray, np.ndarray]], user: str) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = split.get(user, (np.zeros(0, np.int64 if text else np.float32), np.zeros(0, np.int64)))
        return xs.reshape((len(xs), *shape)), ys

    clients = []
    for k, user in enumerate(users):
        if test_path is None:
            clients.append(split_client(k, *get(arrays[0], user), train_fraction, name=user))
        else:
            clients.append(ClientDataset(k, *get(arrays[0], user), *get(arrays[1], user), name=user))
    labels = [ys for split in arrays for _, ys in split.values() if len(ys)]
    if not labels:
        raise DataError(f"LEAF data at {train_path} has no samples")
    num_classes = len(vocab) if text else 1 + max(int(ys.max()) for ys in labels)
    info = {"train_path": str(train_path), "test_path": None if test_path is None else str(test_path)}
    return FederatedDataset("leaf", clients, num_classes, vocab=vocab if text else None, info=info)
