"""One synchronous round loop: the simulation, the simulated clock and the deployed server all run it.

A round: a :class:`Pacer` picks who is asked (``requests``); the round logic
(:meth:`SyncServer.round`, a generator with no I/O) yields the requests of each of its exchanges
(one for a plain round, several with secure aggregation); for each, the transport moves the
messages (``exchange``) and the pacer says which replies the round keeps and how long each took
(``settle``); the round logic then aggregates (:func:`drive`). The pacers are
:class:`Immediate` (every client is a candidate and every reply is kept: a simulation without a
device population), the simulated clock (``simulation/timeline.SimulatedClock``) and the
deployed server's connected clients (``deploy/server.py``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Generator, Sequence
from typing import Protocol, TypeVar

import numpy as np

from fedloom.client.torch_work import TorchClientWork
from fedloom.config import Config
from fedloom.errors import reason_code
from fedloom.messages import Reply, Request, TrainRequest
from fedloom.server.sync import RoundResult, ServerState, SyncServer
from fedloom.transport.base import Transport

Step = Callable[[ServerState], tuple[RoundResult, ServerState]]
T = TypeVar("T")


class Pacer(Protocol):
    """Who a round asks, and which of their replies it keeps (with the round trips it measured)."""

    def requests(self, server: SyncServer, state: ServerState) -> tuple[list[TrainRequest], ServerState]: ...

    def settle(self, requests: Sequence[Request],
               replies: Sequence[Reply]) -> tuple[list[Reply], dict[int, float]]: ...


class Immediate:
    """Every client of the federation is a candidate; every reply is kept; no time is measured."""

    def requests(self, server: SyncServer, state: ServerState) -> tuple[list[TrainRequest], ServerState]:
        return server.train_requests(state)

    def settle(self, requests: Sequence[TrainRequest],
               replies: Sequence[Reply]) -> tuple[list[Reply], dict[int, float]]:
        return list(replies), {}


def drive(exchanges: Generator[list[Request], tuple[list[Reply], dict[int, float]], T], transport: Transport,
          pacer: Pacer) -> T:
    """Run a round's exchanges (a generator that yields requests and receives ``(replies, durations)``) over
    ``transport``, each paced by ``pacer``, and return what the generator returns."""
    try:
        outgoing = next(exchanges)
    except StopIteration as stop:  # done before any exchange (a secure round with too few clients)
        return stop.value
    while True:
        replies, durations = pacer.settle(outgoing, transport.exchange(outgoing))  # type: ignore[arg-type]
        try:
            outgoing = exchanges.send((replies, durations))
        except StopIteration as stop:
            return stop.value


def train_round(server: SyncServer, state: ServerState, transport: Transport,
                pacer: Pacer | None = None) -> tuple[RoundResult, ServerState]:
    """One synchronous round over ``transport``, paced by ``pacer`` (default :class:`Immediate`)."""
    pacer = pacer or Immediate()
    requests, state = pacer.requests(server, state)
    return drive(server.round(state, requests), transport, pacer)


def run_rounds(step: Step, state: ServerState, rounds: int,
               after: Callable[[RoundResult, ServerState], bool]) -> ServerState:
    """Run ``step`` until round ``rounds`` is done; ``after(result, state)`` follows each round and ends the
    run early by returning True."""
    while state.round < rounds:
        result, state = step(state)
        if after(result, state):
            break
    return state


def _kind(text: str) -> str:
    """A reason with its numbers blanked: the same kind of failure from another client or round."""
    return re.sub(r"\d+(\.\d+)?(e[+-]?\d+)?", "#", text)


class Failures:
    """What went wrong in a run, said so a user sees it: each new kind of refusal once (with the client
    and round it first came from), every refusal counted by code, and a verdict when the last
    ``stale`` rounds applied no update (or every round did not, in a shorter run)."""

    def __init__(self, stale: int = 3, said_per_code: int = 5):
        self.stale = stale
        self.said_per_code = said_per_code
        self.counts: dict[str, int] = {}
        self.said: dict[str, set[str]] = {}  # by code: the reasons said, numbers blanked
        self.problems_said: set[str] = set()
        self.rounds_unchanged = 0
        self.streak = 0  # the latest rounds in a row that applied nothing
        self.last_problem = ""

    def observe(self, result: RoundResult) -> list[str]:
        """Count a round's refusals; return the lines worth saying now (new reasons, once each)."""
        lines = []
        for cid, reason in result.rejected.items():
            code = reason_code(reason)
            self.counts[code] = self.counts.get(code, 0) + 1
            said = self.said.setdefault(code, set())
            if _kind(reason) not in said and len(said) < self.said_per_code:
                said.add(_kind(reason))
                lines.append(f"round {result.round}: client {cid}: {reason} (said once; every refusal is "
                             f"counted in metrics.csv as rejected.{code})")
        if result.problem:
            self.rounds_unchanged += 1
            if _kind(result.problem) not in self.problems_said:
                self.problems_said.add(_kind(result.problem))
                lines.append(f"round {result.round}: the model was left unchanged: {result.problem} (said once; "
                             "such rounds have unchanged = 1 in metrics.csv)")
        self.streak = self.streak + 1 if result.problem else 0
        self.last_problem = result.problem
        return lines

    def summary(self) -> str:
        """One line of the run's refusals by code, or empty."""
        return ", ".join(f"{code} {n}" for code, n in sorted(self.counts.items(), key=lambda kv: -kv[1]))

    def verdict(self, rounds_done: int) -> str:
        """Why the run failed (its last rounds applied no update), or empty."""
        need = min(self.stale, rounds_done)
        if need and self.streak >= need:
            return (f"no update was applied in the last {need} round{'s' * (need > 1)}: {self.last_problem}"
                    + (f" (refused updates: {self.summary()})" if self.counts else ""))
        return ""


def round_metrics(result: RoundResult, state: ServerState, server: SyncServer, transport: Transport,
                  work: TorchClientWork, test: tuple[np.ndarray, np.ndarray] | None, cfg: Config,
                  evaluate: bool) -> dict[str, float]:
    """A round's metrics row: training counts and loss; with ``evaluate``, centralised and federated evaluation
    (with FedBN's local layers the federated one is the run's test accuracy: each client tests with its own; a
    server without a ``test`` set has only the federated one). ``dense_bytes_up`` is what the accepted updates would
    weigh as dense arrays (the model's bytes each): against the measured ``bytes_up``, the compression ratio."""
    row: dict[str, float] = {
        "round": state.round, "train_loss": result.train_loss, "clients": len(result.selected),
        "accepted": len(result.accepted), "rejected": len(result.rejected), "examples": result.examples,
        "dense_bytes_up": len(result.accepted) * sum(p.nbytes for p in state.params),
        **result.measurements,
    }
    for reason in result.rejected.values():
        key = f"rejected.{reason_code(reason)}"
        row[key] = row.get(key, 0) + 1
    if result.problem:
        row["unchanged"] = 1
    if evaluate:
        local = cfg.model.batchnorm == "local"  # FedBN: the server's model lacks the clients' own layers
        if not local and test is not None:
            central = work.evaluate_params(state.params, test[0], test[1], cfg.eval.batch_size)
            row.update(test_loss=central.loss, test_accuracy=central.accuracy)
        asked = server.evaluate_requests(state, cfg.run.seed)
        fed = server.summarize(asked, transport.exchange(asked))
        if fed is not None:
            row.update(fed_loss=fed.loss, fed_accuracy=fed.accuracy)
            if local:
                row.update(test_loss=fed.loss, test_accuracy=fed.accuracy)
    return row
