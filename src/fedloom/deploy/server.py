"""The deployed server: the gRPC service clients connect to, and the round loop behind it.

Clients connect out and pull work (long-poll), so a device behind NAT can take part. A client
joins with its enrolment token and gets a session; every later call names the session in the
``fedloom-session`` metadata. The round loop is the simulation's: a :class:`SyncServer` whose
transport (:class:`DeployedTransport`) queues tasks for the clients and waits for their replies.
After every round the global model and the optimizer state are checkpointed and the round is
marked done in SQLite, so a restarted server resumes from the last completed round.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc

from fedloom.deploy.dispatch import DeployedTransport, Dispatcher
from fedloom.deploy.security import server_credentials
from fedloom.deploy.state import ServerState as StateStore
from fedloom.errors import ConfigError, FedloomError
from fedloom.params import Params
from fedloom.server import SyncServer
from fedloom.server.sync import ServerState
from fedloom.simulation.config import Config, DeployConfig, to_toml
from fedloom.simulation.runner import build_clients, build_strategy, round_metrics
from fedloom.transport import wire
from fedloom.transport.proto import fedloom_pb2 as pb
from fedloom.transport.proto import fedloom_pb2_grpc as pb_grpc

log = logging.getLogger("fedloom")

SESSION_KEY = "fedloom-session"
STATUS_KEY = "fedloom-status"
MAX_POLL_S = 30


def limits(cfg: Config) -> wire.Limits:
    size = cfg.deploy.max_message_mb * (1 << 20)
    return wire.Limits(max_message_bytes=size, max_tensor_bytes=size)


class FederationService(pb_grpc.FederationServicer):
    """Join, Pull, Push, Heartbeat. Malformed or oversized input gets an error reply, never a crash."""

    def __init__(self, store: StateStore, dispatcher: Dispatcher, cfg: Config):
        self.store = store
        self.dispatcher = dispatcher
        self.cfg = cfg
        self.limits = limits(cfg)
        self.sessions: dict[str, tuple[int, str]] = {}  # session -> (client id, token), to re-check revocation
        self.finished = threading.Event()
        self._lock = threading.Lock()

    def _client(self, context: grpc.ServicerContext, session: str = "") -> int:
        session = session or dict(context.invocation_metadata()).get(SESSION_KEY, "")
        with self._lock:
            found = self.sessions.get(session)
        if found is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown session: join again")
        return found[0]  # type: ignore[index]

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        found = self.store.authenticate(request.token)
        if found is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked client token")
        cid, name = found  # type: ignore[misc]
        if self.cfg.deploy.mutual_tls:
            names = [v.decode() for v in context.auth_context().get("x509_common_name", [])]
            if name not in names:
                context.abort(grpc.StatusCode.PERMISSION_DENIED,
                              f"the token is {name!r}'s but the certificate is {names or 'nobody'}'s")
        session = secrets.token_hex(16)
        with self._lock:
            self.sessions[session] = (cid, request.token)
        self.dispatcher.seen(cid)
        self.store.touch(cid)
        log.info("client %s (%s) joined", cid, name)
        return pb.JoinReply(session=session, client_id=cid, heartbeat_s=math.ceil(self.cfg.deploy.heartbeat_s))

    def Pull(self, request: pb.PullRequest, context: grpc.ServicerContext) -> Iterator[pb.Chunk]:
        cid = self._client(context, request.session)
        if self.finished.is_set():
            context.set_trailing_metadata(((STATUS_KEY, "finished"),))
            return
        task = self.dispatcher.next_task(cid, min(float(request.wait_s or MAX_POLL_S), MAX_POLL_S), context.is_active)
        if task is None:
            context.set_trailing_metadata(((STATUS_KEY, "finished" if self.finished.is_set() else "idle"),))
            return
        yield from wire.to_chunks(wire.to_envelope(task.request, task_id=task.task_id))

    def Push(self, request_iterator: Iterator[pb.Chunk], context: grpc.ServicerContext) -> pb.PushReply:
        cid = self._client(context)
        try:
            env = wire.from_chunks(request_iterator, self.limits)
            reply = wire.from_envelope(env, self.limits)
        except FedloomError as exc:
            return pb.PushReply(accepted=False, error=pb.ErrorMsg(code=exc.code, reason=str(exc)))
        reason = self.dispatcher.deliver(cid, env.task_id, reply)
        if reason is not None:
            return pb.PushReply(accepted=False, error=pb.ErrorMsg(code="not_awaited", reason=reason))
        return pb.PushReply(accepted=True)

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatReply:
        session = request.session or dict(context.invocation_metadata()).get(SESSION_KEY, "")
        cid = self._client(context, session)
        if self.store.authenticate(self.sessions[session][1]) is None:  # revoked while connected: end the session
            with self._lock:
                self.sessions.pop(session, None)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked client token")
        self.dispatcher.seen(cid)  # in memory: heartbeats cost a read, no disk write
        return pb.HeartbeatReply(known=True)


def _enroll(store: StateStore, names: list[str], token_dir: Path) -> None:
    """Enroll configured clients not yet known; each token goes to ``token_dir/NAME.token`` (0600)."""
    known = {c["name"] for c in store.clients()}
    token_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name in known:
            continue
        _, token = store.enroll(name)
        path = token_dir / f"{name}.token"
        path.touch(mode=0o600)
        path.write_text(token)


def _opt_names(opt_state: dict[str, Params]) -> list[str]:
    return [f"optimizer/{key}/{i}" for key in sorted(opt_state) for i in range(len(opt_state[key]))]


def _split_checkpoint(names: list[str], arrays: Params) -> tuple[Params, dict[str, Params]]:
    params = [a for n, a in zip(names, arrays) if not n.startswith("optimizer/")]
    opt: dict[str, Params] = {}
    for n, a in zip(names, arrays):
        if n.startswith("optimizer/"):
            opt.setdefault(n.split("/")[1], []).append(a)
    return params, opt


def _candidates(dispatcher: Dispatcher, d: DeployConfig, num_clients: int) -> list[int]:
    """The connected clients, after waiting up to ``round_timeout_s`` for ``min_clients`` of them.

    When every client is connected this is all of them, so selection (and the whole run) is the
    simulation's; a lost client is not asked again until it reconnects.
    """
    deadline = time.monotonic() + d.round_timeout_s
    while True:
        connected = [c for c in dispatcher.connected(3 * d.heartbeat_s) if c < num_clients]
        if len(connected) >= d.min_clients or time.monotonic() >= deadline:
            return connected
        time.sleep(0.1)


def serve(cfg: Config, *, on_round: Callable[[dict[str, float]], None] | None = None) -> ServerState:
    """Run (or resume) the configured run as a gRPC server until its last round is done."""
    if cfg.server.aggregation != "sync":
        raise ConfigError("server.aggregation", "the deployed server runs synchronous rounds; "
                                                f"{cfg.server.aggregation} is simulated only (docs/heterogeneity.md)")
    if cfg.server.selection != "uniform":
        raise ConfigError("server.selection", "the deployed server selects uniformly; "
                                              f"{cfg.server.selection} is simulated only (docs/heterogeneity.md)")
    d = cfg.deploy
    state_dir = Path(d.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    store = StateStore(state_dir / "server.db")
    _enroll(store, d.clients, state_dir / "tokens")
    run_id = store.resume_run(cfg.run.name) or store.start_run(cfg.run.name, to_toml(cfg))
    work, dataset = build_clients(cfg)  # the model's shapes, and the held-out data for centralised evaluation
    names = [n for n, _ in work.model.named_parameters()]
    num_clients = len(store.clients())
    server = SyncServer(build_strategy(cfg), num_clients)
    state = server.init(work.initial_params(cfg.run.seed))
    saved = store.load_checkpoint(run_id)
    if saved is not None:
        done, saved_names, arrays = saved
        params, opt_state = _split_checkpoint(saved_names, arrays)
        state = ServerState(done, params, opt_state or state.opt_state)
        log.info("resuming %s after round %d", cfg.run.name, done)
    dispatcher = Dispatcher()
    service = FederationService(store, dispatcher, cfg)
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=max(16, 2 * num_clients + 4)))
    pb_grpc.add_FederationServicer_to_server(service, grpc_server)
    if d.tls:
        port = grpc_server.add_secure_port(d.address, server_credentials(d))
    else:
        port = grpc_server.add_insecure_port(d.address)
    if port == 0:
        raise FedloomError(f"cannot listen on {d.address}")
    grpc_server.start()
    log.info("listening on %s", d.address)
    transport = DeployedTransport(dispatcher, d.round_timeout_s, lost_after_s=3 * d.heartbeat_s)
    test = dataset.test_union()
    try:
        while len(dispatcher.connected(3 * d.heartbeat_s)) < d.min_clients:  # before the first round: no limit
            time.sleep(0.1)
        while state.round < cfg.run.rounds:
            store.open_round(run_id, state.round + 1)
            requests, state = server.train_requests(state, _candidates(dispatcher, d, num_clients))
            result, state = server.apply(state, requests, transport.exchange(requests))
            row = round_metrics(result, state, server, transport, work, test, cfg, evaluate=True)
            store.complete_round(run_id, state.round, state.params + [a for k in sorted(state.opt_state)
                                                                      for a in state.opt_state[k]],
                                 names + _opt_names(state.opt_state), row)
            if on_round is not None:
                on_round(row)
    finally:
        service.finished.set()
        dispatcher.close()
        time.sleep(min(2.0, d.heartbeat_s))  # let polling clients hear that the run is finished
        grpc_server.stop(grace=2.0)
    return state
