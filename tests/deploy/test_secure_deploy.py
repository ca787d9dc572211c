"""Secure aggregation with real `fedloom server` and `fedloom client` processes over TLS."""

import os
import signal
import time

import numpy as np
from test_e2e import BASE, client_args, fedloom, free_port, wait_for
from test_faults import read_until, setup, start

from fedloom.config import load_config
from fedloom.deploy.certs import make_dev_pki
from fedloom.deploy.state import ServerState as StateStore
from fedloom.simulation.runner import simulate

SECURE = """
[aggregation]
weighting = "uniform"

[privacy]
clip = 10.0

[secagg]
mode = "secagg"
"""


def test_three_hospitals_aggregate_securely_over_mutual_tls_to_the_simulations_model(tmp_path):
    pki = tmp_path / "pki"
    make_dev_pki(pki, clients=["c0", "c1", "c2"])
    config = tmp_path / "run.toml"
    config.write_text(BASE.format(port=free_port(), state=tmp_path / "state", pki=pki) + SECURE)
    state = tmp_path / "state"
    server = fedloom("server", "--config", str(config), "--set", f'deploy.cert="{pki / "server.pem"}"',
                     "--set", f'deploy.key="{pki / "server.key"}"')
    procs = []
    try:
        wait_for(state / "tokens" / "c2.token")
        procs = [fedloom(*client_args(config, pki, state, f"c{i}", i), "--set",
                         f'deploy.client_state_dir="{tmp_path / f"c{i}"}"') for i in range(3)]
        for p in procs:
            out, err = p.communicate(timeout=180)
            assert p.returncode == 0, err
        out, err = server.communicate(timeout=60)
        assert server.returncode == 0, err
        rounds = [line for line in out.splitlines() if line.startswith("round")]
        assert len(rounds) == 3 and all("3 updates" in line for line in rounds), out
    finally:
        for p in [server, *procs]:
            if p.poll() is None:
                p.kill()
    for i in range(3):  # each client wiped its round's secrets when the round ended
        assert not list((tmp_path / f"c{i}" / "round").glob("*.npz"))
    store = StateStore(state / "server.db")
    run_id = store.resume_run("hospitals")
    done, names, arrays = store.load_checkpoint(run_id)
    history = store.history(run_id)
    assert done == 3 and [h["metrics"]["secagg.survivors"] for h in history] == [3, 3, 3]
    sim = simulate(load_config(config), progress=False, write=False)
    deployed = [a for n, a in zip(names, arrays) if not n.startswith(("optimizer/", "aggregation/"))]
    for a, b in zip(deployed, sim.params):  # the same up to the fixed point's rounding (drawn by each side)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)


def test_a_client_killed_mid_protocol_is_unmasked_around_and_the_run_goes_on(tmp_path):
    config, state = setup(tmp_path, rounds=1000, heartbeat_s=1.0, extra=SECURE)
    config.write_text(config.read_text().replace("min_clients = 3", "min_clients = 2"))
    server = start("server", "--config", str(config))
    folders = [tmp_path / f"client{i}" for i in range(3)]
    clients = []
    try:
        wait_for(state / "tokens" / "c2.token")
        for i in range(3):
            token = state / "tokens" / f"c{i}.token"
            clients.append(start("client", "--config", str(config), "--set", f'deploy.name="c{i}"',
                                 "--set", f'deploy.token_file="{token}"', "--set", f"deploy.client_index={i}",
                                 "--set", f'deploy.client_state_dir="{folders[i]}"'))
        read_until(server, "round", contains="3 updates", timeout=90)
        end = time.monotonic() + 60
        while not list((folders[2] / "round").glob("*.npz")):  # it holds a round's keys: mid-protocol
            assert time.monotonic() < end, "client 2 never started another secure round"
            time.sleep(0.005)
        os.kill(clients[2].pid, signal.SIGKILL)
        lines = read_until(server, "round", timeout=90)  # that round: unmasked without it, or with its input in
        assert "2 updates" in lines[-1] or "3 updates" in lines[-1], lines
        clients[2] = start("client", "--config", str(config), "--set", 'deploy.name="c2"',
                           "--set", f'deploy.token_file="{state / "tokens" / "c2.token"}"',
                           "--set", "deploy.client_index=2", "--set", f'deploy.client_state_dir="{folders[2]}"')
        read_until(server, "round", contains="3 updates", timeout=90)  # it rejoins the secure rounds
        assert server.poll() is None and all(c.poll() is None for c in clients)
    finally:
        for p in [server, *clients]:
            if p.poll() is None:
                p.kill()
