"""Keyed random streams: ``RandomState([seed, round, client, ...])`` without the construction cost."""

from __future__ import annotations

import threading

import numpy as np

_local = threading.local()


def keyed_rng(*key: int) -> np.random.RandomState:
    """The stream of ``np.random.RandomState(list(key))``, from a per-thread generator reseeded in place.

    Constructing a ``RandomState`` first draws OS entropy for a generator that the key then
    reseeds (about 80 us); reseeding an existing one costs about 7 us and gives the same numbers.
    Use the result at once: the next call in this thread reseeds the same object.
    """
    rng = getattr(_local, "rng", None)
    if rng is None:
        rng = _local.rng = np.random.RandomState()
    rng.seed(list(key))
    return rng
