"""The process engine: a pool of local worker processes sharing a round's clients.

On Linux each worker is a ``fork`` of this process, made once the clients are loaded: it starts
in milliseconds, imports nothing, and shares the parent's client data copy-on-write (its arrays
are never written, so their pages stay shared). The parent hands the pool its loaded work and
data (:class:`Loaded`); any other :data:`ClientSpec` is called once in each worker. A forked
worker runs torch on one thread (``torch.set_num_threads(1)``), always: OpenMP cannot start a
thread team in a child forked from a parent that used one (it hangs), and PyTorch's own data
loader workers, also forked, do the same. Elsewhere (macOS, Windows), and for clients training on
CUDA (which a forked child cannot use once the parent has), workers are started with ``spawn``:
each imports torch and calls the spec to load the clients itself, which costs seconds
per worker, and runs torch on one thread when there are two or more workers (the workers
themselves use the cores).

A round's requests are split over the workers by :func:`split_balanced` (weight: the client's
local steps, or test size for an evaluation), each worker receives its whole share in one
message, so the parameters all requests share are pickled once per worker, and the replies come
back in request order.

Failures never hang or stop the parent: a worker that dies (killed, crashed, out of memory) is
noticed by its process sentinel or end-of-file on its pipe, its requests get error replies with
code ``worker_failed`` and it is restarted for the next round. An exception raised by a worker's
engine comes back as error replies too, and the worker keeps serving. An optional ``timeout``
bounds a round: a worker that takes longer is killed and treated as dead.

Security: requests and replies are pickled over ``multiprocessing`` pipes between this process and
the child processes it started itself. That is trusted local IPC; nothing read from the network
or a user's file is ever unpickled here.

Scripts that create a pool where workers are spawned must guard their entry point with
``if __name__ == "__main__":``, as ``spawn`` imports the main module again in every worker.
"""

from __future__ import annotations

import atexit
import functools
import logging
import multiprocessing as mp
import os
import pickle
import signal
import sys
import time
import traceback
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from fedloom.client.pipeline import NO_STAGES, ClientPipeline
from fedloom.client.work import ClientWork
from fedloom.data.dataset import FederatedDataset
from fedloom.errors import WorkerError
from fedloom.messages import Reply, Request, error_reply
from fedloom.simulation.engines import ClientSpec, local_engine, request_cost, split_balanced

log = logging.getLogger("fedloom")

_POLL_S = 0.2  # how often a waiting parent checks that its workers are still alive
_STOP_S = 5.0  # how long close() waits for a worker to leave before killing it
START_METHOD = "fork" if sys.platform == "linux" else "spawn"


def start_method(device: str = "cpu") -> str:
    """How this process starts workers that train on ``device``: ``fork`` on Linux for a CPU; ``spawn`` elsewhere
    and for CUDA, which cannot be used again in a child forked after the parent used it."""
    return START_METHOD if device == "cpu" else "spawn"
_PARENT_ENDS: weakref.WeakSet[Connection] = weakref.WeakSet()  # this process's ends of its children's pipes


def child_pipe(ctx: Any) -> tuple[Connection, Connection]:
    """A pipe to a child process: (this process's end, the child's end). Every forked child closes its copies
    of this process's ends (:func:`forget_parent_ends`), so that each child sees this process's death."""
    mine, child = ctx.Pipe()
    _PARENT_ENDS.add(mine)
    return mine, child


def forget_parent_ends() -> None:
    """In a forked child: close the copies of the parent's pipe ends (held here, they would hide its death)."""
    for end in list(_PARENT_ENDS):
        end.close()


@dataclass(frozen=True)
class Loaded:
    """A :data:`ClientSpec` for the clients this process has already loaded: forked workers share them."""

    work: ClientWork
    data: FederatedDataset

    def __call__(self) -> tuple[ClientWork, FederatedDataset]:
        return self.work, self.data


def error_replies(requests: Sequence[Request], reason: str, code: str = "worker_failed") -> list[Reply]:
    """One error reply per request, of the reply type that matches the request."""
    return [error_reply(r, code, reason) for r in requests]


