"""The in-process simulation: build everything a config names, run the rounds, write the run folder."""

from __future__ import annotations

import logging
import math
import os
import pickle
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedloom.build import async_server, build_clients, build_strategy, client_pipeline, secure_cohort
from fedloom.checkpoint import mismatch, ragged_selection, restore_state, state_arrays, state_names
from fedloom.client.pipeline import ClientPipeline
from fedloom.client.state import StateFiles
from fedloom.client.torch_work import TorchClientWork, param_names, set_params
from fedloom.client.work import failure
from fedloom.config import Config, to_toml
from fedloom.data.dataset import FederatedDataset
from fedloom.errors import ConfigError
from fedloom.paramfiles import load_params, save_params
from fedloom.params import Params
from fedloom.rounds import Failures, round_metrics, run_rounds, train_round
from fedloom.server import (
    SyncServer,
)
from fedloom.server.sync import RoundResult, ServerState
from fedloom.simulation.choice import resolve_engine
from fedloom.simulation.engines import WithClientState, local_engine
from fedloom.simulation.outputs import RunOutputs
from fedloom.simulation.plotter import Plotter
from fedloom.simulation.report import (
    MetricsFile,
    append_client_rows,
    keep_client_rows,
    plot_run,
    read_metrics,
    write_metrics,
)
from fedloom.simulation.timeline import AsyncRun, AsyncSnapshot, SecureAsyncRun, SimulatedClock
from fedloom.simulation.timings import Timings
from fedloom.transport.base import Transport
from fedloom.transport.inprocess import InProcessTransport
from fedloom.transport.metered import Metered, traffic_columns

log = logging.getLogger("fedloom")


def build_engine(cfg: Config, work: TorchClientWork, dataset: FederatedDataset, own: tuple = (),
                 states: StateFiles | None = None) -> Transport:
    """The engine ``[engine] executor`` selects (``auto``: :func:`~fedloom.simulation.choice.choose_engine`).
    Process workers forked from this process share its loaded clients; spawned workers and Ray actors rebuild
    them with ``build_clients(cfg, *own)`` (``own``: a Python caller's model function, dataset and work), sent
    pickled.

    Every engine runs the client pipeline around each client's training (``client/pipeline.py``). When
    clients keep state, it lives in ``states`` (a temporary folder when None) and travels with each request.
    """
    cfg = replace(cfg, engine=resolve_engine(cfg, work, dataset).engine)
    pipeline = client_pipeline(cfg, work, len(dataset))
    engine = _engine(cfg, work, dataset, own, pipeline)
    if not pipeline.stateful:
        return engine
    return WithClientState(engine, states or StateFiles.temporary())


def _engine(cfg: Config, work: TorchClientWork, dataset: FederatedDataset, own: tuple,
            pipeline: ClientPipeline) -> Transport:
    e = cfg.engine
    if e.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("engine.device", "CUDA is not available on this machine")
    if e.executor == "sequential":
        return InProcessTransport(work, dataset, pipeline)
    if e.executor == "vectorized":
        return local_engine(work, dataset, vectorize=True, group_size=e.group_size, pipeline=pipeline)
    if e.executor == "process":
        from fedloom.simulation.pool import Loaded, ProcessPoolTransport, start_method

        start = start_method(e.device)
        spec = Loaded(work, dataset) if start == "fork" else _picklable_spec(cfg, own)
        return ProcessPoolTransport(spec, workers=e.workers, vectorize=e.vectorize, group_size=e.group_size,
                                    pipeline=pipeline, start=start)
    from fedloom.simulation.ray_engine import RayTransport, import_ray

    try:
        import_ray()
    except ImportError as exc:
        raise ConfigError("engine.executor", str(exc)) from None
    return RayTransport(_picklable_spec(cfg, own), address=e.ray_address, workers=e.workers, vectorize=e.vectorize,
                        group_size=e.group_size, pipeline=pipeline)


