"""`fedloom simulate --resume RUN_DIR`: a run continued from its checkpoint ends with the model of an uninterrupted
run, bit for bit, on every engine; Ctrl-C leaves a checkpoint; a checkpoint that does not fit is refused."""

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

# Adam on the server, centered clipping and Oort: optimizer, aggregator and selector state all cross the checkpoint.
SETTINGS = ["data.dataset=\"digits\"", "data.partition=\"dirichlet\"", "data.num_clients=20", "model.name=\"mlp\"",
            "client.lr=0.05", "server.clients_per_round=5", "server.optimizer=\"adam\"", "server.lr=0.01",
            "server.selection=\"oort\"", "aggregation.centered_clip=0.5", "run.checkpoint_every=2", "eval.every=2",
            "run.client_metrics=true"]


def fedloom(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedloom.cli", *args], capture_output=True, text=True, cwd=tmp_path,
                          timeout=600)


def start(tmp_path: Path, name: str, rounds: int, *extra: str) -> list[str]:
    config = tmp_path / "run.toml"
    config.write_text("[run]\nname = \"x\"\n")
    settings = [*SETTINGS, f"run.name=\"{name}\"", *extra]
    return ["simulate", str(config), "--quiet", "--rounds", str(rounds), *[a for s in settings for a in ("--set", s)]]


def model(run_dir: Path) -> dict[str, np.ndarray]:
    with np.load(run_dir / "model.npz") as f:
        return {k: f[k] for k in f.files}


def losses(run_dir: Path) -> list[str]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [row["train_loss"] for row in csv.DictReader(f)]


def folder(tmp_path: Path, name: str) -> Path:
    return next((tmp_path / "runs").glob(f"{name}-*"))


@pytest.mark.parametrize("engine", ["sequential", "vectorized", "process", "ray"])
def test_a_resumed_run_ends_with_the_uninterrupted_model_bit_for_bit(tmp_path, engine):
    on = [f"engine.executor=\"{engine}\"", "engine.workers=2"]
    assert fedloom(tmp_path, *start(tmp_path, "whole", 6, *on)).returncode == 0
    assert fedloom(tmp_path, *start(tmp_path, "half", 3, *on)).returncode == 0
    out = fedloom(tmp_path, "simulate", "--resume", str(folder(tmp_path, "half")), "--rounds", "6", "--quiet")
    assert out.returncode == 0, out.stderr
    assert "resuming" in out.stderr and "after round 3" in out.stderr
    whole, half = folder(tmp_path, "whole"), folder(tmp_path, "half")
    assert model(whole).keys() == model(half).keys()
    for k, a in model(whole).items():
        np.testing.assert_array_equal(a, model(half)[k])
    assert losses(whole) == losses(half) and len(losses(half)) == 6
    clients = [(run / "clients.csv").read_text().splitlines() for run in (whole, half)]
    assert clients[0] == clients[1] and len(clients[0]) == 1 + 6 * 5  # each round's rows once, as uninterrupted


