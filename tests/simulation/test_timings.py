"""Where a run's time went (``timings.json``), and the forked helper that draws the plot while the run goes on."""

import json
import multiprocessing as mp
import os
import signal

import pytest

from fedloom.config import load_config
from fedloom.simulation.plotter import Plotter
from fedloom.simulation.pool import START_METHOD
from fedloom.simulation.runner import simulate
from fedloom.simulation.timings import PHASES

TINY = ["data.dataset=\"synthetic\"", "data.num_clients=20", "model.name=\"logreg\"", "server.clients_per_round=5",
        "run.rounds=3", "eval.every=1"]


def test_a_run_folder_says_where_its_time_went(tmp_path):
    result = simulate(load_config(None, [*TINY, f"run.out_dir=\"{tmp_path}\""]), progress=False)
    saved = json.loads((result.run_dir / "timings.json").read_text())
    assert saved == result.timings and list(saved) == [*PHASES, "other", "total"]
    assert all(v >= 0 for v in saved.values())
    assert saved["train"] == pytest.approx(result.train_s, abs=0.01)
    assert saved["train"] > 0 and saved["evaluate"] > 0 and saved["plot"] > 0 and saved["write"] > 0
    assert saved["start"] == 0  # from Python the process is not the run's: its age says nothing of the run
    assert sum(v for k, v in saved.items() if k != "total") == pytest.approx(saved["total"], abs=0.01)


@pytest.mark.skipif(START_METHOD != "fork", reason="the plot helper is a fork of the run")
def test_the_plot_helper_ends_with_the_run_and_a_dead_helper_is_replaced_by_drawing_here(tmp_path):
    run = simulate(load_config(None, [*TINY, f"run.out_dir=\"{tmp_path}\""]), progress=False).run_dir
    assert (run / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in mp.active_children() if p.name == "fedloom-plot"]
    (run / "accuracy.png").unlink()
    plotter = Plotter()
    os.kill(plotter.process.pid, signal.SIGKILL)
    assert plotter.draw(run) == run / "accuracy.png"
    assert (run / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert plotter.process is None and plotter.conn is None


def test_a_run_that_fails_before_training_leaves_no_plot_helper_behind(tmp_path):
    from fedloom.errors import ConfigError

    with pytest.raises(ConfigError):
        simulate(load_config(None, [*TINY, "server.clients_per_round=50", f"run.out_dir=\"{tmp_path}\""]),
                 progress=False)
    assert not [p for p in mp.active_children() if p.name == "fedloom-plot"]
    assert not list(tmp_path.iterdir())
