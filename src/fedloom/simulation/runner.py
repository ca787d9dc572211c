"""The in-process simulation: build everything a config names, run the rounds, write the run folder."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import nn

from fedloom.client.torch_work import TorchClientWork
from fedloom.data.dataset import FederatedDataset
from fedloom.errors import ConfigError, DataError
from fedloom.messages import EvaluateConfig, TrainConfig
from fedloom.models import build_model
from fedloom.params import Params
from fedloom.server import (
    ClientSelector,
    OortSelector,
    PowerOfChoiceSelector,
    Strategy,
    SyncServer,
    UniformSelector,
    adagrad,
    adam,
    momentum,
    sgd,
    yogi,
)
from fedloom.server.optimizers import ServerOptimizer
from fedloom.server.sync import RoundResult, ServerState
from fedloom.simulation.config import Config, to_toml
from fedloom.simulation.engines import Engine, local_engine
from fedloom.simulation.report import plot_run, write_metrics
from fedloom.simulation.timeline import AsyncRun, SimulatedClock, async_server
from fedloom.transport.inprocess import InProcessTransport


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


def build_engine(cfg: Config, work: TorchClientWork, dataset: FederatedDataset) -> Engine:
    """The engine ``[engine] executor`` selects; process and Ray workers rebuild the clients from ``cfg``."""
    e = cfg.engine
    if e.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("engine.device", "CUDA is not available on this machine")
    if e.executor == "sequential":
        return InProcessTransport(work, dataset)
    if e.executor == "vectorized":
        return local_engine(work, dataset, vectorize=True, group_size=e.group_size)
    spec = partial(build_clients, cfg)
    if e.executor == "process":
        from fedloom.simulation.pool import ProcessPoolTransport

        return ProcessPoolTransport(spec, workers=e.workers, vectorize=e.vectorize, group_size=e.group_size)
    from fedloom.simulation.ray_engine import RayTransport

    return RayTransport(spec, address=e.ray_address, workers=e.workers, vectorize=e.vectorize,
                        group_size=e.group_size)


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


@dataclass
class RunResult:
    """A finished simulation: per-round metrics, the final model and where it was written."""

    config: Config
    history: list[dict[str, float]]
    params: Params
    run_dir: Path | None = None
    train_s: float = 0.0  # the training rounds alone: selection, client work, aggregation (no evaluation)
    setup_s: float = 0.0  # data loading and model construction
    param_names: list[str] = field(default_factory=list)

    @property
    def final_accuracy(self) -> float:
        return self.history[-1]["test_accuracy"]


def round_metrics(result: RoundResult, state: ServerState, server: SyncServer, transport: Engine,
                  work: TorchClientWork, test: tuple[np.ndarray, np.ndarray], cfg: Config,
                  evaluate: bool) -> dict[str, float]:
    """A round's metrics row: training counts and loss; with ``evaluate``, centralised and federated evaluation."""
    row: dict[str, float] = {
        "round": state.round, "train_loss": result.train_loss, "clients": len(result.selected),
        "accepted": len(result.accepted), "rejected": len(result.rejected), "examples": result.examples,
    }
    if evaluate:
        central = work.evaluate_params(state.params, test[0], test[1], cfg.eval.batch_size)
        row.update(test_loss=central.loss, test_accuracy=central.accuracy)
        asked = server.evaluate_requests(state, cfg.run.seed)
        fed = server.summarize(asked, transport.exchange(asked))
        if fed is not None:
            row.update(fed_loss=fed.loss, fed_accuracy=fed.accuracy)
    return row


def _run_dir(cfg: Config) -> Path:
    root = Path(cfg.run.out_dir)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = root / f"{cfg.run.name}-{stamp}", 1
    while path.exists():
        n += 1
        path = root / f"{cfg.run.name}-{stamp}-{n}"
    path.mkdir(parents=True)
    return path


def save_params(path: Path | BinaryIO, params: Params, names: list[str]) -> None:
    """Save parameters as ``.npz`` keyed by parameter name (read back with :func:`load_params`)."""
    np.savez(path, **dict(zip(names, params)))


def load_params(path: str | Path) -> tuple[list[str], Params]:
    """Read a model saved by :func:`save_params` (never unpickles)."""
    with np.load(path, allow_pickle=False) as f:
        return list(f.files), [f[k] for k in f.files]


def simulate(cfg: Config, *, progress: bool = True, write: bool = True) -> RunResult:
    """Run the whole simulation the config describes; write its run folder unless ``write`` is False."""
    from fedloom.simulation.progress import RoundProgress

    start = time.perf_counter()
    work, dataset = build_clients(cfg)
    params = work.initial_params(cfg.run.seed)
    names = [n for n, _ in work.model.named_parameters()]
    strategy = build_strategy(cfg)
    if strategy.clients_per_round > len(dataset):
        raise ConfigError("server.clients_per_round",
                          f"asks for {strategy.clients_per_round} clients but {dataset.name} has {len(dataset)}")
    server = SyncServer(strategy, len(dataset))
    x_test, y_test = dataset.test_union()
    if cfg.eval.max_examples:
        x_test, y_test = x_test[: cfg.eval.max_examples], y_test[: cfg.eval.max_examples]
    state = server.init(params)
    transport = build_engine(cfg, work, dataset)
    clock = SimulatedClock.create(cfg, dataset, work) if cfg.hetero.population else None
    stream = None
    if cfg.server.aggregation != "sync":
        stream = AsyncRun(cfg, clock, async_server(cfg, strategy), transport, params)  # type: ignore[arg-type]
    setup_s = time.perf_counter() - start
    history: list[dict[str, float]] = []
    train_s = 0.0
    with closing(transport), RoundProgress(cfg.run.rounds, cfg.run.name, enabled=progress) as bar:
        for _ in range(cfg.run.rounds):
            t0 = time.perf_counter()
            if stream is not None:
                result, state = stream.next_update()
            elif clock is not None:
                result, state = clock.round(server, state, transport)
            else:
                requests, state = server.train_requests(state)
                result, state = server.apply(state, requests, transport.exchange(requests))
            train_s += time.perf_counter() - t0
            spent = clock is not None and 0 < cfg.hetero.trip_budget <= clock.trips
            evaluate = state.round % cfg.eval.every == 0 or state.round == cfg.run.rounds or spent
            row = round_metrics(result, state, server, transport, work, (x_test, y_test), cfg, evaluate)
            if clock is not None:
                row.update(sim_time_s=clock.now, trips=clock.trips, bytes_down=clock.bytes_down,
                           bytes_up=clock.bytes_up)
            row["round_s"] = time.perf_counter() - t0
            row["elapsed_s"] = time.perf_counter() - start
            history.append(row)
            bar.advance(row)
            if spent:
                break
    result = RunResult(cfg, history, state.params, train_s=train_s, setup_s=setup_s,
                       param_names=names)
    if write:
        result.run_dir = _run_dir(cfg)
        (result.run_dir / "config.toml").write_text(to_toml(cfg))
        write_metrics(result.run_dir / "metrics.csv", history)
        save_params(result.run_dir / "model.npz", state.params, names)
        plot_run(result.run_dir)
    return result
