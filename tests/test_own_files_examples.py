"""The examples of data from a user's own files: a CSV with a site column, and a CNN on a folder of per-site images."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples" / "own_files"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("own_files")
    done = subprocess.run([sys.executable, str(EXAMPLES / "make_files.py"), str(out)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize("example, data, least", [("clinics.toml", "clinics.csv", 0.85), ("scans.toml", "scans", 0.5)])
def test_the_example_runs_as_written(files, example, data, least, tmp_path):
    out = subprocess.run([sys.executable, "-m", "fedloom.cli", "simulate", str(EXAMPLES / example), "--quiet",
                          "--rounds", "10", "--set", f"data.path=\"{files / data}\"", "--set",
                          f"run.out_dir=\"{tmp_path}\""], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.split("final test accuracy ")[1].split()[0]) > least
