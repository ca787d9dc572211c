"""Client selection: which clients the server asks in a round."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from fedloom.seeding import keyed_rng


class ClientSelector(Protocol):
    """Chooses ``k`` of the ``candidates`` for round ``round`` (1-based)."""

    def select(self, round: int, candidates: Sequence[int], k: int) -> list[int]: ...


@dataclass(frozen=True)
class UniformSelector:
    """Uniform sampling without replacement, seeded per round.

    Round ``r`` draws ``np.random.RandomState([seed, r]).choice(len(candidates), k,
    replace=False)`` as positions into ``candidates``, so the same seed and round always pick
    the same clients, whatever happened in earlier rounds.
    """

    seed: int = 0

    def select(self, round: int, candidates: Sequence[int], k: int) -> list[int]:
        k = min(k, len(candidates))
        picks = keyed_rng(self.seed, round).choice(len(candidates), k, replace=False)
        return [int(candidates[i]) for i in picks]
