"""Bounding what one update can do: clipping for differential privacy, norm bounding and centered clipping.

* :class:`Clip`: DP-FedAvg's clipping (McMahan et al. 2018, "Learning Differentially Private
  Recurrent Language Models"). The client clips its update to L2 norm ``C`` before sending it; the
  server clips again, since a client's own clipping is its word. With ``target_quantile`` the
  bound adapts each round (Andrew et al. 2021, "Differentially Private Learning with Adaptive
  Clipping"): ``C <- C * exp(-lr * (b - target_quantile))``, ``b`` the fraction of updates whose
  norm was at most ``C``; with DP that fraction gets its own Gaussian noise (``count_noise``).
  The paper counts the fraction from bits the clients send; without secure aggregation the server
  computes it from the updates it sees, which is the same number for honest clients and cannot be
  lied about.
* :class:`NormBound`: the server clips each update to ``bound`` (Sun et al. 2019, "Can You Really
  Backdoor Federated Learning?"): a defence against scaled (model-replacement) updates.
* :class:`CenteredClip`: each update's distance from the last aggregate is clipped to ``tau``
  (Karimireddy, He and Jaggi 2021, "Learning from History for Byzantine Robust Optimization"),
  one iteration per round; with the mean reducer after it, the aggregate is
  ``v + mean(clip(x_i - v, tau))``, ``v`` the previous round's aggregate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from fedloom.errors import ConfigError
from fedloom.messages import Update
from fedloom.params import Params, ParamSpec, subtract
from fedloom.stages.base import (
    ClientContext,
    Context,
    Contribution,
    Measurements,
    Rejected,
    Stage,
    State,
    clip,
    l2_norm,
    with_delta,
)


@dataclass(frozen=True, repr=False)
class Clip(Stage):
    """Clip each update to L2 norm ``bound``, on the client and again on the server (see the module docstring).

    ``server_clip=False`` leaves the server's copy alone: for local DP, where the client adds noise
    after clipping and a second clip would shrink the noise.
    """

    bound: float = 1.0
    target_quantile: float = 0.0  # 0: a fixed bound
    lr: float = 0.2
    count_noise: float = 0.0  # std of the noise on the count of unclipped updates (adaptive clipping with DP)
    server_clip: bool = True
    name = "clip"

    def __post_init__(self) -> None:
        if not self.bound > 0:
            raise ConfigError("privacy.clip", f"the clip bound must be > 0, got {self.bound}")
        if not 0 <= self.target_quantile < 1:
            raise ConfigError("privacy.target_quantile", f"must be in [0, 1), got {self.target_quantile}")

    def init(self, spec: ParamSpec) -> State:
        return {"bound": np.array(self.bound, np.float64)}

    def broadcast(self, state: State) -> Measurements:
        return {"bound": float(state["bound"])}

    def client(self, update: Update, ctx: ClientContext) -> Update:
        values, norm = clip(update.values, ctx.broadcast[f"{self.name}.bound"])
        return Update(values, update.weight, update.kind, {**update.metrics, "clip_norm": norm})

    def update(self, c: Contribution, state: State, ctx: Context) -> Contribution:
        if not self.server_clip:
            return c
        delta, norm = clip(c.delta, float(state["bound"]))
        return replace(c, delta=delta, metrics={**c.metrics, "server_norm": norm})

    def observe(self, aggregate: Params, kept: list[Contribution], state: State,
                ctx: Context) -> tuple[State, Measurements]:
        bound = float(state["bound"])
        # the norm before the server's clip; under local noise only the client saw it, and reports it
        norms = [float(c.metrics.get("server_norm" if self.server_clip else "clip_norm", math.inf)) for c in kept]
        under = sum(n <= bound * (1 + 1e-9) for n in norms)
        measurements = {"clip_bound": bound, "clipped": 1.0 - under / max(1, len(kept))}
        if self.target_quantile > 0:
            noise = float(ctx.noise.normal((1,), self.count_noise, (ctx.round, 7))[0]) if self.count_noise > 0 else 0.0
            fraction = (under + noise) / max(1, ctx.expected)
            state = {"bound": np.array(bound * math.exp(-self.lr * (fraction - self.target_quantile)), np.float64)}
        return state, measurements


@dataclass(frozen=True, repr=False)
class MaxNorm(Stage):
    """Refuse an update whose L2 norm is above ``limit``: a corrupt or malicious update, not a large step.

    A sanity bound, not a defence: it keeps out updates such as values of 3e38 that would ruin the
    model for every later round, and says why. Bounding what honest-looking updates can do is
    :class:`NormBound`'s, :class:`CenteredClip`'s and the robust reducers'.
    """

    limit: float = 1e6
    name = "max_norm"

    def update(self, c: Contribution, state: State, ctx: Context) -> Contribution:
        norm = l2_norm(c.delta)
        if not norm <= self.limit:
            raise Rejected(f"its L2 norm {norm:.3g} is above {self.limit:g} (aggregation.max_norm)")
        return c


@dataclass(frozen=True, repr=False)
class NormBound(Stage):
    """The server clips each update to L2 norm ``bound`` (Sun et al. 2019)."""

    bound: float = 1.0
    name = "norm_bound"

    def __post_init__(self) -> None:
        if not self.bound > 0:
            raise ConfigError("aggregation.norm_bound", f"must be > 0, got {self.bound}")

    def update(self, c: Contribution, state: State, ctx: Context) -> Contribution:
        return with_delta(c, clip(c.delta, self.bound)[0])


@dataclass(frozen=True, repr=False)
class CenteredClip(Stage):
    """Clip each update's distance from the last aggregate to ``tau`` (Karimireddy et al. 2021; one iteration)."""

    tau: float = 1.0
    name = "centered_clip"

    def __post_init__(self) -> None:
        if not self.tau > 0:
            raise ConfigError("aggregation.centered_clip", f"tau must be > 0, got {self.tau}")

    def init(self, spec: ParamSpec) -> State:
        return {f"center{i}": np.zeros(shape, np.dtype(dtype)) for i, (shape, dtype)
                in enumerate(zip(spec.shapes, spec.dtypes))}

    @staticmethod
    def _center(state: State) -> Params:
        return [state[f"center{i}"] for i in range(len(state))]

    def update(self, c: Contribution, state: State, ctx: Context) -> Contribution:
        center = self._center(state)
        moved, _ = clip(subtract(c.delta, center), self.tau)
        return with_delta(c, [m + v for m, v in zip(moved, center)])

    def observe(self, aggregate: Params, kept: list[Contribution], state: State,
                ctx: Context) -> tuple[State, Measurements]:
        return {f"center{i}": a.copy() for i, a in enumerate(aggregate)}, {}
