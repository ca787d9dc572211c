"""Workloads W-A and W-B, each as a fedloom config and as a plain sequential PyTorch loop.

Both implementations train on identical data in identical order (BENCHMARKS.md's common
rules): round r samples ``RandomState([0, r]).choice(K, k, replace=False)``; client c shuffles
with ``RandomState([0, r, c]).permutation(n_train)``; FedAvg weights are train-split sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from benchmarks.plain import PlainResult, fedavg
from benchmarks.specs import WA, WA_SCALED, WB
from fedloom.build import load_dataset, model_factory
from fedloom.config import Config, config_from_dict
from fedloom.data.dataset import FederatedDataset

# fedloom engines compared with the plain loop: label -> [engine] settings.
ENGINE_VARIANTS = {
    "fedloom-sequential": {"executor": "sequential"},
    "fedloom-vectorized": {"executor": "vectorized"},
    "fedloom-process": {"executor": "process", "vectorize": False},
    "fedloom-vectorized-process": {"executor": "process", "vectorize": True},
    "fedloom-vectorized-cuda": {"executor": "vectorized", "device": "cuda"},  # only where a GPU is present
    "fedloom-auto": {"executor": "auto"},
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


ALL = ("fedloom-sequential", "fedloom-vectorized", "fedloom-process", "fedloom-vectorized-process", "fedloom-auto")
WORKLOADS = {
    "wa": Workload("W-A synthetic-overhead", config_from_dict(WA), ALL),
    "wb": Workload("W-B shakespeare-keyboard", config_from_dict(WB), ALL),
    "wa-scaled": Workload("W-A scaled (10,000 clients, 1,000 per round)", config_from_dict(WA_SCALED),
                          ("fedloom-sequential", "fedloom-vectorized", "fedloom-vectorized-process", "fedloom-auto"),
                          repeat=1),
}


def plain_fedavg(cfg: Config, dataset: FederatedDataset) -> PlainResult:
    """The config's workload trained by the plain loop (``plain.py``)."""
    c = cfg.client
    return fedavg(model_factory(cfg, dataset), dataset, rounds=cfg.run.rounds,
                  clients_per_round=cfg.server.clients_per_round, lr=c.lr, batch_size=c.batch_size,
                  max_steps=c.max_steps, seed=cfg.run.seed)


def load(workload: Workload) -> FederatedDataset:
    return load_dataset(workload.config)
