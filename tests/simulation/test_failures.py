"""Failures a user can see: refusals counted by code and said once, runs that applied nothing exit 1, problems
found before training, and a run folder that grows as rounds complete and survives Ctrl-C."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedloom.build import build_clients, build_strategy
from fedloom.client.torch_work import TorchClientWork
from fedloom.config import load_config
from fedloom.errors import ConfigError
from fedloom.rounds import Failures, train_round
from fedloom.server import SyncServer
from fedloom.simulation.runner import check_fit
from fedloom.transport.inprocess import InProcessTransport

SMALL = ["data.dataset=\"digits\"", "data.partition=\"iid\"", "data.num_clients=10", "model.name=\"logreg\"",
         "server.clients_per_round=4", "eval.every=1"]


def fedloom(*args, env=None):
    return subprocess.run([sys.executable, "-m", "fedloom.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def simulate_args(tmp_path: Path, *overrides: str) -> list[str]:
    """``simulate CONFIG --quiet --set ...`` for SMALL and ``overrides``, writing runs under ``tmp_path/runs``."""
    config = tmp_path / "run.toml"
    config.write_text('[run]\nname = "small"\n')
    (tmp_path / "runs").mkdir(exist_ok=True)
    settings = [*SMALL, f"run.out_dir=\"{tmp_path / 'runs'}\"", *overrides]
    return ["simulate", str(config), "--quiet", *[arg for o in settings for arg in ("--set", o)]]


def rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_run_that_applies_nothing_exits_1_and_says_why_once(tmp_path):
    out = fedloom(*simulate_args(tmp_path, "client.lr=1e30", "run.rounds=4"))
    assert out.returncode == 1, out.stderr
    assert "fedloom: error: the run failed: no update was applied in the last 3 rounds" in out.stderr
    assert out.stderr.count("invalid_update: ") == 1  # the first refusal, said once
    assert out.stderr.count("the model was left unchanged") == 1
    assert "refused updates in this run, by code: invalid_update 16" in out.stderr
    run_dir = next((tmp_path / "runs").iterdir())
    table = rows(run_dir)
    assert [r["rejected.invalid_update"] for r in table] == ["4"] * 4 and [r["unchanged"] for r in table] == ["1"] * 4
    assert (run_dir / "model.npz").exists()


def test_settings_that_can_never_apply_a_round_are_refused_before_training(tmp_path):
    out = fedloom(*simulate_args(tmp_path, "server.min_updates=5"))
    assert out.returncode == 2
    assert out.stderr.startswith("fedloom: error: server.min_updates: a round needs 5 valid updates but asks only 4")
    assert list((tmp_path / "runs").iterdir()) == []  # no folder left behind by a run that never started


def test_an_unwritable_output_folder_is_found_before_training(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    start = time.perf_counter()
    out = fedloom(*simulate_args(tmp_path, "run.rounds=50", f"run.out_dir=\"{blocked}\""))
    assert out.returncode == 2 and out.stderr.startswith("fedloom: error: run.out_dir: cannot create the run folder")
    assert "round" not in out.stdout and time.perf_counter() - start < 60


def test_a_missing_ray_is_found_before_training(tmp_path):
    (tmp_path / "shadow" / "ray").mkdir(parents=True)
    (tmp_path / "shadow" / "ray" / "__init__.py").write_text("raise ImportError('no ray here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "shadow"), os.environ.get("PYTHONPATH", "")])}
    out = fedloom(*simulate_args(tmp_path, "engine.executor=\"ray\""), env=env)
    assert out.returncode == 2
    assert out.stderr.startswith("fedloom: error: engine.executor: the ray engine needs Ray: pip install")


def test_a_model_that_does_not_fit_the_data_is_found_before_training():
    cfg = load_config(None, SMALL)
    _, dataset = build_clients(cfg)
    work = TorchClientWork(lambda: nn.Sequential(nn.Flatten(), nn.Linear(5, 10)))  # digits have 64 features
    with pytest.raises(ConfigError, match=r"model: the model does not fit client 0's training data \(x float32 "
                                          r"\(1, 8, 8\), y int64\): RuntimeError: .*shapes cannot be multiplied"):
        check_fit(work, work.initial_params(0), dataset, dataset.test_union())


class Fragile(nn.Module):
    """Evaluates, but raises when it trains."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise ValueError("this layer cannot train")
        return self.linear(x)