def _picklable_spec(cfg: Config, own: tuple) -> partial:
    """How workers that share no memory with this process (spawned, Ray actors) rebuild the clients."""
    try:
        pickle.dumps([o for o in own if not isinstance(o, FederatedDataset)])  # arrays always pickle
    except Exception as exc:  # noqa: BLE001 - whatever fails to pickle, the user needs the same advice
        raise ConfigError("engine.executor", f"{cfg.engine.executor} workers rebuild the clients from what they are "
                                             f"sent, and it does not pickle ({type(exc).__name__}: {exc}): pass a "
                                             "module-level model function, or use the vectorized or sequential "
                                             "engine") from None
    return partial(build_clients, cfg, *own)


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
    timings: dict[str, float] = field(default_factory=dict)  # seconds by phase (simulation/timings.py)
    engine: str = ""  # the engine the clients trained on, and why (engine.executor = "auto" chooses)
    failed: str = ""  # why the run failed: its last rounds applied no update (the CLI exits 1)

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
    try:
        path.mkdir(parents=True)
    except OSError as exc:
        raise ConfigError("run.out_dir", f"cannot create the run folder {path}: {exc.strerror or exc}") from None
    return path


def check_fit(work: TorchClientWork, params: Params, dataset: FederatedDataset,
              test: tuple[np.ndarray, np.ndarray]) -> None:
    """A forward pass on two training and two test examples, so that a model that does not fit the data
    (shapes, dtypes, classes) is found before training, with the reason."""
    client = next((c for c in dataset.clients if c.num_train), None)
    samples = [("test", test[0][:2], test[1][:2])]
    if client is not None:
        samples.insert(0, (f"client {client.client_id}'s training", client.x_train[:2], client.y_train[:2]))
    for what, x, y in samples:
        try:
            work.evaluate_params(params, x, y)
        except Exception as exc:  # noqa: BLE001 - any failure of user code is reported the same way
            raise ConfigError("model", f"the model does not fit {what} data (x {x.dtype} {x.shape[1:]}, "
                                       f"y {y.dtype}): {failure(exc)}") from None


def simulate(cfg: Config, *, progress: bool = True, write: bool = True,
             model_fn: Callable[[], nn.Module] | None = None, dataset: FederatedDataset | None = None,
             work: TorchClientWork | None = None, resume: str | Path | None = None) -> RunResult:
    """Run the whole simulation the config describes, writing its run folder as it goes unless ``write`` is False.

    Everything that can be found before training is: the run folder is created (and the config
    written) first, and the model is tried on the data. ``metrics.csv`` grows a row per round; at
    Ctrl-C the folder keeps the rounds done and the model they reached. Each new kind of refused
    update is logged once; ``RunResult.failed`` says why when the last rounds applied nothing.

    From Python, ``model_fn`` (a zero-argument ``nn.Module`` builder), ``dataset`` (a
    :class:`FederatedDataset`) or ``work`` (a :class:`TorchClientWork`) replace what the config
    would build; process and Ray workers receive them pickled.

    ``resume`` names a run folder to continue from its ``checkpoint.npz`` (written every
    ``run.checkpoint_every`` rounds, at the end and at Ctrl-C): the run goes on in that folder to
    ``run.rounds`` and ends with the model an uninterrupted run reaches, bit for bit.
    """
    if cfg.data.dataset == "site" and dataset is None:
        raise ConfigError("data.dataset", "\"site\" is one deployed site's own data; a simulation needs every "
                                          "client's: name them all (dataset = \"files\" with a client column, or a "
                                          "folder of one file per client)")
    if cfg.server.aggregation != "sync" and not cfg.hetero.population:
        raise ConfigError("hetero.population", f"a simulation of {cfg.server.aggregation} runs on the simulated clock: "
                                               "name a device population (mobile, silo or a trace)")
    own = (model_fn, dataset, work)
    timings = Timings()
    start = time.perf_counter()
    if resume is not None:
        run_dir: Path | None = Path(resume)
        if not (run_dir / CHECKPOINT).exists():
            raise ConfigError("resume", f"{run_dir} has no {CHECKPOINT} to resume from")
    else:
        run_dir = _run_dir(cfg) if write else None
    plotter = Plotter() if run_dir is not None else None  # forked now: its imports overlap the run
    try:
        if run_dir is not None:
            (run_dir / "config.toml").write_text(to_toml(cfg))
        return _run(cfg, run_dir, start, timings, plotter, progress, own, resume=resume is not None)
    except BaseException:
        if resume is None and run_dir is not None and not (run_dir / "metrics.csv").exists():
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing ran: leave no empty folder behind
        raise
    finally:
        if plotter is not None:
            plotter.close()


