"""The deployed server: state that can be trusted, the gRPC service, and the round loop behind it.

Clients connect out and pull work (long-poll), so a device behind NAT can take part; the service
(``service.py``) runs in an event loop thread. The round loop runs in the calling thread and is
the simulation's: a :class:`SyncServer` whose transport (:class:`DeployedTransport`) queues tasks
for the clients and waits for their replies. After every round the global model and the
optimizer state are checkpointed and the round is marked done in SQLite, so a restarted server
resumes from the last completed round. With ``server.aggregation = "fedbuff"`` or ``"fedasync"``
the loop is ``deploy/buffered.py``'s instead (the simulation's :class:`AsyncServer`, every accepted
update journaled before its client is answered), and a "round" is a server update (a version).

Before anything is served, the state is checked: a database that lost committed rounds or
enrolments, a checkpoint that is not the file written for its round or that holds NaN, and a
checkpoint or configuration that does not fit the configured model are refused with a
:class:`StateError` naming the file and what to do. Clients are told that the run is over only
when its last round is done; a server that stops otherwise (an error, Ctrl-C, SIGTERM) cuts their
calls, and they keep reconnecting until it is back.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from fedloom.build import async_server, build_clients, build_strategy
from fedloom.checkpoint import mismatch, ragged_selection, restore_state, state_arrays, state_names
from fedloom.client.torch_work import param_names
from fedloom.config import Config, DeployConfig, HeteroConfig, to_toml
from fedloom.data.dataset import FederatedDataset
from fedloom.data.site import site_arrays
from fedloom.deploy.buffered import DeployedAsync, journal_entry
from fedloom.deploy.certs import check_client_name
from fedloom.deploy.journal import Journal
from fedloom.deploy.security import server_credentials
from fedloom.deploy.service import FederationService
from fedloom.deploy.state import ServerState as StateStore
from fedloom.deploy.state import private_dir
from fedloom.errors import CertError, ConfigError, FedloomError, StateError
from fedloom.hetero.clock import run_flops
from fedloom.messages import Reply, TrainRequest
from fedloom.params import Params
from fedloom.rounds import round_metrics, run_rounds, train_round
from fedloom.server import SyncServer
from fedloom.server.asynchronous import AsyncState
from fedloom.server.sync import RoundResult, ServerState
from fedloom.transport.dispatch import REPLY_SLACK_BYTES, DeployedTransport, LoopThread
from fedloom.transport.metered import Metered, traffic_columns

log = logging.getLogger("fedloom")

# Settings a run's checkpoints depend on: changed between restarts, the saved state cannot be resumed.
FIXED_SETTINGS = ("model", "server.optimizer", "aggregation", "privacy", "secagg")


def _check_config(cfg: Config) -> None:
    """Refuse what the deployed server cannot run, before anything touches disk."""
    if cfg.server.aggregation != "sync" and cfg.secagg.mode != "off":
        raise ConfigError("secagg.mode", f"secure {cfg.server.aggregation} (one cohort per buffer) is simulated "
                                            "only; the deployed server sums securely in synchronous rounds "
                                            "(server.aggregation = \"sync\")")
    if cfg.hetero.population:
        raise ConfigError("hetero.population", "simulated devices have no place in a deployment, whose clients are "
                                               "real (and measured: `fedloom trace` writes them as a population); "
                                               "remove it. hetero.deadline_s, over_select and stragglers apply, in "
                                               "wall-clock seconds")
    for name in cfg.deploy.clients:
        try:
            check_client_name(name)
        except CertError as exc:
            raise ConfigError("deploy.clients", exc.message) from None


def _enroll(store: StateStore, names: list[str], token_dir: Path) -> None:
    """Enroll configured clients not yet known; each token goes to ``token_dir/NAME.token`` (0600).

    A token file of a client the registry does not know means the database lost enrolments (a
    token is written only after its enrolment is committed): refused, rather than enrolling anew.
    """
    private_dir(token_dir)
    known = {c["name"] for c in store.clients()}
    stray = sorted(p for p in token_dir.glob("*.token") if p.stem not in known)
    if stray:
        raise StateError(f"{stray[0]} exists but {store.path} has no client {stray[0].stem!r}: the database has lost "
                         "enrolments (was server.db-wal deleted or truncated, or an older copy restored?). Restore "
                         "server.db and server.db-wal together from a backup; to start over, move the state folder "
                         "aside", stage="state")
    for name in names:
        if name in known:
            continue
        _, token = store.enroll(name)
        with os.fdopen(os.open(token_dir / f"{name}.token", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(token)


def _settings(toml_text: str) -> dict[str, object]:
    """A config's TOML as ``{"section.key": value}``."""
    return {f"{s}.{k}": v for s, table in tomllib.loads(toml_text).items() for k, v in table.items()}


