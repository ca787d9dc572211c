"""The cross-silo example's one command: certificates, a server and three hospitals with mutual TLS."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "examples" / "hospitals" / "run.py"


def test_hospitals_example_runs_end_to_end(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rounds = [line for line in done.stdout.splitlines() if line.startswith("round ")]
    assert len(rounds) == 10 and all("3 updates" in line for line in rounds)
    assert "test accuracy" not in done.stdout  # the server holds no data: each hospital tests on its own
    assert float(rounds[-1].split("federated accuracy ")[1].split(",")[0]) > 0.9
    data = tmp_path / "runs" / "hospitals-data"  # each hospital's own file, in its own format
    assert sorted(p.name for p in data.iterdir()) == ["general.npz", "st-mary.csv", "university.tsv"]
    assert (tmp_path / "runs" / "hospitals-pki" / "clients" / "general.pem").exists()
    assert "hospital clients exit [0, 0, 0]" in done.stdout
