"""The simulation runner end to end: seeded, every dataset and model wired, run folders written."""

import math

import numpy as np
import pytest

from fedloom.config import load_config
from fedloom.paramfiles import load_params
from fedloom.simulation.runner import simulate

TIMING = ("round_s", "elapsed_s")


def cfg(tmp_path, *overrides):
    return load_config(None, [f"run.out_dir=\"{tmp_path}\"", *overrides])


def strip_timing(history):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in history]


def test_same_config_same_numbers(tmp_path):
    c = cfg(tmp_path, "data.dataset=\"synthetic\"", "data.num_clients=30", "model.name=\"logreg\"",
            "client.lr=0.05", "server.clients_per_round=5", "run.rounds=4", "eval.every=2",
            "server.optimizer=\"adam\"", "server.lr=0.05", "eval.federated_clients=10")
    a = simulate(c, progress=False, write=False)
    b = simulate(c, progress=False, write=False)
    assert strip_timing(a.history) == strip_timing(b.history)
    for x, y in zip(a.params, b.params):
        np.testing.assert_array_equal(x, y)
    other = simulate(load_config(None, [f"run.out_dir=\"{tmp_path}\"", "data.dataset=\"synthetic\"",
                                        "data.num_clients=30", "model.name=\"logreg\"", "client.lr=0.05",
                                        "server.clients_per_round=5", "run.rounds=4", "eval.every=2",
                                        "server.optimizer=\"adam\"", "server.lr=0.05", "eval.federated_clients=10",
                                        "run.seed=1"]), progress=False, write=False)
    assert not np.array_equal(other.params[0], a.params[0])
    assert not math.isnan(a.history[1]["fed_accuracy"]) and math.isnan(a.history[0].get("fed_accuracy", math.nan))


@pytest.mark.parametrize("overrides,floor", [
    (["data.dataset=\"digits\"", "data.partition=\"iid\"", "data.num_clients=10", "model.name=\"logreg\"",
      "client.lr=0.5", "client.local_epochs=2"], 0.85),
    (["data.dataset=\"digits\"", "data.partition=\"dirichlet\"", "data.alpha=1.0", "data.num_clients=10",
      "model.name=\"cnn\"", "model.channels=8", "client.lr=0.1", "client.local_epochs=2"], 0.6),
    (["data.dataset=\"breast_cancer\"", "data.partition=\"shards\"", "data.num_clients=10", "model.name=\"mlp\"",
      "model.hidden=[16]", "client.lr=0.1", "server.optimizer=\"momentum\"", "server.lr=0.5"], 0.85),
])
def test_federated_training_learns(tmp_path, overrides, floor):
    c = cfg(tmp_path, *overrides, "server.clients_per_round=5", "run.rounds=10", "eval.every=10")
    result = simulate(c, progress=False, write=False)
    assert result.final_accuracy >= floor
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_run_folder_holds_config_metrics_model_and_plot(tmp_path):
    c = cfg(tmp_path, "data.num_clients=6", "model.hidden_size=16", "client.max_steps=2",
            "server.clients_per_round=3", "run.rounds=2", "eval.every=1", "eval.max_examples=50", "run.name=\"tiny\"")
    result = simulate(c, progress=False)
    run = result.run_dir
    assert run.parent == tmp_path and run.name.startswith("tiny-")
    assert sorted(p.name for p in run.iterdir()) == ["accuracy.png", "checkpoint.npz", "config.toml", "metrics.csv",
                                                     "model.npz", "model.pt", "timings.json"]
    assert load_config(run / "config.toml") == c
    names, params = load_params(run / "model.npz")
    assert names[0] == "embed.weight" and params[0].shape == (65, 8)
    for got, want in zip(params, result.params):
        np.testing.assert_array_equal(got, want)
    lines = (run / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("round,train_loss,test_loss,test_accuracy") and len(lines) == 3


def test_too_many_clients_per_round_is_a_config_error(tmp_path):
    from fedloom.errors import ConfigError

    with pytest.raises(ConfigError, match="server.clients_per_round"):
        simulate(cfg(tmp_path, "data.dataset=\"digits\"", "data.partition=\"iid\"", "data.num_clients=4",
                     "model.name=\"logreg\"", "server.clients_per_round=5"), progress=False, write=False)
