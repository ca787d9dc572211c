"""The deployed client: connects out to the server, pulls work, runs it on local data, pushes results.

The client always initiates (join, long-poll, push, heartbeat), so it works from behind NAT. It
leaves only when the server says the run is over (a poll that ends with ``fedloom-status:
finished``); a lost connection is never taken for that. When the server is unreachable, restarts
or is busy, the client reconnects by itself with exponential backoff (0.5 s doubling to 30 s,
with jitter) and joins again, for up to ``deploy.reconnect_s`` seconds of outage (0 = forever);
a refused or revoked token ends it with an error.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from dataclasses import replace
from pathlib import Path

import grpc

from fedloom.build import build_clients, client_pipeline
from fedloom.client.pipeline import NO_STAGES, ClientPipeline
from fedloom.client.state import StateFiles, keep_state, with_state
from fedloom.client.work import ClientWork, handle
from fedloom.config import Config
from fedloom.data.dataset import ClientDataset
from fedloom.deploy.security import channel_credentials
from fedloom.deploy.service import MAX_POLL_S, SESSION_KEY, STATUS_KEY, TASK_KEY, TOKEN_KEY, limits
from fedloom.errors import ClientRefused, ConfigError, FedloomError, WireError
from fedloom.messages import ErrorReply, Reply, Request, StepReply
from fedloom.transport import wire
from fedloom.transport.proto import fedloom_pb2 as pb
from fedloom.transport.proto import fedloom_pb2_grpc as pb_grpc

log = logging.getLogger("fedloom")


def _token(cfg: Config) -> str:
    path = cfg.deploy.token_file
    if not path:
        raise ConfigError("deploy.token_file", "a client needs the file holding its enrolment token")
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError("deploy.token_file", f"cannot read {path}: {exc.strerror}") from None


def _channel(cfg: Config, address: str) -> grpc.Channel:
    if cfg.deploy.tls:
        return grpc.secure_channel(address, channel_credentials(cfg.deploy))
    return grpc.insecure_channel(address)


def _heartbeats(stub: pb_grpc.FederationStub, session: str, every_s: float, stop: threading.Event) -> None:
    """Say "alive" every ``every_s`` seconds until ``stop``; a failed beat is tried again at the next one."""
    while not stop.wait(every_s):
        try:
            stub.Heartbeat(pb.HeartbeatRequest(session=session), metadata=((SESSION_KEY, session),), timeout=every_s)
        except (grpc.RpcError, ValueError):  # ValueError: the channel closed under us; the main loop reconnects
            continue


def _push(stub: pb_grpc.FederationStub, meta: tuple, task_id: str, reply: Reply) -> bool:
    answer = stub.Push(wire.to_chunks(wire.to_envelope(reply, task_id=task_id)), metadata=(*meta, (TASK_KEY, task_id)),
                       timeout=600)
    if not answer.accepted:
        log.warning("server refused a reply: %s", answer.error.reason)
    else:
        log.info("task %s: %s accepted", task_id[:64], type(reply).__name__)
    return answer.accepted


def _handled(request: Request, work: ClientWork, data: ClientDataset, pipeline: ClientPipeline,
             states: StateFiles | None) -> Reply:
    """The reply to a task; a client that keeps state reads it first and saves what the task made before replying."""
    if states is None or not pipeline.stateful:
        return handle(request, work, data, pipeline)
    request = with_state(request, states)
    reply = keep_state(request, handle(request, work, data, pipeline), states)
    states.prune(request.round - 1, keep=1)  # a server that restarts may ask this round again, never an older one
    return reply


def serve_client(work: ClientWork, local: ClientDataset, cfg: Config, address: str, token: str,
                 give_up_s: float | None = None, stop: threading.Event | None = None,
                 pipeline: ClientPipeline = NO_STAGES, states: StateFiles | None = None) -> int:
    """Take part in the server's run with ``work`` on ``local`` data until the server says it is finished.

    Returns the number of replies the server accepted. A reply whose push failed is pushed again
    after reconnecting (the server still awaits it unless its round gave up). The client gives up
    after ``give_up_s`` seconds without reaching the server (default ``deploy.reconnect_s``; 0 =
    never). ``stop`` (optional) ends the client between tasks; used by tests and the load benchmark.
    ``pipeline``: what the client runs around its training (``client/pipeline.py``); ``states``: where it
    keeps what it carries between rounds (error feedback's residual, FedBN's layers), surviving a restart.
    """
    give_up_s = cfg.deploy.reconnect_s if give_up_s is None else give_up_s
    stop = stop or threading.Event()
    lim = limits(cfg)
    backoff, last_ok, done = 0.5, time.monotonic(), 0
    unsent: tuple[str, Reply] | None = None
    while not stop.is_set():
        try:
            with _channel(cfg, address) as channel:
                stub = pb_grpc.FederationStub(channel)
                joined = stub.Join(pb.JoinRequest(client_name=cfg.deploy.name, token=token), timeout=10,
                                   metadata=((TOKEN_KEY, token),))  # known before its request is read
                meta = ((SESSION_KEY, joined.session),)
                data = replace(local, client_id=joined.client_id)  # the server's id keys the seeded shuffle
                log.info("joined %s as client %d", address, joined.client_id)
                beat_stop = threading.Event()
                threading.Thread(target=_heartbeats, args=(stub, joined.session, joined.heartbeat_s or 5, beat_stop),
                                 daemon=True).start()
                try:
                    backoff, last_ok = 0.5, time.monotonic()
                    if unsent is not None:
                        done += _push(stub, meta, *unsent)
                        unsent = None
                    while not stop.is_set():
                        call = stub.Pull(pb.PullRequest(session=joined.session, wait_s=MAX_POLL_S), metadata=meta,
                                         timeout=MAX_POLL_S + 15)
                        first = next(call, None)  # stream the rest: a large model is never held twice
                        last_ok = time.monotonic()
                        if first is None:
                            if dict(call.trailing_metadata() or ()).get(STATUS_KEY) == "finished":
                                return done
                            continue
                        try:
                            env = wire.from_chunks(itertools.chain([first], call), lim)
                        except WireError as exc:  # not even an envelope: nothing to answer
                            log.warning("the server sent a task this client cannot read: %s", exc)
                            continue
                        try:
                            request = wire.from_envelope(env, lim)
                        except WireError as exc:  # an unknown or malformed task: answer it with the reason
                            log.warning("the server sent a task this client cannot read: %s", exc)
                            done += _push(stub, meta, env.task_id, StepReply(
                                env.client_id, env.round, env.kind[:64] or "unknown",
                                error=ErrorReply(exc.code, f"the client cannot read a {env.kind[:64]!r} task: {exc}")))
                            continue
                        unsent = (env.task_id, _handled(request, work, data, pipeline, states))
                        done += _push(stub, meta, *unsent)
                        unsent = None
                finally:
                    beat_stop.set()
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                if "session" not in (exc.details() or ""):
                    raise ClientRefused(exc.details() or "refused") from None
            if give_up_s and time.monotonic() - last_ok > give_up_s:
                raise FedloomError(f"server {address} unreachable for {give_up_s:g} s (deploy.reconnect_s): "
                                   f"{exc.details()}") from None
            wait = backoff * (1 + random.random() / 2)
            log.info("connection lost (%s); retrying in %.1f s", exc.code().name, wait)
            stop.wait(wait)
            backoff = min(backoff * 2, 30.0)
    return done


def run_client(cfg: Config, address: str | None = None) -> int:
    """Load this client's data and model from ``cfg`` and take part in the run until it finishes.

    With ``data.dataset = "site"`` the client reads only its own data (``data/site.py``); otherwise it loads the
    configured federation and keeps client ``deploy.client_index``'s share."""
    site = cfg.data.dataset == "site"
    if site and not (cfg.data.path or cfg.data.loader):
        raise ConfigError("data.path", "a site's client reads its own data: name its file or folder (data.path) or "
                                       "a loader (data.loader)")
    if site and cfg.deploy.client_index:
        raise ConfigError("deploy.client_index", "a site holds only its own data: leave client_index at 0")
    work, dataset = build_clients(cfg)
    if not 0 <= cfg.deploy.client_index < len(dataset):
        raise ConfigError("deploy.client_index", f"the dataset has clients 0..{len(dataset) - 1}")
    folder = cfg.deploy.client_state_dir or f"fedloom-client-{cfg.deploy.name or cfg.deploy.client_index}"
    return serve_client(work, dataset[cfg.deploy.client_index], cfg, address or cfg.deploy.address, _token(cfg),
                        pipeline=client_pipeline(cfg, work, len(dataset), deployed=True), states=StateFiles(folder))
