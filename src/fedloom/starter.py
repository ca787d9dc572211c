"""``fedloom init``: a commented config with every default, or a small project that runs as written."""

from __future__ import annotations

from pathlib import Path

from fedloom.config import Config, to_toml
from fedloom.errors import ConfigError

MODEL = '''"""The model: any torch nn.Module. fedloom calls make(dataset) once per process and reuses it."""

from torch import nn


def make(dataset):
    features = dataset.clients[0].x_train.shape[1]
    return nn.Sequential(nn.Linear(features, 32), nn.ReLU(), nn.Linear(32, dataset.num_classes))
'''

DATA = '''"""The data: return (x, y, client_ids) arrays, one row per sample, or a fedloom FederatedDataset.

Replace the synthetic table below with your own reader, for example
    frame = pandas.read_csv("patients.csv")
    return frame[features].to_numpy(), frame["label"].to_numpy(), frame["site"].to_numpy()
"""

import numpy as np


def load():
    rng = np.random.default_rng(0)
    sites = np.array(["north", "south", "east", "west", "city", "coast", "hills", "lakes"])
    site = rng.integers(0, len(sites), 2000)
    x = rng.normal(size=(2000, 10)) + site[:, None] * 0.1  # each site's features drift a little
    y = (x @ rng.normal(size=(10, 4))).argmax(axis=1)  # four classes
    return x, y, sites[site]
'''

PROJECT_CONFIG = '''# A fedloom project: your model (model.py) and data (data.py), federated.
# Run it from this folder:  fedloom simulate config.toml
# Every other setting has a default: `fedloom init defaults.toml` writes them all, with comments.

[run]
name = "my-project"
rounds = 20

[data]
loader = "data:load"        # data.py, function load
train_fraction = 0.8        # each client's first 80% of rows train, the rest test

[model]
factory = "model:make"      # model.py, function make

[client]
lr = 0.05
batch_size = 16
local_epochs = 1

[server]
clients_per_round = 4

[eval]
every = 5
'''


def write_defaults(path: str | Path) -> Path:
    """Write a config with every setting at its default, each with its comment; an existing file is kept."""
    path = Path(path)
    if path.exists():
        raise ConfigError("init", f"{path} exists; choose another name")
    path.write_text("# Every fedloom setting at its default. Keep what you change; delete the rest.\n\n"
                    + to_toml(Config()))
    return path


def write_project(folder: str | Path) -> Path:
    """Write ``model.py``, ``data.py`` and ``config.toml`` into a new or empty folder."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError("init", f"{folder} is not empty; choose a new folder")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.py").write_text(MODEL)
    (folder / "data.py").write_text(DATA)
    (folder / "config.toml").write_text(PROJECT_CONFIG)
    return folder
