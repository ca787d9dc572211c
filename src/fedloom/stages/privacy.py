"""Differential privacy at the level of clients: DP-FedAvg's noise, local noise, and the privacy accountant.

* :class:`GaussianNoise`: DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private
  Recurrent Language Models"). Updates are clipped to ``C`` (``clipping.Clip``) and weighed
  uniformly; the mean of the kept updates becomes their sum over the number of updates asked for
  (the paper's fixed-denominator estimator, so a dropout cannot raise the sensitivity), and
  Gaussian noise of std ``z * C / expected`` is added. With adaptive clipping (Andrew et al.
  2021) part of the noise budget goes to the count of unclipped updates: the updates get the
  multiplier ``z_update = (z^-2 - (2 * count_std)^-2)^-1/2``, so that the whole round is still a
  Gaussian mechanism of multiplier ``z``.
* :class:`LocalNoise`: local DP; each client adds noise of std ``z * C`` to its clipped update
  before sending it, so no one, the server included, sees an update without noise.
* :class:`DistributedNoise`: distributed DP under secure aggregation (the server never sees an update to
  add noise to, nor the sum before it holds the noise): each client adds its share, std
  ``z * C / sqrt(m)``, to its clipped update before masking, ``m`` the fewest survivors a round is
  applied with (``secagg.dropout_fraction`` sets it); the sum of ``s >= m`` shares has std
  ``z * C * sqrt(s / m) >= z * C``, DP-FedAvg's noise on the sum, so the accountant counts ``z``.
  A round with more survivors than ``m`` carries more noise than it needs (``sqrt(s / m)``); one with
  fewer is not applied. As in Kairouz et al. 2021 ("The Distributed Discrete Gaussian Mechanism for
  Federated Learning with Secure Aggregation") but with continuous Gaussian shares rounded to the
  fixed point afterwards, so the guarantee is DP-FedAvg's up to that rounding (see the docs).
* :class:`Accountant`: the privacy spent, with the ``dp-accounting`` package's RDP accountant,
  for the sampling the run really uses: a fixed number of clients drawn without replacement
  (``SampledWithoutReplacementDpEvent``, neighbouring datasets differ by replacing one client, so
  the sum's sensitivity is ``2C`` and the event's multiplier ``z / 2``), Poisson sampling
  (``PoissonSampledDpEvent``, add or remove one client, sensitivity ``C``), or no amplification
  at all (asynchronous rounds and local DP: every round counts as if every client took part).

What this protects: the trained model (and with local noise each update) reveals little about
whether any one client took part, whatever that client's data. What it does not: a server that
does not add the noise it claims (central DP trusts the server; local DP does not), side
channels such as timing and message sizes, and floating-point attacks on the noise (Mironov 2012).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedloom.errors import ConfigError
from fedloom.messages import Update
from fedloom.params import Params, ParamSpec
from fedloom.stages.base import ClientContext, Context, Contribution, Measurements, Stage, State, scaled

SAMPLINGS = ("fixed", "poisson", "none")


@dataclass(frozen=True)
class Accountant:
    """Epsilon after a number of rounds of a Gaussian mechanism of multiplier ``noise_multiplier``.

    ``sampling``: ``fixed`` (``per_round`` of ``population`` clients without replacement),
    ``poisson`` (each client with probability ``per_round / population``) or ``none``.
    """

    noise_multiplier: float
    sampling: str
    population: int
    per_round: int
    delta: float

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLINGS:
            raise ConfigError("privacy", f"unknown sampling {self.sampling!r}")
        if not 0 < self.delta < 1:
            raise ConfigError("privacy.delta", f"must be in (0, 1), got {self.delta}")

    def _event(self, noise_multiplier: float, rounds: int):  # noqa: ANN202 - a dp_accounting event
        import dp_accounting

        if self.sampling == "fixed":
            one = dp_accounting.SampledWithoutReplacementDpEvent(
                self.population, self.per_round, dp_accounting.GaussianDpEvent(noise_multiplier / 2))
        elif self.sampling == "poisson":
            one = dp_accounting.PoissonSampledDpEvent(self.per_round / self.population,
                                                      dp_accounting.GaussianDpEvent(noise_multiplier))
        else:
            one = dp_accounting.GaussianDpEvent(noise_multiplier / 2)
        return dp_accounting.SelfComposedDpEvent(one, rounds)

    def _accountant(self):  # noqa: ANN202
        from dp_accounting import NeighboringRelation
        from dp_accounting.rdp import RdpAccountant

        relation = NeighboringRelation.ADD_OR_REMOVE_ONE if self.sampling == "poisson" else \
            NeighboringRelation.REPLACE_ONE
        return RdpAccountant(neighboring_relation=relation)

    def epsilon(self, rounds: int) -> float:
        """Epsilon at ``delta`` after ``rounds`` rounds (0 before the first)."""
        if rounds <= 0:
            return 0.0
        accountant = self._accountant()
        accountant.compose(self._event(self.noise_multiplier, rounds))
        return float(accountant.get_epsilon(self.delta))


def noise_for_epsilon(epsilon: float, rounds: int, sampling: str, population: int, per_round: int,
                      delta: float) -> float:
    """The smallest noise multiplier that keeps ``rounds`` rounds within ``epsilon`` at ``delta``.

    Calibrated by ``dp_accounting.calibrate_dp_mechanism`` with the same events as :class:`Accountant`.
    """
    import dp_accounting

    if not epsilon > 0 or rounds < 1:
        raise ConfigError("privacy", f"need epsilon > 0 and rounds >= 1, got {epsilon} and {rounds}")
    base = Accountant(1.0, sampling, population, per_round, delta)
    return float(dp_accounting.calibrate_dp_mechanism(
        base._accountant, lambda z: base._event(z, rounds), epsilon, delta,
        dp_accounting.LowerEndpointAndGuess(0.01, 1.0), tol=1e-4))


def update_multiplier(noise_multiplier: float, count_std: float) -> float:
    """The updates' share of a multiplier ``z`` when the count of unclipped updates has noise ``count_std``
    (Andrew et al. 2021, Theorem 1: ``(z^-2 - (2 count_std)^-2)^-1/2``)."""
    if count_std <= 0:
        return noise_multiplier
    rest = noise_multiplier ** -2 - (2 * count_std) ** -2
    if rest <= 0:
        raise ConfigError("privacy.noise_multiplier",
                          f"{noise_multiplier} leaves nothing for the updates after the count's noise {count_std:g}; "
                          "raise it or ask for more clients per round")
    return rest ** -0.5


@dataclass(frozen=True, repr=False)
class GaussianNoise(Stage):
    """DP-FedAvg's noise on the aggregate (see the module docstring); it needs a ``Clip`` before the reducer."""

    multiplier: float = 1.0  # for the updates (update_multiplier under adaptive clipping)
    accountant: Accountant | None = None  # for the whole mechanism
    budget: float = 0.0  # epsilon that training must not exceed; 0 = none
    name = "dp_noise"
    acts_on = "aggregate"

    def init(self, spec: ParamSpec) -> State:
        return {"rounds": np.array(0, np.int64)}

    def aggregate(self, value: Params, kept: list[Contribution], state: State,
                  ctx: Context) -> tuple[Params, State, Measurements]:
        bound = ctx.clip_bound
        if bound is None:
            raise ConfigError("privacy", "DP noise needs clipping before the reducer")
        total = scaled(value, len(kept) / ctx.expected)  # the fixed-denominator mean: sum / expected
        std = self.multiplier * bound / ctx.expected
        noised = [(a + ctx.noise.normal(a.shape, std, (ctx.round, 5, i))).astype(a.dtype)
                  for i, a in enumerate(total)]
        rounds = int(state["rounds"]) + 1
        measurements = {"noise_std": std}
        if self.accountant is not None:
            measurements["epsilon"] = self.accountant.epsilon(rounds)
        return noised, {"rounds": np.array(rounds, np.int64)}, measurements

    def stop_reason(self, state: State) -> str | None:
        return _over_budget(self.accountant, self.budget, state)


