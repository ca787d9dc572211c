"""Real server and client processes over gRPC with mutual TLS on loopback."""

import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedloom.config import load_config
from fedloom.deploy.certs import make_dev_pki
from fedloom.deploy.state import ServerState as StateStore
from fedloom.simulation.runner import simulate

BASE = """
[run]
name = "hospitals"
rounds = 3
seed = 0

[data]
dataset = "breast_cancer"
partition = "iid"
num_clients = 3

[model]
name = "mlp"
hidden = [16]

[client]
lr = 0.1
local_epochs = 2

[server]
clients_per_round = 3
optimizer = "adam"
lr = 0.05

[eval]
every = 1
federated_clients = 3

[engine]
executor = "sequential"

[deploy]
address = "127.0.0.1:{port}"
state_dir = "{state}"
clients = ["c0", "c1", "c2"]
min_clients = 3
heartbeat_s = 5.0
round_timeout_s = 60.0
mutual_tls = true
ca = "{pki}/ca.pem"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fedloom(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "fedloom.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture
def deployment(tmp_path):
    pki = tmp_path / "pki"
    make_dev_pki(pki, clients=["c0", "c1", "c2", "intruder"])
    config = tmp_path / "run.toml"
    config.write_text(BASE.format(port=free_port(), state=tmp_path / "state", pki=pki))
    return tmp_path, config, pki


def client_args(config: Path, pki: Path, state: Path, name: str, index: int, token_of: str | None = None):
    return ["client", "--config", str(config), "--set", f'deploy.name="{name}"',
            "--set", f'deploy.token_file="{state / "tokens" / f"{token_of or name}.token"}"',
            "--set", f"deploy.client_index={index}", "--set", f'deploy.cert="{pki / "clients" / f"{name}.pem"}"',
            "--set", f'deploy.key="{pki / "clients" / f"{name}.key"}"']


def wait_for(path: Path, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.1)


def federation(config: Path, pki: Path, state: Path, clients: list[list[str]], *server_args: str,
               envs: list[dict] | None = None, cwd: Path | None = None, timeout: float = 240) -> str:
    """Run `fedloom server` (TLS with ``pki``'s server certificate, ``server_args`` added) and one `fedloom client`
    per entry of ``clients`` (its arguments after ``client``; ``envs``: each one's environment) until all have
    exited, each with status 0; the server's standard output."""
    server = fedloom("server", "--config", str(config), "--set", f'deploy.cert="{pki / "server.pem"}"',
                     "--set", f'deploy.key="{pki / "server.key"}"', *server_args, cwd=cwd)
    procs = []
    try:
        wait_for(state / "tokens" / f"c{len(clients) - 1}.token")
        procs = [fedloom(*args, cwd=cwd, **({"env": envs[i]} if envs else {})) for i, args in enumerate(clients)]
        out, err = server.communicate(timeout=timeout)
        assert server.returncode == 0, err
        for p in procs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
        return out
    finally:
        for p in [server, *procs]:
            if p.poll() is None:
                p.kill()


def test_three_hospitals_match_the_simulation_and_strangers_are_refused(deployment):
    tmp, config, pki = deployment
    state = tmp / "state"
    server = fedloom("server", "--config", str(config), "--set", f'deploy.cert="{pki / "server.pem"}"',
                     "--set", f'deploy.key="{pki / "server.key"}"')
    procs = []
    try:
        wait_for(state / "tokens" / "c2.token")
        (tmp / "bad.token").write_text("not-a-token")
        stranger = fedloom("client", "--config", str(config), "--set", 'deploy.name="intruder"',
                           "--set", f'deploy.token_file="{tmp / "bad.token"}"',
                           "--set", f'deploy.cert="{pki / "clients" / "intruder.pem"}"',
                           "--set", f'deploy.key="{pki / "clients" / "intruder.key"}"')
        thief = fedloom(*client_args(config, pki, state, "intruder", 0, token_of="c0"))
        procs = [fedloom(*client_args(config, pki, state, f"c{i}", i)) for i in range(3)]
        out, err = stranger.communicate(timeout=60)
        assert stranger.returncode == 2 and "the certificate (intruder) is no enrolled client's" in err
        out, err = thief.communicate(timeout=60)
        assert thief.returncode == 2 and "certificate" in err
        for p in procs:
            out, err = p.communicate(timeout=180)
            assert p.returncode == 0, err
            assert "run finished" in out
        out, err = server.communicate(timeout=60)
        assert server.returncode == 0, err
        assert [line.split(":")[0] for line in out.splitlines() if line.startswith("round")] == \
            ["round 1", "round 2", "round 3"]
    finally:
        for p in [server, *procs]:
            if p.poll() is None:
                p.kill()
    store = StateStore(state / "server.db")
    run_id = store.resume_run("hospitals")
    done, names, arrays = store.load_checkpoint(run_id)
    assert done == 3
    cfg = load_config(config)
    sim = simulate(cfg, progress=False, write=False)
    deployed = [a for n, a in zip(names, arrays) if not n.startswith("optimizer/")]
    for a, b in zip(deployed, sim.params):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


OWN_MODEL = """
from torch import nn


def make(dataset):
    return nn.Sequential(nn.Linear(dataset.clients[0].x_train.shape[1], 8), nn.Tanh(), nn.Linear(8, 2))
"""
OWN_DATA = """
import numpy as np


def load():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6))
    return x, (x[:, 0] + x[:, 1] > 0).astype(int), np.array(["north", "south", "west"])[np.arange(300) % 3]
"""


@pytest.mark.parametrize("extra", [
    '[aggregation]\nweighting = "uniform"\nreducer = "trimmed_mean"\ntrim = 0.34\nnorm_bound = 1.0\n',
    '[aggregation]\nweighting = "uniform"\n[privacy]\nnoise_multiplier = 0.3\nclip = 0.5\nnoise_seed = 0\n',
    "own model",
    '[compression]\nuplink = "topk0.2+uniform8"\nerror_feedback = true\ndownlink = "uniform8"\n'
    '[privacy]\nnoise_seed = 0\n',
], ids=["robust", "private-fixed-test-seed", "own-model-and-data-loader", "compressed-error-feedback"])
def test_robust_private_and_own_model_runs_deploy_to_the_simulations_model(deployment, extra, monkeypatch):
    tmp, config, pki = deployment
    text = config.read_text() + f'cert = "{pki / "server.pem"}"\nkey = "{pki / "server.key"}"\n'
    if extra == "own model":  # model.factory and data.loader resolved in each process's working directory
        (tmp / "sitemodel.py").write_text(OWN_MODEL)
        (tmp / "sitedata.py").write_text(OWN_DATA)
        text = text.replace('name = "mlp"\nhidden = [16]', 'factory = "sitemodel:make"')
        text = text.replace('dataset = "breast_cancer"\npartition = "iid"\nnum_clients = 3',
                            'loader = "sitedata:load"\npartition = "natural"')
        assert "sitemodel:make" in text and "sitedata:load" in text
        monkeypatch.chdir(tmp)
    config.write_text(text if extra == "own model" else text + extra)
    state = tmp / "state"
    server = fedloom("server", "--config", str(config), cwd=tmp)
    procs = []
    try:
        wait_for(state / "tokens" / "c2.token")
        procs = [fedloom(*client_args(config, pki, state, f"c{i}", i), cwd=tmp) for i in range(3)]
        out, err = server.communicate(timeout=180)
        assert server.returncode == 0, err
    finally:
        for p in [server, *procs]:
            if p.poll() is None:
                p.kill()
    with StateStore(state / "server.db") as store:
        run_id = store.resume_run("hospitals")
        done, names, arrays = store.load_checkpoint(run_id)
        history = store.history(run_id)
    sim = simulate(load_config(config), progress=False, write=False)
    assert done == 3 and [h["metrics"]["accepted"] for h in history] == [3, 3, 3]
    deployed = [a for n, a in zip(names, arrays) if "/" not in n]
    assert [a.shape for a in deployed] == [a.shape for a in sim.params]
    for a, b in zip(deployed, sim.params):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    if "compression" in extra:  # each client kept its residual in its own folder, between rounds
        assert sorted(p.name for p in (tmp / "fedloom-client-c0").iterdir()) == ["0-2.npz", "0-3.npz"]
        assert history[-1]["metrics"]["bytes_up"] < 3 * 0.5 * sum(a.nbytes for a in deployed)  # 3 updates, 20% kept
    if "noise_multiplier" in extra:
        assert history[-1]["metrics"]["dp_noise.epsilon"] == pytest.approx(sim.history[-1]["dp_noise.epsilon"])
