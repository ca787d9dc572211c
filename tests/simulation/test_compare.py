"""``compare_runs`` and ``fedloom compare`` on small fake run folders with known metrics."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fedloom
from fedloom.errors import DataError
from fedloom.simulation.compare import compare_runs, time_to_target
from fedloom.simulation.report import read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Two runs with device simulation (evaluated every other round in "fast"), one without: its
# sim_time_s column is there but empty, and it has no trips column at all.
RUNS = {
    "fast": [
        {"round": 1, "test_accuracy": "", "sim_time_s": 10, "trips": 4},
        {"round": 2, "test_accuracy": 0.30, "sim_time_s": 20, "trips": 8},
        {"round": 3, "test_accuracy": "", "sim_time_s": 30, "trips": 12},
        {"round": 4, "test_accuracy": 0.50, "sim_time_s": 40, "trips": 16},
    ],
    "slow": [
        {"round": 1, "test_accuracy": 0.10, "sim_time_s": 100, "trips": 6},
        {"round": 2, "test_accuracy": 0.20, "sim_time_s": 200, "trips": 12},
        {"round": 3, "test_accuracy": 0.35, "sim_time_s": 300, "trips": 18},
        {"round": 4, "test_accuracy": 0.45, "sim_time_s": 400, "trips": 24},
    ],
    "plain": [
        {"round": 1, "test_accuracy": 0.25, "sim_time_s": ""},
        {"round": 2, "test_accuracy": 0.40, "sim_time_s": ""},
        {"round": 3, "test_accuracy": 0.38, "sim_time_s": ""},
    ],
}


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    dirs = []
    for name, rows in RUNS.items():
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        with open(run / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) + ["train_loss"])
            writer.writeheader()
            writer.writerows(rows)
        dirs.append(run)
    return dirs


def test_time_to_target(runs):
    fast = read_metrics(runs[0] / "metrics.csv")
    assert time_to_target(fast, 0.3) == 20.0
    assert time_to_target(fast, 0.31) == 40.0  # round 3 is not evaluated
    assert time_to_target(fast, 0.31, x="round") == 4.0
    assert time_to_target(fast, 0.51) is None
    plain = read_metrics(runs[2] / "metrics.csv")
    assert time_to_target(plain, 0.4) is None  # sim_time_s is empty
    assert time_to_target(plain, 0.4, x="round") == 2.0
    assert time_to_target([{"round": 1.0, "test_accuracy": 0.9}], 0.5) is None  # no sim_time_s column
    assert time_to_target([{"round": 1.0, "test_accuracy": math.nan}], 0.0, x="round") is None


def test_compare_runs_default_target(runs, tmp_path):
    path, summaries = compare_runs(runs, out=tmp_path / "figs" / "cmp.png")
    assert path == tmp_path / "figs" / "cmp.png"
    assert path.read_bytes().startswith(PNG_MAGIC)
    # default target: the lowest best accuracy, 0.40 (plain's), reached by every run
    assert summaries == [
        {"run": "fast", "final_accuracy": 0.5, "best_accuracy": 0.5, "rounds": 4, "sim_time_s": 40.0, "trips": 16,
         "time_to_target_s": 40.0, "rounds_to_target": 4},
        {"run": "slow", "final_accuracy": 0.45, "best_accuracy": 0.45, "rounds": 4, "sim_time_s": 400.0,
         "trips": 24, "time_to_target_s": 400.0, "rounds_to_target": 4},
        {"run": "plain", "final_accuracy": 0.38, "best_accuracy": 0.4, "rounds": 3, "sim_time_s": None,
         "trips": None, "time_to_target_s": None, "rounds_to_target": 2},
    ]


def test_compare_runs_explicit_target_and_default_out(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, summaries = compare_runs(runs[1:], target=0.2)
    assert path == Path("compare.png")
    assert (tmp_path / "compare.png").read_bytes().startswith(PNG_MAGIC)
    assert [(s["time_to_target_s"], s["rounds_to_target"]) for s in summaries] == [(200.0, 2), (None, 1)]
    _, summaries = compare_runs(runs, target=0.46, out=tmp_path / "x.png")
    assert [(s["time_to_target_s"], s["rounds_to_target"]) for s in summaries] == [(40.0, 4), (None, None),
                                                                                    (None, None)]


def test_compare_runs_errors(runs, tmp_path):
    with pytest.raises(DataError, match="no run folder"):
        compare_runs([runs[0], tmp_path / "nope"], out=tmp_path / "x.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no metrics file"):
        compare_runs([tmp_path / "empty"], out=tmp_path / "x.png")
    with pytest.raises(DataError):
        compare_runs([], out=tmp_path / "x.png")


def fedloom_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    src = str(Path(fedloom.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "fedloom.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=60)


def test_cli_compare(runs, tmp_path):
    done = fedloom_cli("compare", *map(str, runs), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "fast: time-to-target 40.0 s (round 4), final accuracy 0.5000, 16 trips",
        "slow: time-to-target 400.0 s (round 4), final accuracy 0.4500, 24 trips",
        "plain: time-to-target n/a (round 2), final accuracy 0.3800, n/a trips",
        "wrote compare.png",
    ]
    assert (tmp_path / "compare.png").read_bytes().startswith(PNG_MAGIC)

    out = tmp_path / "c.png"
    done = fedloom_cli("compare", str(runs[0]), str(runs[1]), "--target", "0.46", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "fast: time-to-target 40.0 s (round 4), final accuracy 0.5000, 16 trips",
        "slow: time-to-target not reached, final accuracy 0.4500, 24 trips",
        f"wrote {out}",
    ]
    assert out.read_bytes().startswith(PNG_MAGIC)


def test_cli_compare_missing_run(runs, tmp_path):
    done = fedloom_cli("compare", str(runs[0]), str(tmp_path / "nope"), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip() == f"fedloom: error: no run folder at {tmp_path / 'nope'}"
