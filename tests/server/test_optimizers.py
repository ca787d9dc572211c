"""Hand-computed steps of every server optimizer (Reddi et al. 2021, Algorithm 2)."""

import math

import numpy as np
import pytest

from fedloom.server import adagrad, adam, momentum, sgd, yogi

X = [np.array([1.0, -2.0], np.float32)]
D1 = [np.array([0.5, 0.1], np.float32)]
D2 = [np.array([-0.2, 0.1], np.float32)]


def steps(opt, deltas):
    params, state = X, opt.init(X)
    out = []
    for d in deltas:
        params, state = opt.update(d, params, state)
        out.append((params[0].astype(float), {k: v[0].astype(float) for k, v in state.items()}))
    return out


def test_fedavg_is_sgd_lr_one():
    (p, _), = steps(sgd(1.0), [D1])
    np.testing.assert_allclose(p, [1.5, -1.9], rtol=1e-6)


def test_sgd_server_lr():
    (p, _), = steps(sgd(0.5), [D1])
    np.testing.assert_allclose(p, [1.25, -1.95], rtol=1e-6)


def test_momentum_two_steps():
    (p1, s1), (p2, s2) = steps(momentum(lr=1.0, beta=0.9), [D1, D2])
    np.testing.assert_allclose(s1["v"], [0.5, 0.1], rtol=1e-6)
    np.testing.assert_allclose(p1, [1.5, -1.9], rtol=1e-6)
    # v2 = 0.9 * v1 + d2 = [0.25, 0.19]; x2 = x1 + v2
    np.testing.assert_allclose(s2["v"], [0.25, 0.19], rtol=1e-5)
    np.testing.assert_allclose(p2, [1.75, -1.71], rtol=1e-5)


def _hand_adaptive(kind, lr, b1, b2, tau, deltas):
    x = np.array([1.0, -2.0])
    m = np.zeros(2)
    v = np.full(2, tau * tau)
    for d in deltas:
        d = np.asarray(d[0], float)
        m = b1 * m + (1 - b1) * d
        if kind == "adagrad":
            v = v + d * d
        elif kind == "adam":
            v = b2 * v + (1 - b2) * d * d
        else:
            v = v - (1 - b2) * d * d * np.sign(v - d * d)
        x = x + lr * m / (np.sqrt(v) + tau)
    return x, m, v


def test_fedadam_first_step_by_hand():
    # m = 0.1 * d; v = 0.99 * tau^2 + 0.01 * d^2; with tau = 0.1, d = 0.5:
    # m = 0.05, v = 0.0099 + 0.0025 = 0.0124, x = 1 + 0.1 * 0.05 / (sqrt(0.0124) + 0.1)
    (p, s), = steps(adam(lr=0.1, beta1=0.9, beta2=0.99, tau=0.1), [D1])
    assert s["m"][0] == pytest.approx(0.05, rel=1e-6)
    assert s["v"][0] == pytest.approx(0.0124, rel=1e-5)
    assert p[0] == pytest.approx(1 + 0.1 * 0.05 / (math.sqrt(0.0124) + 0.1), rel=1e-6)


def test_fedyogi_first_step_by_hand():
    # v0 = tau^2 = 0.01 < d^2 = 0.25, so sign(v - d^2) = -1 and v = 0.01 + 0.01 * 0.25 = 0.0125
    (p, s), = steps(yogi(lr=0.1, beta1=0.9, beta2=0.99, tau=0.1), [D1])
    assert s["v"][0] == pytest.approx(0.0125, rel=1e-5)
    assert p[0] == pytest.approx(1 + 0.1 * 0.05 / (math.sqrt(0.0125) + 0.1), rel=1e-6)


def test_fedadagrad_first_step_by_hand():
    # v = tau^2 + d^2 = 0.01 + 0.25 = 0.26
    (p, s), = steps(adagrad(lr=0.1, beta1=0.9, tau=0.1), [D1])
    assert s["v"][0] == pytest.approx(0.26, rel=1e-6)
    assert p[0] == pytest.approx(1 + 0.1 * 0.05 / (math.sqrt(0.26) + 0.1), rel=1e-6)


@pytest.mark.parametrize("kind,make", [("adagrad", lambda: adagrad(0.3, 0.8, 0.05)),
                                       ("adam", lambda: adam(0.3, 0.8, 0.9, 0.05)),
                                       ("yogi", lambda: yogi(0.3, 0.8, 0.9, 0.05))])
def test_adaptive_two_steps_match_formula(kind, make):
    (_, _), (p, s) = steps(make(), [D1, D2])
    x, m, v = _hand_adaptive(kind, 0.3, 0.8, 0.9, 0.05, [D1, D2])
    np.testing.assert_allclose(s["m"], m, rtol=1e-5)
    np.testing.assert_allclose(s["v"], v, rtol=1e-5)
    np.testing.assert_allclose(p, x, rtol=1e-5)


def test_update_never_mutates_arguments():
    opt = adam()
    state = opt.init(X)
    before = [a.copy() for a in state["v"]]
    opt.update(D1, X, state)
    np.testing.assert_array_equal(state["v"][0], before[0])
    np.testing.assert_array_equal(X[0], [1.0, -2.0])