def _serve(conn: Connection, spec: ClientSpec, vectorize: bool, group_size: int, single_thread: bool,
           pipeline: ClientPipeline) -> None:
    """A worker's whole life: load the clients once, report their sizes, then answer rounds until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it then stops the workers
    forget_parent_ends()
    if single_thread:
        import torch

        torch.set_num_threads(1)
    try:
        work, data = spec()
        engine = local_engine(work, data, vectorize, group_size, pipeline)
        sizes = ([c.num_train for c in data.clients], [c.num_test for c in data.clients])
    except Exception:  # noqa: BLE001 - reported to the parent, which raises WorkerError
        conn.send(("failed", traceback.format_exc()))
        return
    conn.send(("ready", sizes))
    while True:
        try:
            requests = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if requests is None:
            return
        try:
            replies = engine.exchange(requests)
        except Exception as exc:  # noqa: BLE001 - an engine failure fails this share, not the worker
            replies = error_replies(requests, f"{type(exc).__name__}: {exc}")
        try:
            conn.send(replies)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:  # pickled before anything is written
            conn.send(error_replies(requests, f"replies could not be sent: {type(exc).__name__}: {exc}"))


class _Worker:
    """The parent's handle on one worker process: its process and its end of the pipe."""

    def __init__(self, ctx: Any, args: tuple[Any, ...], index: int):
        self.conn, child = child_pipe(ctx)
        self.process = ctx.Process(target=_serve, args=(child, *args), name=f"fedloom-worker-{index}", daemon=True)
        self.process.start()
        child.close()  # only the worker holds it now, so its death reads as end-of-file here
        self.ready = False
        self.broken = False  # could not start: its slot is left out of rounds until a restart works

    def await_ready(self) -> tuple[list[int], list[int]]:
        """Block until the worker has loaded its clients; return their (train, test) sizes."""
        message = self.receive(None)
        if message is None:
            raise WorkerError(f"worker {self.process.name} died while starting (exit code {self.process.exitcode})")
        status, payload = message
        if status != "ready":
            raise WorkerError(f"worker {self.process.name} could not load its clients:\n{payload}")
        self.ready = True
        return payload

    def receive(self, deadline: float | None) -> Any:
        """The worker's next message, or None once it is dead (or past ``deadline``, when it is killed)."""
        while True:
            alive = self.process.is_alive()  # checked before the pipe, so a last message is never missed
            if self.conn.poll():
                try:
                    return self.conn.recv()
                except Exception:  # noqa: BLE001 - end-of-file or a message cut short by death
                    return None
            if not alive:
                return None
            if deadline is not None and time.monotonic() > deadline:
                self.kill()
                return None
            wait([self.conn, self.process.sentinel], timeout=_POLL_S)

    def send(self, message: Any) -> bool:
        try:
            self.conn.send(message)
            return True
        except (OSError, ValueError):  # broken pipe: the worker is dead
            return False

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()

    def stop(self) -> None:
        if self.process.is_alive():
            self.send(None)
            self.process.join(_STOP_S)
        self.kill()
        self.conn.close()


def _close_if_alive(ref: weakref.ref[ProcessPoolTransport]) -> None:
    transport = ref()
    if transport is not None:
        transport.close()


