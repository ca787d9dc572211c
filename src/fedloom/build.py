"""Building a run from its config: the dataset, the model, the client work and the server's strategy.

Shared by the simulation and the deployment (server and clients build the same pieces from the
same config).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fedloom.client.torch_work import TorchClientWork
from fedloom.config import Config
from fedloom.data.dataset import FederatedDataset
from fedloom.errors import DataError
from fedloom.messages import EvaluateConfig, TrainConfig
from fedloom.models import build_model
from fedloom.server import (
    ClientSelector,
    OortSelector,
    PowerOfChoiceSelector,
    Strategy,
    UniformSelector,
    adagrad,
    adam,
    momentum,
    sgd,
    yogi,
)
from fedloom.server.asynchronous import AsyncServer, polynomial_staleness
from fedloom.server.optimizers import ServerOptimizer


def load_dataset(cfg: Config) -> FederatedDataset:
    """The federated dataset the config's ``[data]`` section names."""
    from fedloom import data as fd

    d, seed = cfg.data, cfg.run.seed
    if d.dataset == "shakespeare":
        return fd.load_shakespeare(seq_len=d.seq_len, train_fraction=d.train_fraction,
                                   max_clients=d.num_clients or None)
    if d.dataset == "synthetic":
        return fd.synthetic(alpha=d.synthetic_alpha, beta=d.synthetic_beta, num_clients=d.num_clients or 1000,
                            seed=seed, train_fraction=d.train_fraction)
    if d.dataset == "leaf":
        return fd.load_leaf(d.path, d.test_path or None, train_fraction=d.train_fraction)
    return fd.tabular(d.dataset, d.num_clients, partition=d.partition, alpha=d.alpha,
                      shards_per_client=d.shards_per_client, seed=seed, train_fraction=d.train_fraction)


def model_factory(cfg: Config, dataset: FederatedDataset) -> Callable[[], nn.Module]:
    """A zero-argument function building the config's model for this dataset's inputs."""
    sample = next((c.x_train for c in dataset.clients if c.num_train), None)
    if sample is None:
        raise DataError(f"dataset {dataset.name!r} has no training samples")
    m = cfg.model
    input_shape = tuple(sample.shape[1:])
    return lambda: build_model(m.name, input_shape, dataset.num_classes, hidden=tuple(m.hidden), channels=m.channels,
                               embed_dim=m.embed_dim, hidden_size=m.hidden_size, num_layers=m.num_layers)


def build_clients(cfg: Config) -> tuple[TorchClientWork, FederatedDataset]:
    """The client work and data a config describes; a picklable ``ClientSpec`` as ``partial(build_clients, cfg)``."""
    dataset = load_dataset(cfg)
    return TorchClientWork(model_factory(cfg, dataset), device=cfg.engine.device), dataset


def server_optimizer(cfg: Config) -> ServerOptimizer:
    s = cfg.server
    return {
        "sgd": lambda: sgd(s.lr),
        "momentum": lambda: momentum(s.lr, s.momentum),
        "adagrad": lambda: adagrad(s.lr, s.beta1, s.tau),
        "adam": lambda: adam(s.lr, s.beta1, s.beta2, s.tau),
        "yogi": lambda: yogi(s.lr, s.beta1, s.beta2, s.tau),
    }[s.optimizer]()


def client_selector(cfg: Config) -> ClientSelector:
    """The selector ``[server] selection`` names, seeded by the run's seed."""
    s = cfg.server
    if s.selection == "oort":
        return OortSelector(seed=cfg.run.seed)
    if s.selection == "power_of_choice":
        return PowerOfChoiceSelector(d=s.choice_d or 2 * s.clients_per_round, seed=cfg.run.seed)
    return UniformSelector(cfg.run.seed)


def build_strategy(cfg: Config) -> Strategy:
    c = cfg.client
    train = TrainConfig(lr=c.lr, batch_size=c.batch_size, local_epochs=c.local_epochs,
                        max_steps=c.max_steps or None, mu=c.mu, seed=cfg.run.seed)
    return Strategy(
        clients_per_round=cfg.server.clients_per_round,
        train=train,
        selector=client_selector(cfg),
        optimizer=server_optimizer(cfg),
        min_updates=cfg.server.min_updates,
        evaluate_clients=cfg.eval.federated_clients,
        evaluate=EvaluateConfig(batch_size=cfg.eval.batch_size),
    )


def async_server(cfg: Config, strategy: Strategy) -> AsyncServer:
    """FedBuff with ``buffer_size`` (default half of ``clients_per_round``) or FedAsync (a buffer of one)."""
    s = cfg.server
    size = 1 if s.aggregation == "fedasync" else (s.buffer_size or max(1, s.clients_per_round // 2))
    return AsyncServer(strategy, size, polynomial_staleness(s.staleness_exponent))
