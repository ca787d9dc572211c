"""Parameter files: a model's arrays as ``.npz``, keyed by parameter name, read without unpickling."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np

from fedloom.params import Params


def save_params(path: Path | BinaryIO, params: Params, names: list[str]) -> None:
    """Save parameters as ``.npz`` keyed by parameter name (read back with :func:`load_params`)."""
    np.savez(path, **dict(zip(names, params)))


def load_params(path: str | Path) -> tuple[list[str], Params]:
    """Read a model saved by :func:`save_params` (never unpickles)."""
    with np.load(path, allow_pickle=False) as f:
        return list(f.files), [f[k] for k in f.files]
