"""The in-process simulation: build everything a config names, run the rounds, write the run folder."""

from __future__ import annotations

import logging
import time
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path

import torch

from fedloom.build import async_server, build_clients, build_strategy, client_pipeline
from fedloom.client.torch_work import TorchClientWork
from fedloom.config import Config, to_toml
from fedloom.data.dataset import FederatedDataset
from fedloom.errors import ConfigError
from fedloom.paramfiles import save_params
from fedloom.params import Params
from fedloom.rounds import round_metrics, run_rounds, train_round
from fedloom.server import (
    SyncServer,
)
from fedloom.server.sync import RoundResult, ServerState
from fedloom.simulation.engines import local_engine
from fedloom.simulation.report import plot_run, write_metrics
from fedloom.simulation.timeline import AsyncRun, SimulatedClock
from fedloom.transport.base import Transport
from fedloom.transport.inprocess import InProcessTransport

log = logging.getLogger("fedloom")


def build_engine(cfg: Config, work: TorchClientWork, dataset: FederatedDataset) -> Transport:
    """The engine ``[engine] executor`` selects; process and Ray workers rebuild the clients from ``cfg``.

    Every engine runs the client halves of the aggregator (and of a simulated attack) on each update.
    """
    e = cfg.engine
    pipeline = client_pipeline(cfg, len(dataset))
    if e.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("engine.device", "CUDA is not available on this machine")
    if e.executor == "sequential":
        return InProcessTransport(work, dataset, pipeline)
    if e.executor == "vectorized":
        return local_engine(work, dataset, vectorize=True, group_size=e.group_size, pipeline=pipeline)
    spec = partial(build_clients, cfg)
    if e.executor == "process":
        from fedloom.simulation.pool import ProcessPoolTransport

        return ProcessPoolTransport(spec, workers=e.workers, vectorize=e.vectorize, group_size=e.group_size,
                                    pipeline=pipeline)
    from fedloom.simulation.ray_engine import RayTransport

    return RayTransport(spec, address=e.ray_address, workers=e.workers, vectorize=e.vectorize,
                        group_size=e.group_size, pipeline=pipeline)


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
    stopped: str = ""  # why training ended before run.rounds (a privacy budget), if it did

    @property
    def final_accuracy(self) -> float:
        return self.history[-1]["test_accuracy"]


def _run_dir(cfg: Config) -> Path:
    root = Path(cfg.run.out_dir)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = root / f"{cfg.run.name}-{stamp}", 1
    while path.exists():
        n += 1
        path = root / f"{cfg.run.name}-{stamp}-{n}"
    path.mkdir(parents=True)
    return path


def simulate(cfg: Config, *, progress: bool = True, write: bool = True) -> RunResult:
    """Run the whole simulation the config describes; write its run folder unless ``write`` is False."""
    from fedloom.simulation.progress import RoundProgress

    start = time.perf_counter()
    work, dataset = build_clients(cfg)
    params = work.initial_params(cfg.run.seed)
    names = [n for n, _ in work.model.named_parameters()]
    strategy = build_strategy(cfg, len(dataset))
    if strategy.clients_per_round > len(dataset):
        raise ConfigError("server.clients_per_round",
                          f"asks for {strategy.clients_per_round} clients but {dataset.name} has {len(dataset)}")
    server = SyncServer(strategy, len(dataset))
    x_test, y_test = dataset.test_union()
    if cfg.eval.max_examples:
        x_test, y_test = x_test[: cfg.eval.max_examples], y_test[: cfg.eval.max_examples]
    state = server.init(params)
    first = strategy.aggregator.stop_reason(state.aggregation)
    if first:
        raise ConfigError("privacy.epsilon_budget", f"not even one round fits: {first}")
    transport = build_engine(cfg, work, dataset)
    clock = SimulatedClock.create(cfg, dataset, work) if cfg.hetero.population else None
    stream = None
    if cfg.server.aggregation != "sync":
        stream = AsyncRun(cfg, clock, async_server(cfg, strategy), transport, params)  # type: ignore[arg-type]
    setup_s = time.perf_counter() - start
    history: list[dict[str, float]] = []
    timer = {"train_s": 0.0, "t0": 0.0}
    stopped: list[str] = []  # why the run ended before its last round (a privacy budget)

    def step(state: ServerState) -> tuple[RoundResult, ServerState]:
        timer["t0"] = time.perf_counter()
        out = stream.next_update() if stream is not None else train_round(server, state, transport, clock)
        timer["train_s"] += time.perf_counter() - timer["t0"]
        return out

    def after(result: RoundResult, state: ServerState) -> bool:
        if result.problem:
            log.warning("round %d: the model was left unchanged: %s", state.round, result.problem)
        reason = strategy.aggregator.stop_reason(state.aggregation) if state.round < cfg.run.rounds else None
        if reason:
            stopped.append(reason)
        spent = (clock is not None and 0 < cfg.hetero.trip_budget <= clock.trips) or bool(reason)
        evaluate = state.round % cfg.eval.every == 0 or state.round == cfg.run.rounds or spent
        row = round_metrics(result, state, server, transport, work, (x_test, y_test), cfg, evaluate)
        if clock is not None:
            row.update(sim_time_s=clock.now, trips=clock.trips, bytes_down=clock.bytes_down, bytes_up=clock.bytes_up)
        row["round_s"] = time.perf_counter() - timer["t0"]
        row["elapsed_s"] = time.perf_counter() - start
        history.append(row)
        bar.advance(row)
        return spent

    with closing(transport), RoundProgress(cfg.run.rounds, cfg.run.name, enabled=progress) as bar:
        state = run_rounds(step, state, cfg.run.rounds, after)
    train_s = timer["train_s"]
    if stopped:
        log.warning("%s", stopped[0])
    result = RunResult(cfg, history, state.params, train_s=train_s, setup_s=setup_s,
                       param_names=names, stopped=stopped[0] if stopped else "")
    if write:
        result.run_dir = _run_dir(cfg)
        (result.run_dir / "config.toml").write_text(to_toml(cfg))
        write_metrics(result.run_dir / "metrics.csv", history)
        save_params(result.run_dir / "model.npz", state.params, names)
        plot_run(result.run_dir)
    return result
