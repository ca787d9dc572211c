"""Reducers: the one many-to-one step of an aggregation.

A reducer takes the clients' update values and weights and returns one aggregate of the same
shapes. It never mutates its arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from fedloom.errors import RoundError
from fedloom.params import Params

Reducer = Callable[[Sequence[Params], Sequence[float]], Params]


def weighted_mean(values: Sequence[Params], weights: Sequence[float]) -> Params:
    """FedAvg's weighted mean ``sum_k (w_k / sum_j w_j) * v_k`` (McMahan et al. 2017).

    Each array is accumulated in its own dtype (float32 for models), clients in the order given.
    """
    if len(values) == 0:
        raise RoundError("weighted_mean of no updates")
    if len(values) != len(weights):
        raise RoundError(f"{len(values)} updates but {len(weights)} weights")
    total = float(sum(weights))
    if not total > 0:
        raise RoundError(f"weights must sum to a positive number, got {total}")
    out = [np.zeros_like(a) for a in values[0]]
    for v, w in zip(values, weights):
        for acc, a in zip(out, v):
            acc += np.asarray(w / total, dtype=acc.dtype) * a
    return out