class ProcessPoolTransport:
    """Runs a round's requests on ``workers`` local processes, each holding the client data once.

    ``workers=0`` means one per core (``os.cpu_count()``); ``vectorize`` and ``group_size`` set up
    each worker's local engine; a :class:`Loaded` ``spec`` shares this process's clients with forked
    workers. ``start`` is the start method (:func:`start_method`). ``timeout`` (seconds, None = none)
    bounds how long a round waits for a worker before killing it. Close it (or use it as a context
    manager) to stop the workers; they never outlive this process.
    """

    def __init__(self, spec: ClientSpec, workers: int = 0, vectorize: bool = True, group_size: int = 0,
                 *, timeout: float | None = None, pipeline: ClientPipeline = NO_STAGES, start: str = START_METHOD):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.num_workers = workers or os.cpu_count() or 1
        self.timeout = timeout
        self._ctx = mp.get_context(start)
        single_thread = start == "fork" or self.num_workers >= 2
        self._args = (spec, vectorize, group_size, single_thread, pipeline)
        self._workers: list[_Worker] = []
        self._closed = False
        self._atexit = functools.partial(_close_if_alive, weakref.ref(self))
        atexit.register(self._atexit)
        try:
            for i in range(self.num_workers):
                self._workers.append(_Worker(self._ctx, self._args, i))
            self.train_sizes, self.test_sizes = self._await_all()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> ProcessPoolTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn down what close() uses
            pass

    @property
    def pids(self) -> list[int]:
        """The worker processes' ids (for monitoring, and for tests that kill one)."""
        return [w.process.pid for w in self._workers]

    @property
    def workers_alive(self) -> list[bool]:
        """Whether each worker process is running now (a dead one is restarted before the next round)."""
        return [w.process.is_alive() for w in self._workers]

    def exchange(self, requests: Sequence[Request]) -> list[Reply]:
        """Run the requests on the workers; replies come back in request order, failures as error replies."""
        if self._closed:
            raise RuntimeError("the process pool is closed")
        if not requests:
            return []
        live = self._revive()
        if not live:
            return error_replies(requests, "no worker process could start; see the fedloom log")
        weights = [request_cost(r, self.train_sizes, self.test_sizes) for r in requests]
        # split positions rather than requests, so each reply finds its request's place again
        parts: list[list[int]] = split_balanced(list(range(len(requests))), weights, len(live))  # type: ignore[arg-type]
        groups = {k: g for k, g in zip(live, parts) if g}
        replies: list[Reply | None] = [None] * len(requests)
        sent = {k: g for k, g in groups.items() if self._workers[k].send([requests[i] for i in g])}
        for k, group in groups.items():
            if k not in sent:
                self._fail(k, group, requests, replies, "its process had died")
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        for k, group in sent.items():
            answer = self._workers[k].receive(deadline)
            if isinstance(answer, list) and len(answer) == len(group):
                for i, reply in zip(group, answer):
                    replies[i] = reply
            else:
                self._fail(k, group, requests, replies, "it died or timed out during the round")
        return replies  # type: ignore[return-value]

    def close(self) -> None:
        """Stop every worker (safe to call more than once)."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._atexit)
        for w in self._workers:
            w.stop()

    def _await_all(self) -> tuple[list[int], list[int]]:
        sizes = [w.await_ready() for w in self._workers]
        if any(s != sizes[0] for s in sizes):
            raise WorkerError("workers loaded different clients; the client spec must be deterministic")
        return sizes[0]

    def _fail(self, k: int, group: list[int], requests: Sequence[Request], replies: list[Reply | None],
              why: str) -> None:
        """Error replies for worker ``k``'s share, and a fresh worker started in its place."""
        dead = self._workers[k]
        reason = f"worker {k} (pid {dead.process.pid}) failed: {why}; exit code {dead.process.exitcode}"
        for i, reply in zip(group, error_replies([requests[i] for i in group], reason)):
            replies[i] = reply
        dead.stop()
        self._workers[k] = _Worker(self._ctx, self._args, k)  # loads its clients while the server aggregates

    def _revive(self) -> list[int]:
        """Before a round: restart workers that died or could not start, wait for them; the ones able to serve."""
        for k, w in enumerate(self._workers):
            if w.broken or (w.ready and not w.process.is_alive()):
                w.stop()
                self._workers[k] = _Worker(self._ctx, self._args, k)
        live = []
        for k, w in enumerate(self._workers):
            if not w.ready:
                try:
                    if w.await_ready() != (self.train_sizes, self.test_sizes):
                        raise WorkerError("a restarted worker loaded different clients")
                except WorkerError as exc:
                    w.broken = True
                    log.warning("process pool: worker %d left out of this round: %s", k, exc)
                    continue
            live.append(k)
        return live
