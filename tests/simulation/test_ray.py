"""The Ray engine against a real Ray cluster started with the ``ray`` CLI on this machine."""

import functools
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

import fedloom  # noqa: E402
from fedloom.build import build_clients  # noqa: E402
from fedloom.config import load_config  # noqa: E402
from fedloom.messages import TrainConfig, TrainRequest  # noqa: E402
from fedloom.simulation.engines import request_cost, split_balanced  # noqa: E402
from fedloom.simulation.ray_engine import RayTransport  # noqa: E402
from fedloom.transport.inprocess import InProcessTransport  # noqa: E402

ROUNDS = 3
CFG = load_config(None, ["data.dataset=\"synthetic\"", "data.num_clients=40", "model.name=\"logreg\"",
                         "client.lr=0.01", "client.max_steps=10", "server.clients_per_round=10",
                         f"run.rounds={ROUNDS}", "eval.federated_clients=8"])
SPEC = functools.partial(build_clients, CFG)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_line(proc, text, timeout):
    """Read the process's output until ``text`` appears; return everything read."""
    lines, seen = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if text in line:
                seen.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not seen.is_set() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return seen.is_set(), "".join(lines)


def reload_ray_auth_settings():
    """Make this process see the RAY_AUTH_* variables set after ``import ray`` (what Ray itself does for them)."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token authentication: nothing to reload
        return

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A one-node Ray cluster (2 CPUs, small object store) with token authentication, stopped afterwards.

    ``ray start --block`` keeps the head in the foreground; terminating it stops exactly the processes of
    this cluster (unlike ``ray stop --force``, which would stop every Ray cluster of this user on the machine).
    """
    tmp = tmp_path_factory.mktemp("ray")
    token = tmp / "token"
    token.write_text(secrets.token_hex(32))
    src = str(Path(fedloom.__file__).resolve().parents[1])
    env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    port = free_port()
    ray_cli = Path(sys.executable).with_name("ray")
    proc = subprocess.Popen(
        [str(ray_cli), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", "--object-store-memory=200000000",
         f"--temp-dir={tmp / 'r'}"],
        env={**os.environ, **env, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        started, output = wait_for_line(proc, "Ray runtime started", timeout=45)
        if not started:
            pytest.fail(f"ray start did not come up:\n{output}")
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            reload_ray_auth_settings()
            yield f"127.0.0.1:{port}"
        reload_ray_auth_settings()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def sequential(drive):
    work, data = build_clients(CFG)
    return drive(CFG, InProcessTransport(work, data), ROUNDS)


def assert_same_run(a, b):
    for x, y in zip(a[0], b[0], strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    for e, f in zip(a[1], b[1], strict=True):
        assert e.loss == pytest.approx(f.loss, rel=1e-5) and e.accuracy == pytest.approx(f.accuracy, abs=1e-9)


def test_ray_cluster_equals_sequential_and_survives_a_dead_actor(cluster, sequential, drive):
    with RayTransport(SPEC, address=cluster, workers=2, vectorize=False) as rt:
        assert rt.num_workers == 2 and len(rt.actors) == 2
        assert rt.train_sizes == [c.num_train for c in build_clients(CFG)[1].clients]
        assert_same_run(drive(CFG, rt, ROUNDS), sequential)

        params = build_clients(CFG)[0].initial_params(0)
        requests = [TrainRequest(c, 1, params, TrainConfig()) for c in range(10)]
        replies = rt.exchange(requests)
        assert [r.client_id for r in replies] == list(range(10))
        assert all(v.flags.writeable for r in replies for v in r.update.values)

        ray.kill(rt.actors[0])
        replies = rt.exchange(requests)
        costs = [request_cost(r, rt.train_sizes, rt.test_sizes) for r in requests]
        first_share = split_balanced(list(range(10)), costs, 2)[0]
        assert {i for i, r in enumerate(replies) if r.error is not None} == set(first_share)
        assert {r.error.code for r in replies if r.error is not None} == {"worker_failed"}
        assert all(r.error is None for r in rt.exchange(requests))  # a new actor took the dead one's place
    assert ray.is_initialized() is False  # the transport connected, so it disconnected


def test_vectorized_ray_equals_sequential(cluster, sequential, drive):
    pytest.importorskip("fedloom.simulation.vectorized")
    with RayTransport(SPEC, address=cluster, workers=2, vectorize=True) as rt:
        assert_same_run(drive(CFG, rt, ROUNDS), sequential)
