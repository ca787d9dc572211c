"""The reference workloads' settings (``../shared/BENCHMARKS.md``), as plain dictionaries in fedloom's config layout.

Kept apart from ``workloads.py`` so that the plain script (``plain.py``) reads the same numbers
without importing fedloom's config and server.
"""

WA = {
    "run": {"name": "wa", "seed": 0, "rounds": 20},
    "data": {"dataset": "synthetic", "num_clients": 1000, "synthetic_alpha": 1.0, "synthetic_beta": 1.0},
    "model": {"name": "logreg"},
    "client": {"lr": 0.01, "batch_size": 10, "local_epochs": 1, "max_steps": 0},
    "server": {"clients_per_round": 100, "optimizer": "sgd", "lr": 1.0},
    "eval": {"every": 20},
    "engine": {"executor": "sequential"},
}
WB = {
    "run": {"name": "wb", "seed": 0, "rounds": 10},
    "data": {"dataset": "shakespeare"},
    "model": {"name": "char_lstm", "embed_dim": 8, "hidden_size": 128, "num_layers": 1},
    "client": {"lr": 1.0, "batch_size": 10, "local_epochs": 1, "max_steps": 20},
    "server": {"clients_per_round": 10, "optimizer": "sgd", "lr": 1.0},
    "eval": {"every": 10},
    "engine": {"executor": "sequential"},
}
WA_SCALED = {**WA, "run": {**WA["run"], "name": "wa-scaled"}, "data": {**WA["data"], "num_clients": 10000},
             "server": {**WA["server"], "clients_per_round": 1000}}
SPECS = {"wa": WA, "wb": WB, "wa-scaled": WA_SCALED}
