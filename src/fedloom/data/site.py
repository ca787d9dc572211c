"""One site's own data: what a deployed client (a hospital, a phone) holds, and nothing of the others'.

A site's config names its data (``data.dataset = "site"``): ``data.path`` is a CSV, Parquet or
``.npz`` table (labels in ``data.label_column``; a client-id column, if there is one, is ignored),
a LEAF ``.json`` file (its users' samples together), or a folder of ``.txt`` files (text, cut into
next-character windows of ``data.seq_len`` with the vocabulary ``data.vocab``); or ``data.loader``
names a ``module:function`` returning the site's ``(x, y)`` arrays. A site sees only its own labels,
so the classes come from the config (``model.num_classes``, or the vocabulary's size for text); a
label outside them is refused. The same readers give a server its own test set
(``deploy.test_data``). Files are read without unpickling.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedloom.config import Config
from fedloom.data.dataset import FederatedDataset
from fedloom.data.leaf import load_leaf
from fedloom.data.partition import split_client
from fedloom.data.readers import SUFFIXES, read_table
from fedloom.data.text import encode, windows
from fedloom.errors import ConfigError, DataError
from fedloom.plugins import as_features, as_labels, load_object

Arrays = tuple[np.ndarray, np.ndarray]


def read_text_folder(path: Path, vocab: str, seq_len: int) -> Arrays:
    """Next-character windows (``text.windows``) of every ``.txt`` file in ``path``, in name order."""
    if not vocab:
        raise DataError(f"{path}: text needs the vocabulary every site shares (data.vocab)")
    files = sorted(p for p in path.iterdir() if p.suffix == ".txt" and p.is_file())
    if not files:
        raise DataError(f"{path} holds no .txt files (a site's folder is text; a table is one file)")
    xs, ys = [], []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read {f} as UTF-8 text: {exc}") from None
        try:
            x, y = windows(encode(text, vocab), seq_len)
        except DataError as exc:
            raise DataError(f"{f}: {exc.message}") from None
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def read_leaf_file(path: Path, vocab: str) -> Arrays:
    """Every user's samples of a LEAF ``.json`` file, together (a site is one client however many users it has)."""
    fed = load_leaf(path, train_fraction=1.0, vocab=vocab or None)
    return (np.concatenate([c.x_train for c in fed.clients]), np.concatenate([c.y_train for c in fed.clients]))


def read_site(path: str | Path, label: str, client: str, vocab: str, seq_len: int) -> Arrays:
    """A site's ``(x, y)`` from the file or folder at ``path`` (the module docstring lists the kinds)."""
    p = Path(path)
    if p.is_dir():
        return read_text_folder(p, vocab, seq_len)
    if not p.is_file():
        raise DataError(f"no file or folder at {p}")
    if p.suffix == ".json":
        return read_leaf_file(p, vocab)
    if p.suffix not in SUFFIXES:
        raise DataError(f"{p}: unknown file type; a site's data is a {', '.join(SUFFIXES)} or LEAF .json file, or a "
                        "folder of .txt files")
    x, y, _ = read_table(p, label, client)
    return x, y


def checked(x: np.ndarray, y: np.ndarray, num_classes: int, where: str) -> Arrays:
    """``(x, y)`` as a model takes them, with every label one of the federation's ``num_classes``."""
    x, y = as_features(x, where), as_labels(y, where)
    if len(x) != len(y):
        raise DataError(f"{where}: {len(x)} inputs but {len(y)} labels")
    if not len(y):
        raise DataError(f"{where}: no samples")
    if int(y.max()) >= num_classes:
        raise DataError(f"{where}: label {int(y.max())} is outside the federation's {num_classes} classes "
                        "(model.num_classes)")
    return x, y


def site_arrays(cfg: Config, path: str = "") -> Arrays:
    """The ``(x, y)`` a config names: ``path`` (a server's test set) or the site's ``data.path``/``data.loader``."""
    d = cfg.data
    if path or d.path:
        x, y = read_site(path or d.path, d.label_column, d.client_column, d.vocab, d.seq_len)
        where = str(path or d.path)
    else:
        out = load_object(d.loader, "data.loader")()
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ConfigError("data.loader", f"{d.loader} returned a {type(out).__name__}; a site's loader returns "
                                             "its (x, y) arrays")
        x, y = out
        where = d.loader
    return checked(x, y, federation_classes(cfg), where)


def federation_classes(cfg: Config) -> int:
    """The classes every site and the server agree on: ``model.num_classes``, or a text vocabulary's size."""
    return cfg.model.num_classes or len(cfg.data.vocab)


def load_site(cfg: Config) -> FederatedDataset:
    """This process's federation: one client (id 0, its first ``data.train_fraction`` samples for training) when
    it names its data; none when it names none (a server that holds no data)."""
    d = cfg.data
    clients = []
    if d.path or d.loader:
        x, y = site_arrays(cfg)
        clients.append(split_client(0, x, y, d.train_fraction, name=cfg.deploy.name or Path(d.path or d.loader).stem))
    return FederatedDataset("site", clients, federation_classes(cfg), vocab=d.vocab or None)
