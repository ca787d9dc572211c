"""The process engine with real worker processes: same numbers as sequential, order kept, failures contained."""

import functools
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import pytest

from fedloom.build import build_clients
from fedloom.config import load_config
from fedloom.data.dataset import FederatedDataset
from fedloom.errors import WorkerError
from fedloom.messages import EvaluateReply, EvaluateRequest, TrainConfig, TrainReply, TrainRequest
from fedloom.simulation.engines import request_cost, split_balanced
from fedloom.simulation.pool import START_METHOD, Loaded, ProcessPoolTransport
from fedloom.transport.inprocess import InProcessTransport

ROUNDS = 4
KILL_ROUND, HANG_ROUND = 101, 102  # rounds in which the faulty client work misbehaves on purpose
KILL_CLIENT, HANG_CLIENT, BROKEN_CLIENT = 3, 5, 39


def small_config():
    return load_config(None, ["data.dataset=\"synthetic\"", "data.num_clients=40", "model.name=\"logreg\"",
                              "client.lr=0.01", "client.max_steps=10", "server.clients_per_round=10",
                              f"run.rounds={ROUNDS}", "eval.federated_clients=8"])


CFG = small_config()


@dataclass
class FaultyWork:
    """Client work that kills its own process or hangs for one client in one agreed round."""

    inner: object

    def train(self, params, data, config):
        if config.round == KILL_ROUND and data.client_id == KILL_CLIENT:
            os.kill(os.getpid(), signal.SIGKILL)
        if config.round == HANG_ROUND and data.client_id == HANG_CLIENT:
            time.sleep(60)
        return self.inner.train(params, data, config)

    def evaluate(self, params, data, config):
        return self.inner.evaluate(params, data, config)


@dataclass(frozen=True)
class BrokenDataset(FederatedDataset):
    """Looking up one client raises outside the client's work, so the worker's engine itself fails."""

    def __getitem__(self, client_id):
        if client_id == BROKEN_CLIENT:
            raise RuntimeError("engine broke")
        return super().__getitem__(client_id)


def faulty_clients(cfg):
    work, data = build_clients(cfg)
    return FaultyWork(work), BrokenDataset(data.name, data.clients, data.num_classes, data.vocab, data.info)


@pytest.fixture(scope="module")
def sequential(drive):
    work, data = build_clients(CFG)
    return drive(CFG, InProcessTransport(work, data), ROUNDS)


@pytest.fixture(scope="module")
def pool():
    with ProcessPoolTransport(functools.partial(build_clients, CFG), workers=2, vectorize=False) as p:
        yield p


@pytest.fixture(scope="module")
def faulty_pool():
    with ProcessPoolTransport(functools.partial(faulty_clients, CFG), workers=2, vectorize=False, timeout=1.5) as p:
        yield p


