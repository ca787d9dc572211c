"""Shared by the engine tests: the simulation loop of ``runner.simulate`` over any engine."""

import pytest

from fedloom.build import build_clients, build_strategy
from fedloom.server import SyncServer


def _drive(cfg, transport, rounds):
    """Train and federated-evaluate ``rounds`` rounds; returns the final params and each round's evaluation."""
    work, data = build_clients(cfg)
    server = SyncServer(build_strategy(cfg, len(data)), len(data))
    state = server.init(work.initial_params(cfg.run.seed))
    evaluations = []
    for _ in range(rounds):
        requests, state = server.train_requests(state)
        result, state = server.apply(state, requests, transport.exchange(requests))
        assert not result.rejected, result.rejected
        asked = server.evaluate_requests(state, cfg.run.seed)
        evaluations.append(server.summarize(asked, transport.exchange(asked)))
    return state.params, evaluations


@pytest.fixture(scope="session")
def drive():
    return _drive
