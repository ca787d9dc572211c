"""State that cannot be trusted is refused: a real ``fedloom server`` started on damaged state says which file
and what to do, exits 2, and changes nothing."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.attacks import Deployment
from fedloom.deploy.state import ServerState as StateStore


def _run(root: Path, rounds: int, kill_at: int | None = None) -> Deployment:
    root.mkdir()
    d = Deployment(root, rounds=rounds)
    d.start()
    if kill_at is None:
        assert d.server.wait(timeout=240) == 0, d.server.err[-3000:]
    else:
        d.wait_round(kill_at)
        os.kill(d.server.pid, signal.SIGKILL)
        d.server.wait()
    d.stop()
    return d


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Deployment:
    """A run of 4 rounds that completed."""
    return _run(tmp_path_factory.mktemp("finished") / "d", rounds=4)


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> Deployment:
    """A long run killed with SIGKILL after round 6: its last transactions are in server.db-wal."""
    d = _run(tmp_path_factory.mktemp("killed") / "d", rounds=100_000, kill_at=6)
    assert (d.state / "server.db-wal").stat().st_size > 0
    return d


def _snapshot(state: Path) -> dict[str, str]:
    return {str(p.relative_to(state)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(state.rglob("*")) if p.is_file() and not p.name.startswith("server.db")}


def restart(d: Deployment, tmp_path: Path, damage, *settings: str) -> tuple[subprocess.CompletedProcess, Path]:
    """Copy ``d``'s state, ``damage(copy)``, then start the server on it for more rounds (no client needed)."""
    state = tmp_path / "state"
    shutil.copytree(d.state, state)
    damage(state)
    before = _snapshot(state)
    args = ["--set", f'deploy.state_dir="{state}"', "--set", "run.rounds=50"]
    for s in settings:
        args += ["--set", s]
    done = subprocess.run([sys.executable, "-m", "fedloom.cli", "server", "--config", str(d.config), *args],
                          capture_output=True, text=True, timeout=120)
    assert _snapshot(state) == before  # no token re-issued, no checkpoint overwritten
    return done, state


def refused(done: subprocess.CompletedProcess, *words: str) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    line = next(line for line in done.stderr.splitlines() if line.startswith("fedloom: error:"))
    for w in words:
        assert w in line, line
    return line


def _drop_wal(state: Path) -> None:
    (state / "server.db-wal").unlink()
    (state / "server.db-shm").unlink(missing_ok=True)


def _cut_wal(state: Path) -> None:
    wal = state / "server.db-wal"
    with open(wal, "r+b") as f:
        f.truncate(wal.stat().st_size // 4)


def test_a_deleted_wal_is_refused_not_taken_for_a_new_run(killed, tmp_path):
    done, _ = restart(killed, tmp_path, _drop_wal)
    refused(done, "has lost", "Restore server.db and server.db-wal together from a backup")


def test_a_truncated_wal_is_refused(killed, tmp_path):
    done, _ = restart(killed, tmp_path, _cut_wal)
    refused(done, "has lost committed rounds", "server.db-wal deleted or truncated")


def test_the_killed_state_itself_resumes(killed, tmp_path):
    def nothing(state: Path) -> None:
        pass

    state = tmp_path / "state"
    shutil.copytree(killed.state, state)
    with StateStore(state / "server.db") as store:  # what kill -9 left is consistent: it would resume
        store.check_files()
        assert store.load_checkpoint(store.resume_run("attacked"))[0] >= 6


def _older_over_latest(state: Path) -> None:
    ckpt = state / "checkpoints" / "run-0001"
    (ckpt / "round-000004.npz").write_bytes((ckpt / "round-000002.npz").read_bytes())


def _nan_over_latest(state: Path) -> None:
    path = state / "checkpoints" / "run-0001" / "round-000004.npz"
    with np.load(path) as f:
        arrays = {k: np.full_like(f[k], np.nan) for k in f.files}
    np.savez(path, **arrays)


@pytest.mark.parametrize("damage", [_older_over_latest, _nan_over_latest])
def test_a_replaced_checkpoint_is_refused(finished, tmp_path, damage):
    done, state = restart(finished, tmp_path, damage)
    refused(done, str(state / "checkpoints" / "run-0001" / "round-000004.npz"), "is not the file written for round 4",
            "Restore it from a backup")


def test_a_changed_model_is_refused(finished, tmp_path):
    done, _ = restart(finished, tmp_path, lambda state: None, 'model.name="mlp"')
    refused(done, "was started with another model, optimizer or aggregation (model.name was 'logreg', now 'mlp')",
            "give the run a new run.name")


def test_a_checkpoint_that_does_not_fit_the_model_is_refused(finished, tmp_path):
    done, state = restart(finished, tmp_path, lambda state: None, 'data.dataset="digits"')  # 64 features, 10 classes
    refused(done, str(state / "checkpoints" / "run-0001" / "round-000004.npz"), "does not fit the configured model",
            "linear.weight is float32[2, 30] in it, float32[10, 64] in the model")


def test_state_files_are_private_to_the_servers_user(finished):
    state = finished.state
    for path in [state, state / "tokens", state / "checkpoints", state / "checkpoints" / "run-0001"]:
        assert path.stat().st_mode & 0o777 == 0o700, path
    for path in [state / "server.db", state / "tokens" / "c0.token",
                 state / "checkpoints" / "run-0001" / "round-000004.npz"]:
        assert path.stat().st_mode & 0o777 == 0o600, path


def test_client_names_that_leave_the_token_folder_are_refused(finished, tmp_path):
    done = subprocess.run([sys.executable, "-m", "fedloom.cli", "server", "--config", str(finished.config),
                           "--set", f'deploy.state_dir="{tmp_path / "state"}"', "--set", 'deploy.clients=["../../x"]'],
                          capture_output=True, text=True, timeout=120)
    refused(done, "deploy.clients: bad client name '../../x'")
    assert not (tmp_path / "state").exists() and not list(tmp_path.rglob("x.token"))


def test_a_server_without_tls_says_so(finished, tmp_path):
    server = subprocess.Popen([sys.executable, "-m", "fedloom.cli", "server", "--config", str(finished.config),
                               "--set", f'deploy.state_dir="{tmp_path / "state"}"', "--set", "deploy.tls=false"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 60
        while time.monotonic() < end:
            line = server.stderr.readline()
            if "deploy.tls = false" in line:
                assert "travel unencrypted" in line
                break
        else:
            raise AssertionError("no warning about TLS being off")
    finally:
        server.kill()
        server.wait()