def assert_same_run(a, b):
    for x, y in zip(a[0], b[0], strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    for e, f in zip(a[1], b[1], strict=True):
        assert e.loss == pytest.approx(f.loss, rel=1e-5) and e.accuracy == pytest.approx(f.accuracy, abs=1e-9)


def requests_for(clients, rnd=1, evaluate=()):
    params = build_clients(CFG)[0].initial_params(0)
    return [EvaluateRequest(c, rnd, params) if c in evaluate else TrainRequest(c, rnd, params, TrainConfig(round=rnd))
            for c in clients]


def ok(reply):
    return reply.error is None


def share_of(pool, requests, client):
    """Positions of the requests sent to the same worker as ``client``'s (the pool's documented split)."""
    weights = [request_cost(r, pool.train_sizes, pool.test_sizes) for r in requests]
    parts = split_balanced(list(range(len(requests))), weights, pool.num_workers)
    return next(set(p) for p in parts if any(requests[i].client_id == client for i in p))


def failed_positions(replies):
    return {i for i, r in enumerate(replies) if not ok(r)}


def test_pool_equals_sequential(pool, sequential, drive):
    assert pool.num_workers == 2 and all(pool.workers_alive)
    work, data = build_clients(CFG)
    assert pool.train_sizes == [c.num_train for c in data.clients]
    assert_same_run(drive(CFG, pool, ROUNDS), sequential)


def test_vectorized_pool_equals_sequential(sequential, drive):
    pytest.importorskip("fedloom.simulation.vectorized")
    with ProcessPoolTransport(functools.partial(build_clients, CFG), workers=2, vectorize=True) as p:
        assert_same_run(drive(CFG, p, ROUNDS), sequential)


def test_replies_in_request_order_with_evaluations(pool):
    clients = [17, 2, 30, 2, 8, 25, 0, 11]
    requests = requests_for(clients, evaluate={2, 25, 11})
    work, data = build_clients(CFG)
    expected = InProcessTransport(work, data).exchange(requests)
    replies = pool.exchange(requests)
    assert [(type(r), r.client_id) for r in replies] == [(type(r), r.client_id) for r in expected]
    assert {type(r) for r in replies} == {TrainReply, EvaluateReply} and all(map(ok, replies))
    for got, want in zip(replies, expected):
        if isinstance(want, EvaluateReply):
            assert got.evaluation == pytest.approx(want.evaluation)
        else:
            np.testing.assert_allclose(got.update.values[0], want.update.values[0], rtol=1e-5, atol=1e-6)
    assert pool.exchange([]) == []
    unknown = pool.exchange(requests_for([1000]))
    assert unknown[0].error.code == "unknown_client"


def test_worker_killed_between_rounds_is_restarted(faulty_pool):
    before = faulty_pool.pids
    os.kill(before[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while faulty_pool.workers_alive[0] and time.monotonic() < deadline:
        time.sleep(0.05)
    replies = faulty_pool.exchange(requests_for(range(10)))
    assert all(map(ok, replies))  # the dead worker was replaced before the round was sent
    assert faulty_pool.pids[0] != before[0] and faulty_pool.pids[1] == before[1]


def test_worker_killed_mid_round_fails_only_its_share(faulty_pool):
    clients = list(range(12))
    requests = requests_for(clients, rnd=KILL_ROUND)
    before = faulty_pool.pids
    start = time.monotonic()
    replies = faulty_pool.exchange(requests)
    assert time.monotonic() - start < 10
    assert [r.client_id for r in replies] == clients
    assert failed_positions(replies) == share_of(faulty_pool, requests, KILL_CLIENT) != set(range(12))
    assert {r.error.code for r in replies if not ok(r)} == {"worker_failed"}
    assert faulty_pool.pids != before
    assert all(map(ok, faulty_pool.exchange(requests_for(clients, rnd=2))))


def test_hung_worker_times_out(faulty_pool):
    requests = requests_for(range(10), rnd=HANG_ROUND)
    start = time.monotonic()
    replies = faulty_pool.exchange(requests)
    assert 1.4 < time.monotonic() - start < 10
    assert failed_positions(replies) == share_of(faulty_pool, requests, HANG_CLIENT) != set(range(10))
    assert "timed out" in replies[HANG_CLIENT].error.reason
    assert all(map(ok, faulty_pool.exchange(requests_for(range(10), rnd=3))))


def test_engine_exception_becomes_error_replies_and_worker_lives(faulty_pool):
    before = faulty_pool.pids
    requests = requests_for([BROKEN_CLIENT, 1, 2, 4, 6, 7], evaluate={2, 7})
    replies = faulty_pool.exchange(requests)
    assert failed_positions(replies) == share_of(faulty_pool, requests, BROKEN_CLIENT) != set(range(6))
    assert [type(r) for r in replies] == [TrainReply, TrainReply, EvaluateReply, TrainReply, TrainReply, EvaluateReply]
    for r in replies:
        assert ok(r) or (r.error.code == "worker_failed" and "RuntimeError: engine broke" in r.error.reason)
    assert faulty_pool.pids == before and all(faulty_pool.workers_alive)


def test_failing_spec_raises_at_start():
    before = {c.pid for c in mp.active_children()}
    missing = functools.partial(open, "/nonexistent/fedloom-data")  # a spec that fails as a missing data file does
    with pytest.raises(WorkerError, match="FileNotFoundError"):
        ProcessPoolTransport(missing, workers=1)
    assert {c.pid for c in mp.active_children()} <= before


def test_close_stops_every_worker():
    p = ProcessPoolTransport(functools.partial(build_clients, CFG), workers=2, vectorize=False)
    pids = p.pids
    assert {c.pid for c in mp.active_children()} >= set(pids)
    p.close()
    p.close()  # idempotent
    assert not {c.pid for c in mp.active_children()} & set(pids)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(RuntimeError, match="closed"):
        p.exchange(requests_for([1]))


@pytest.mark.skipif(START_METHOD != "fork", reason="workers share the parent's clients only where they are forked")
def test_forked_workers_share_the_loaded_clients_without_pickling_or_loading_them():
    work, data = build_clients(CFG)
    unpicklable = FaultyWork(work)
    unpicklable.note = lambda: None  # a lambda: pickling this work would fail, a fork copies it
    with ProcessPoolTransport(Loaded(unpicklable, data), workers=2, vectorize=False) as p:
        replies = p.exchange(requests_for([1, 2, 3, 4]))
    with ProcessPoolTransport(functools.partial(build_clients, CFG), workers=2, vectorize=False, start="spawn") as p:
        spawned = p.exchange(requests_for([1, 2, 3, 4]))  # workers that load the clients themselves
    assert all(ok(r) for r in replies)
    for got, want in zip(replies, spawned, strict=True):
        for a, b in zip(got.update.values, want.update.values, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(START_METHOD != "fork", reason="the copies of pipe ends that could outlive a parent are fork's")
def test_forked_workers_end_when_their_parent_is_killed(tmp_path):
    script = (
        "import functools, os, signal, sys\n"
        "from fedloom.build import build_clients\n"
        "from fedloom.config import load_config\n"
        "from fedloom.simulation.pool import Loaded, ProcessPoolTransport\n"
        "cfg = load_config(None, ['data.dataset=\"synthetic\"', 'data.num_clients=10', 'model.name=\"logreg\"'])\n"
        "p = ProcessPoolTransport(Loaded(*build_clients(cfg)), workers=2, vectorize=False)\n"
        "print(*p.pids, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    pids = [int(p) for p in done.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids), "a worker outlived its killed parent"


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended; only its parent's wait is due
    except FileNotFoundError:
        return False