@dataclass(frozen=True, repr=False)
class LocalNoise(Stage):
    """Local DP: each client adds noise of std ``multiplier * C`` to its clipped update (``C``: the clip's bound)."""

    multiplier: float = 1.0
    accountant: Accountant | None = None
    budget: float = 0.0
    name = "local_noise"
    blind = True

    def init(self, spec: ParamSpec) -> State:
        return {"rounds": np.array(0, np.int64)}

    def client(self, update: Update, ctx: ClientContext) -> Update:
        std = self.multiplier * ctx.broadcast["clip.bound"]
        values = [(a + ctx.noise.normal(a.shape, std, (ctx.round, ctx.client_id, 11, i))).astype(a.dtype)
                  for i, a in enumerate(update.values)]
        return Update(values, update.weight, update.kind, dict(update.metrics))

    def observe(self, aggregate: Params, kept: list[Contribution], state: State,
                ctx: Context) -> tuple[State, Measurements]:
        rounds = int(state["rounds"]) + 1
        measurements = {} if self.accountant is None else {"epsilon": self.accountant.epsilon(rounds)}
        return {"rounds": np.array(rounds, np.int64)}, measurements

    def stop_reason(self, state: State) -> str | None:
        return _over_budget(self.accountant, self.budget, state)


@dataclass(frozen=True, repr=False)
class DistributedNoise(Stage):
    """Distributed DP: each client adds noise of std ``multiplier * C / sqrt(shares)`` to its clipped update; the
    server scales the securely summed mean to the fixed denominator (see the module docstring)."""

    multiplier: float = 1.0
    shares: int = 1
    accountant: Accountant | None = None
    budget: float = 0.0
    name = "distributed_noise"
    acts_on = "aggregate"

    def init(self, spec: ParamSpec) -> State:
        return {"rounds": np.array(0, np.int64)}

    def std(self, bound: float) -> float:
        """A client's share of the noise, for clip bound ``bound``."""
        return self.multiplier * bound / self.shares ** 0.5

    def client(self, update: Update, ctx: ClientContext) -> Update:
        std = self.std(ctx.broadcast["clip.bound"])
        values = [(a + ctx.noise.normal(a.shape, std, (ctx.round, ctx.client_id, 13, i))).astype(a.dtype)
                  for i, a in enumerate(update.values)]
        return Update(values, update.weight, update.kind, dict(update.metrics))

    def aggregate(self, value: Params, kept: list[Contribution], state: State,
                  ctx: Context) -> tuple[Params, State, Measurements]:
        total = scaled(value, len(kept) / ctx.expected)  # the fixed-denominator mean: sum / expected
        rounds = int(state["rounds"]) + 1
        measurements = {"noise_std": self.multiplier * (ctx.clip_bound or 0.0) * (len(kept) / self.shares) ** 0.5
                        / ctx.expected}
        if self.accountant is not None:
            measurements["epsilon"] = self.accountant.epsilon(rounds)
        return total, {"rounds": np.array(rounds, np.int64)}, measurements

    def stop_reason(self, state: State) -> str | None:
        return _over_budget(self.accountant, self.budget, state)


def _over_budget(accountant: Accountant | None, budget: float, state: State) -> str | None:
    """Why another round may not run: it would spend more than the budget."""
    if not budget or accountant is None:
        return None
    rounds = int(state["rounds"])
    after = accountant.epsilon(rounds + 1)
    if after > budget:
        return (f"privacy budget: another round would reach epsilon {after:.3f} > privacy.epsilon_budget {budget:g} "
                f"(delta {accountant.delta:g}); training stopped after {rounds} private rounds")
    return None
