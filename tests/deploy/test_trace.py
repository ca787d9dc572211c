"""Measured traces: a deployed run with a client slowed on purpose, its trace, and a simulation of that trace."""

import csv
import os

from test_e2e import BASE, client_args, federation, fedloom, free_port

from fedloom.config import load_config
from fedloom.deploy.certs import make_dev_pki
from fedloom.deploy.state import ServerState as StateStore
from fedloom.hetero.profiles import load_population
from fedloom.simulation.runner import simulate

SLOW_MODEL = """
import os
import time

from torch import nn


class Slowed(nn.Module):
    '''The example's MLP; training steps take SLOW_S seconds more in a process that sets it.'''

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 2))
        self.delay = float(os.environ.get("SLOW_S", "0"))

    def forward(self, x):
        if self.training and self.delay:
            time.sleep(self.delay)
        return self.net(x)


def make():
    return Slowed()
"""


def test_a_slowed_clients_trace_makes_the_simulation_find_it_slow(tmp_path):
    (tmp_path / "slow_model.py").write_text(SLOW_MODEL)
    pki = tmp_path / "pki"
    make_dev_pki(pki, clients=["c0", "c1", "c2"])
    config = tmp_path / "run.toml"
    config.write_text(BASE.format(port=free_port(), state=tmp_path / "state", pki=pki)
                      .replace('[model]\nname = "mlp"', '[model]\nfactory = "slow_model:make"'))
    state = tmp_path / "state"
    federation(config, pki, state, [client_args(config, pki, state, f"c{i}", i) for i in range(3)], cwd=tmp_path,
               envs=[{**os.environ, "SLOW_S": "0.1" if i == 1 else "0"} for i in range(3)])
    store = StateStore(state / "server.db")
    run_id = store.resume_run("hospitals")
    tasks = store.tasks(run_id)
    # 3 rounds of 3 training and 3 evaluation tasks, each measured
    assert sorted((t["kind"], t["outcome"]) for t in tasks) == [("EvaluateRequest", "ok")] * 9 + [
        ("TrainRequest", "ok")] * 9
    assert all(t["down_bytes"] > 2000 and t["up_bytes"] > 50 and t["work_s"] > 0 for t in tasks)  # the model, a reply
    slow = [t["work_s"] for t in tasks if t["client_id"] == 1 and t["kind"] == "TrainRequest"]
    fast = [t["work_s"] for t in tasks if t["client_id"] != 1 and t["kind"] == "TrainRequest"]
    assert min(slow) > max(1.0, max(fast))  # 2 epochs of 5 batches with 100 ms more each: at least 1 s
    assert sorted(store.presence(run_id)) == [0, 1, 2]
    store.close()

    done = fedloom("trace", str(state), "--out", str(tmp_path / "trace.csv"))
    out, err = done.communicate(timeout=60)
    assert done.returncode == 0, err
    assert "client 1 (c1)" in out and "3 of 3 training tasks" in out
    with open(tmp_path / "trace.csv") as f:
        rows = list(csv.DictReader(f))
    speed = [float(r["compute_sps"]) for r in rows]
    assert speed[1] < min(speed[0], speed[2]) / 2, speed
    assert all(float(r["dropout_p"]) == 0 and r["available"].endswith("-1000000000.0") for r in rows)
    profiles = load_population(tmp_path / "trace.csv")
    # connected from when each joined (after the server had started the run) to the end of the record, and on
    assert [(p.availability.is_available(0.0), p.availability.is_available(1e6)) for p in profiles] == [
        (False, True)] * 3

    # a simulation of that trace: asked 3 a round and keeping the first 2 arrivals, it never waits for client 1 once
    # all three are there (the first rounds start as soon as two have joined, as they joined the real run: a busy
    # machine may start a client seconds after the others, so the simulation runs rounds enough to pass that)
    cfg = load_config(config, [f'hetero.population="{tmp_path / "trace.csv"}"', "hetero.over_select=1.5",
                               "server.clients_per_round=2", "run.rounds=30", "run.client_metrics=true",
                               f'run.out_dir="{tmp_path / "sim"}"', 'model.name="mlp"', 'model.factory=""'])
    result = simulate(cfg, progress=False)
    with open(result.run_dir / "clients.csv") as f:
        asked: dict[int, dict[int, str]] = {}
        for r in csv.DictReader(f):
            asked.setdefault(int(r["round"]), {})[int(r["client"])] = r["status"]
    all_three = [statuses for statuses in asked.values() if len(statuses) == 3]
    assert len(all_three) >= 3, asked
    assert all(s == {0: "accepted", 1: "not_kept", 2: "accepted"} for s in all_three), asked
