"""Reducers: the one many-to-one step of an aggregation.

A reducer takes the clients' update values and weights and returns one aggregate of the same
shapes; it never mutates its arguments. The weighted mean is FedAvg's; the others are robust to
a minority of arbitrary (Byzantine) updates, each at a price in accuracy on honest data that is
not identically distributed:

* :func:`coordinate_median` and :func:`trimmed_mean`: per coordinate (Yin et al. 2018,
  "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates");
* :func:`krum`: the update closest to its ``n - f - 2`` nearest neighbours, or the mean of the
  ``m`` best (Multi-Krum; Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine
  Tolerant Gradient Descent").

The robust reducers ignore the weights: a weight is a client's claim, which is what an
attacker controls. They raise :class:`RoundError` when a round has too few updates for them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fedloom.errors import RoundError
from fedloom.params import Params, ParamSpec, unflatten

Reducer = Callable[[Sequence[Params], Sequence[float]], Params]


def _check(values: Sequence[Params], weights: Sequence[float], name: str) -> None:
    if len(values) == 0:
        raise RoundError(f"{name} of no updates")
    if len(values) != len(weights):
        raise RoundError(f"{len(values)} updates but {len(weights)} weights")


def _stack(values: Sequence[Params]) -> np.ndarray:
    """The updates as rows of one float32 matrix (clients x values)."""
    out = np.empty((len(values), sum(a.size for a in values[0])), dtype=np.float32)
    for row, v in zip(out, values):
        row[:] = np.concatenate([a.ravel() for a in v])
    return out


def _unstack(vector: np.ndarray, like: Params) -> Params:
    return unflatten(vector, ParamSpec.of(like))


def weighted_mean(values: Sequence[Params], weights: Sequence[float]) -> Params:
    """FedAvg's weighted mean ``sum_k (w_k / sum_j w_j) * v_k`` (McMahan et al. 2017).

    Each array is accumulated in its own dtype (float32 for models), clients in the order given.
    """
    _check(values, weights, "weighted_mean")
    total = float(sum(weights))
    if not total > 0:
        raise RoundError(f"weights must sum to a positive number, got {total}")
    out = [np.zeros_like(a) for a in values[0]]
    for v, w in zip(values, weights):
        for acc, a in zip(out, v):
            acc += np.asarray(w / total, dtype=acc.dtype) * a
    return out


def coordinate_median(values: Sequence[Params], weights: Sequence[float]) -> Params:
    """The median of each coordinate over the updates (the mean of the middle two for an even count)."""
    _check(values, weights, "coordinate_median")
    return _unstack(np.median(_stack(values), axis=0), values[0])


@dataclass(frozen=True)
class TrimmedMean:
    """Per coordinate, drop the ``beta`` fraction of largest and of smallest values, average the rest.

    ``floor(beta * n)`` values go from each end; at least one value must remain.
    """

    beta: float = 0.1

    def __call__(self, values: Sequence[Params], weights: Sequence[float]) -> Params:
        _check(values, weights, "trimmed_mean")
        n = len(values)
        cut = int(np.floor(self.beta * n))
        if n - 2 * cut < 1:
            raise RoundError(f"trimmed_mean with beta={self.beta} drops all of {n} updates")
        x = np.sort(_stack(values), axis=0)
        return _unstack(x[cut:n - cut].mean(axis=0, dtype=np.float64), values[0])


def trimmed_mean(beta: float = 0.1) -> TrimmedMean:
    return TrimmedMean(beta)


@dataclass(frozen=True)
class Krum:
    """Krum (``m = 1``) or Multi-Krum (the mean of the ``m`` best; ``m = 0``: ``n - f``) against ``f`` attackers.

    Each update is scored by the sum of its squared distances to its ``n - f - 2`` nearest other
    updates; the lowest scores win. Needs ``n > 2f + 2`` updates (Blanchard et al. 2017).
    """

    f: int = 1
    m: int = 1

    def __call__(self, values: Sequence[Params], weights: Sequence[float]) -> Params:
        _check(values, weights, "krum")
        n = len(values)
        if n <= 2 * self.f + 2:
            raise RoundError(f"krum against f={self.f} needs more than {2 * self.f + 2} updates, got {n}")
        return _unstack(_stack(values)[self.select(values)].mean(axis=0, dtype=np.float64), values[0])

    def select(self, values: Sequence[Params]) -> list[int]:
        """The indices of the ``m`` updates with the lowest Krum scores, best first.

        The pairwise distances are computed with torch, whose thread pool the training shares:
        numpy's BLAS would leave its own threads spinning on the cores the next round trains on.
        """
        import torch

        x = torch.from_numpy(_stack(values)).double()
        sq = (x * x).sum(dim=1)
        dist = torch.clamp(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), min=0.0).numpy()
        np.fill_diagonal(dist, np.inf)
        closest = len(values) - self.f - 2
        scores = np.sort(dist, axis=1)[:, :closest].sum(axis=1)
        m = self.m or len(values) - self.f
        return [int(i) for i in np.argsort(scores, kind="stable")[: min(m, len(values))]]


def krum(f: int = 1, m: int = 1) -> Krum:
    return Krum(f, m)