def _run(cfg: Config, run_dir: Path | None, start: float, timings: Timings, plotter: Plotter | None,
         progress: bool, own: tuple, resume: bool = False) -> RunResult:
    from fedloom.simulation.progress import RoundProgress

    with timings("data"):
        work, dataset = build_clients(cfg, *own)
    params = work.initial_params(cfg.run.seed)
    names = param_names(work.model)
    strategy = build_strategy(cfg, len(dataset))
    if strategy.clients_per_round > len(dataset):
        raise ConfigError("server.clients_per_round",
                          f"asks for {strategy.clients_per_round} clients but {dataset.name} has {len(dataset)}")
    server = SyncServer(strategy, len(dataset))
    x_test, y_test = dataset.test_union()
    if cfg.eval.max_examples:
        x_test, y_test = x_test[: cfg.eval.max_examples], y_test[: cfg.eval.max_examples]
    check_fit(work, params, dataset, (x_test, y_test))
    state = server.init(params)
    history: list[dict[str, float]] = []
    clock = SimulatedClock.create(cfg, dataset, work) if cfg.hetero.population else None
    saved: dict[str, np.ndarray] = {}  # a resumed asynchronous run's tasks in flight
    if resume and run_dir is not None:
        if cfg.server.aggregation != "sync" and strategy.secure is not None:
            raise ConfigError("resume", "a secure FedBuff run cannot be resumed: the cohorts in flight when it stopped "
                                        "held their round's keys in memory, and their clients' masked updates cannot "
                                        "be asked for again; start it anew")
        state, saved = read_checkpoint(run_dir / CHECKPOINT, state, names, clock)
        if (cfg.server.aggregation != "sync") != bool(saved):
            raise ConfigError("server.aggregation", f"{run_dir} was not a {cfg.server.aggregation} run: resume it with "
                                                    "the aggregation it ran with")
        history = [{k: int(v) if v.is_integer() else v for k, v in row.items() if not math.isnan(v)}
                   for row in read_metrics(run_dir / "metrics.csv") if row["round"] <= state.round]
        keep_client_rows(run_dir / "clients.csv", state.round)
        log.warning("resuming %s after round %d", run_dir, state.round)
    first = strategy.aggregator.stop_reason(state.aggregation)
    if first:
        raise ConfigError("privacy.epsilon_budget", f"not even one round fits: {first}")
    outputs = RunOutputs(cfg, run_dir) if run_dir is not None else None
    states = StateFiles(run_dir / CLIENT_STATE) if run_dir is not None else None
    if states is not None and resume:  # what clients made after the checkpoint never happened
        states.rewind(int(saved["async/dispatched"]) if saved else state.round)
    try:
        with timings("engine"):
            choice = resolve_engine(cfg, work, dataset)
            log.info("engine %s", choice.reason)
            if progress:
                print(f"engine {choice.reason}", flush=True)
            transport = Metered(build_engine(replace(cfg, engine=choice.engine), work, dataset, own, states))
    except BaseException:
        if outputs is not None:
            outputs.close("FAILED")
        raise
    stream = None
    if cfg.server.aggregation != "sync" and strategy.secure is not None:
        stream = SecureAsyncRun(cfg, clock, async_server(cfg, strategy), transport, params,  # type: ignore[arg-type]
                                secure_cohort(cfg))
    elif cfg.server.aggregation != "sync":
        aserver = async_server(cfg, strategy)
        stream = AsyncRun(cfg, clock, aserver, transport, params, launch=not saved)  # type: ignore[arg-type]
        if saved:
            stream.restore(state, AsyncSnapshot.from_arrays(saved, aserver, params))
    setup_s = time.perf_counter() - start
    metrics = MetricsFile(run_dir / "metrics.csv", history) if run_dir is not None else None
    failures = Failures()
    timer = {"t0": 0.0}  # when the round began (its round_s); the rounds' sum is timings' "train"
    stopped: list[str] = []  # why the run ended before its last round (a privacy budget)
    latest: list = [state, stream.snapshot() if stream is not None else None]  # the last round written: Ctrl-C keeps it
    if clock is None and history:  # resumed: the traffic so far is in the last row kept
        transport.bytes_down = int(history[-1].get("total_bytes_down", 0))
        transport.bytes_up = int(history[-1].get("total_bytes_up", 0))
    sent = [clock.bytes_down, clock.bytes_up] if clock is not None else [transport.bytes_down, transport.bytes_up]

    def step(state: ServerState) -> tuple[RoundResult, ServerState]:
        timer["t0"] = time.perf_counter()
        with timings("train"):
            out = stream.next_update() if stream is not None else train_round(server, state, transport, clock)
        return out

    def after(result: RoundResult, state: ServerState) -> bool:
        for line in failures.observe(result):
            log.warning("%s", line)
        reason = strategy.aggregator.stop_reason(state.aggregation) if state.round < cfg.run.rounds else None
        if reason:
            stopped.append(reason)
        spent = (clock is not None and 0 < cfg.hetero.trip_budget <= clock.trips) or bool(reason)
        evaluate = state.round % cfg.eval.every == 0 or state.round == cfg.run.rounds or spent
        with timings("evaluate" if evaluate else "other"):
            row = round_metrics(result, state, server, transport, work, (x_test, y_test), cfg, evaluate)
        traffic = clock if clock is not None else transport  # the clock counts what its devices sent
        down, up = traffic.bytes_down, traffic.bytes_up  # type: ignore[union-attr]
        row.update(traffic_columns(down, up, sent))
        if clock is not None:
            row.update(sim_time_s=clock.now, trips=clock.trips)
        row["round_s"] = time.perf_counter() - timer["t0"]
        row["elapsed_s"] = time.perf_counter() - start
        with timings("write"):
            if metrics is not None:
                metrics.append(row)
            else:
                history.append(row)
            if outputs is not None:
                outputs.log(row)
            if run_dir is not None and cfg.run.client_metrics:
                append_client_rows(run_dir / "clients.csv", state.round, result.selected, result.accepted,
                                   result.rejected, result.client_metrics, result.durations)
            snap = stream.snapshot() if stream is not None else None
            every = cfg.run.checkpoint_every
            if run_dir is not None and every and state.round % every == 0:
                write_checkpoint(run_dir / CHECKPOINT, state, names, clock, states, snap)
        latest[:] = [state, snap]
        bar.advance(row)
        return spent

    status = "FAILED"
    try:
        try:
            with RoundProgress(cfg.run.rounds, cfg.run.name, enabled=progress) as bar:
                state = run_rounds(step, state, cfg.run.rounds, after)
        finally:
            with timings("engine"):
                transport.close()
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        if run_dir is not None and history:
            write_metrics(run_dir / "metrics.csv", [r for r in history if r["round"] <= latest[0].round])
            keep_client_rows(run_dir / "clients.csv", latest[0].round)
            write_checkpoint(run_dir / CHECKPOINT, latest[0], names, clock, states, latest[1])
            _finish_folder(run_dir, work, latest[0].params, names, timings, plotter)
            timings.write(run_dir)
            log.warning("interrupted after round %d; %s has its metrics and that round's model",
                        latest[0].round, run_dir)
        raise
    finally:
        if outputs is not None:
            outputs.close(status)
    train_s = timings.seconds["train"]
    if stopped:
        log.warning("%s", stopped[0])
    if failures.counts:
        log.warning("refused updates in this run, by code: %s", failures.summary())
    if failures.rounds_unchanged:
        log.warning("%d of %d rounds left the model unchanged", failures.rounds_unchanged, len(history))
    result = RunResult(cfg, history, state.params, train_s=train_s, setup_s=setup_s, engine=choice.reason,
                       param_names=names, stopped=stopped[0] if stopped else "", failed=failures.verdict(len(history)))
    if run_dir is not None:
        result.run_dir = run_dir
        with timings("write"):
            write_checkpoint(run_dir / CHECKPOINT, state, names, clock, states, latest[1])
        _finish_folder(run_dir, work, state.params, names, timings, plotter)
        result.timings = timings.write(run_dir)
    else:
        result.timings = timings.summary()
    return result