def _check_same_run(stored: str, cfg: Config, db: Path) -> None:
    """Refuse to resume a run whose :data:`FIXED_SETTINGS` changed; report other changed settings."""
    old, new = _settings(stored), _settings(to_toml(cfg))
    changed = {k: (old[k], new[k]) for k in old.keys() & new.keys() if old[k] != new[k]}
    fixed = sorted(k for k in changed if k.split(".")[0] in FIXED_SETTINGS or k in FIXED_SETTINGS)
    if fixed:
        was = "; ".join(f"{k} was {changed[k][0]!r}, now {changed[k][1]!r}" for k in fixed)
        raise StateError(f"run {cfg.run.name!r} in {db} was started with another model, optimizer or aggregation "
                         f"({was}): its checkpoints cannot be resumed. Put the settings back, or give the run a new "
                         "run.name to start a new one", stage="state")
    for k in sorted(changed):
        log.info("resuming with a changed setting: %s was %r, now %r", k, *changed[k])


def _checkpoint_arrays(state: ServerState) -> Params:
    return state.params + state_arrays(state, selection=True)  # a selector's learnt state (Oort's) too


def _resume(store: StateStore, run_id: int, fresh: ServerState, names: list[str]) -> ServerState:
    """``fresh`` with the latest checkpoint's round, model, optimizer and aggregator state, checked against
    ``fresh``'s names, shapes and dtypes."""
    saved = store.load_checkpoint(run_id)
    if saved is None:
        return fresh
    done, saved_names, arrays = saved
    path = store.checkpoint_path(run_id, done)
    problem = mismatch(saved_names, arrays, names + state_names(fresh, selection=True), _checkpoint_arrays(fresh),
                       "the model", ragged_selection(fresh))
    if problem:
        raise StateError(f"checkpoint {path} does not fit the configured model: {problem}. Was [model] changed "
                         "since the run started? Put it back, or give the run a new run.name to start a new one",
                         stage="checkpoint")
    log.info("resuming after round %d from %s", done, path)
    return restore_state(fresh, done, arrays[: len(names)], arrays[len(names):], selection=True)


def _check_budget(d: DeployConfig, params: Params) -> None:
    """A train reply (and what decoding it takes) must fit ``inflight_mb``, or no update could ever arrive."""
    need = 2 * (sum(p.nbytes for p in params) + REPLY_SLACK_BYTES)
    if need > d.inflight_mb << 20:
        raise ConfigError("deploy.inflight_mb", f"a train reply of this model needs {need >> 20} MiB in flight "
                                                f"(its bytes and its decoding); raise it to at least {-(-need >> 20)}")


def server_test_set(cfg: Config, dataset: FederatedDataset) -> tuple[np.ndarray, np.ndarray] | None:
    """What the server evaluates the model on centrally: ``deploy.test_data``, else the held-out splits of the
    dataset it loaded; none for a server of sites (``data.dataset = "site"``), which holds no data."""
    if cfg.deploy.test_data:
        return site_arrays(cfg, cfg.deploy.test_data)
    return None if cfg.data.dataset == "site" else dataset.test_union()


