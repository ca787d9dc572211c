"""Starting points: `fedloom --version`, `fedloom init` (every default), `fedloom init --project` (runs as written)."""

import subprocess
import sys
import tomllib
from pathlib import Path

from fedloom.config import Config, load_config


def fedloom(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fedloom.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_version_is_the_package_version():
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    out = fedloom("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"fedloom {project['project']['version']}"


def test_init_writes_every_default_and_keeps_an_existing_file(tmp_path):
    path = tmp_path / "defaults.toml"
    assert fedloom("init", str(path)).returncode == 0
    assert load_config(path) == Config() and "# local SGD learning rate" in path.read_text()
    again = fedloom("init", str(path))
    assert again.returncode == 2 and "exists; choose another name" in again.stderr


def test_init_project_runs_as_written(tmp_path):
    folder = tmp_path / "mine"
    assert fedloom("init", "--project", str(folder)).returncode == 0
    assert sorted(p.name for p in folder.iterdir()) == ["config.toml", "data.py", "model.py"]
    out = fedloom("simulate", "config.toml", "--quiet", "--rounds", "5", cwd=folder)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.split("final test accuracy ")[1].split()[0]) > 0.5  # four classes
    assert len(list((folder / "runs").iterdir())) == 1
    refused = fedloom("init", "--project", str(folder))
    assert refused.returncode == 2 and "is not empty" in refused.stderr
