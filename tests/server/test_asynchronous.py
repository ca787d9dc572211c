"""FedBuff and FedAsync round logic, by hand (Nguyen et al. 2022; Xie et al. 2019)."""

import math

import numpy as np
import pytest

from fedloom.config import load_config
from fedloom.errors import ConfigError
from fedloom.messages import ErrorReply, TrainConfig, TrainReply, Update
from fedloom.server import Strategy, sgd
from fedloom.server.asynchronous import AsyncServer, polynomial_staleness
from fedloom.simulation.runner import simulate

X = [np.array([1.0, 2.0], np.float32)]


def reply(cid, delta, loss=1.0, examples=10, weight=5.0):
    return TrainReply(cid, 1, update=Update([np.array(delta, np.float32)], weight,
                                            metrics={"loss": loss, "examples": examples}))


def test_fedbuff_averages_staleness_scaled_deltas_every_k_arrivals():
    server = AsyncServer(Strategy(2, TrainConfig(), optimizer=sgd(1.0)), buffer_size=2)
    state = server.init(X)
    req = server.request(state, 0, dispatch=1)
    assert req.config.round == 1 and req.params is state.params
    a1, state = server.receive(state, req, 0, reply(0, [1.0, 1.0], loss=2.0, examples=10, weight=1.0))
    assert a1.accepted and not a1.aggregated and state.version == 0
    # the second reply claims it was sent 3 versions before the current one: staleness 3
    req1 = server.request(state, 1, dispatch=1)
    a2, state = server.receive(state, req1, -3, reply(1, [4.0, 0.0], loss=1.0, examples=30, weight=3.0))
    assert a2.aggregated and a2.staleness == 3 and state.version == 1
    # [1, 1] * 1 (weight 1) and [4, 0] * (1 + 3) ** -0.5 = [2, 0] (weight 3), example-weighted as in FedAvg:
    # ([1, 1] + 3 * [2, 0]) / 4 = [1.75, 0.25]
    np.testing.assert_allclose(state.params[0], [2.75, 2.25], rtol=1e-6)
    assert a2.train_loss == pytest.approx((2.0 * 10 + 1.0 * 30) / 40)
    assert state.buffer == ()


def test_fedasync_mixes_each_arrival_at_alpha_times_staleness():
    alpha = 0.5
    server = AsyncServer(Strategy(1, TrainConfig(), optimizer=sgd(alpha)), buffer_size=1,
                         staleness=polynomial_staleness(1.0))
    state = server.init(X)
    req = server.request(state, 0, 1)
    _, state = server.receive(state, req, -1, reply(0, [2.0, 2.0]))  # staleness 1: s = 1/2
    np.testing.assert_allclose(state.params[0], [1.0 + alpha * 0.5 * 2.0, 2.0 + alpha * 0.5 * 2.0])


def test_bad_and_failed_replies_are_refused_without_touching_the_buffer():
    server = AsyncServer(Strategy(2), buffer_size=2)
    state = server.init(X)
    req = server.request(state, 0, 1)
    a, same = server.receive(state, req, 0, reply(0, [math.nan, 0.0]))
    assert not a.accepted and "NaN" in a.reason and same is state
    a, same = server.receive(state, req, 0, TrainReply(0, 1, error=ErrorReply("dropped", "left")))
    assert not a.accepted and a.reason == "dropped: left" and same is state
    a, same = server.receive(state, req, 0, reply(1, [1.0, 0.0]))  # client 1 answering client 0's task
    assert not a.accepted and a.reason.startswith("invalid_reply:") and same is state
    with pytest.raises(ConfigError):
        AsyncServer(Strategy(2), buffer_size=0)


def test_fedbuff_simulation_runs_on_simulated_time_and_is_reproducible():
    overrides = ["data.dataset=\"synthetic\"", "data.num_clients=60", "model.name=\"logreg\"", "client.lr=0.05",
                 "run.rounds=8", "server.clients_per_round=10", "server.aggregation=\"fedbuff\"",
                 "server.buffer_size=4", "eval.every=4", "hetero.population=\"mobile\""]
    a = simulate(load_config(None, overrides), progress=False, write=False)
    b = simulate(load_config(None, [*overrides, "engine.executor=\"sequential\""]), progress=False, write=False)
    assert [r["sim_time_s"] for r in a.history] == [r["sim_time_s"] for r in b.history]
    for x, y in zip(a.params, b.params):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    times = [r["sim_time_s"] for r in a.history]
    assert times == sorted(times) and [r["round"] for r in a.history] == list(range(1, 9))
    assert all(r["accepted"] == 4 for r in a.history)  # every update closes a buffer of 4
    assert a.history[-1]["trips"] >= 8 * 4
    assert not math.isnan(a.history[3]["test_accuracy"]) and not math.isnan(a.history[7]["test_accuracy"])


def test_a_simulation_of_asynchronous_aggregation_needs_a_population(tmp_path):
    cfg = load_config(None, ["server.aggregation=\"fedbuff\"", f"run.out_dir=\"{tmp_path}\""])  # a deployment's
    with pytest.raises(ConfigError, match="hetero.population"):
        simulate(cfg, progress=False)
    assert not any(tmp_path.iterdir())