def test_ctrl_c_leaves_a_checkpoint_to_resume_from(tmp_path):
    assert fedloom(tmp_path, *start(tmp_path, "whole", 12, "run.checkpoint_every=0")).returncode == 0
    args = start(tmp_path, "cut", 12, "run.checkpoint_every=0")
    proc = subprocess.Popen([sys.executable, "-m", "fedloom.cli", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            cut = list((tmp_path / "runs").glob("cut-*"))
            if cut and (cut[0] / "metrics.csv").exists() and len(losses(cut[0])) >= 2:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    cut = folder(tmp_path, "cut")
    done = len(losses(cut))
    if done == 12:
        pytest.skip("the run finished before Ctrl-C arrived")
    assert proc.returncode == 130 and (cut / "checkpoint.npz").exists()
    out = fedloom(tmp_path, "simulate", "--resume", str(cut), "--quiet")
    assert out.returncode == 0, out.stderr
    assert f"after round {done}" in out.stderr
    for k, a in model(folder(tmp_path, "whole")).items():
        np.testing.assert_array_equal(a, model(cut)[k])


def test_a_checkpoint_that_does_not_fit_is_refused(tmp_path):
    assert fedloom(tmp_path, *start(tmp_path, "small", 2)).returncode == 0
    run_dir = folder(tmp_path, "small")
    out = fedloom(tmp_path, "simulate", "--resume", str(run_dir), "--set", "model.hidden=[8]", "--quiet")
    assert out.returncode == 2 and "checkpoint.npz does not fit this run's model and settings" in out.stderr
    out = fedloom(tmp_path, "simulate", "--resume", str(run_dir), "--set", "hetero.population=\"silo\"",
                  "--set", "server.aggregation=\"fedbuff\"", "--set", "server.selection=\"uniform\"", "--quiet")
    assert out.returncode == 2 and "does not fit this run's model and settings" in out.stderr  # no clock in it
    out = fedloom(tmp_path, "simulate", "--resume", str(run_dir), "--set", "hetero.population=\"silo\"", "--quiet")
    assert out.returncode == 2 and "does not fit this run's model and settings" in out.stderr  # no clock in it
    out = fedloom(tmp_path, "simulate", "--resume", str(tmp_path), "--quiet")
    assert out.returncode == 2
    out = fedloom(tmp_path, "simulate", "--quiet")
    assert out.returncode == 2 and "give a config file, or --resume RUN_DIR" in out.stderr


def test_a_run_on_the_simulated_clock_resumes_with_its_clock(tmp_path):
    clocked = ["hetero.population=\"mobile\"", "hetero.over_select=1.4", "hetero.deadline_s=60.0"]
    assert fedloom(tmp_path, *start(tmp_path, "whole", 6, *clocked)).returncode == 0
    assert fedloom(tmp_path, *start(tmp_path, "half", 3, *clocked)).returncode == 0
    out = fedloom(tmp_path, "simulate", "--resume", str(folder(tmp_path, "half")), "--rounds", "6", "--quiet")
    assert out.returncode == 0, out.stderr
    whole, half = folder(tmp_path, "whole"), folder(tmp_path, "half")
    for k, a in model(whole).items():
        np.testing.assert_array_equal(a, model(half)[k])

    def clock_columns(run_dir):
        with open(run_dir / "metrics.csv", newline="") as f:
            return [(r["sim_time_s"], r["trips"], r["bytes_up"]) for r in csv.DictReader(f)]

    assert clock_columns(whole) == clock_columns(half) and float(clock_columns(half)[-1][0]) > 0


@pytest.mark.parametrize("engine", ["sequential", "process"])
def test_fedbuff_resumes_its_tasks_in_flight_and_its_clients_state_bit_for_bit(tmp_path, engine):
    fedbuff = ["hetero.population=\"mobile\"", "server.aggregation=\"fedbuff\"", "server.selection=\"uniform\"",
               "server.concurrency=8", "server.buffer_size=4", "aggregation.centered_clip=0",
               "compression.uplink=\"topk0.1+uniform8\"", "compression.error_feedback=true",
               f"engine.executor=\"{engine}\"", "engine.workers=2", "engine.vectorize=false"]
    assert fedloom(tmp_path, *start(tmp_path, "whole", 8, *fedbuff)).returncode == 0
    assert fedloom(tmp_path, *start(tmp_path, "half", 5, *fedbuff)).returncode == 0
    half = folder(tmp_path, "half")
    with np.load(half / "checkpoint.npz") as f:
        assert len(f["async/events"]) >= 8  # the tasks in flight (and wake-ups) went into the checkpoint
    out = fedloom(tmp_path, "simulate", "--resume", str(half), "--rounds", "8", "--quiet")
    assert out.returncode == 0, out.stderr
    whole = folder(tmp_path, "whole")
    for k, a in model(whole).items():
        np.testing.assert_array_equal(a, model(half)[k])
    assert losses(whole) == losses(half)
    out = fedloom(tmp_path, "simulate", "--resume", str(half), "--rounds", "9", "--set",
                  "server.aggregation=\"sync\"", "--quiet")
    assert out.returncode == 2 and "was not a sync run" in out.stderr