CHECKPOINT = "checkpoint.npz"
CLIENT_STATE = "client_state"  # the clients' state, by version (client/state.py): part of the checkpoint


CLOCK = ("now", "trips", "bytes_down", "bytes_up")  # a synchronous run's simulated clock, between rounds


def write_checkpoint(path: Path, state: ServerState, names: list[str], clock: SimulatedClock | None = None,
                     states: StateFiles | None = None, snap: AsyncSnapshot | None = None) -> None:
    """The round, model, optimizer, aggregator and selector state (and the simulated clock), whole or not at all;
    for FedBuff and FedAsync also the tasks in flight (``snap``).

    The clients' state is the ``client_state`` folder's versions up to the round (or the last
    dispatch): the newer ones a resumed run drops (:meth:`StateFiles.rewind`); the older ones no
    round after this can need go now.
    """
    tmp = path.with_name(path.name + ".tmp")
    ticks = [np.asarray(getattr(clock, k)) for k in CLOCK] if clock is not None else []
    more, extra = snap.arrays() if snap is not None else ([], [])
    with open(tmp, "wb") as f:
        save_params(f, [np.asarray(state.round), *state.params, *state_arrays(state, selection=True), *ticks, *extra],
                    ["round", *names, *state_names(state, selection=True), *(f"clock/{k}" for k in CLOCK[:len(ticks)]),
                     *more])
    os.replace(tmp, path)
    if states is not None:
        states.prune(snap.first_task - 1 if snap is not None else state.round)


