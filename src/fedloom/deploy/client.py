"""The deployed client: connects out to the server, pulls work, runs it on local data, pushes results.

The client always initiates (join, long-poll, push, heartbeat), so it works from behind NAT. When
the server is unreachable or restarts, the client reconnects by itself with exponential backoff
(0.5 s doubling to 30 s, with jitter) and joins again; a refused token ends it with an error.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import replace
from pathlib import Path

import grpc

from fedloom.client.work import ClientWork, handle
from fedloom.data.dataset import ClientDataset
from fedloom.deploy.security import channel_credentials
from fedloom.deploy.server import MAX_POLL_S, SESSION_KEY, STATUS_KEY, limits
from fedloom.errors import ClientRefused, ConfigError, FedloomError
from fedloom.simulation.config import Config
from fedloom.simulation.runner import build_clients
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
    while not stop.wait(every_s):
        try:
            stub.Heartbeat(pb.HeartbeatRequest(session=session), metadata=((SESSION_KEY, session),), timeout=every_s)
        except grpc.RpcError:
            return  # the main loop notices the broken connection and reconnects


def serve_client(work: ClientWork, local: ClientDataset, cfg: Config, address: str, token: str,
                 give_up_s: float = 600.0, stop: threading.Event | None = None) -> int:
    """Take part in the server's run with ``work`` on ``local`` data until the run is finished.

    Returns the number of tasks done. ``stop`` (optional) ends the client between tasks; used by
    tests and the load benchmark that run many clients in one process.
    """
    lim = limits(cfg)
    backoff, last_ok, done = 0.5, time.monotonic(), 0
    while stop is None or not stop.is_set():
        beat_stop = threading.Event()
        try:
            with _channel(cfg, address) as channel:
                stub = pb_grpc.FederationStub(channel)
                joined = stub.Join(pb.JoinRequest(client_name=cfg.deploy.name, token=token), timeout=10)
                meta = ((SESSION_KEY, joined.session),)
                data = replace(local, client_id=joined.client_id)  # the server's id keys the seeded shuffle
                log.info("joined %s as client %d", address, joined.client_id)
                threading.Thread(target=_heartbeats, args=(stub, joined.session, joined.heartbeat_s or 5, beat_stop),
                                 daemon=True).start()
                backoff, last_ok = 0.5, time.monotonic()
                while stop is None or not stop.is_set():
                    call = stub.Pull(pb.PullRequest(session=joined.session, wait_s=MAX_POLL_S), metadata=meta,
                                     timeout=MAX_POLL_S + 15)
                    chunks = list(call)
                    last_ok = time.monotonic()
                    if dict(call.trailing_metadata() or ()).get(STATUS_KEY) == "finished":
                        return done
                    if not chunks:
                        continue
                    env = wire.from_chunks(chunks, lim)
                    reply = handle(wire.from_envelope(env, lim), work, data)
                    answer = stub.Push(wire.to_chunks(wire.to_envelope(reply, task_id=env.task_id)), metadata=meta,
                                       timeout=600)
                    if not answer.accepted:
                        log.warning("server refused a reply: %s", answer.error.reason)
                    done += 1
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                if "session" not in (exc.details() or ""):
                    raise ClientRefused(exc.details() or "refused") from None
            if time.monotonic() - last_ok > give_up_s:
                raise FedloomError(f"server {address} unreachable for {give_up_s:g} s: {exc.details()}") from None
            wait = backoff * (1 + random.random() / 2)
            log.info("connection lost (%s); retrying in %.1f s", exc.code().name, wait)
            time.sleep(wait)
            backoff = min(backoff * 2, 30.0)
        finally:
            beat_stop.set()
    return done


def run_client(cfg: Config, address: str | None = None, give_up_s: float = 600.0) -> int:
    """Load this client's data and model from ``cfg`` and take part in the run until it finishes."""
    work, dataset = build_clients(cfg)
    if not 0 <= cfg.deploy.client_index < len(dataset):
        raise ConfigError("deploy.client_index", f"the dataset has clients 0..{len(dataset) - 1}")
    return serve_client(work, dataset[cfg.deploy.client_index], cfg, address or cfg.deploy.address, _token(cfg),
                        give_up_s)
