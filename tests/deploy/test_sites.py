"""Sites that hold only their own data, with real `fedloom server` and `fedloom client` processes over mutual TLS.

(The hospitals example, ``test_hospitals_example.py``, runs the other case: no server test set, federated
evaluation, one hospital reading its data with a loader function.)
"""

import csv

import numpy as np
from test_e2e import BASE, client_args, federation, free_port

from fedloom.config import load_config
from fedloom.data import iid, load_breast_cancer
from fedloom.deploy.certs import make_dev_pki
from fedloom.deploy.state import ServerState as StateStore
from fedloom.simulation.runner import simulate

SITES = """
[data]
dataset = "site"

[model]
name = "mlp"
hidden = [16]
input_shape = [30]
num_classes = 2
"""


def write(path, x, y, sites=None):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*(f"f{i}" for i in range(x.shape[1])), "label", *(["client"] if sites is not None else [])])
        for i in range(len(y)):
            w.writerow([*(f"{v:.6f}" for v in x[i]), int(y[i]), *([sites[i]] if sites is not None else [])])


def test_each_client_reads_only_its_own_file_the_server_tests_on_its_own_and_it_is_the_simulations_run(tmp_path):
    x, y = load_breast_cancer()
    *parts, held_out = iid(len(y), 4, seed=0)
    for i, part in enumerate(parts):  # each site's file in a folder of its own
        (tmp_path / f"site-c{i}").mkdir()
        write(tmp_path / f"site-c{i}" / "patients.csv", x[part], y[part])
    write(tmp_path / "server-test.csv", x[held_out], y[held_out])
    every = np.concatenate(parts)
    names = np.repeat([f"c{i}" for i in range(3)], [len(p) for p in parts])
    write(tmp_path / "all.csv", x[every], y[every], sites=names)
    pki = tmp_path / "pki"
    make_dev_pki(pki, clients=["c0", "c1", "c2"])
    base = BASE.format(port=free_port(), state=tmp_path / "state", pki=pki)
    base = base.split("[data]")[0] + SITES + "\n[client]" + base.split("[client]")[1]
    config = tmp_path / "run.toml"
    config.write_text(base.replace("federated_clients = 3", "federated_clients = 0")
                      + f'test_data = "{tmp_path / "server-test.csv"}"\n')
    state = tmp_path / "state"
    own = [f'data.path="{tmp_path / f"site-c{i}" / "patients.csv"}"' for i in range(3)]
    out = federation(config, pki, state, [[*client_args(config, pki, state, f"c{i}", 0), "--set", own[i]]
                                          for i in range(3)])
    rounds = [line for line in out.splitlines() if line.startswith("round")]
    assert len(rounds) == 3 and all("3 updates" in r and "test accuracy" in r for r in rounds), out
    store = StateStore(state / "server.db")
    run_id = store.resume_run("hospitals")
    history = store.history(run_id)
    assert all("test_accuracy" in h["metrics"] and "fed_accuracy" not in h["metrics"] for h in history)
    assert history[-1]["metrics"]["test_accuracy"] > 0.85  # on the server's own held-out patients
    _, names, arrays = store.load_checkpoint(run_id)
    # the same run simulated from one table of the three sites' rows: the same model
    sim = simulate(load_config(config, ['data.dataset="files"', f'data.path="{tmp_path / "all.csv"}"',
                                        'data.partition="natural"', "model.input_shape=[]", "model.num_classes=0"]),
                   progress=False, write=False)
    deployed = [a for n, a in zip(names, arrays) if not n.startswith("optimizer/")]
    for a, b in zip(deployed, sim.params):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
