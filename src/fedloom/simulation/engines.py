"""Simulation engines: how the simulated clients' work is executed on this host or a cluster.

Every engine is a transport (``transport/base.Transport``): ``exchange(requests) -> replies`` and
``close()``. They differ only in where and how the clients' work runs:

- ``sequential`` — one client after another in this process (:class:`InProcessTransport`).
- ``vectorized`` — clients that share one architecture train together, parameters stacked along
  a leading client axis (:class:`fedloom.simulation.vectorized.VectorizedTransport`).
- ``process`` — a pool of local worker processes, each holding the client data once and running
  a sequential or vectorized engine over its share of a round's requests.
- ``ray`` — the same workers as Ray actors, for clusters beyond one machine.

Workers are built from a :data:`ClientSpec`: a picklable zero-argument callable returning the
client work and the federated dataset, so data is loaded once per worker, never sent per round.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fedloom.client.pipeline import NO_STAGES, ClientPipeline
from fedloom.client.state import StateFiles, keep_state, with_state
from fedloom.client.work import ClientWork
from fedloom.data.dataset import FederatedDataset
from fedloom.messages import Reply, Request, TrainRequest
from fedloom.transport.base import Transport
from fedloom.transport.inprocess import InProcessTransport

ClientSpec = Callable[[], tuple[ClientWork, FederatedDataset]]

ENGINES = ("sequential", "vectorized", "process", "ray")


def local_engine(work: ClientWork, data: FederatedDataset, vectorize: bool, group_size: int = 0,
                 pipeline: ClientPipeline = NO_STAGES) -> Transport:
    """The in-process engine: vectorized when asked (it falls back to sequential by itself).

    ``pipeline`` holds the client halves of the aggregator's stages, run on every update.
    """
    if vectorize:
        from fedloom.simulation.vectorized import VectorizedTransport

        return VectorizedTransport(work, data, group_size=group_size, pipeline=pipeline)
    return InProcessTransport(work, data, pipeline)


def request_cost(request: Request, train_sizes: Sequence[int], test_sizes: Sequence[int]) -> float:
    """Expected work of a request: local SGD steps for training (epochs and step cap counted),
    samples for evaluation; 0 for an unknown client."""
    cid = request.client_id
    if not 0 <= cid < len(train_sizes):
        return 0.0
    if isinstance(request, TrainRequest):
        c = request.config
        steps = c.local_epochs * -(-train_sizes[cid] // c.batch_size)
        return float(min(steps, c.max_steps) if c.max_steps is not None else steps)
    return float(test_sizes[cid])


def split_balanced(requests: Sequence[Request], weights: Sequence[float], parts: int) -> list[list[Request]]:
    """Split requests into ``parts`` groups of similar total weight (largest first, greedy)."""
    groups: list[list[Request]] = [[] for _ in range(parts)]
    loads = [0.0] * parts
    for i in sorted(range(len(requests)), key=lambda i: -weights[i]):
        k = loads.index(min(loads))
        groups[k].append(requests[i])
        loads[k] += weights[i]
    return groups


class WithClientState:
    """An engine whose clients keep state between rounds (``ClientPipeline.stateful``): each request takes its
    client's state from ``files``, each reply's new state goes back there.

    The state travels inside the request and the reply, so it reaches whichever worker serves the client
    this round (a process, a Ray actor) and comes back with the reply; workers keep nothing.
    """

    def __init__(self, engine: Transport, files: StateFiles):
        self.engine = engine
        self.files = files

    def __getattr__(self, name: str) -> Any:  # the engine's own attributes (pids, workers_alive, ...)
        return getattr(self.engine, name)

    def exchange(self, requests: Sequence[Request]) -> list[Reply]:
        asked = [with_state(r, self.files) for r in requests]
        return [keep_state(q, r, self.files) for q, r in zip(asked, self.engine.exchange(asked))]

    def close(self) -> None:
        self.engine.close()