class Connected:
    """The deployed server's pacer (``rounds.Pacer``): a round asks the connected clients.

    It waits up to ``round_timeout_s`` for ``min_clients`` of them that are ready: a client still busy
    with a task a round stopped waiting for is not counted nor asked until it is done with it (asked
    again at once, it would start late again). When every client is connected this is all of them,
    so selection (and the whole run) is the simulation's; a lost client is not asked again until it
    reconnects. Every reply the transport returns is kept, with the round
    trip the server measured of each (what a selector such as Oort learns from).

    The simulated clock's ``[hetero]`` settings mean the same here in wall-clock seconds:
    ``over_select`` asks that many times ``clients_per_round`` and keeps the first
    ``clients_per_round`` updates; ``deadline_s`` stops waiting for a round's updates (and for each
    step of a secure round) after that many seconds, the rest being answered ``not_kept`` and their
    late replies measured; with ``stragglers = "partial"`` a client is asked for the local steps that
    fit in 80% of the deadline at the speed it was last measured at (a client not measured yet does
    its full work).
    """

    def __init__(self, transport: DeployedTransport, d: DeployConfig, h: HeteroConfig, num_clients: int):
        self.transport, self.d, self.h, self.num_clients = transport, d, h, num_clients

    def requests(self, server: SyncServer, state: ServerState) -> tuple[list[TrainRequest], ServerState]:
        deadline = time.monotonic() + self.d.round_timeout_s
        while True:  # a client still busy with a task an earlier round gave up on would start late: not counted
            connected = [c for c in self.transport.ready() if c < self.num_clients]
            if len(connected) >= self.d.min_clients or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        k = server.strategy.clients_per_round
        ask = min(len(connected), math.ceil(self.h.over_select * k - 1e-9))
        requests, state = server.train_requests(state, connected, k=ask)
        self.transport.keep = k if len(requests) > k else 0
        self.transport.deadline_s = self.h.deadline_s
        if self.h.deadline_s > 0 and self.h.stragglers == "partial":
            requests = [self._partial(r) for r in requests]
        return requests, state

    def _partial(self, request: TrainRequest) -> TrainRequest:
        """``request`` capped to the local steps that fit in 80% of the deadline at the client's measured speed."""
        measured = self.transport.speed.get(request.client_id)
        if measured is None:
            return request
        per_example, transfer_s = measured
        if not per_example > 0:
            return request
        fit = math.floor((0.8 * self.h.deadline_s - transfer_s) / (per_example * request.config.batch_size))
        cap = request.config.max_steps
        if fit < 1 or (cap is not None and fit >= cap):
            return request
        return replace(request, config=replace(request.config, max_steps=fit))

    def settle(self, requests: Sequence[TrainRequest],
               replies: Sequence[Reply]) -> tuple[list[Reply], dict[int, float]]:
        return list(replies), self.transport.round_trips()


def _write_presence(store: StateStore, run_id: int, transport: Metered, every_s: float,
                    done: threading.Event) -> None:
    """Write each client's latest connected interval every ``every_s`` seconds until ``done``, so that who is
    connected is on record between rounds too (``fedloom dashboard`` reads it); the rounds write the rest."""
    while not done.wait(max(1.0, every_s)):
        try:
            latest = {c: spans[-1:] for c, spans in transport.engine.presence().items()}  # type: ignore[union-attr]
            store.record_tasks(run_id, [], 0.0, latest)
        except (StateError, RuntimeError, TimeoutError) as exc:  # the loop or the store is closing: the run goes on
            log.debug("presence not written: %s", exc)


