"""The ``fedloom`` command in a real subprocess, on a tiny config."""

import json
import subprocess
import sys
from pathlib import Path

TINY = """
[run]
name = "tiny"
rounds = 3
out_dir = "{out}"

[data]
dataset = "shakespeare"
num_clients = 8

[model]
hidden_size = 16

[client]
max_steps = 2

[server]
clients_per_round = 4

[eval]
every = 2
max_examples = 40
federated_clients = 3
"""


def fedloom(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fedloom.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_simulate_then_report(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY.format(out=tmp_path / "runs"))
    done = fedloom("simulate", str(config), "--rounds", "2", "--set", "client.lr=0.5", "--quiet", "--profile",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary, profile = done.stdout.splitlines()
    assert summary.startswith("tiny: 2 rounds, final test accuracy") and " engine) -> " in summary
    (run,) = (tmp_path / "runs").iterdir()
    assert str(run) in summary
    timings = json.loads((run / "timings.json").read_text())
    assert 0.1 < timings["start"] < timings["total"]  # the interpreter and the imports, before the run began
    assert profile == f"where the time went (timings.json): total {timings['total']:.2f} s = " + " + ".join(
        f"{k} {v:.2f}" for k, v in timings.items() if k != "total" and v >= 0.005)
    assert 'lr = 0.5' in (run / "config.toml").read_text() and "rounds = 2" in (run / "config.toml").read_text()
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[2].split(",")[3] != ""  # evaluated after the last round
    (run / "accuracy.png").unlink()
    done = fedloom("report", str(run), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (run / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_config_value_names_the_key_before_training(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY.format(out=tmp_path / "runs"))
    done = fedloom("simulate", str(config), "--set", "client.lr=-1", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == "fedloom: error: client.lr: must be > 0, got -1.0"
    assert not (tmp_path / "runs").exists()
    done = fedloom("report", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert done.returncode == 2 and "no run folder" in done.stderr


def test_readme_example_runs():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = readme.split("## A custom client update and strategy in 20 lines")[1].split("```python\n")[1].split("```")[0]
    assert len(code.strip().splitlines()) <= 25
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("round 20: client loss")


def test_privacy_chooses_the_noise_for_a_target_epsilon(tmp_path):
    from fedloom.stages.privacy import Accountant

    config = tmp_path / "tiny.toml"
    config.write_text(TINY.format(out=tmp_path / "runs"))
    done = fedloom("privacy", str(config), "--epsilon", "4", "--set", "privacy.delta=1e-4", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    z = float(done.stdout.split("noise_multiplier = ")[1].split()[0])
    assert "3 rounds (4 of 8 clients a round, drawn without replacement)" in done.stdout
    assert Accountant(z, "fixed", 8, 4, 1e-4).epsilon(3) <= 4.0 < Accountant(z * 0.95, "fixed", 8, 4, 1e-4).epsilon(3)
