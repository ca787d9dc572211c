"""The asynchronous server: buffered, staleness-weighted aggregation with no I/O.

FedBuff (Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation",
AISTATS; Algorithm 1): clients train on whatever model version they were sent; each arriving
delta is scaled by a staleness function ``s(tau)`` of how many server updates happened since it
was sent (default ``1/sqrt(1+tau)``), buffered, and every ``K`` arrivals the mean of the scaled
deltas goes through the server optimizer (FedBuff's server learning rate is ``sgd(lr)``).
FedAsync (Xie et al. 2019, "Asynchronous Federated Optimization") is the case ``K = 1`` with
server SGD at the mixing rate alpha: ``x <- x + alpha * s(tau) * delta``, which is Xie et al.'s
``x <- (1 - alpha_t) x + alpha_t x_new`` with ``alpha_t = alpha * s(tau)``.

It reuses the synchronous server's pieces: update validation, the strategy's aggregator (its
stages and reducer, the same weights as a synchronous round) and its server optimizer. The
staleness factor is not multiplied into the delta before the aggregator: each buffered update
carries it as its ``scale``, which the aggregator applies (``aggregation/aggregator.py``), so
that clipping and robust reducers see the updates as the clients sent them.

Deviation from FedBuff's Algorithm 1, which averages the ``K`` scaled deltas uniformly: the
buffer is averaged with the clients' example counts as weights, as FedAvg averages a round
(McMahan et al. 2017), so that the asynchronous and synchronous servers optimise the same
objective ``sum_i n_i F_i``. With unequal clients a uniform mean gives a small client as much
pull as a large one; on the keyboard example with the mobile population (20 clients in flight,
``K = 10``, 3,000 client trips; BENCHMARKS.md) the weighted buffer ends 1.8 points higher
(0.4771 against 0.4590). Clients that report ``weight = 1`` get the paper's uniform mean.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from fedloom.aggregation.aggregator import AggState
from fedloom.errors import ConfigError, FedloomError
from fedloom.messages import TrainReply, TrainRequest
from fedloom.params import Params, ParamSpec, is_finite
from fedloom.secagg.protocol import SecureSum
from fedloom.server.optimizers import OptState
from fedloom.server.strategy import Strategy
from fedloom.server.sync import RoundResult, ServerState
from fedloom.server.validation import check_reply, to_delta
from fedloom.stages.base import Contribution

Staleness = Callable[[int], float]


def polynomial_staleness(exponent: float = 0.5) -> Staleness:
    """``s(tau) = (1 + tau) ** -exponent``; FedBuff's default is exponent 0.5."""
    if exponent < 0:
        raise ConfigError("server.staleness_exponent", f"must be >= 0, got {exponent}")
    return lambda tau: float((1 + tau) ** -exponent)


@dataclass(frozen=True)
class AsyncState:
    """The model after ``version`` server updates, the optimizer state and the buffered deltas."""

    version: int
    params: Params
    opt_state: OptState
    aggregation: AggState = ()
    buffer: tuple[Contribution, ...] = ()
    losses: tuple[tuple[float, float], ...] = ()  # (loss, examples) of the buffered updates


@dataclass(frozen=True)
class Arrival:
    """What one arriving reply did: accepted (or why not), its staleness, and whether it closed a buffer."""

    client_id: int
    staleness: int
    accepted: bool
    reason: str = ""
    aggregated: bool = False
    train_loss: float = float("nan")
    measurements: dict[str, float] = field(default_factory=dict)  # the aggregator's, when it aggregated
    refused: dict[int, str] = field(default_factory=dict)  # buffered updates a stage refused, when it aggregated


def buffer_result(state: AsyncState, arrivals: list[tuple[Arrival, TrainReply]]) -> tuple[RoundResult, ServerState]:
    """What a server update reports (as a synchronous round would) and the state it reached, from the arrivals that
    led to it, the last of which closed the buffer."""
    last = arrivals[-1][0]
    kept = [(a, r) for a, r in arrivals if a.accepted and a.client_id not in last.refused]
    examples = sum(r.update.metrics.get("examples", r.update.weight) for _, r in kept if r.update is not None)
    refused = {**{a.client_id: a.reason for a, _ in arrivals if not a.accepted}, **last.refused}
    result = RoundResult(state.version, [a.client_id for a, _ in arrivals], [a.client_id for a, _ in kept], refused,
                         last.train_loss, float(examples), last.measurements, last.reason,
                         {a.client_id: dict(r.update.metrics) for a, r in kept if r.update is not None})
    return result, ServerState(state.version, state.params, state.opt_state, aggregation=state.aggregation)


