"""Adaptive client selection: Oort and power-of-choice, as pure functions of an explicit state.

Both selectors follow the selector protocol of :mod:`fedloom.server.selection` (``init``,
``select``, ``observe`` over an explicit state). No method keeps hidden state or mutates its
arguments: each returns a new state, whose arrays are fresh copies marked read-only. All randomness
comes from :func:`fedloom.seeding.keyed_rng` keyed by ``(seed, round, stream)``, so the same seed,
round and state always give the same picks, and round ``r``'s draw does not depend on the draws of
earlier rounds. If there are at most ``k`` candidates, ``select`` returns all of them.

Selection uses only what a real server knows (:class:`~fedloom.server.selection.ClientFeedback`):
example counts and mean squared per-sample training losses the clients reported, and the
round-trip times the server measured. It never reads a simulated device profile. Feedback without
a loss (a straggler, a dropout) updates only the client's measured duration; feedback without a
duration keeps the last one measured.

Oort
----
Lai, Zhu, Madhyastha, Chowdhury, "Oort: Efficient Federated Learning via Guided Participant
Selection", OSDI 2021 (Algorithm 1), and the authors' code (github.com/SymbioticLab/Oort,
``oort/oort.py``, also in FedScale). Taken from the paper:

* statistical utility ``U_i = |B_i| * sqrt(mean of squared per-sample losses)``, clipped to the
  ``utility_clip_percentile`` (95) order statistic of the explored candidates' utilities;
* a temporal-uncertainty bonus ``sqrt(staleness_weight * log(R) / L_i)`` with ``L_i`` the last
  round client ``i`` reported in and ``staleness_weight`` 0.1 (the paper's constant), written as the
  paper writes it (divided by the last round, not by the staleness ``R - L_i``);
* the system penalty ``(T / t_i) ** alpha`` when the measured duration ``t_i`` exceeds the preferred
  round duration ``T``, ``alpha = 2``;
* exploitation of ``floor((1 - eps) * k)`` explored clients: the cut-off is ``cutoff_fraction``
  (0.95) times the ``floor((1 - eps) * k)``-th highest utility, and the picks are sampled without
  replacement with probability proportional to utility among the clients at or above the cut-off
  (the paper's choice, not a plain top-k; ``cutoff_fraction=1`` gives the top-k up to ties);
* exploration of the other ``eps * k`` among never-tried candidates, with ``eps`` starting at 0.9,
  multiplied by 0.98 after every ``select`` and floored at 0.2;
* the pacer: when the summed utility reported by the exploited clients over the last ``W``
  rounds is below that of the ``W`` rounds before, ``T`` is relaxed by one step.

Deviations, each deliberate:

* ``T`` and the pacer step are percentiles, as in the authors' code, not seconds as Algorithm 1
  writes ``T <- T + Delta``: ``T`` is the ``pacer_percentile`` order statistic
  (``sorted(d)[min(floor(n * p / 100), n - 1)]``) of the measured durations of all clients seen so
  far, starting at ``pacer_start_percentile`` (30, the code's default) and rising by ``pacer_step``
  (5 points) per relaxation, up to 100 where ``T`` is infinite (no penalty). A percentile adapts to
  whatever units and spread the durations have; a step in seconds would need tuning per deployment.
* The pacer compares non-overlapping windows, once every ``W`` (``pacer_window``, 20 as in the
  code) rounds, with the paper's strict "fell below" test; the code's 10% flatness band and its
  tightening branch are left out.
* Never-tried clients are explored uniformly: the paper prefers faster ones, but the speed of a
  client the server has never measured is unknown here.
* No normalisation of ``U_i`` before the bonus (the code min-max normalises; the paper does not),
  and no blacklist of over-selected clients.
* If too few explored (or unexplored) candidates exist, the other group fills the ``k`` slots
  (extra explored clients are exploited by the same cut-off sampling).

Power-of-choice
---------------
Cho, Wang, Joshi, "Client Selection in Federated Learning: Convergence Analysis and Power-of-Choice
Selection Strategies", AISTATS 2022. A candidate set of ``d`` clients (``d >= k``; ``max(d, k)`` is
used) is drawn without replacement with probability proportional to the data fraction ``p_i``; the
``k`` of them with the highest loss are selected. Deviations:

* The loss is the one the client last reported (the paper's ``rpow-d`` variant), not a fresh
  evaluation of the current global model by each of the ``d`` candidates, which would cost an extra
  round trip. The ranking key is ``loss_sq_mean``; ranking by its square root (the RMS loss, an
  upper bound on the mean loss) would give the same order.
* A client that never reported has unknown loss, treated as ``+inf`` (so it is picked first among
  the ``d``, ties broken by draw order), and unknown size, weighted by the mean known size among the
  candidates (uniform when none is known). Clients that reported zero examples are drawn only when
  too few others remain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from fedloom.errors import ConfigError, StateError
from fedloom.seeding import keyed_rng
from fedloom.server.selection import ClientFeedback

_EXPLOIT_STREAM = 0
_EXPLORE_STREAM = 1
_CANDIDATE_STREAM = 2


# ---------------------------------------------------------------- small helpers


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


def _order_stat(values: Sequence[float] | np.ndarray, percentile: float) -> float:
    """``sorted(values)[min(floor(n * percentile / 100), n - 1)]`` (the authors' Oort convention)."""
    s = np.sort(np.asarray(values, dtype=float))
    return float(s[min(int(len(s) * percentile / 100.0), len(s) - 1)])


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _check_call(round: int, candidates: Sequence[int], k: int, num_clients: int) -> list[int]:
    _require(isinstance(round, int) and round >= 1, "select.round", f"must be an int >= 1, got {round!r}")
    _require(isinstance(k, int) and k >= 0, "select.k", f"must be an int >= 0, got {k!r}")
    cands = [int(c) for c in candidates]
    if len(set(cands)) != len(cands):
        raise StateError("candidates contain duplicates", stage="select")
    for c in cands:
        if not 0 <= c < num_clients:
            raise StateError(f"unknown client (state has {num_clients})", client_id=c, stage="select")
    return cands


def _check_feedback(fb: ClientFeedback, num_clients: int) -> None:
    if not 0 <= fb.client_id < num_clients:
        raise StateError(f"unknown client (state has {num_clients})", client_id=fb.client_id, stage="observe")
    bad = (
        fb.round < 1
        or fb.num_examples < 0
        or (fb.loss_sq_mean is not None and not (math.isfinite(fb.loss_sq_mean) and fb.loss_sq_mean >= 0))
        or (fb.duration_s is not None and not (math.isfinite(fb.duration_s) and fb.duration_s >= 0))
    )
    if bad:
        raise StateError(f"invalid feedback {fb}", client_id=fb.client_id, stage="observe")


def _check_num_clients(num_clients: int) -> None:
    _require(isinstance(num_clients, int) and num_clients >= 0, "init.num_clients", "must be an int >= 0")


# ---------------------------------------------------------------- Oort


@dataclass(frozen=True)
class OortState:
    """Everything Oort remembers; arrays are indexed by client id and read-only."""

    utility: np.ndarray  # last statistical utility U_i = |B_i| * sqrt(loss_sq_mean)
    last_round: np.ndarray  # last round the client reported in; 0 = never (unexplored)
    duration: np.ndarray  # last measured round-trip seconds; nan = never measured
    epsilon: float  # exploration fraction for the next select
    pacer_percentile: float  # percentile of measured durations that sets T
    util_history: tuple[float, ...] = ()  # per past select: summed utility its exploited clients reported
    pending_util: float = 0.0  # utility reported so far by the last select's exploited clients
    last_exploit: frozenset[int] = field(default_factory=frozenset)
    preferred_duration: float = math.inf  # T used by the last select
    selections: int = 0  # select calls so far

    @property
    def num_clients(self) -> int:
        return len(self.utility)


@dataclass(frozen=True)
class OortSelector:
    """Oort's training selector (Lai et al., OSDI 2021); see the module docstring."""

    alpha: float = 2.0  # system penalty exponent: utility *= (T / t_i) ** alpha when t_i > T
    epsilon: float = 0.9  # initial exploration fraction
    epsilon_decay: float = 0.98  # epsilon *= decay after every select
    epsilon_min: float = 0.2  # floor of epsilon
    pacer_start_percentile: float = 30.0  # T starts at this percentile of measured durations
    pacer_step: float = 5.0  # percentile points T's percentile rises by when utility stalls
    pacer_window: int = 20  # W: rounds per window the pacer compares
    staleness_weight: float = 0.1  # confidence bonus sqrt(w * log(R) / L_i)
    utility_clip_percentile: float = 95.0  # U_i is clipped to this percentile of explored candidates
    cutoff_fraction: float = 0.95  # exploit among utilities >= this * the (1-eps)k-th highest
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.alpha >= 0, "oort.alpha", f"must be >= 0, got {self.alpha}")
        _require(0 <= self.epsilon <= 1, "oort.epsilon", f"must be in [0, 1], got {self.epsilon}")
        _require(0 < self.epsilon_decay <= 1, "oort.epsilon_decay", f"must be in (0, 1], got {self.epsilon_decay}")
        _require(0 <= self.epsilon_min <= 1, "oort.epsilon_min", f"must be in [0, 1], got {self.epsilon_min}")
        _require(
            0 <= self.pacer_start_percentile <= 100,
            "oort.pacer_start_percentile",
            f"must be in [0, 100], got {self.pacer_start_percentile}",
        )
        _require(0 <= self.pacer_step <= 100, "oort.pacer_step", f"must be in [0, 100], got {self.pacer_step}")
        _require(
            isinstance(self.pacer_window, int) and self.pacer_window >= 1,
            "oort.pacer_window",
            f"must be an int >= 1, got {self.pacer_window!r}",
        )
        _require(self.staleness_weight >= 0, "oort.staleness_weight", f"must be >= 0, got {self.staleness_weight}")
        _require(
            0 < self.utility_clip_percentile <= 100,
            "oort.utility_clip_percentile",
            f"must be in (0, 100], got {self.utility_clip_percentile}",
        )
        _require(
            0 < self.cutoff_fraction <= 1, "oort.cutoff_fraction", f"must be in (0, 1], got {self.cutoff_fraction}"
        )

    # -- protocol

    def init(self, num_clients: int) -> OortState:
        _check_num_clients(num_clients)
        return OortState(
            utility=_frozen(np.zeros(num_clients)),
            last_round=_frozen(np.zeros(num_clients, dtype=np.int64)),
            duration=_frozen(np.full(num_clients, np.nan)),
            epsilon=float(self.epsilon),
            pacer_percentile=float(self.pacer_start_percentile),
        )

    def observe(self, state: OortState, feedback: Sequence[ClientFeedback]) -> OortState:
        """Record each client's round, measured duration and utility; later feedback for a client wins."""
        utility, last_round, duration = state.utility.copy(), state.last_round.copy(), state.duration.copy()
        pending = state.pending_util
        for fb in feedback:
            _check_feedback(fb, state.num_clients)
            last_round[fb.client_id] = fb.round
            if fb.duration_s is not None:
                duration[fb.client_id] = fb.duration_s
            if fb.loss_sq_mean is None:
                continue
            u = fb.num_examples * math.sqrt(fb.loss_sq_mean)
            utility[fb.client_id] = u
            if fb.client_id in state.last_exploit:
                pending += u
        return replace(
            state,
            utility=_frozen(utility),
            last_round=_frozen(last_round),
            duration=_frozen(duration),
            pending_util=pending,
        )

    def select(self, round: int, candidates: Sequence[int], k: int, state: OortState) -> tuple[list[int], OortState]:
        cands = _check_call(round, candidates, k, state.num_clients)
        history = state.util_history + ((state.pending_util,) if state.selections else ())
        percentile = self._paced_percentile(history, state.pacer_percentile)
        t_pref = _preferred_duration(state, percentile)
        explored = [c for c in cands if state.last_round[c] > 0]
        unexplored = [c for c in cands if state.last_round[c] == 0]
        util = self._utilities(round, explored, state, t_pref)
        if len(cands) <= k:
            exploit, explore = explored, unexplored
        else:
            exploit, explore = self._split(round, k, state.epsilon, explored, unexplored, util)
        new_state = replace(
            state,
            epsilon=max(state.epsilon * self.epsilon_decay, self.epsilon_min),
            pacer_percentile=percentile,
            util_history=history,
            pending_util=0.0,
            last_exploit=frozenset(exploit),
            preferred_duration=t_pref,
            selections=state.selections + 1,
        )
        return exploit + explore, new_state

    # -- introspection (pure)

    def preferred_duration(self, state: OortState) -> float:
        """T at the state's current pacer percentile (the pacer may move it at the next select)."""
        return _preferred_duration(state, state.pacer_percentile)

    def utilities(self, round: int, candidates: Sequence[int], state: OortState) -> dict[int, float]:
        """Oort's utility of each explored candidate in ``round``, at the state's current ``T``."""
        cands = _check_call(round, candidates, 0, state.num_clients)
        explored = [c for c in cands if state.last_round[c] > 0]
        return self._utilities(round, explored, state, self.preferred_duration(state))

    # -- pieces

    def _paced_percentile(self, history: tuple[float, ...], percentile: float) -> float:
        w = self.pacer_window
        if len(history) >= 2 * w and len(history) % w == 0 and sum(history[-w:]) < sum(history[-2 * w : -w]):
            return min(100.0, percentile + self.pacer_step)
        return percentile

    def _utilities(self, round: int, explored: list[int], state: OortState, t_pref: float) -> dict[int, float]:
        if not explored:
            return {}
        raw = state.utility[explored]
        clip = _order_stat(raw, self.utility_clip_percentile)
        out = {}
        for c, u in zip(explored, raw):
            score = min(float(u), clip) + math.sqrt(self.staleness_weight * math.log(round) / state.last_round[c])
            t = float(state.duration[c])
            if t > t_pref:
                score *= (t_pref / t) ** self.alpha
            out[c] = score
        return out

    def _split(
        self, round: int, k: int, eps: float, explored: list[int], unexplored: list[int], util: dict[int, float]
    ) -> tuple[list[int], list[int]]:
        n_exploit = min(int(math.floor((1.0 - eps) * k + 1e-9)), len(explored))
        n_exploit = max(n_exploit, k - len(unexplored))  # explored fill in when too few are untried
        ranked = sorted(explored, key=lambda c: -util[c])  # stable: ties keep candidate order
        exploit = self._sample_exploit(round, ranked, util, n_exploit)
        n_explore = k - len(exploit)
        picks = keyed_rng(self.seed, round, _EXPLORE_STREAM).choice(len(unexplored), n_explore, replace=False)
        return exploit, [unexplored[i] for i in picks]

    def _sample_exploit(self, round: int, ranked: list[int], util: dict[int, float], n: int) -> list[int]:
        if n <= 0:
            return []
        cutoff = self.cutoff_fraction * util[ranked[n - 1]]
        pool = [c for c in ranked if util[c] >= cutoff]
        weights = np.array([util[c] for c in pool])
        if np.count_nonzero(weights > 0) < n:
            return ranked[:n]
        rng = keyed_rng(self.seed, round, _EXPLOIT_STREAM)
        idx = rng.choice(len(pool), n, replace=False, p=weights / weights.sum())
        return [pool[i] for i in idx]