def read_checkpoint(path: Path, fresh: ServerState, names: list[str],
                    clock: SimulatedClock | None = None) -> tuple[ServerState, dict[str, np.ndarray]]:
    """``fresh`` (and ``clock``) as the checkpoint left them, and an asynchronous run's ``async/...`` arrays; one of
    another model or setting is refused."""
    saved_names, arrays = load_params(path)
    extra = {n: a for n, a in zip(saved_names, arrays) if n.startswith("async/")}
    arrays = [a for n, a in zip(saved_names, arrays) if not n.startswith("async/")]
    saved_names = [n for n in saved_names if not n.startswith("async/")]
    ticks = [f"clock/{k}" for k in CLOCK] if clock is not None else []
    expected = ["round", *names, *state_names(fresh, selection=True), *ticks]
    like = [np.asarray(0), *fresh.params, *state_arrays(fresh, selection=True),
            *(np.asarray(getattr(clock, k)) for k in CLOCK[:len(ticks)])]
    problem = mismatch(saved_names, arrays, expected, like, "this run",
                       ragged_selection(fresh) | {"round", *ticks})
    if problem:
        raise ConfigError("resume", f"{path} does not fit this run's model and settings: {problem}")
    if clock is not None:
        for k, a in zip(CLOCK, arrays[len(arrays) - len(CLOCK):]):
            setattr(clock, k, a.item())
    k = 1 + len(names)
    return (restore_state(fresh, int(arrays[0]), arrays[1:k], arrays[k:len(arrays) - len(ticks)], selection=True),
            extra)


def _finish_folder(run_dir: Path, work: TorchClientWork, params: Params, names: list[str],
                   timings: Timings, plotter: Plotter | None) -> None:
    """``model.npz`` (arrays by name), ``model.pt`` (the model's ``state_dict`` for ``torch.load``) and the plot."""
    with timings("write"):
        save_params(run_dir / "model.npz", params, names)
        set_params(work.model, params)
        torch.save(work.model.state_dict(), run_dir / "model.pt")
    with timings("plot"):
        plotter.draw(run_dir) if plotter is not None else plot_run(run_dir)
