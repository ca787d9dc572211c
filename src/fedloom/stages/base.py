"""Stages: the steps between a client's update and the server optimizer.

A stage has a client half, a server half and state, in the shape of optax transformations: the
server keeps each stage's state (``init``), tells the client halves what they need for a round
(``broadcast``), and every half returns its new value, new state and its measurements (numbers
that go to ``metrics.csv``, e.g. the clip norm or the fraction clipped).

Where a stage sits in an aggregator's chain decides what its server half sees
(``aggregation/aggregator.py``): before the reducer it acts on each update (:meth:`Stage.update`)
and may watch the aggregate afterwards (:meth:`Stage.observe`); after the reducer it acts on the
aggregate (:meth:`Stage.aggregate`). Its client half (:meth:`Stage.client`) runs on the client,
in every simulation engine and in the deployed client, before the update is sent.

State is a dict of numpy arrays, so that a deployed server can checkpoint it with the model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from fedloom.errors import FedloomError
from fedloom.messages import Update
from fedloom.params import Params, ParamSpec
from fedloom.seeding import keyed_rng

State = dict[str, np.ndarray]
Measurements = dict[str, float]


class Rejected(FedloomError):
    """A stage refuses one update (the round goes on without it; the reason is recorded)."""

    code = "rejected"


# -- noise ---------------------------------------------------------------------------------------


class Noise(Protocol):
    def normal(self, shape: tuple[int, ...], std: float, key: tuple[int, ...]) -> np.ndarray: ...


@dataclass(frozen=True)
class SeededNoise:
    """Gaussian noise drawn from ``RandomState([seed, *key])``: a simulation's noise, reproducible."""

    seed: int = 0

    def normal(self, shape: tuple[int, ...], std: float, key: tuple[int, ...]) -> np.ndarray:
        return keyed_rng(self.seed, *key).normal(0.0, std, shape)


class SecureNoise:
    """Gaussian noise from the operating system's cryptographically secure source (a deployment's).

    Box-Muller on 53-bit uniforms from ``os.urandom``, in float64. Like every floating-point
    Gaussian it does not close the attacks on floating-point noise of Mironov (CCS 2012).
    """

    def normal(self, shape: tuple[int, ...], std: float, key: tuple[int, ...] = ()) -> np.ndarray:
        n = math.prod(shape)
        pairs = (n + 1) // 2
        words = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64).reshape(2, pairs)
        u1 = ((words[0] >> np.uint64(11)).astype(np.float64) + 1.0) / 2.0**53  # (0, 1]
        u2 = (words[1] >> np.uint64(11)).astype(np.float64) / 2.0**53  # [0, 1)
        r = np.sqrt(-2.0 * np.log(u1))
        z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])[:n]
        return (std * z).reshape(shape)


# -- what flows through the halves ---------------------------------------------------------------


@dataclass(frozen=True)
class Contribution:
    """One client's accepted update on its way through the server halves.

    ``weight`` is what the reducer weighs it by (the weighting stage sets it from ``examples``,
    the client's claim); ``scale`` is FedBuff's staleness factor, applied by the aggregator.
    """

    client_id: int
    delta: Params
    weight: float
    examples: float
    scale: float = 1.0
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Context:
    """What the server halves know of the round: its number, how many updates it asked for, its noise."""

    round: int
    expected: int
    noise: Noise = SeededNoise()
    clip_bound: float | None = None  # the bound a clipping stage before the reducer holds this round


@dataclass(frozen=True)
class ClientContext:
    """What a client half knows: who it runs for, the round, the model it was sent, the stages' broadcast."""

    client_id: int
    round: int
    sent: Params
    broadcast: Mapping[str, float]
    noise: Noise = SeededNoise()


# -- the stage ----------------------------------------------------------------------------------


class Stage:
    """A step of the aggregation; every half is the identity unless a subclass says otherwise.

    ``acts_on`` is ``"update"`` (it belongs before the reducer) or ``"aggregate"`` (after it).
    """

    name = "stage"
    acts_on = "update"
    blind = False  # before the reducer: its ``observe`` needs no single update (it runs under secure aggregation)

    def init(self, spec: ParamSpec) -> State:
        return {}

    def broadcast(self, state: State) -> Measurements:
        """Values this round's client halves need (e.g. the clip norm), keyed without the stage's name."""
        return {}

    def client(self, update: Update, ctx: ClientContext) -> Update:
        """The client half: runs on the client before the update is sent (measurements go in its metrics)."""
        return update

    def update(self, c: Contribution, state: State, ctx: Context) -> Contribution:
        """The server half of a stage before the reducer, on each update; raise :class:`Rejected` to refuse it."""
        return c

    def observe(self, aggregate: Params, kept: list[Contribution], state: State,
                ctx: Context) -> tuple[State, Measurements]:
        """A stage before the reducer sees the round's aggregate and the updates it kept."""
        return state, {}

    def aggregate(self, value: Params, kept: list[Contribution], state: State,
                  ctx: Context) -> tuple[Params, State, Measurements]:
        """The server half of a stage after the reducer, on the aggregate."""
        return value, state, {}

    def stop_reason(self, state: State) -> str | None:
        """Why training must stop before another round (a privacy budget), or None."""
        return None

    def __repr__(self) -> str:
        return self.name


# -- helpers the stages share -------------------------------------------------------------------


def l2_norm(values: Params) -> float:
    """The L2 norm of all arrays together, in float64 (no overflow for float32 values; one float64 copy of each)."""
    total = 0.0
    for a in values:
        wide = a.ravel().astype(np.float64)
        total += float(np.dot(wide, wide))
    return math.sqrt(total)


def scaled(values: Params, factor: float) -> Params:
    """``values * factor`` in each array's own dtype (new arrays)."""
    return [(a * np.asarray(factor, dtype=np.float64)).astype(a.dtype, copy=False) for a in values]


def clip(values: Params, bound: float) -> tuple[Params, float]:
    """``values`` scaled to L2 norm at most ``bound`` (McMahan et al. 2018), and their norm before."""
    norm = l2_norm(values)
    return (scaled(values, bound / norm) if norm > bound else [a.copy() for a in values]), norm


def with_delta(c: Contribution, delta: Params) -> Contribution:
    return replace(c, delta=delta)
