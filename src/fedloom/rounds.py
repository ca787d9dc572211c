"""One synchronous round loop: the simulation, the simulated clock and the deployed server all run it.

A round: a :class:`Pacer` picks who is asked (``requests``), the transport moves the messages
(``exchange``), the pacer says which replies the round keeps and how long each took (``settle``),
and the round logic aggregates them (:meth:`SyncServer.apply`). The pacers are
:class:`Immediate` (every client is a candidate and every reply is kept: a simulation without a
device population), the simulated clock (``simulation/timeline.SimulatedClock``) and the
deployed server's connected clients (``deploy/server.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from fedloom.client.torch_work import TorchClientWork
from fedloom.config import Config
from fedloom.messages import Reply, TrainRequest
from fedloom.server.sync import RoundResult, ServerState, SyncServer
from fedloom.transport.base import Transport

Step = Callable[[ServerState], tuple[RoundResult, ServerState]]


class Pacer(Protocol):
    """Who a round asks, and which of their replies it keeps (with the round trips it measured)."""

    def requests(self, server: SyncServer, state: ServerState) -> tuple[list[TrainRequest], ServerState]: ...

    def settle(self, requests: Sequence[TrainRequest],
               replies: Sequence[Reply]) -> tuple[list[Reply], dict[int, float]]: ...


class Immediate:
    """Every client of the federation is a candidate; every reply is kept; no time is measured."""

    def requests(self, server: SyncServer, state: ServerState) -> tuple[list[TrainRequest], ServerState]:
        return server.train_requests(state)

    def settle(self, requests: Sequence[TrainRequest],
               replies: Sequence[Reply]) -> tuple[list[Reply], dict[int, float]]:
        return list(replies), {}


def train_round(server: SyncServer, state: ServerState, transport: Transport,
                pacer: Pacer | None = None) -> tuple[RoundResult, ServerState]:
    """One synchronous round over ``transport``, paced by ``pacer`` (default :class:`Immediate`)."""
    pacer = pacer or Immediate()
    requests, state = pacer.requests(server, state)
    replies, durations = pacer.settle(requests, transport.exchange(requests))
    return server.apply(state, requests, replies, durations)  # type: ignore[arg-type]


def run_rounds(step: Step, state: ServerState, rounds: int,
               after: Callable[[RoundResult, ServerState], bool]) -> ServerState:
    """Run ``step`` until round ``rounds`` is done; ``after(result, state)`` follows each round and ends the
    run early by returning True."""
    while state.round < rounds:
        result, state = step(state)
        if after(result, state):
            break
    return state


def round_metrics(result: RoundResult, state: ServerState, server: SyncServer, transport: Transport,
                  work: TorchClientWork, test: tuple[np.ndarray, np.ndarray], cfg: Config,
                  evaluate: bool) -> dict[str, float]:
    """A round's metrics row: training counts and loss; with ``evaluate``, centralised and federated evaluation."""
    row: dict[str, float] = {
        "round": state.round, "train_loss": result.train_loss, "clients": len(result.selected),
        "accepted": len(result.accepted), "rejected": len(result.rejected), "examples": result.examples,
        **result.measurements,
    }
    if evaluate:
        central = work.evaluate_params(state.params, test[0], test[1], cfg.eval.batch_size)
        row.update(test_loss=central.loss, test_accuracy=central.accuracy)
        asked = server.evaluate_requests(state, cfg.run.seed)
        fed = server.summarize(asked, transport.exchange(asked))
        if fed is not None:
            row.update(fed_loss=fed.loss, fed_accuracy=fed.accuracy)
    return row
