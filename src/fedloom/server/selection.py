"""Client selection: which clients the server asks in a round.

A selector is a frozen dataclass of hyperparameters with three pure methods over an explicit state
(the server keeps the state in its :class:`~fedloom.server.sync.ServerState`)::

    state = selector.init(num_clients)                            # clients are 0 .. num_clients-1
    picks, state = selector.select(round, candidates, k, state)   # round is 1-based
    state = selector.observe(state, feedback)                     # after the round's replies

Selection only learns what a real server knows (:class:`ClientFeedback`): what clients reported
and the round-trip times the server measured, never a simulated device profile.
Uniform sampling is here; Oort and power-of-choice are in :mod:`fedloom.server.adaptive`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fedloom.seeding import keyed_rng


@dataclass(frozen=True)
class ClientFeedback:
    """What the server learnt about one client's task in a round.

    ``loss_sq_mean`` is None when no update came back (a straggler, a dropout, a failure);
    ``duration_s`` is None when the transport measures no time (a simulation without a device
    population). For a task that never came back it is the time the server waited: a lower bound.
    """

    client_id: int
    round: int  # the 1-based round the task belonged to
    num_examples: int  # examples the client trained on, as reported (0 without an update)
    loss_sq_mean: float | None  # mean of squared per-sample training losses, as reported
    duration_s: float | None  # round-trip time of the task, as measured by the server


class ClientSelector(Protocol):
    """The selector protocol (see the module docstring)."""

    def init(self, num_clients: int) -> Any: ...

    def select(self, round: int, candidates: Sequence[int], k: int, state: Any) -> tuple[list[int], Any]: ...

    def observe(self, state: Any, feedback: Sequence[ClientFeedback]) -> Any: ...


@dataclass(frozen=True)
class UniformSelector:
    """Uniform sampling without replacement, seeded per round; it keeps no state (None).

    Round ``r`` draws ``np.random.RandomState([seed, r]).choice(len(candidates), k,
    replace=False)`` as positions into ``candidates``, so the same seed and round always pick
    the same clients, whatever happened in earlier rounds.
    """

    seed: int = 0

    def init(self, num_clients: int) -> None:
        return None

    def select(self, round: int, candidates: Sequence[int], k: int, state: None = None) -> tuple[list[int], None]:
        k = min(k, len(candidates))
        picks = keyed_rng(self.seed, round).choice(len(candidates), k, replace=False)
        return [int(candidates[i]) for i in picks], state

    def observe(self, state: None, feedback: Sequence[ClientFeedback]) -> None:
        return state


@dataclass(frozen=True)
class PoissonSelector:
    """Each candidate independently with probability ``k / num_clients`` (the sampling of DP-FedAvg, McMahan
    et al. 2018); the state is the size of the federation.

    Round ``r`` draws ``np.random.RandomState([seed, r, 5]).random_sample(len(candidates))``; a round
    may ask fewer or more than ``k`` clients, or none.
    """

    seed: int = 0

    def init(self, num_clients: int) -> int:
        return num_clients

    def select(self, round: int, candidates: Sequence[int], k: int, state: int) -> tuple[list[int], int]:
        draws = keyed_rng(self.seed, round, 5).random_sample(len(candidates))
        return [int(c) for c, u in zip(candidates, draws) if u < k / max(1, state)], state

    def observe(self, state: int, feedback: Sequence[ClientFeedback]) -> int:
        return state