class AsyncServer:
    """FedBuff/FedAsync round logic: ``request`` for a client, ``receive`` its reply."""

    def __init__(self, strategy: Strategy, buffer_size: int, staleness: Staleness | None = None):
        if buffer_size < 1:
            raise ConfigError("server.buffer_size", f"must be >= 1, got {buffer_size}")
        self.strategy = strategy
        self.buffer_size = buffer_size
        self.staleness = staleness or polynomial_staleness(0.5)
        self._broadcast: tuple[int, bytes] = (-1, b"")  # the model version last encoded for the downlink, and its bytes

    def init(self, params: Params) -> AsyncState:
        return AsyncState(0, [np.array(p, copy=True) for p in params], self.strategy.optimizer.init(params),
                          self.strategy.aggregator.init(ParamSpec.of(params)))

    def request(self, state: AsyncState, client_id: int, dispatch: int) -> TrainRequest:
        """A task on the current model; ``dispatch`` (1, 2, ...) numbers tasks and seeds the client's shuffle.
        With a downlink codec the model travels encoded, once per model version. The stages' client halves get
        what they need (the clip bound) as in a synchronous round."""
        payload = b""
        if self.strategy.compression.downlink is not None:
            if self._broadcast[0] != state.version:
                self._broadcast = (state.version, self.strategy.compression.encode_model(
                    state.params, self.strategy.seed, state.version))
            payload = self._broadcast[1]
        stage = self.strategy.aggregator.broadcast(state.aggregation)
        config = replace(self.strategy.train, round=dispatch, stage=stage)
        return TrainRequest(client_id, dispatch, state.params, config, payload)

    def receive(self, state: AsyncState, request: TrainRequest, version_sent: int,
                reply: TrainReply) -> tuple[Arrival, AsyncState]:
        """Check ``reply`` against its task and :meth:`add` its update (trained on ``version_sent``)."""
        tau = state.version - version_sent
        cid = request.client_id
        try:
            reply = check_reply(request, reply, compression=self.strategy.compression)
        except FedloomError as exc:
            return Arrival(cid, tau, False, f"{exc.code}: {exc.message}"), state
        if reply.error is not None:
            return Arrival(cid, tau, False, f"{reply.error.code}: {reply.error.reason}"), state
        u = reply.update
        return self.add(state, cid, version_sent, to_delta(u, request.params), float(u.weight), u.metrics)

    def add(self, state: AsyncState, client_id: int, version_sent: int, delta: Params, weight: float,
            metrics: dict[str, float]) -> tuple[Arrival, AsyncState]:
        """Buffer a checked update (its change from the model ``version_sent``), and aggregate a full buffer.

        The deployed server calls this directly with the updates its journal holds (``deploy/journal.py``):
        checked at the door, and read back after a restart."""
        tau = state.version - version_sent
        c = Contribution(client_id, delta, weight, weight, self.staleness(tau), metrics)
        buffer = (*state.buffer, c)
        losses = (*state.losses, (metrics.get("loss", float("nan")), metrics.get("examples", weight)))
        if len(buffer) < self.buffer_size:
            return Arrival(client_id, tau, True), replace(state, buffer=buffer, losses=losses)
        agg = self.strategy.aggregator.aggregate(buffer, state.aggregation, state.version + 1, self.buffer_size)
        seen = sum(n for _, n in losses)
        loss = sum(value * n for value, n in losses) / seen if seen else float("nan")
        if agg.delta is None:  # nothing to apply: the buffer is spent, the model stays (the reason says why)
            return (Arrival(client_id, tau, True, agg.problem, aggregated=True, train_loss=loss,
                            refused=agg.rejected),
                    AsyncState(state.version + 1, state.params, state.opt_state, state.aggregation))
        params, opt_state = self.strategy.optimizer.update(agg.delta, state.params, state.opt_state)
        return (Arrival(client_id, tau, True, aggregated=True, train_loss=loss, measurements=agg.measurements,
                        refused=agg.rejected), AsyncState(state.version + 1, params, opt_state, agg.state))

    def receive_sum(self, state: AsyncState, version_sent: int,
                    outcome: SecureSum) -> tuple[float, dict[str, float], str, AsyncState]:
        """Apply a buffer summed securely (``simulation/timeline.SecureAsyncRun``): its updates were all trained on
        ``version_sent``, so they share one staleness factor, applied to their mean as the aggregator applies
        each update's. Returns the factor, the aggregator's measurements, why nothing was applied (or "") and the
        next state."""
        factor = self.staleness(state.version - version_sent)
        secure = self.strategy.secure
        assert secure is not None
        if outcome.problem or outcome.total is None:
            return factor, {}, outcome.problem, replace(state, version=state.version + 1)
        mean = outcome.mean(secure.bound, ParamSpec.of(state.params), factor)
        agg = self.strategy.aggregator.aggregate_mean(mean, outcome.survivors, state.aggregation, state.version + 1,
                                                      self.buffer_size)
        if agg.delta is None:
            return factor, agg.measurements, agg.problem, replace(state, version=state.version + 1)
        params, opt_state = self.strategy.optimizer.update(agg.delta, state.params, state.opt_state)
        if not is_finite(params):
            return factor, agg.measurements, "the server optimizer's step is not finite", replace(
                state, version=state.version + 1)
        return factor, agg.measurements, "", AsyncState(state.version + 1, params, opt_state, agg.state)
