"""The synchronous server: round logic with no I/O.

Each round: select clients, build train requests with the current global model, and, once the
replies are in, validate them, reduce them to one delta and apply the server optimizer. A
transport (in-process for simulation, gRPC for deployment) moves the messages in between.
Every method returns new values; nothing is kept between calls but the configuration (the
selector's memory, e.g. Oort's utilities, travels in :class:`ServerState` too).
"""

from __future__ import annotations

import math
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fedloom.aggregation.aggregator import AggState
from fedloom.errors import FedloomError, RoundError
from fedloom.messages import (
    EvaluateReply,
    EvaluateRequest,
    Evaluation,
    Reply,
    Request,
    TrainReply,
    TrainRequest,
    Update,
)
from fedloom.params import Params, ParamSpec, is_finite
from fedloom.seeding import keyed_rng
from fedloom.server.optimizers import OptState
from fedloom.server.selection import ClientFeedback
from fedloom.server.strategy import Strategy
from fedloom.server.validation import check_reply, masked_door, to_delta
from fedloom.stages.base import Contribution


@dataclass(frozen=True)
class ServerState:
    """The global model after ``round`` completed rounds, the optimizer's and the selector's state."""

    round: int
    params: Params
    opt_state: OptState
    selection: Any = None
    aggregation: AggState = ()


@dataclass(frozen=True)
class RoundResult:
    """What happened in one training round."""

    round: int
    selected: list[int]
    accepted: list[int]
    rejected: dict[int, str] = field(default_factory=dict)
    train_loss: float = float("nan")
    examples: float = 0.0
    measurements: dict[str, float] = field(default_factory=dict)  # the aggregator's, e.g. clip bound, epsilon
    problem: str = ""  # why the model was left unchanged, when it was
    client_metrics: dict[int, dict[str, float]] = field(default_factory=dict)  # each accepted client's report
    durations: dict[int, float] = field(default_factory=dict)  # asked clients' measured round trips, where known


@dataclass(frozen=True)
class FederatedEvaluation:
    """Example-weighted mean of the clients' own evaluations."""

    loss: float
    accuracy: float
    num_clients: int
    num_examples: int


def mean_loss(metrics: Mapping[int, Mapping[str, float]]) -> tuple[float, float]:
    """The example-weighted mean of the reported losses (NaN without any), and the examples they stand for."""
    seen = {cid: m.get("examples", 0.0) for cid, m in metrics.items() if "loss" in m}
    examples = sum(seen.values())
    return (sum(metrics[c]["loss"] * n for c, n in seen.items()) / examples if examples else math.nan), examples


def _finite(value: object) -> float | None:
    """A reported number the selector may use: finite and >= 0, else None (a client's report is untrusted)."""
    if isinstance(value, int | float) and math.isfinite(value) and value >= 0:
        return float(value)
    return None


