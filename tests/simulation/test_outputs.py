"""TensorBoard and MLflow outputs carry the numbers of metrics.csv; a missing package stops the run before training."""

import csv
import os
import subprocess
import sys

import pytest

from fedloom.config import load_config
from fedloom.simulation.runner import simulate

SMALL = ["data.dataset=\"digits\"", "data.partition=\"iid\"", "data.num_clients=10", "model.name=\"mlp\"",
         "server.clients_per_round=4", "eval.every=1", "run.rounds=3"]


def metrics(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return {int(r["round"]): r for r in csv.DictReader(f)}


def test_tensorboard_and_mlflow_get_the_metrics_csv_numbers(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store = tmp_path / "mlruns"
    cfg = load_config(None, [*SMALL, f"run.out_dir=\"{tmp_path}\"", "log.tensorboard=true",
                             f"log.mlflow=\"{store}\"", "run.name=\"logged\""])
    result = simulate(cfg, progress=False)
    rows = metrics(result.run_dir)
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    board = {e.step: e.value for e in events.Scalars("test_accuracy")}
    assert board == pytest.approx({k: float(r["test_accuracy"]) for k, r in rows.items()}, rel=1e-6)
    assert [e.step for e in events.Scalars("train_loss")] == [1, 2, 3]
    client = MlflowClient(tracking_uri=store.as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("logged").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["client.lr"] == str(cfg.client.lr)
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "test_accuracy")}
    assert history == pytest.approx({k: float(r["test_accuracy"]) for k, r in rows.items()}, rel=1e-12)


@pytest.mark.parametrize("package, setting", [("mlflow", "log.mlflow=\"mlruns\""),
                                              ("tensorboard", "log.tensorboard=true")])
def test_a_missing_package_is_found_before_training(tmp_path, package, setting):
    (tmp_path / "shadow" / package).mkdir(parents=True)
    (tmp_path / "shadow" / package / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "shadow"), os.environ.get("PYTHONPATH", "")])}
    (tmp_path / "run.toml").write_text("[run]\nname = \"x\"\n")
    args = [a for s in [*SMALL, f"run.out_dir=\"{tmp_path / 'runs'}\"", setting] for a in ("--set", s)]
    out = subprocess.run([sys.executable, "-m", "fedloom.cli", "simulate", str(tmp_path / "run.toml"), "--quiet",
                          *args], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 2 and f"fedloom: error: {setting.split('=')[0]}: needs" in out.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
