"""Workloads W-A and W-B, each as a fedloom config and as a plain sequential PyTorch loop.

Both implementations train on identical data in identical order (BENCHMARKS.md's common
rules): round r samples ``RandomState([0, r]).choice(K, k, replace=False)``; client c shuffles
with ``RandomState([0, r, c]).permutation(n_train)``; FedAvg weights are train-split sizes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from fedloom.build import load_dataset, model_factory
from fedloom.config import Config, config_from_dict
from fedloom.data.dataset import FederatedDataset

_WA = {
    "run": {"name": "wa", "seed": 0, "rounds": 20},
    "data": {"dataset": "synthetic", "num_clients": 1000, "synthetic_alpha": 1.0, "synthetic_beta": 1.0},
    "model": {"name": "logreg"},
    "client": {"lr": 0.01, "batch_size": 10, "local_epochs": 1, "max_steps": 0},
    "server": {"clients_per_round": 100, "optimizer": "sgd", "lr": 1.0},
    "eval": {"every": 20},
    "engine": {"executor": "sequential"},
}
_WB = {
    "run": {"name": "wb", "seed": 0, "rounds": 10},
    "data": {"dataset": "shakespeare"},
    "model": {"name": "char_lstm", "embed_dim": 8, "hidden_size": 128, "num_layers": 1},
    "client": {"lr": 1.0, "batch_size": 10, "local_epochs": 1, "max_steps": 20},
    "server": {"clients_per_round": 10, "optimizer": "sgd", "lr": 1.0},
    "eval": {"every": 10},
    "engine": {"executor": "sequential"},
}
_WA_SCALED = {**_WA, "run": {**_WA["run"], "name": "wa-scaled"}, "data": {**_WA["data"], "num_clients": 10000},
              "server": {**_WA["server"], "clients_per_round": 1000}}

# fedloom engines compared with the plain loop: label -> [engine] settings.
ENGINE_VARIANTS = {
    "fedloom-sequential": {"executor": "sequential"},
    "fedloom-vectorized": {"executor": "vectorized"},
    "fedloom-process": {"executor": "process", "vectorize": False},
    "fedloom-vectorized-process": {"executor": "process", "vectorize": True},
    "fedloom-vectorized-cuda": {"executor": "vectorized", "device": "cuda"},  # only where a GPU is present
}


@dataclass(frozen=True)
class Workload:
    name: str
    config: Config
    variants: tuple[str, ...]
    repeat: int = 3

    def with_engine(self, variant: str) -> Config:
        engine = replace(self.config.engine, **ENGINE_VARIANTS[variant])
        return replace(self.config, engine=engine)


ALL = ("fedloom-sequential", "fedloom-vectorized", "fedloom-process", "fedloom-vectorized-process")
WORKLOADS = {
    "wa": Workload("W-A synthetic-overhead", config_from_dict(_WA), ALL),
    "wb": Workload("W-B shakespeare-keyboard", config_from_dict(_WB), ALL),
    "wa-scaled": Workload("W-A scaled (10,000 clients, 1,000 per round)", config_from_dict(_WA_SCALED),
                          ("fedloom-sequential", "fedloom-vectorized", "fedloom-vectorized-process"), repeat=1),
}


@dataclass(frozen=True)
class PlainResult:
    train_s: float
    accuracy: float
    examples: int


def plain_fedavg(cfg: Config, dataset: FederatedDataset) -> PlainResult:
    """FedAvg as a researcher would write it with no framework: one model, torch.optim.SGD, a loop."""
    torch.manual_seed(cfg.run.seed)
    model = model_factory(cfg, dataset)()
    params = list(model.parameters())
    c, k, n_clients = cfg.client, cfg.server.clients_per_round, len(dataset)
    global_w = [p.detach().clone() for p in params]
    examples = 0
    start = time.perf_counter()
    for r in range(1, cfg.run.rounds + 1):
        chosen = np.random.RandomState([cfg.run.seed, r]).choice(n_clients, k, replace=False)
        total = sum(dataset[int(cid)].num_train for cid in chosen)
        new_w = [torch.zeros_like(w) for w in global_w]
        for cid in chosen:
            data = dataset[int(cid)]
            with torch.no_grad():
                for p, w in zip(params, global_w):
                    p.copy_(w)
            opt = torch.optim.SGD(params, lr=c.lr)
            x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
            order = torch.from_numpy(np.random.RandomState([cfg.run.seed, r, int(cid)]).permutation(data.num_train))
            steps = 0
            for s in range(0, data.num_train, c.batch_size):
                if c.max_steps and steps >= c.max_steps:
                    break
                idx = order[s : s + c.batch_size]
                opt.zero_grad()
                out = model(x[idx])
                loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y[idx].reshape(-1))
                loss.backward()
                opt.step()
                steps += 1
                examples += len(idx)
            with torch.no_grad():
                for acc, p in zip(new_w, params):
                    acc += (data.num_train / total) * p
        global_w = new_w
    train_s = time.perf_counter() - start
    with torch.no_grad():
        for p, w in zip(params, global_w):
            p.copy_(w)
        x_test, y_test = dataset.test_union()
        correct = positions = 0
        for s in range(0, len(y_test), 256):
            out = model(torch.from_numpy(x_test[s : s + 256]))
            yb = torch.from_numpy(y_test[s : s + 256])
            correct += int((out.argmax(-1) == yb).sum())
            positions += yb.numel()
    return PlainResult(train_s, correct / positions, examples)


def load(workload: Workload) -> FederatedDataset:
    return load_dataset(workload.config)
