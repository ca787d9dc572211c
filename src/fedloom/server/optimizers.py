"""Server optimizers: what the server does with the aggregated client delta.

Following Reddi et al. 2021 ("Adaptive Federated Optimization", Algorithm 2), the mean client
delta ``d = mean_k(x_k - x)`` is treated as a pseudo-gradient step. Each optimizer is a pair of
pure functions, ``init(params) -> state`` and ``update(delta, params, state) -> (params, state)``:

- ``sgd``: ``x <- x + lr * d``; with ``lr = 1`` this is FedAvg (McMahan et al. 2017).
- ``momentum``: FedAvgM (Hsu et al. 2019), ``v <- beta * v + d; x <- x + lr * v``.
- ``adagrad`` / ``adam`` / ``yogi``: FedAdagrad, FedAdam, FedYogi with
  ``m <- b1 * m + (1 - b1) * d`` and ``x <- x + lr * m / (sqrt(v) + tau)``, where
  ``v <- v + d^2`` (Adagrad), ``v <- b2 * v + (1 - b2) * d^2`` (Adam),
  ``v <- v - (1 - b2) * d^2 * sign(v - d^2)`` (Yogi).

As in the paper there is no bias correction, and ``v`` starts at ``tau^2`` (the paper asks for
``v_{-1} >= tau^2``). Arithmetic is done in each array's dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedloom.params import Params

OptState = dict[str, Params]


@dataclass(frozen=True)
class ServerOptimizer:
    """A named ``(init, update)`` pair."""

    name: str
    init: Callable[[Params], OptState]
    update: Callable[[Params, Params, OptState], tuple[Params, OptState]]


def _zeros(params: Params) -> Params:
    return [np.zeros_like(p) for p in params]


def _c(value: float, like: np.ndarray) -> np.ndarray:
    return np.asarray(value, dtype=like.dtype)


def sgd(lr: float = 1.0) -> ServerOptimizer:
    """``x <- x + lr * delta``. FedAvg is ``sgd(1.0)``."""

    def update(delta: Params, params: Params, state: OptState) -> tuple[Params, OptState]:
        return [p + _c(lr, p) * d for p, d in zip(params, delta)], state

    return ServerOptimizer("sgd", lambda params: {}, update)


def momentum(lr: float = 1.0, beta: float = 0.9) -> ServerOptimizer:
    """FedAvgM (Hsu et al. 2019): server momentum ``v <- beta * v + delta; x <- x + lr * v``."""

    def update(delta: Params, params: Params, state: OptState) -> tuple[Params, OptState]:
        v = [_c(beta, m) * m + d for m, d in zip(state["v"], delta)]
        return [p + _c(lr, p) * m for p, m in zip(params, v)], {"v": v}

    return ServerOptimizer("momentum", lambda params: {"v": _zeros(params)}, update)


def _adaptive(name: str, second_moment: Callable[[np.ndarray, np.ndarray], np.ndarray], lr: float, beta1: float,
              tau: float) -> ServerOptimizer:
    def init(params: Params) -> OptState:
        return {"m": _zeros(params), "v": [np.full_like(p, tau * tau) for p in params]}

    def update(delta: Params, params: Params, state: OptState) -> tuple[Params, OptState]:
        m = [_c(beta1, mi) * mi + _c(1 - beta1, d) * d for mi, d in zip(state["m"], delta)]
        v = [second_moment(vi, d) for vi, d in zip(state["v"], delta)]
        new = [p + _c(lr, p) * mi / (np.sqrt(vi) + _c(tau, p)) for p, mi, vi in zip(params, m, v)]
        return new, {"m": m, "v": v}

    return ServerOptimizer(name, init, update)


def adagrad(lr: float = 0.1, beta1: float = 0.9, tau: float = 1e-3) -> ServerOptimizer:
    """FedAdagrad (Reddi et al. 2021): ``v <- v + delta^2``."""
    return _adaptive("adagrad", lambda v, d: v + d * d, lr, beta1, tau)


def adam(lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> ServerOptimizer:
    """FedAdam (Reddi et al. 2021): ``v <- beta2 * v + (1 - beta2) * delta^2``, no bias correction."""
    return _adaptive("adam", lambda v, d: _c(beta2, v) * v + _c(1 - beta2, d) * d * d, lr, beta1, tau)


def yogi(lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> ServerOptimizer:
    """FedYogi (Reddi et al. 2021): ``v <- v - (1 - beta2) * delta^2 * sign(v - delta^2)``."""
    return _adaptive("yogi", lambda v, d: v - _c(1 - beta2, d) * d * d * np.sign(v - d * d), lr, beta1, tau)


OPTIMIZERS = ("sgd", "momentum", "adagrad", "adam", "yogi")
