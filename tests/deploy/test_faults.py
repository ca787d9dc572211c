"""Crash safety with real processes: the server killed mid-round resumes; a killed client rejoins."""

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_e2e import BASE, free_port, wait_for

from fedloom.config import load_config
from fedloom.deploy.certs import make_dev_pki
from fedloom.deploy.state import ServerState as StateStore
from fedloom.simulation.runner import simulate


def start(*args):
    return subprocess.Popen([sys.executable, "-m", "fedloom.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, bufsize=1)


def setup(tmp_path, rounds, heartbeat_s, extra=""):
    pki = tmp_path / "pki"
    make_dev_pki(pki)
    config = tmp_path / "run.toml"
    text = BASE.format(port=free_port(), state=tmp_path / "state", pki=pki).replace("rounds = 3", f"rounds = {rounds}")
    text = text.replace("heartbeat_s = 5.0", f"heartbeat_s = {heartbeat_s}")
    config.write_text(text.replace("mutual_tls = true", "mutual_tls = false")
                      + f'cert = "{pki / "server.pem"}"\nkey = "{pki / "server.key"}"\n' + extra)
    return config, tmp_path / "state"


STATEFUL = """
[aggregation]
weighting = "uniform"
centered_clip = 0.5
norm_bound = 1.0
"""


def client(config, state, i):
    token = state / "tokens" / f"c{i}.token"
    return start("client", "--config", str(config), "--set", f'deploy.name="c{i}"',
                 "--set", f'deploy.token_file="{token}"', "--set", f"deploy.client_index={i}")


def read_until(proc, prefix, timeout=120, contains=""):
    """Lines of ``proc``'s stdout up to and including the first that starts with ``prefix`` (and holds ``contains``)."""
    lines, end = [], time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(prefix) and contains in line:
            return lines
    raise AssertionError(f"no line starting with {prefix!r} holding {contains!r} in {lines}")


@pytest.mark.parametrize("extra", ["", STATEFUL], ids=["fedavg", "stateful-aggregator"])
def test_server_killed_mid_round_resumes_and_clients_reconnect(tmp_path, extra):
    # a generous heartbeat: no client may be taken for lost on a busy machine, or the model would differ.
    # The stateful aggregator's state (centered clipping's centre) is checkpointed with the model.
    config, state = setup(tmp_path, rounds=30, heartbeat_s=10.0, extra=extra)
    server = start("server", "--config", str(config))
    clients = []
    try:
        wait_for(state / "tokens" / "c2.token")
        clients = [client(config, state, i) for i in range(3)]
        first = read_until(server, "round 2:")
        os.kill(server.pid, signal.SIGKILL)  # in the middle of a later round
        server.wait()
        with StateStore(state / "server.db") as store:
            done_before = store.last_completed_round(store.resume_run("hospitals"))
        assert 2 <= done_before < 30
        server = start("server", "--config", str(config))  # the clients find it again by themselves
        lines = read_until(server, "round 30:")
        assert lines[0].startswith(f"round {done_before + 1}:")
        assert all("3 updates" in line for line in first + lines)
        assert server.wait(timeout=60) == 0
        for c in clients:
            assert c.wait(timeout=60) == 0
    finally:
        for p in [server, *clients]:
            if p.poll() is None:
                p.kill()
    with StateStore(state / "server.db") as store:
        run = store.resume_run("hospitals")
        assert [h["round"] for h in store.history(run)] == list(range(1, 31))
        done, names, arrays = store.load_checkpoint(run)
    sim = simulate(load_config(config), progress=False, write=False)
    assert done == 30 and any(n.startswith("aggregation/") for n in names) == bool(extra)
    for a, b in zip([a for n, a in zip(names, arrays) if "/" not in n], sim.params):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_client_killed_mid_run_is_dropped_then_rejoins(tmp_path):
    config, state = setup(tmp_path, rounds=1000, heartbeat_s=1.0)  # more rounds than it waits for; it stops the run
    config.write_text(config.read_text().replace("min_clients = 3", "min_clients = 2"))
    server = start("server", "--config", str(config))
    clients = []
    try:
        wait_for(state / "tokens" / "c2.token")
        clients = [client(config, state, i) for i in range(3)]
        read_until(server, "round", contains="3 updates", timeout=60)
        os.kill(clients[2].pid, signal.SIGKILL)
        read_until(server, "round", contains="2 updates", timeout=60)  # the run goes on without the lost client
        clients[2] = client(config, state, 2)
        read_until(server, "round", contains="3 updates", timeout=60)  # it came back and is asked again
        assert server.poll() is None and all(c.poll() is None for c in clients)
    finally:
        for p in [server, *clients]:
            if p.poll() is None:
                p.kill()


def test_random_kills_leave_every_completed_round_intact(tmp_path):
    rng = random.Random(7)
    rounds = 60
    config, state = setup(tmp_path, rounds=rounds, heartbeat_s=1.0)
    config.write_text(config.read_text().replace("min_clients = 3", "min_clients = 2"))
    server = start("server", "--config", str(config))
    procs = {}
    try:
        wait_for(state / "tokens" / "c2.token")
        procs = {i: client(config, state, i) for i in range(3)}
        read_until(server, "round 1:")
        kills = []
        for _ in range(4):
            time.sleep(rng.uniform(0.3, 1.5))
            if server.poll() is not None:
                break
            victim = rng.choice(["server", 0, 1, 2])
            kills.append(victim)
            proc = server if victim == "server" else procs[victim]
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            if victim == "server":
                server = start("server", "--config", str(config))
            else:
                procs[victim] = client(config, state, victim)
        assert "server" in kills or len(kills) == 4
        read_until(server, f"round {rounds}:", timeout=180)
        assert server.wait(timeout=60) == 0
    finally:
        for p in [server, *procs.values()]:
            if p.poll() is None:
                p.kill()
    with StateStore(state / "server.db") as store:
        run = store.resume_run("hospitals")
        history = store.history(run)
        assert [h["round"] for h in history] == list(range(1, rounds + 1))  # each round done exactly once
        assert all(h["metrics"]["accepted"] >= 1 and "test_accuracy" in h["metrics"] for h in history)
        done, names, arrays = store.load_checkpoint(run)
    assert done == rounds and all(np.isfinite(a).all() for a in arrays)