def _feedback(rnd: int, requests: Sequence[TrainRequest], updates: Mapping[int, Update],
              durations: Mapping[int, float]) -> list[ClientFeedback]:
    """What the selector may learn from a round: accepted clients' reports, every asked client's duration.

    Without a ``loss_sq`` report the squared mean loss stands in for it; unusable reports count as none.
    """
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
                           self.strategy.selector.init(self.num_clients),
                           self.strategy.aggregator.init(ParamSpec.of(params)))

    def train_requests(self, state: ServerState, candidates: Sequence[int] | None = None,
                       k: int | None = None) -> tuple[list[TrainRequest], ServerState]:
        """Requests for round ``state.round + 1``, one per selected client, and the state after selection.

        ``candidates`` are the clients that may be asked (a deployment passes the connected ones,
        a simulated clock the available ones); by default every client of the federation. ``k``
        asks more (over-selection) or fewer than ``strategy.clients_per_round``. With a downlink codec the
        model travels encoded (``payload``), encoded once for the round.
        """
        rnd = state.round + 1
        pool = range(self.num_clients) if candidates is None else candidates
        chosen, selection = self.strategy.selector.select(
            rnd, pool, self.strategy.clients_per_round if k is None else k, state.selection)
        config = replace(self.strategy.train, round=rnd, stage=self.strategy.aggregator.broadcast(state.aggregation))
        c = self.strategy.compression
        payload = c.encode_model(state.params, self.strategy.seed, state.round) if c.downlink is not None else b""
        return ([TrainRequest(cid, rnd, state.params, config, payload) for cid in chosen],
                replace(state, selection=selection))

    def round(self, state: ServerState, requests: Sequence[TrainRequest]) -> Generator[
            list[Request], tuple[list[Reply], dict[int, float]], tuple[RoundResult, ServerState]]:
        """A round's exchanges with no I/O: yields the requests of each exchange, receives ``(replies, durations)``
        (the durations the transport or clock measured), returns the round's result and the next state.

        One exchange (the train requests) for a plain round; with secure aggregation, the steps of
        ``secagg/protocol.py`` around the training. ``rounds.train_round`` drives it over any transport.
        """
        secure = self.strategy.secure
        if secure is None:
            replies, durations = yield list(requests)
            return self.apply(state, requests, replies, durations)  # type: ignore[arg-type]
        size = ParamSpec.of(state.params).num_elements
        check = masked_door(self.strategy.compression, secure.payload_bytes(size))
        outcome = yield from secure.round(state.round + 1, requests, size + 1, check)
        rnd, expected = state.round + 1, min(len(requests), self.strategy.clients_per_round)
        loss, examples = mean_loss(outcome.metrics)
        updates = {cid: Update([], 1.0, "masked", m) for cid, m in outcome.metrics.items()}
        selection = self.strategy.selector.observe(state.selection,
                                                   _feedback(rnd, requests, updates, outcome.durations))
        problem, params, opt_state, aggregation = outcome.problem, state.params, state.opt_state, state.aggregation
        measurements = dict(outcome.measurements)
        if not problem and len(outcome.survivors) < max(1, self.strategy.min_updates):
            problem = (f"{len(outcome.survivors)} valid updates, fewer than "
                       f"server.min_updates={self.strategy.min_updates}")
        if not problem:
            mean = outcome.mean(secure.bound, ParamSpec.of(state.params))
            agg = self.strategy.aggregator.aggregate_mean(mean, outcome.survivors, state.aggregation, rnd, expected)
            measurements.update(agg.measurements)
            problem = agg.problem
            if not problem:
                params, opt_state = self.strategy.optimizer.update(agg.delta, state.params, state.opt_state)
                aggregation = agg.state
                if not is_finite(params):
                    problem, params, opt_state = ("the server optimizer's step is not finite", state.params,
                                                  state.opt_state)
                    aggregation = state.aggregation
        kept = list(outcome.survivors) if not outcome.problem else []
        rejected = {u: why for u, why in outcome.rejected.items() if u not in kept}  # a survivor that failed to
        measurements["secagg.unmask_failed"] = float(len(outcome.rejected) - len(rejected))  # unmask: its input is in
        result = RoundResult(rnd, [r.client_id for r in requests], kept, rejected, loss, examples,
                             measurements, problem, outcome.metrics, dict(outcome.durations))
        return result, ServerState(rnd, params, opt_state, selection, aggregation)

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
        asked = {r.client_id: r for r in requests}
        updates: dict[int, Update] = {}  # the accepted ones, in arrival order
        rejected: dict[int, str] = {}
        for reply in replies:
            cid = getattr(reply, "client_id", None)
            request = asked.get(cid)  # type: ignore[arg-type]
            if request is None or cid in updates or cid in rejected:
                rejected.setdefault(cid, f"not_asked: not asked in round {rnd}" if request is None
                                    else "duplicate: a second reply")
                continue
            try:
                reply = check_reply(request, reply, compression=self.strategy.compression)
            except FedloomError as exc:
                rejected[cid] = f"{exc.code}: {exc.message}"
                continue
            if reply.error is not None:
                rejected[cid] = f"{reply.error.code}: {reply.error.reason}"
            else:
                updates[cid] = reply.update
        for cid in asked.keys() - updates.keys() - rejected.keys():
            rejected[cid] = "no_reply: no reply"
        return self._aggregate(state, requests, updates, rejected, durations or {})

    def _aggregate(self, state: ServerState, requests: Sequence[TrainRequest], updates: dict[int, Update],
                   rejected: dict[int, str], durations: Mapping[int, float]) -> tuple[RoundResult, ServerState]:
        """The aggregator over the checked updates, then the server optimizer (see :meth:`apply`)."""
        rnd = state.round + 1
        contributions = [Contribution(cid, to_delta(u, state.params), float(u.weight), float(u.weight),
                                      metrics=u.metrics) for cid, u in updates.items()]
        expected = min(len(requests), self.strategy.clients_per_round)
        agg = self.strategy.aggregator.aggregate(contributions, state.aggregation, rnd, expected)
        rejected = {**rejected, **agg.rejected}
        kept = {cid: updates[cid] for cid in agg.kept}
        loss, examples = mean_loss({cid: {"examples": u.weight, **u.metrics} for cid, u in kept.items()})
        selection = self.strategy.selector.observe(state.selection, _feedback(rnd, requests, kept, durations))
        problem = agg.problem
        if not problem and len(kept) < max(1, self.strategy.min_updates):
            problem = f"{len(kept)} valid updates, fewer than server.min_updates={self.strategy.min_updates}"
        params, opt_state = state.params, state.opt_state
        if not problem:
            params, opt_state = self.strategy.optimizer.update(agg.delta, state.params, state.opt_state)
            if not is_finite(params):
                problem, params, opt_state = "the server optimizer's step is not finite", state.params, state.opt_state
        result = RoundResult(rnd, [r.client_id for r in requests], list(kept), rejected, loss, examples,
                             agg.measurements, problem, {cid: dict(u.metrics) for cid, u in kept.items()},
                             dict(durations))
        aggregation = agg.state if not problem else state.aggregation
        return result, ServerState(rnd, params, opt_state, selection, aggregation)

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
    def summarize(requests: Sequence[EvaluateRequest], replies: Sequence[EvaluateReply]) -> FederatedEvaluation | None:
        """Example-weighted mean loss and accuracy of the valid evaluation replies to ``requests``.

        Replies that fail :func:`~fedloom.server.validation.check_reply` (another kind of message,
        impossible numbers) and evaluations of no examples are left out; None when nothing is left.
        """
        asked = {r.client_id: r for r in requests}
        good: dict[int, Evaluation] = {}
        for reply in replies:
            request = asked.get(getattr(reply, "client_id", None))  # type: ignore[arg-type]
            if request is None or request.client_id in good:
                continue
            try:
                check_reply(request, reply)
            except FedloomError:
                continue
            if reply.evaluation is not None and reply.evaluation.num_examples > 0:
                good[request.client_id] = reply.evaluation
        n = sum(e.num_examples for e in good.values())
        if not n:
            return None
        share = [(e, e.num_examples / n) for e in good.values()]  # weights first: no overflow on large losses
        return FederatedEvaluation(
            loss=math.fsum(e.loss * w for e, w in share),
            accuracy=math.fsum(e.accuracy * w for e, w in share),
            num_clients=len(good),
            num_examples=n,
        )