def serve(cfg: Config, *, on_round: Callable[[dict[str, float]], None] | None = None) -> ServerState:
    """Run (or resume) the configured run as a gRPC server until its last round is done."""
    _check_config(cfg)
    d = cfg.deploy
    if d.tls:
        credentials = server_credentials(d)
    else:
        credentials = None
        log.warning("deploy.tls = false: tokens, models and updates travel unencrypted and unauthenticated on %s; "
                    "use it only for experiments on a trusted network", d.address)
    state_dir = Path(d.state_dir)
    private_dir(state_dir)
    store = StateStore(state_dir / "server.db")
    try:
        store.check_files()
        _enroll(store, d.clients, state_dir / "tokens")
        run_id = store.resume_run(cfg.run.name)
        if run_id is None:
            run_id = store.start_run(cfg.run.name, to_toml(cfg))
        else:
            _check_same_run(store.run_config(run_id), cfg, store.path)
        work, dataset = build_clients(cfg)  # the model (site: from the config alone), and any data the server holds
        names = param_names(work.model)
        num_clients = len(store.clients())
        test = server_test_set(cfg, dataset)
        strategy = build_strategy(cfg, num_clients, deployed=True)
        if test is None and not strategy.evaluate_clients:
            log.info("the server holds no test set (deploy.test_data): every client evaluates each round on its own")
            strategy = replace(strategy, evaluate_clients=num_clients)
        server = SyncServer(strategy, num_clients)
        state = _resume(store, run_id, server.init(work.initial_params(cfg.run.seed)), names)
        _check_budget(d, state.params)
        if state.round >= cfg.run.rounds:
            log.info("run %s is already finished after round %d: clients that connect are told so", cfg.run.name,
                     state.round)
        loop = LoopThread()
        service = FederationService(store, cfg)
        journal = None
        if cfg.server.aggregation != "sync":  # every accepted update is journaled before its push is answered
            journal = Journal(store, run_id, state_dir / "journal" / f"run-{run_id:04d}")
            service.dispatcher.journal = lambda task, reply: asyncio.wrap_future(
                journal.write(journal_entry(task.task_id, task.version, reply)))  # type: ignore[union-attr]
            service.dispatcher.received.update(store.journaled(run_id, 10_000))
        if server.strategy.secure is not None:  # only masked updates of this length are let in
            service.dispatcher.masked_bytes = server.strategy.secure.payload_bytes(
                sum(p.size for p in state.params))
        completed = False
        done = threading.Event()  # tells the presence writer to stop
        try:
            try:
                port = loop.call(service.start(d.address, credentials))
            except RuntimeError as exc:
                raise FedloomError(f"cannot listen on {d.address}: {exc}") from None
            if port == 0:
                raise FedloomError(f"cannot listen on {d.address}")
            log.info("listening on %s", d.address)
            last = (store.history(run_id) or [{"metrics": {}}])[-1]["metrics"]  # the traffic before a restart
            transport = Metered(DeployedTransport(loop, service.dispatcher, d.round_timeout_s, 3 * d.heartbeat_s,
                                                  service.max_message_bytes),
                                int(last.get("total_bytes_down", 0)), int(last.get("total_bytes_up", 0)))
            presence = threading.Thread(target=_write_presence, args=(store, run_id, transport, d.heartbeat_s, done),
                                        name="fedloom-presence", daemon=True)
            presence.start()
            while len(transport.connected()) < d.min_clients:  # before the first round: no limit
                time.sleep(0.1)
            pacer = Connected(transport.engine, d, cfg.hetero, num_clients)  # type: ignore[arg-type]
            flops = run_flops(cfg, work.model, dataset)
            sent = [transport.bytes_down, transport.bytes_up]
            stream = None if journal is None else DeployedAsync(
                cfg, async_server(cfg, strategy), transport,
                AsyncState(state.round, state.params, state.opt_state, state.aggregation), journal, store, run_id,
                num_clients)

            def step(state: ServerState) -> tuple[RoundResult, ServerState]:
                store.open_round(run_id, state.round + 1)
                return train_round(server, state, transport, pacer) if stream is None else stream.next_update()

            def after(result: RoundResult, state: ServerState) -> bool:
                for cid, why in sorted(result.rejected.items(), key=str):
                    log.info("round %d: no update from client %s: %s", state.round, cid, why[:300])
                evaluate = stream is None or state.round % cfg.eval.every == 0 or state.round == cfg.run.rounds
                row = round_metrics(result, state, server, transport, work, test, cfg, evaluate)
                row.update(traffic_columns(transport.bytes_down, transport.bytes_up, sent))
                store.complete_round(run_id, state.round, _checkpoint_arrays(state),
                                     names + state_names(state, selection=True), row,
                                     applied=stream.applied if stream is not None else ())
                if journal is not None:
                    journal.prune()
                store.record_tasks(run_id, transport.engine.take_measured(), flops, transport.engine.presence())
                if on_round is not None:
                    on_round(row)
                reason = server.strategy.aggregator.stop_reason(state.aggregation) \
                    if state.round < cfg.run.rounds else None
                if reason:
                    log.warning("%s", reason)
                return bool(reason)

            state = run_rounds(step, state, cfg.run.rounds, after)
            completed = True
        finally:
            done.set()
            try:
                loop.call(service.stop(completed, linger_s=min(10.0, 2 * d.heartbeat_s)), timeout=30)
            finally:
                loop.close()
                if journal is not None:
                    journal.close()
        return state
    finally:
        store.close()
