"""A user's own model and data: ``model.factory`` and ``data.loader`` on every engine through the CLI, and
``simulate(cfg, model_fn=..., dataset=...)`` from Python."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from fedloom.build import build_clients
from fedloom.config import load_config
from fedloom.data.dataset import FederatedDataset
from fedloom.errors import ConfigError, DataError
from fedloom.paramfiles import load_params
from fedloom.plugins import from_arrays
from fedloom.simulation.runner import simulate

MODEL = '''
from torch import nn


def make(dataset):
    return nn.Sequential(nn.Linear(dataset.clients[0].x_train.shape[1], 16), nn.ReLU(),
                         nn.Linear(16, dataset.num_classes))
'''
DATA = '''
import numpy as np


def load():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 5))  # float64, as numpy makes it: converted when loaded
    y = (x @ rng.normal(size=(5, 3))).argmax(axis=1)
    sites = np.array(["site-a", "site-b", "site-c", "site-d", "site-e", "site-f"])[rng.integers(0, 6, 600)]
    return x, y, sites
'''
CONFIG = '''
[run]
name = "own"
rounds = 8
out_dir = "runs"
[data]
loader = "mydata:load"
[model]
factory = "mymodel:make"
[client]
lr = 0.1
[server]
clients_per_round = 4
[eval]
every = 8
'''


@pytest.fixture
def project(tmp_path):
    (tmp_path / "mymodel.py").write_text(MODEL)
    (tmp_path / "mydata.py").write_text(DATA)
    (tmp_path / "own.toml").write_text(CONFIG)
    return tmp_path


def run_cli(project: Path, *settings: str) -> subprocess.CompletedProcess:
    args = [a for s in settings for a in ("--set", s)]
    return subprocess.run([sys.executable, "-m", "fedloom.cli", "simulate", "own.toml", "--quiet", *args],
                          capture_output=True, text=True, cwd=project, timeout=600)


def test_own_model_and_data_give_the_same_model_on_every_engine(project):
    models = {}
    for engine in ["sequential", "vectorized", "process", "ray"]:
        out = run_cli(project, f"engine.executor=\"{engine}\"", "engine.workers=2", f"run.name=\"{engine}\"")
        assert out.returncode == 0, out.stderr
        run_dir = next((project / "runs").glob(f"{engine}-*"))
        models[engine] = load_params(run_dir / "model.npz")[1]
        accuracy = float(out.stdout.split("final test accuracy ")[1].split()[0])
        assert accuracy > 0.6, (engine, out.stdout)  # three classes: chance is about 0.33
    for engine, params in models.items():
        for a, b in zip(models["sequential"], params):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=engine)


BATCHNORM_MODEL = '''
from torch import nn


def make(dataset):
    return nn.Sequential(nn.Linear(dataset.clients[0].x_train.shape[1], 16), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, dataset.num_classes))
'''


def test_fedbn_runs_a_users_batchnorm_model_from_the_cli(project):
    (project / "bnmodel.py").write_text(BATCHNORM_MODEL)
    out = run_cli(project, "model.factory=\"bnmodel:make\"", "model.batchnorm=\"local\"",
                  "eval.federated_clients=6", "engine.executor=\"process\"", "engine.workers=2", "run.name=\"bn\"")
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.split("final test accuracy ")[1].split()[0]) > 0.6
    run_dir = next((project / "runs").glob("bn-*"))
    assert {p.name.split("-")[0] for p in (run_dir / "client_state").glob("*.npz")} == {str(i) for i in range(6)}
    out = run_cli(project, "model.batchnorm=\"local\"", "eval.federated_clients=6")
    assert out.returncode == 2 and "model.batchnorm: \"local\" keeps BatchNorm layers on the clients" in out.stderr


def test_a_bad_plug_in_name_is_refused_before_training(project):
    out = run_cli(project, "model.factory=\"mymodel\"")
    assert out.returncode == 2 and "fedloom: error: model.factory: must be 'package.module:function'" in out.stderr
    out = run_cli(project, "data.loader=\"nowhere:load\"")
    assert out.returncode == 2 and "fedloom: error: data.loader: cannot import 'nowhere'" in out.stderr
    out = run_cli(project, "model.factory=\"mymodel:nothing\"")
    assert out.returncode == 2 and "fedloom: error: model.factory: 'mymodel' has no function 'nothing'" in out.stderr


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(5, 3))


def federation() -> FederatedDataset:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 5)).astype(np.float32)
    return from_arrays(x, (x @ rng.normal(size=(5, 3))).argmax(1), rng.integers(0, 8, 400), 0.8)


@pytest.mark.parametrize("engine", ["vectorized", "process"])
def test_simulate_takes_a_model_function_and_a_dataset_from_python(engine, tmp_path):
    cfg = load_config(None, ["run.rounds=5", "server.clients_per_round=4", "client.lr=0.1", "eval.every=5",
                             f"engine.executor=\"{engine}\"", "engine.workers=2", f"run.out_dir=\"{tmp_path}\""])
    result = simulate(cfg, progress=False, model_fn=mlp, dataset=federation())
    assert result.final_accuracy > 0.6 and (result.run_dir / "metrics.csv").exists()
    reference = simulate(load_config(None, ["run.rounds=5", "server.clients_per_round=4", "client.lr=0.1",
                                            "eval.every=5", "engine.executor=\"sequential\""]),
                         progress=False, write=False, model_fn=mlp, dataset=federation())
    for a, b in zip(reference.params, result.params):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_forked_process_workers_share_a_model_function_that_does_not_pickle_and_ray_refuses_it():
    settings = ["run.rounds=2", "server.clients_per_round=4", "client.lr=0.1", "eval.every=2", "engine.workers=2"]
    forked = simulate(load_config(None, [*settings, "engine.executor=\"process\""]), progress=False, write=False,
                      model_fn=lambda: mlp(), dataset=federation())
    reference = simulate(load_config(None, [*settings, "engine.executor=\"sequential\""]), progress=False,
                         write=False, model_fn=mlp, dataset=federation())
    for a, b in zip(reference.params, forked.params):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="engine.executor: ray workers rebuild the clients .* does not pickle"):
        simulate(load_config(None, [*settings, "engine.executor=\"ray\""]), progress=False, write=False,
                 model_fn=lambda: mlp(), dataset=federation())


def test_arrays_with_a_client_column_become_a_federation_with_checked_dtypes():
    data = from_arrays(np.zeros((6, 2)), np.array([0.0, 1.0, 2.0, 0.0, 1.0, 2.0]), ["b", "a", "b", "a", "b", "a"], 0.5)
    assert len(data) == 2 and data.num_classes == 3 and data[0].x_train.dtype == np.float32
    assert [c.name for c in data.clients] == ["a", "b"] and data[0].y_train.dtype == np.int64
    with pytest.raises(DataError, match="labels must be whole class numbers"):
        from_arrays(np.zeros((2, 2)), np.array([0.5, 1.0]), [0, 1], 0.5)
    with pytest.raises(DataError, match="inputs must be numbers"):
        from_arrays(np.array([["a"], ["b"]]), np.array([0, 1]), [0, 1], 0.5)
    with pytest.raises(DataError, match="need one row each"):
        from_arrays(np.zeros((3, 2)), np.array([0, 1]), [0, 1], 0.5)


def test_leaf_text_trains_the_character_model(tmp_path):
    users = ["ROMEO", "JULIET", "NURSE"]
    text = "but soft what light through yonder window breaks it is the east and juliet is the sun "
    doc = {"users": users, "num_samples": [30] * 3, "user_data": {
        u: {"x": [text[i:i + 20] for i in range(30)], "y": [text[i + 20] for i in range(30)]} for u in users}}
    (tmp_path / "train.json").write_text(json.dumps(doc))
    cfg = load_config(None, ["data.dataset=\"leaf\"", f"data.path=\"{tmp_path / 'train.json'}\"",
                             "model.name=\"char_lstm\"", "run.rounds=2", "server.clients_per_round=3"])
    result = simulate(cfg, progress=False, write=False)
    assert len(result.history) == 2 and np.isfinite(result.history[-1]["test_loss"])
    with pytest.raises(ConfigError, match="model.name: 'mlp' does not fit the 'leaf' data, which is character data"):
        simulate(load_config(None, ["data.dataset=\"leaf\"", f"data.path=\"{tmp_path / 'train.json'}\"",
                                    "model.name=\"mlp\"", "run.rounds=1"]), progress=False, write=False)


def test_a_loader_without_client_ids_is_split_by_the_configured_partition(tmp_path, monkeypatch):
    (tmp_path / "plaindata.py").write_text("import numpy as np\n\ndef load():\n    rng = np.random.default_rng(0)\n"
                                           "    return rng.normal(size=(600, 4)), np.arange(600) % 3\n")
    monkeypatch.chdir(tmp_path)
    base = ["data.loader=\"plaindata:load\"", "model.name=\"mlp\"", "data.num_clients=6"]
    _, data = build_clients(load_config(None, [*base, "data.partition=\"dirichlet_balanced\"", "data.alpha=0.1"]))
    assert len(data) == 6 and {c.num_train + c.num_test for c in data.clients} == {100}
    _, data = build_clients(load_config(None, [*base, "data.partition=\"classes\"", "data.classes_per_client=1"]))
    assert all(len(np.unique(c.y_train)) == 1 for c in data.clients)
    with pytest.raises(ConfigError, match="has no client ids: name a partition"):
        build_clients(load_config(None, [*base[:2]]))


@pytest.mark.parametrize("partition", ["classes", "lognormal", "power_law", "dirichlet_balanced"])
def test_the_new_partitions_run_from_the_cli(partition, tmp_path):
    (tmp_path / "run.toml").write_text("[run]\nname = \"p\"\n")
    settings = ["data.dataset=\"digits\"", f"data.partition=\"{partition}\"", "data.num_clients=30",
                "model.name=\"mlp\"", "server.clients_per_round=10", "client.lr=0.1", f"run.out_dir=\"{tmp_path}\""]
    out = subprocess.run([sys.executable, "-m", "fedloom.cli", "simulate", str(tmp_path / "run.toml"), "--quiet",
                          "--rounds", "3", *[a for s in settings for a in ("--set", s)]],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
