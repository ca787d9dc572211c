"""The aggregator: the stages and the one reducer between the clients' updates and the server optimizer.

``chain(weighting("uniform"), Clip(1.0), weighted_mean, GaussianNoise(...))`` lists them in data-flow
order, with exactly one reducer; it is checked when built. Stages before the reducer act on each
update (and may watch the aggregate afterwards), stages after it act on the aggregate; the client
halves of the stages run on the clients, in chain order (:meth:`Aggregator.client_stages`).

An aggregation (:meth:`Aggregator.aggregate`):

1. each update passes the stages before the reducer; a stage may refuse it (recorded with its reason);
2. the reducer combines what is left with the weights the stages set, each times the update's
   ``scale`` (FedBuff's staleness factor), and the aggregate is scaled by the weighted mean of the
   scales: a buffer of stale updates moves the model less, as in FedBuff (Nguyen et al. 2022),
   while clipping and the robust reducers see the updates as the clients sent them;
3. the stages before the reducer observe the aggregate; the stages after it transform it;
4. an aggregate that is not finite is not applied (the round says why).

The aggregator's state (one dict of arrays per stage) lives in the server state and is
checkpointed with the model by a deployed server.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fedloom.aggregation.reducers import Krum, Reducer, TrimmedMean, weighted_mean
from fedloom.errors import ConfigError, FedloomError
from fedloom.params import Params, ParamSpec, is_finite
from fedloom.stages.base import Context, Contribution, Measurements, Noise, SeededNoise, Stage, State, scaled
from fedloom.stages.clipping import Clip
from fedloom.stages.privacy import DistributedNoise, GaussianNoise, LocalNoise
from fedloom.stages.weighting import Weighting

AggState = tuple[State, ...]


def reducer_name(reducer: Reducer) -> str:
    if isinstance(reducer, TrimmedMean):
        return "trimmed_mean"
    if isinstance(reducer, Krum):
        return "krum" if reducer.m == 1 else "multi_krum"
    return getattr(reducer, "__name__", type(reducer).__name__)


@dataclass(frozen=True)
class Aggregation:
    """What one aggregation produced."""

    delta: Params | None  # None: nothing to apply (why: ``problem``)
    kept: list[int]
    rejected: dict[int, str]
    measurements: Measurements
    state: AggState
    problem: str = ""


@dataclass(frozen=True)
class Aggregator:
    """Stages before the reducer, the reducer, stages after it (build it with :func:`chain`)."""

    before: tuple[Stage, ...] = ()
    reducer: Reducer = weighted_mean
    after: tuple[Stage, ...] = ()
    noise: Noise = field(default_factory=SeededNoise)

    @property
    def stages(self) -> tuple[Stage, ...]:
        return self.before + self.after

    def client_stages(self) -> tuple[Stage, ...]:
        """The stages whose client half does something, in chain order."""
        return tuple(s for s in self.stages if type(s).client is not Stage.client)

    def init(self, spec: ParamSpec) -> AggState:
        return tuple(s.init(spec) for s in self.stages)

    def broadcast(self, state: AggState) -> tuple[tuple[str, float], ...]:
        """What the client halves need this round, as ``("stage.key", value)`` pairs."""
        return tuple((f"{s.name}.{k}", float(v)) for s, st in zip(self.stages, state)
                     for k, v in sorted(s.broadcast(st).items()))

    def stop_reason(self, state: AggState) -> str | None:
        return next((r for s, st in zip(self.stages, state) if (r := s.stop_reason(st))), None)

    def aggregate(self, contributions: Sequence[Contribution], state: AggState, round: int,
                  expected: int) -> Aggregation:
        """Run the chain over one round's (or one buffer's) accepted updates; see the module docstring."""
        states = list(state)
        kept, rejected = [], {}
        for c in contributions:
            try:
                for i, stage in enumerate(self.before):
                    c = stage.update(c, states[i], self._context(round, expected, states))
            except FedloomError as exc:
                rejected[c.client_id] = f"{stage.name}: {exc.message}"
                continue
            kept.append(c)
        ids = [c.client_id for c in kept]
        if not kept:
            why = "no valid update arrived" if not contributions else "no update passed the stages"
            return Aggregation(None, ids, rejected, {}, state, why)
        weights = [c.weight * c.scale for c in kept]
        try:
            value = self.reducer([c.delta for c in kept], weights)
        except FedloomError as exc:
            return Aggregation(None, ids, rejected, {}, state, f"{reducer_name(self.reducer)}: {exc.message}")
        if any(c.scale != 1.0 for c in kept):
            value = scaled(value, sum(weights) / sum(c.weight for c in kept))
        return self._finish(value, kept, states, state, rejected, self._context(round, expected, states))

    def aggregate_mean(self, mean: Params, kept: Sequence[int], state: AggState, round: int,
                       expected: int) -> Aggregation:
        """The chain after a reducer that ran elsewhere: ``mean`` is the (weighted) mean of the updates of
        ``kept``, summed securely (``secagg/``); the stages after the reducer transform it (DP's noise and
        fixed denominator). The stages before it ran their client halves; of their server halves only those
        that need no single update observe the round (local DP's accountant): the server sees no update."""
        states = list(state)
        contributions = [Contribution(cid, [], 1.0, 1.0) for cid in kept]
        return self._finish(mean, contributions, states, state, {}, self._context(round, expected, states), blind=True)

    def _finish(self, value: Params, kept: list[Contribution], states: list[State], state: AggState,
                rejected: dict[int, str], ctx: Context, blind: bool = False) -> Aggregation:
        """After the reducer: the stages before it observe the aggregate (with ``blind``, only those that need no
        single update), the stages after it transform it; an aggregate that is not finite is not applied."""
        measurements: Measurements = {}
        for i, stage in enumerate(self.before):
            if stage.blind or not blind:
                states[i], m = stage.observe(value, kept, states[i], ctx)
                measurements.update({f"{stage.name}.{k}": v for k, v in m.items()})
        for j, stage in enumerate(self.after, start=len(self.before)):
            value, states[j], m = stage.aggregate(value, kept, states[j], ctx)
            measurements.update({f"{stage.name}.{k}": v for k, v in m.items()})
        ids = [c.client_id for c in kept]
        if not is_finite(value):
            return Aggregation(None, ids, rejected, measurements, state, "the aggregate is not finite")
        return Aggregation(value, ids, rejected, measurements, tuple(states))

    def _context(self, round: int, expected: int, states: list[State]) -> Context:
        bound = next((float(st["bound"]) for s, st in zip(self.before, states) if isinstance(s, Clip)), None)
        return Context(round, max(1, expected), self.noise, bound)


def chain(*parts: Any, noise: Noise | None = None) -> Aggregator:
    """An aggregator from stages and one reducer in data-flow order; an invalid chain is refused, saying why."""
    reducers = [i for i, p in enumerate(parts) if not isinstance(p, Stage)]
    if len(reducers) != 1:
        names = ", ".join(repr(parts[i]) for i in reducers) or "none"
        raise ConfigError("aggregation", f"a chain needs exactly one reducer, got {len(reducers)} ({names})")
    r = reducers[0]
    if not callable(parts[r]):
        raise ConfigError("aggregation", f"{parts[r]!r} is neither a stage nor a reducer")
    before, after = tuple(parts[:r]), tuple(parts[r + 1:])
    for s in before:
        if s.acts_on != "update":
            raise ConfigError("aggregation", f"{s.name} acts on the aggregate: put it after the reducer")
    for s in after:
        if s.acts_on != "aggregate":
            raise ConfigError("aggregation", f"{s.name} acts on each update: put it before the reducer")
    names = [s.name for s in before + after]
    if len(set(names)) != len(names):
        raise ConfigError("aggregation", f"a stage appears twice in {names}")
    _check_privacy(before, parts[r], after)
    return Aggregator(before, parts[r], after, noise or SeededNoise())


def _check_privacy(before: tuple[Stage, ...], reducer: Reducer, after: tuple[Stage, ...]) -> None:
    """DP noise is calibrated to the sensitivity of the uniform mean of clipped updates: refuse anything else."""
    noisy = [s for s in before + after if isinstance(s, GaussianNoise | LocalNoise | DistributedNoise)]
    if not noisy:
        return
    what = noisy[0].name
    clips = [i for i, s in enumerate(before) if isinstance(s, Clip)]
    if not clips:
        raise ConfigError("privacy", f"{what} is calibrated to a clip bound: put a Clip stage before the reducer")
    if isinstance(noisy[0], LocalNoise) and before.index(noisy[0]) < clips[0]:
        raise ConfigError("privacy", "local noise goes on the clipped update: put it after the Clip stage")
    if reducer is not weighted_mean:
        raise ConfigError("privacy", f"DP noise is calibrated for the mean of clipped updates; {reducer_name(reducer)} "
                                     "has another sensitivity, so the guarantee would not hold")
    modes = [s.mode for s in before if isinstance(s, Weighting)]
    if modes != ["uniform"]:
        raise ConfigError("privacy", "DP-FedAvg weighs every update the same (a client's weight would be part of its "
                                     "sensitivity): use uniform weighting")