def _preferred_duration(state: OortState, percentile: float) -> float:
    seen = state.duration[~np.isnan(state.duration)]
    if percentile >= 100.0 or len(seen) == 0:
        return math.inf
    return _order_stat(seen, percentile)


# ---------------------------------------------------------------- power-of-choice


@dataclass(frozen=True)
class PowerOfChoiceState:
    """Last reported size and loss per client id; read-only arrays."""

    num_examples: np.ndarray  # -1 = never reported
    loss_sq_mean: np.ndarray  # nan = never reported

    @property
    def num_clients(self) -> int:
        return len(self.num_examples)


@dataclass(frozen=True)
class PowerOfChoiceSelector:
    """Power-of-choice (Cho, Wang, Joshi, AISTATS 2022), ``rpow-d`` flavour; see the module docstring."""

    d: int = 10  # candidate-set size; max(d, k) is used
    seed: int = 0

    def __post_init__(self) -> None:
        _require(isinstance(self.d, int) and self.d >= 1, "power_of_choice.d", f"must be an int >= 1, got {self.d!r}")

    def init(self, num_clients: int) -> PowerOfChoiceState:
        _check_num_clients(num_clients)
        return PowerOfChoiceState(
            num_examples=_frozen(np.full(num_clients, -1, dtype=np.int64)),
            loss_sq_mean=_frozen(np.full(num_clients, np.nan)),
        )

    def observe(self, state: PowerOfChoiceState, feedback: Sequence[ClientFeedback]) -> PowerOfChoiceState:
        sizes, losses = state.num_examples.copy(), state.loss_sq_mean.copy()
        for fb in feedback:
            _check_feedback(fb, state.num_clients)
            if fb.loss_sq_mean is not None:
                sizes[fb.client_id] = fb.num_examples
                losses[fb.client_id] = fb.loss_sq_mean
        return PowerOfChoiceState(num_examples=_frozen(sizes), loss_sq_mean=_frozen(losses))

    def sample_candidates(self, round: int, candidates: Sequence[int], k: int, state: PowerOfChoiceState) -> list[int]:
        """The ``max(d, k)`` clients drawn in ``round``, in draw order (the first half of ``select``)."""
        cands = _check_call(round, candidates, k, state.num_clients)
        n = min(max(self.d, k), len(cands))
        weights = _size_weights(state.num_examples[cands])
        rng = keyed_rng(self.seed, round, _CANDIDATE_STREAM)
        positive = np.flatnonzero(weights > 0)
        if len(positive) >= n:
            idx = list(rng.choice(len(cands), n, replace=False, p=weights / weights.sum()))
        else:  # too few with data: all of them, then uniformly among the empty ones
            zero = np.flatnonzero(weights == 0)
            idx = list(positive) + list(rng.choice(zero, n - len(positive), replace=False))
        return [cands[i] for i in idx]

    def select(
        self, round: int, candidates: Sequence[int], k: int, state: PowerOfChoiceState
    ) -> tuple[list[int], PowerOfChoiceState]:
        drawn = self.sample_candidates(round, candidates, k, state)
        loss = {c: math.inf if np.isnan(state.loss_sq_mean[c]) else float(state.loss_sq_mean[c]) for c in drawn}
        return sorted(drawn, key=lambda c: -loss[c])[:k], state


def _size_weights(sizes: np.ndarray) -> np.ndarray:
    """Sampling weight per candidate: its reported size; unknown sizes get the mean known size (1 if none)."""
    known = sizes >= 0
    fill = float(sizes[known].mean()) if known.any() else 1.0
    weights = np.where(known, sizes, fill).astype(float)
    if not (weights > 0).any():
        weights = np.ones_like(weights)
    return weights
