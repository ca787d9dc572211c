"""The synchronous server: round logic with no I/O.

Each round: select clients, build train requests with the current global model, and, once the
replies are in, validate them, reduce them to one delta and apply the server optimizer. A
transport (in-process for simulation, gRPC for deployment) moves the messages in between.
Every method returns new values; nothing is kept between calls but the configuration (the
selector's memory, e.g. Oort's utilities, travels in :class:`ServerState` too).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fedloom.errors import FedloomError, RoundError
from fedloom.messages import EvaluateReply, EvaluateRequest, TrainReply, TrainRequest
from fedloom.params import Params, ParamSpec
from fedloom.seeding import keyed_rng
from fedloom.server.optimizers import OptState
from fedloom.server.selection import ClientFeedback
from fedloom.server.strategy import Strategy
from fedloom.server.validation import as_delta


@dataclass(frozen=True)
class ServerState:
    """The global model after ``round`` completed rounds, the optimizer's and the selector's state."""

    round: int
    params: Params
    opt_state: OptState
    selection: Any = None


@dataclass(frozen=True)
class RoundResult:
    """What happened in one training round."""

    round: int
    selected: list[int]
    accepted: list[int]
    rejected: dict[int, str] = field(default_factory=dict)
    train_loss: float = float("nan")
    examples: float = 0.0


@dataclass(frozen=True)
class FederatedEvaluation:
    """Example-weighted mean of the clients' own evaluations."""

    loss: float
    accuracy: float
    num_clients: int
    num_examples: int


def _finite(value: object) -> float | None:
    """A reported number the selector may use: finite and >= 0, else None (a client's report is untrusted)."""
    if isinstance(value, int | float) and math.isfinite(value) and value >= 0:
        return float(value)
    return None


def _feedback(rnd: int, requests: Sequence[TrainRequest], replies: Sequence[TrainReply], accepted: list[int],
              durations: Mapping[int, float]) -> list[ClientFeedback]:
    """What the selector may learn from a round: accepted clients' reports, every asked client's duration.

    Without a ``loss_sq`` report the squared mean loss stands in for it; unusable reports count as none.
    """
    updates = {r.client_id: r.update for r in replies if r.client_id in accepted and r.update is not None}
    out = []
    for cid in dict.fromkeys(r.client_id for r in requests):
        duration = _finite(durations.get(cid))
        loss_sq = examples = None
        if cid in updates:
            m = updates[cid].metrics
            loss = _finite(m.get("loss"))
            loss_sq = _finite(m.get("loss_sq", None if loss is None else loss * loss))
            examples = _finite(m.get("examples", updates[cid].weight))
        if loss_sq is None or examples is None:
            loss_sq, examples = None, 0.0
            if duration is None:
                continue  # nothing learnt
        out.append(ClientFeedback(cid, rnd, int(examples), loss_sq, duration))
    return out