def test_user_code_that_raises_is_said_once_with_the_client_and_where():
    cfg = load_config(None, SMALL)
    _, dataset = build_clients(cfg)
    work = TorchClientWork(Fragile)
    server = SyncServer(build_strategy(cfg, len(dataset)), len(dataset))
    state = server.init(work.initial_params(0))
    failures, said = Failures(), []
    for _ in range(3):
        result, state = train_round(server, state, InProcessTransport(work, dataset))
        said += failures.observe(result)
    first = next(iter(result.rejected.values()))
    assert first.startswith("client_failed: ValueError: this layer cannot train (at test_failures.py:")
    assert " in forward" in first
    refusals = [line for line in said if "client_failed" in line]
    assert len(refusals) == 1 and refusals[0].startswith("round 1: client ")
    assert failures.counts == {"client_failed": 12} and failures.rounds_unchanged == 3
    assert failures.verdict(3).startswith("no update was applied in the last 3 rounds: no valid update arrived")


def test_metrics_grow_as_rounds_complete_and_ctrl_c_keeps_the_rounds_done(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "fedloom.cli", *simulate_args(tmp_path, "run.rounds=100000")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            folders = list((tmp_path / "runs").iterdir())
            if folders and (folders[0] / "metrics.csv").exists() and len(rows(folders[0])) >= 3:
                break
            time.sleep(0.2)
        else:
            pytest.fail("metrics.csv did not grow while the run was going")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "fedloom: interrupted" in err
    run_dir = folders[0]
    done = rows(run_dir)
    assert len(done) >= 3 and [int(r["round"]) for r in done] == list(range(1, len(done) + 1))
    assert f"interrupted after round {len(done)}" in err
    with np.load(run_dir / "model.npz") as saved:
        assert len(saved.files) == 2 and (run_dir / "accuracy.png").exists()


def test_per_client_rows_on_request(tmp_path):
    out = fedloom(*simulate_args(tmp_path, "run.rounds=3", "run.client_metrics=true", "server.clients_per_round=4",
                                 "hetero.population=\"mobile\"", "hetero.over_select=1.5"))
    assert out.returncode == 0, out.stderr
    run_dir = next((tmp_path / "runs").iterdir())
    with open(run_dir / "clients.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["round", "client", "status", "loss", "loss_sq", "examples", "steps",
                             "seconds"]
    assert {r["round"] for r in table} == {"1", "2", "3"} and len(table) == 3 * 6  # 1.5 x 4 asked a round
    accepted = [r for r in table if r["status"] == "accepted"]
    assert len(accepted) == 3 * 4 and all(float(r["loss"]) > 0 and float(r["examples"]) > 0 for r in accepted)
    assert all(float(r["seconds"]) > 0 for r in accepted)  # each one's round trip on the simulated clock
    assert {r["status"] for r in table} - {"accepted"} == {"not_kept"} and all(
        r["loss"] == "" for r in table if r["status"] != "accepted")
    metrics = rows(run_dir)
    assert [int(r["accepted"]) for r in metrics] == [sum(r["round"] == str(k) and r["status"] == "accepted"
                                                          for r in table) for k in (1, 2, 3)]


def test_fedbuff_counts_the_buffered_updates_a_stage_refused(tmp_path):
    out = fedloom(*simulate_args(tmp_path, "run.rounds=6", "hetero.population=\"silo\"",
                                 "server.aggregation=\"fedbuff\"", "server.buffer_size=4", "attack.kind=\"scale\"",
                                 "attack.fraction=0.3", "attack.strength=1e9", "aggregation.max_norm=1000.0"))
    assert out.returncode == 0, out.stderr
    table = rows(next((tmp_path / "runs").iterdir()))
    refused = [int(r["rejected.max_norm"] or 0) for r in table]
    assert sum(refused) > 0  # the boosted updates, refused when their buffer was aggregated
    assert all(int(r["accepted"]) + n == 4 for r, n in zip(table, refused))
    assert all(not r.get("unchanged") for r, n in zip(table, refused) if n < 4)  # the model moved: not "unchanged"
