"""The files users have: one table with a client-id column, or a folder of one file per client.

CSV (a header row; every column but the label and the client id is a numeric feature), Parquet
(the same columns; needs ``pyarrow``) and ``.npz`` (arrays ``x`` and ``y``, and ``client`` when one
file holds every client; read without unpickling). A folder holds one such file per client, named
for the client. :func:`read_hf` reads a Hugging Face dataset saved with ``save_to_disk``.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedloom.errors import DataError

Table = tuple[np.ndarray, np.ndarray, np.ndarray | None]
SUFFIXES = (".csv", ".parquet", ".npz")


def read_csv(path: Path, label: str, client: str) -> Table:
    """``(x, y, client_ids or None)`` from a CSV file with a header row."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if not rows or label not in rows[0]:
        raise DataError(f"{path}: the header has no label column {label!r} (columns: {rows[0] if rows else []})")
    header, body = rows[0], rows[1:]
    if any(len(r) != len(header) for r in body):
        bad = next(i for i, r in enumerate(body) if len(r) != len(header))
        raise DataError(f"{path}: row {bad + 2} has {len(body[bad])} fields, the header {len(header)}")
    cells = np.asarray(body, dtype=str).reshape(len(body), len(header))
    features = [i for i, name in enumerate(header) if name not in (label, client)]
    try:
        x = cells[:, features].astype(np.float32)
    except ValueError as exc:
        raise DataError(f"{path}: feature columns must be numbers ({exc})") from None
    try:
        y = cells[:, header.index(label)].astype(np.float64)
    except ValueError:
        raise DataError(f"{path}: label column {label!r} must hold class numbers") from None
    ids = cells[:, header.index(client)] if client in header else None
    return x, y, ids


def _columns(names: list[str], column: Callable[[str], np.ndarray], where: str, label: str, client: str) -> Table:
    """``(x, y, ids)`` from named columns: one feature column is taken as it is (an image, a vector),
    several are stacked as a table."""
    if label not in names:
        raise DataError(f"{where} has no label column {label!r} (columns: {names})")
    features = [n for n in names if n not in (label, client)]
    if not features:
        raise DataError(f"{where} has no feature column besides {label!r} and {client!r}")
    try:
        arrays = [np.asarray(column(n)) for n in features]
        x = arrays[0] if len(arrays) == 1 else np.stack(arrays, axis=1)
        x = x.astype(np.float32) if x.dtype.kind in "fiub" else x
    except (ValueError, TypeError) as exc:
        raise DataError(f"{where}: feature columns must be numbers or arrays of numbers ({exc})") from None
    return x, np.asarray(column(label)), (np.asarray(column(client)) if client in names else None)


def read_parquet(path: Path, label: str, client: str) -> Table:
    """``(x, y, client_ids or None)`` from a Parquet file."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install 'fedloom[hf]'") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many kinds for a bad file
        raise DataError(f"cannot read {path} as Parquet: {exc}") from None
    return _columns(table.column_names, lambda n: table.column(n).to_numpy(zero_copy_only=False), str(path),
                    label, client)


def read_hf(path: str | Path, label: str = "label", client: str = "client", split: str = "train") -> Table:
    """``(x, y, client_ids or None)`` from a Hugging Face dataset saved with ``save_to_disk`` (a
    ``DatasetDict``'s ``split``); loaded from disk, nothing downloaded."""
    try:
        import datasets
    except ImportError:
        raise DataError("reading a Hugging Face dataset needs the datasets package: pip install 'fedloom[hf]'") \
            from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - a folder that is not a saved dataset
        raise DataError(f"cannot load a Hugging Face dataset from {path}: {exc}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path} has the splits {sorted(loaded)}, not {split!r} (data.hf_split)")
        loaded = loaded[split]
    table = loaded.with_format("numpy")
    return _columns(list(table.column_names), lambda n: table[n], str(path), label, client)


def read_npz(path: Path, client: str) -> Table:
    """``(x, y, client_ids or None)`` from arrays ``x``, ``y`` (and ``client``) in an ``.npz`` file."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f.files or "y" not in f.files:
                raise DataError(f"{path}: needs arrays 'x' and 'y'; it has {f.files}")
            return f["x"], f["y"], (f[client] if client in f.files else None)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path} as .npz without unpickling: {exc}") from None


def read_table(path: Path, label: str, client: str) -> Table:
    if path.suffix == ".csv":
        return read_csv(path, label, client)
    if path.suffix == ".npz":
        return read_npz(path, client)
    if path.suffix == ".parquet":
        return read_parquet(path, label, client)
    raise DataError(f"{path}: unknown file type; fedloom reads {', '.join(SUFFIXES)}")


def read_files(path: str | Path, label: str = "label", client: str = "client") -> Table:
    """One table with an optional client-id column, or a folder of one file per client (the file's name
    without its suffix is the client id)."""
    path = Path(path)
    if path.is_file():
        return read_table(path, label, client)
    if not path.is_dir():
        raise DataError(f"no file or folder at {path}")
    files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES)
    if not files:
        raise DataError(f"{path} holds no {' or '.join(SUFFIXES)} files")
    tables = [read_table(p, label, client) for p in files]
    ids = np.concatenate([np.full(len(t[1]), p.stem) for p, t in zip(files, tables)])
    widths = {t[0].shape[1:] for t in tables}
    if len(widths) > 1:
        raise DataError(f"{path}: the clients' files have different feature shapes {sorted(widths)}")
    return np.concatenate([t[0] for t in tables]), np.concatenate([t[1] for t in tables]), ids