class SyncServer:
    """Synchronous rounds over clients ``0..num_clients-1`` with a :class:`Strategy`."""

    def __init__(self, strategy: Strategy, num_clients: int):
        if num_clients < 1:
            raise RoundError("a federation needs at least one client")
        self.strategy = strategy
        self.num_clients = num_clients

    def init(self, params: Params) -> ServerState:
        return ServerState(0, [np.array(p, copy=True) for p in params], self.strategy.optimizer.init(params),
                           self.strategy.selector.init(self.num_clients))

    def train_requests(self, state: ServerState, candidates: Sequence[int] | None = None,
                       k: int | None = None) -> tuple[list[TrainRequest], ServerState]:
        """Requests for round ``state.round + 1``, one per selected client, and the state after selection.

        ``candidates`` are the clients that may be asked (a deployment passes the connected ones,
        a simulated clock the available ones); by default every client of the federation. ``k``
        asks more (over-selection) or fewer than ``strategy.clients_per_round``.
        """
        rnd = state.round + 1
        pool = range(self.num_clients) if candidates is None else candidates
        chosen, selection = self.strategy.selector.select(
            rnd, pool, self.strategy.clients_per_round if k is None else k, state.selection)
        config = replace(self.strategy.train, round=rnd)
        return [TrainRequest(cid, rnd, state.params, config) for cid in chosen], replace(state, selection=selection)

    def apply(self, state: ServerState, requests: Sequence[TrainRequest], replies: Sequence[TrainReply],
              durations: Mapping[int, float] | None = None) -> tuple[RoundResult, ServerState]:
        """Aggregate the valid replies to ``requests`` into the next global model.

        Invalid or failed replies are recorded in ``RoundResult.rejected`` with their reason.
        With fewer than ``strategy.min_updates`` valid updates the model is left unchanged and
        the round still counts (its result says why). The selector then observes the round: each
        accepted client's reported examples and ``loss_sq``, and for every asked client the
        round-trip seconds in ``durations`` (what the transport measured), where known.
        """
        rnd = state.round + 1
        asked = {r.client_id for r in requests}
        spec = ParamSpec.of(state.params)
        deltas, weights, accepted, rejected = [], [], [], {}
        loss_sum = examples = 0.0
        for reply in replies:
            cid = reply.client_id
            if cid not in asked or reply.round != rnd:
                rejected[cid] = f"not asked in round {rnd}"
                continue
            if reply.error is not None:
                rejected[cid] = f"{reply.error.code}: {reply.error.reason}"
                continue
            try:
                deltas.append(as_delta(reply.update, state.params, spec, cid))
            except FedloomError as exc:
                rejected[cid] = f"{exc.code}: {exc.message}"
                continue
            weights.append(reply.update.weight)
            accepted.append(cid)
            seen = reply.update.metrics.get("examples", reply.update.weight)
            if "loss" in reply.update.metrics:
                loss_sum += reply.update.metrics["loss"] * seen
                examples += seen
        for cid in asked - set(accepted) - set(rejected):
            rejected[cid] = "no reply"
        result = RoundResult(rnd, [r.client_id for r in requests], accepted, rejected,
                             loss_sum / examples if examples else float("nan"), examples)
        selection = self.strategy.selector.observe(state.selection, _feedback(rnd, requests, replies, accepted,
                                                                              durations or {}))
        if len(accepted) < max(1, self.strategy.min_updates):
            return result, ServerState(rnd, state.params, state.opt_state, selection)
        delta = self.strategy.reducer(deltas, weights)
        params, opt_state = self.strategy.optimizer.update(delta, state.params, state.opt_state)
        return result, ServerState(rnd, params, opt_state, selection)

    def evaluate_requests(self, state: ServerState, seed: int = 0) -> list[EvaluateRequest]:
        """Federated evaluation of the current model on ``strategy.evaluate_clients`` clients.

        Clients are drawn by ``np.random.RandomState([seed, round, 1])`` (all of them when the
        number asked is at least the federation's size).
        """
        k = self.strategy.evaluate_clients
        if k <= 0:
            return []
        if k >= self.num_clients:
            chosen = list(range(self.num_clients))
        else:
            chosen = sorted(keyed_rng(seed, state.round, 1).choice(self.num_clients, k, replace=False))
        return [EvaluateRequest(int(c), state.round, state.params, self.strategy.evaluate) for c in chosen]

    @staticmethod
    def summarize(replies: Sequence[EvaluateReply]) -> FederatedEvaluation | None:
        """Example-weighted mean loss and accuracy of the successful evaluation replies."""
        good = [r.evaluation for r in replies if r.evaluation is not None and r.evaluation.num_examples > 0]
        n = sum(e.num_examples for e in good)
        if not n:
            return None
        return FederatedEvaluation(
            loss=sum(e.loss * e.num_examples for e in good) / n,
            accuracy=sum(e.accuracy * e.num_examples for e in good) / n,
            num_clients=len(good),
            num_examples=n,
        )
