"""The Ray engine: the process engine's design, with Ray actors that may live on many machines.

Each actor calls the :data:`ClientSpec` once when it starts, so every machine loads the client
data itself (it must be available there) and nothing but requests and replies travels per round.
An actor reports its clients' sizes, builds a local engine (vectorized or sequential) and serves
one ``run(requests)`` call per round. A round's requests are split over the actors by
:func:`split_balanced` (local steps, or test size for an evaluation), each actor gets its whole
share in one call, all calls run at once, and the replies come back in request order.

An exception in an actor's engine comes back as error replies. An actor that dies (its process
killed, its node lost) costs error replies with code ``worker_failed`` for its share, and a new
actor takes its place for the next round.

``address=""`` starts a local Ray just for this transport; otherwise it connects to a running
cluster (``"auto"``, ``"HEAD:6379"`` or ``"ray://HEAD:10001"``). Ray serialises the messages
between processes of a cluster you run; see docs/ray.md. Ray is optional:
``pip install 'fedloom[ray]'``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from fedloom.client.pipeline import NO_STAGES, ClientPipeline
from fedloom.errors import WorkerError
from fedloom.messages import Reply, Request, TrainReply
from fedloom.params import Params
from fedloom.simulation.engines import ClientSpec, local_engine, request_cost, split_balanced
from fedloom.simulation.pool import error_replies

log = logging.getLogger("fedloom")


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ImportError("the ray engine needs Ray: pip install 'fedloom[ray]'") from exc
    return ray


def _writable(arrays: Params, memo: dict[int, Params]) -> Params:
    """Writable copies of arrays that view Ray's read-only object store; a list shared by many messages once."""
    if id(arrays) not in memo:
        memo[id(arrays)] = [a if a.flags.writeable else np.array(a) for a in arrays]
    return memo[id(arrays)]


def writable_requests(requests: list[Request]) -> list[Request]:
    """Requests whose parameters torch may wrap safely (all of a round's requests share one copy)."""
    memo: dict[int, Params] = {}
    return [replace(r, params=_writable(r.params, memo)) if hasattr(r, "params") else r for r in requests]


def writable_replies(replies: list[Reply]) -> list[Reply]:
    """Replies whose updates are ordinary writable arrays, as every other engine returns them."""
    memo: dict[int, Params] = {}
    return [replace(r, update=replace(r.update, values=_writable(r.update.values, memo)))
            if isinstance(r, TrainReply) and r.update is not None else r for r in replies]


class ClientActor:
    """One Ray actor: the clients loaded once from the spec, and a local engine that serves rounds."""

    def __init__(self, spec: ClientSpec, vectorize: bool, group_size: int, single_thread: bool,
                 pipeline: ClientPipeline = NO_STAGES):
        if single_thread:
            import torch

            torch.set_num_threads(1)  # Ray gives each actor one CPU; more torch threads would oversubscribe it
        work, data = spec()
        self.engine = local_engine(work, data, vectorize, group_size, pipeline)
        self.sizes = ([c.num_train for c in data.clients], [c.num_test for c in data.clients])

    def client_sizes(self) -> tuple[list[int], list[int]]:
        return self.sizes

    def run(self, requests: list[Request]) -> list[Reply]:
        try:
            return self.engine.exchange(writable_requests(requests))
        except Exception as exc:  # noqa: BLE001 - an engine failure fails this share, not the actor
            return error_replies(requests, f"{type(exc).__name__}: {exc}")


class RayTransport:
    """Runs a round's requests on ``workers`` Ray actors, each holding the client data once.

    ``address``: empty = start a local Ray, else the cluster to join. ``workers=0`` = one actor per
    CPU of the cluster. Each actor asks Ray for one CPU (less when more actors than CPUs are asked
    for, so they all fit). ``close()`` kills the actors, and shuts Ray down when this transport
    started (or connected) it.
    """

    def __init__(self, spec: ClientSpec, address: str = "", workers: int = 0, vectorize: bool = True,
                 group_size: int = 0, pipeline: ClientPipeline = NO_STAGES):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self._ray = ray = import_ray()
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            options = {"address": address} if address else {"num_cpus": workers or None}
            ray.init(include_dashboard=False, logging_level=logging.WARNING, **options)
        self._closed = False
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        self.num_workers = workers or max(1, int(cpus))
        self._actor_cls = ray.remote(ClientActor).options(num_cpus=min(1.0, cpus / self.num_workers),
                                                          max_restarts=0, max_task_retries=0)
        self._args = (spec, vectorize, group_size, self.num_workers >= 2, pipeline)
        self._actors: list[Any] = []
        try:
            self._actors = [self._actor_cls.remote(*self._args) for _ in range(self.num_workers)]
            sizes = ray.get([a.client_sizes.remote() for a in self._actors])
        except ray.exceptions.RayError as exc:
            self.close()
            raise WorkerError(f"a Ray actor could not load its clients: {exc}") from exc
        self.train_sizes, self.test_sizes = sizes[0]

    def __enter__(self) -> RayTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def actors(self) -> list[Any]:
        """The actor handles, in worker order (for monitoring, and for tests that kill one)."""
        return list(self._actors)

    def exchange(self, requests: Sequence[Request]) -> list[Reply]:
        """Run the requests on the actors; replies come back in request order, failures as error replies."""
        if self._closed:
            raise RuntimeError("the Ray transport is closed")
        if not requests:
            return []
        weights = [request_cost(r, self.train_sizes, self.test_sizes) for r in requests]
        parts: list[list[int]] = split_balanced(list(range(len(requests))), weights, len(self._actors))  # type: ignore[arg-type]
        calls = {k: (g, self._actors[k].run.remote([requests[i] for i in g])) for k, g in enumerate(parts) if g}
        replies: list[Reply | None] = [None] * len(requests)
        for k, (group, ref) in calls.items():
            for i, reply in zip(group, self._collect(k, ref, [requests[i] for i in group])):
                replies[i] = reply
        return replies  # type: ignore[return-value]

    def close(self) -> None:
        """Kill the actors, and shut Ray down if this transport started it (safe to call more than once)."""
        if self._closed:
            return
        self._closed = True
        for actor in self._actors:
            self._kill(actor)
        self._actors = []
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()

    def _kill(self, actor: Any) -> None:
        try:
            self._ray.kill(actor)
        except Exception:  # noqa: BLE001 - already dead, or the cluster is gone
            pass

    def _collect(self, k: int, ref: Any, requests: list[Request]) -> list[Reply]:
        """Actor ``k``'s replies; if it failed, error replies, and a new actor in its place when it died."""
        ray = self._ray
        try:
            return writable_replies(ray.get(ref))
        except ray.exceptions.RayError as exc:
            if isinstance(exc, ray.exceptions.RayActorError):
                log.warning("ray engine: actor %d died; starting a new one: %s", k, exc)
                self._kill(self._actors[k])
                self._actors[k] = self._actor_cls.remote(*self._args)
            return error_replies(requests, f"Ray actor {k} failed: {type(exc).__name__}: {exc}")
