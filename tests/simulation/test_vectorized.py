"""The vectorized engine gives what sequential training gives, for every model it supports."""

import logging
from dataclasses import replace

import numpy as np
import pytest
from torch import nn

from benchmarks.workloads import WORKLOADS
from fedloom.build import build_clients, build_strategy
from fedloom.client import TorchClientWork
from fedloom.config import load_config
from fedloom.data.dataset import ClientDataset, FederatedDataset
from fedloom.messages import TrainConfig, TrainRequest
from fedloom.server import SyncServer
from fedloom.simulation.vectorized import VectorizedTransport, stacked_forward
from fedloom.transport import InProcessTransport


def run_rounds(cfg, transport_cls, rounds, **kw):
    work, data = build_clients(cfg)
    server = SyncServer(build_strategy(cfg, len(data)), len(data))
    transport = transport_cls(work, data, **kw)
    state = server.init(work.initial_params(cfg.run.seed))
    results = []
    for _ in range(rounds):
        requests, state = server.train_requests(state)
        result, state = server.apply(state, requests, transport.exchange(requests))
        results.append(result)
    return state.params, results


def assert_same(cfg, rounds, **kw):
    seq, seq_results = run_rounds(cfg, InProcessTransport, rounds)
    vec, vec_results = run_rounds(cfg, VectorizedTransport, rounds, **kw)
    for a, b in zip(seq, vec):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)
    for a, b in zip(seq_results, vec_results):
        assert a.accepted == b.accepted and a.examples == b.examples
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-4)


@pytest.mark.parametrize("name,rounds", [("wa", 4), ("wb", 3)])
def test_reference_workloads(name, rounds):
    cfg = WORKLOADS[name].config
    if name == "wb":
        cfg = replace(cfg, server=replace(cfg.server, clients_per_round=6))
    assert_same(cfg, rounds)


@pytest.mark.parametrize("model", [["model.name=\"logreg\""], ["model.name=\"mlp\"", "model.hidden=[16, 8]"],
                                   ["model.name=\"cnn\"", "model.channels=4"]])
def test_models_epochs_step_cap_and_fedprox(model):
    cfg = load_config(None, ["data.dataset=\"digits\"", "data.partition=\"dirichlet\"", "data.num_clients=12",
                             "data.alpha=0.5", "server.clients_per_round=6", "client.lr=0.1", "client.batch_size=8",
                             "client.local_epochs=3", "client.max_steps=25", "client.mu=0.3", *model])
    assert_same(cfg, 2)
    assert_same(cfg, 2, group_size=4)


def test_two_layer_lstm():
    cfg = load_config(None, ["data.num_clients=12", "model.num_layers=2", "model.hidden_size=16",
                             "server.clients_per_round=4", "client.max_steps=3", "client.local_epochs=2"])
    assert_same(cfg, 2)


class WithNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Linear(16, 10))

    def forward(self, x):
        return self.net(x)


def test_models_it_cannot_vectorize_fall_back_with_a_notice(caplog):
    assert stacked_forward(WithNorm())[0] is None
    cfg = load_config(None, ["data.dataset=\"digits\"", "data.partition=\"iid\"", "data.num_clients=6",
                             "model.name=\"logreg\"", "server.clients_per_round=3"])
    _, data = build_clients(cfg)
    work = TorchClientWork(WithNorm)
    with caplog.at_level(logging.WARNING, logger="fedloom"):
        transport = VectorizedTransport(work, data)
    assert len(caplog.records) == 1 and "cannot vectorize" in caplog.text and "buffers" in caplog.text
    params = work.initial_params(0)
    reqs = [TrainRequest(c, 1, params, TrainConfig(lr=0.1)) for c in range(3)]
    got = transport.exchange(reqs)
    want = InProcessTransport(work, data).exchange(reqs)
    for g, w in zip(got, want):
        for a, b in zip(g.update.values, w.update.values):
            np.testing.assert_array_equal(a, b)


def test_a_user_model_can_opt_in():
    class Tiny(nn.Module):
        fedloom_vectorize = True

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x) * 2.0

    rng = np.random.RandomState(0)
    clients = [ClientDataset(i, rng.normal(size=(n, 4)).astype(np.float32), rng.randint(0, 3, n),
                             np.zeros((1, 4), np.float32), np.zeros(1, np.int64)) for i, n in enumerate([7, 13])]
    data = FederatedDataset("tiny", clients, 3)
    work = TorchClientWork(Tiny)
    params = work.initial_params(0)
    reqs = [TrainRequest(c, 1, params, TrainConfig(lr=0.2, batch_size=4, local_epochs=2)) for c in range(2)]
    vec = VectorizedTransport(work, data)
    assert vec.forward is not None
    for g, w in zip(vec.exchange(reqs), InProcessTransport(work, data).exchange(reqs)):
        for a, b in zip(g.update.values, w.update.values):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert g.update.metrics["steps"] == w.update.metrics["steps"]


def test_clients_without_data_get_error_replies_and_the_rest_train():
    rng = np.random.RandomState(0)
    empty = ClientDataset(1, np.zeros((0, 4), np.float32), np.zeros(0, np.int64),
                          np.zeros((1, 4), np.float32), np.zeros(1, np.int64))
    full = ClientDataset(0, rng.normal(size=(9, 4)).astype(np.float32), rng.randint(0, 3, 9),
                         np.zeros((1, 4), np.float32), np.zeros(1, np.int64))
    data = FederatedDataset("t", [full, empty], 3)
    from fedloom.models import LogisticRegression

    work = TorchClientWork(lambda: LogisticRegression(4, 3))
    params = work.initial_params(0)
    replies = VectorizedTransport(work, data).exchange(
        [TrainRequest(c, 1, params, TrainConfig()) for c in (0, 1, 5)])
    assert replies[0].update is not None
    assert replies[1].error.code == "bad_data"
    assert replies[2].error.code == "unknown_client"


@pytest.mark.parametrize("name", ["wa", "wb"])
def test_reported_metrics_match_sequential_training(name):
    cfg = WORKLOADS[name].config
    work, data = build_clients(cfg)
    params = work.initial_params(cfg.run.seed)
    train = TrainConfig(lr=cfg.client.lr, batch_size=cfg.client.batch_size, local_epochs=cfg.client.local_epochs,
                        max_steps=3)
    reqs = [TrainRequest(c, 1, params, train) for c in range(4)]
    for v, s in zip(VectorizedTransport(work, data).exchange(reqs), InProcessTransport(work, data).exchange(reqs)):
        for key in ("loss", "loss_sq", "examples", "steps"):
            assert v.update.metrics[key] == pytest.approx(s.update.metrics[key], rel=1e-4), key
