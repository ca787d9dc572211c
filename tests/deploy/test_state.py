"""The server's SQLite state: resume after a crash (also a real SIGKILL), atomic checkpoints, tokens, bad input."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import fedloom
from fedloom.deploy import state as state_mod
from fedloom.deploy.state import ServerState, hash_token
from fedloom.errors import FedloomError, ShapeError, StateError

NAMES = ["layer.weight", "layer.bias"]


def _params(scale: float) -> list[np.ndarray]:
    return [np.full((3, 2), scale, np.float32), np.arange(2, dtype=np.float64) * scale]


def _assert_params(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def _complete(st: ServerState, run: int, rnd: int) -> None:
    st.open_round(run, rnd)
    st.complete_round(run, rnd, _params(rnd), NAMES, {"loss": 1.0 / rnd, "accuracy": np.float32(0.5)})


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "server" / "state.db"


def test_runs_rounds_history(db):
    with ServerState(db) as st:
        run = st.start_run("mnist", "[server]\nrounds = 3\n")
        assert st.resume_run("mnist") == run and st.resume_run("other") is None
        assert st.run_config(run) == "[server]\nrounds = 3\n"
        assert st.last_completed_round(run) == 0 and st.load_checkpoint(run) is None
        for rnd in (1, 2):
            _complete(st, run, rnd)
        assert st.last_completed_round(run) == 2
        rnd, names, params = st.load_checkpoint(run)
        assert rnd == 2 and names == NAMES
        _assert_params(params, _params(2))
        hist = st.history(run)
        assert [h["round"] for h in hist] == [1, 2]
        assert hist[1]["metrics"] == {"loss": 0.5, "accuracy": 0.5}
        assert hist[0]["finished"] >= hist[0]["started"]
    assert (db.parent / "checkpoints" / f"run-{run:04d}" / "round-000002.npz").is_file()


def test_two_runs_keep_separate_checkpoints(db):
    with ServerState(db) as st:
        a, b = st.start_run("a", ""), st.start_run("b", "")
        _complete(st, a, 1)
        st.open_round(b, 1)
        st.complete_round(b, 1, _params(7), NAMES, {})
        _assert_params(st.load_checkpoint(a)[2], _params(1))
        _assert_params(st.load_checkpoint(b)[2], _params(7))


def test_resume_after_close_without_completing(db):
    st = ServerState(db)
    run = st.start_run("r", "")
    _complete(st, run, 1)
    st.open_round(run, 2)
    st.close()  # "crash": round 2 never completed
    with ServerState(db) as st:
        assert st.resume_run("r") == run
        assert st.last_completed_round(run) == 1
        rnd, names, params = st.load_checkpoint(run)
        assert (rnd, names) == (1, NAMES)
        _assert_params(params, _params(1))
        _complete(st, run, 2)  # the open round is started again and finishes
        assert st.last_completed_round(run) == 2


_CHILD = """
import sys, time
import numpy as np
from fedloom.deploy.state import ServerState
st = ServerState(sys.argv[1])
run = st.start_run("r", "")
st.open_round(run, 1)
st.complete_round(run, 1, [np.full((3, 2), 1.0, np.float32), np.arange(2.0)], ["layer.weight", "layer.bias"], {})
st.open_round(run, 2)

def hang(run_id, rnd, metrics_json, checkpoint, digest, applied):
    # round 2's checkpoint is on disk; the transaction marking it done is open but never commits
    conn = st._conn
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("UPDATE rounds SET status = 'done', checkpoint = ? WHERE run_id = ? AND round = ?",
                 (checkpoint, run_id, rnd))
    print("ready", flush=True)
    time.sleep(60)

st._mark_done = hang
st.complete_round(run, 2, [np.full((3, 2), 2.0, np.float32), np.arange(2.0) * 2], ["layer.weight", "layer.bias"], {})
"""


def test_resume_after_sigkill_mid_write(db):
    env = dict(os.environ, PYTHONPATH=str(Path(fedloom.__file__).parents[1]))
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(db)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=10)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert (db.parent / "checkpoints" / "run-0001" / "round-000002.npz").exists()  # written, never marked done
    with ServerState(db) as st:
        run = st.resume_run("r")
        assert st.last_completed_round(run) == 1
        rnd, names, params = st.load_checkpoint(run)
        assert (rnd, names) == (1, NAMES)
        _assert_params(params, _params(1))
        _complete(st, run, 2)
        _assert_params(st.load_checkpoint(run)[2], _params(2))


def test_leftover_temp_files_are_ignored(db):
    with ServerState(db) as st:
        run = st.start_run("r", "")
        _complete(st, run, 1)
        st.open_round(run, 2)
        ckpt_dir = db.parent / "checkpoints" / "run-0001"
        (ckpt_dir / "round-000002.tmp-999-deadbeef.npz").write_bytes(b"PK\x03\x04 half a zip")  # crash mid-write
        (ckpt_dir / "round-000002.npz").write_bytes(b"garbage")  # renamed into place, never marked done
        rnd, _, params = st.load_checkpoint(run)
        assert rnd == 1
        _assert_params(params, _params(1))
        st.complete_round(run, 2, _params(2), NAMES, {})
        _assert_params(st.load_checkpoint(run)[2], _params(2))


def test_failed_checkpoint_write_leaves_round_open(db, monkeypatch):
    with ServerState(db) as st:
        run = st.start_run("r", "")
        _complete(st, run, 1)
        st.open_round(run, 2)

        def broken_replace(src, dst):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(state_mod.os, "replace", broken_replace)
        with pytest.raises(StateError, match="cannot write checkpoint"):
            st.complete_round(run, 2, _params(2), NAMES, {})
        monkeypatch.undo()
        assert st.last_completed_round(run) == 1
        assert sorted(p.name for p in (db.parent / "checkpoints" / "run-0001").iterdir()) == ["round-000001.npz"]
        st.complete_round(run, 2, _params(2), NAMES, {})
        assert st.last_completed_round(run) == 2


def test_bad_round_calls(db):
    with ServerState(db) as st:
        run = st.start_run("r", "")
        with pytest.raises(StateError, match="already exists"):
            st.start_run("r", "")
        for call in (lambda: st.last_completed_round(42), lambda: st.open_round(42, 1),
                     lambda: st.load_checkpoint(42), lambda: st.history(42)):
            with pytest.raises(StateError, match="no run with id 42"):
                call()
        with pytest.raises(StateError, match="next round is 1"):
            st.open_round(run, 2)
        with pytest.raises(StateError, match="numbered from 1"):
            st.open_round(run, 0)
        with pytest.raises(StateError, match="never opened"):
            st.complete_round(run, 1, _params(1), NAMES, {})
        _complete(st, run, 1)
        with pytest.raises(StateError, match="already done"):
            st.complete_round(run, 1, _params(9), NAMES, {})
        with pytest.raises(StateError, match="already done"):
            st.open_round(run, 1)
        _assert_params(st.load_checkpoint(run)[2], _params(1))  # the done round's checkpoint is untouched
        st.open_round(run, 2)
        with pytest.raises(ShapeError, match="2 arrays but 1 names"):
            st.complete_round(run, 2, _params(2), ["w"], {})
        with pytest.raises(StateError, match="JSON"):
            st.complete_round(run, 2, _params(2), NAMES, {"bad": object()})
        assert st.last_completed_round(run) == 1


def test_corrupt_or_missing_checkpoint(db):
    with ServerState(db) as st:
        run = st.start_run("r", "")
        _complete(st, run, 1)
        path = db.parent / "checkpoints" / "run-0001" / "round-000001.npz"
        data = bytearray(path.read_bytes())
        data[len(data) // 3] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.raises(StateError, match="round-000001.npz is not the file written for round 1 .its SHA-256"):
            st.load_checkpoint(run)
        path.unlink()
        with pytest.raises(StateError, match="is missing"):
            st.load_checkpoint(run)


def test_tokens(db):
    with ServerState(db) as st:
        alice_id, alice_token = st.enroll("alice")
        bob_id, bob_token = st.enroll("bob")
        assert (alice_id, bob_id) == (0, 1) and alice_token != bob_token
        assert st.authenticate(alice_token) == (0, "alice")
        assert st.authenticate(bob_token) == (1, "bob")
        assert st.authenticate("not-a-token") is None and st.authenticate("") is None
        with pytest.raises(StateError, match="already enrolled"):
            st.enroll("alice")
        st.revoke("bob")
        assert st.authenticate(bob_token) is None
        with pytest.raises(StateError, match="no enrolled client"):
            st.revoke("carol")
        st.touch(alice_id)
        with pytest.raises(StateError, match="no enrolled client with id 7"):
            st.touch(7)
        listed = {c["name"]: c for c in st.clients()}
        assert listed["alice"]["last_seen"] is not None and listed["bob"]["last_seen"] is None
        assert listed["bob"]["revoked"] and not listed["alice"]["revoked"]
        assert "token_hash" not in listed["alice"]
        again_id, new_token = st.enroll("bob", reissue=True)
        assert again_id == bob_id and st.authenticate(new_token) == (1, "bob") and st.authenticate(bob_token) is None
    raw = b"".join(p.read_bytes() for p in db.parent.iterdir() if p.name.startswith("state.db"))
    for token in (alice_token, bob_token, new_token):
        assert token.encode() not in raw
    assert hash_token(alice_token).encode() in raw


def test_concurrent_threads(db):
    with ServerState(db) as st:
        ids = [st.enroll(f"c{i}") for i in range(4)]
        errors: list[BaseException] = []

        def work(cid: int, token: str) -> None:
            try:
                for _ in range(20):
                    assert st.authenticate(token) is not None
                    st.touch(cid)
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=work, args=pair) for pair in ids]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert all(c["last_seen"] is not None for c in st.clients())


def test_corrupt_database_file(tmp_path):
    bad = tmp_path / "state.db"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(StateError, match=str(bad)) as err:
        ServerState(bad)
    assert isinstance(err.value, FedloomError) and err.value.code == "bad_state"


def test_foreign_sqlite_database(tmp_path):
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
    conn.close()
    with pytest.raises(StateError, match="not a fedloom state database"):
        ServerState(other)


def test_closed_state(db):
    st = ServerState(db)
    st.close()
    st.close()
    with pytest.raises(StateError, match="is closed"):
        st.clients()


def test_a_replaced_checkpoint_is_refused_by_its_digest(db):
    with ServerState(db) as st:
        run = st.start_run("r", "")
        for rnd in (1, 2):
            _complete(st, run, rnd)
        ckpt = db.parent / "checkpoints" / "run-0001"
        (ckpt / "round-000002.npz").write_bytes((ckpt / "round-000001.npz").read_bytes())  # an older one copied over
        with pytest.raises(StateError, match="round-000002.npz is not the file written for round 2"):
            st.load_checkpoint(run)
        np.savez(ckpt / "round-000002.npz", **dict(zip(NAMES, [np.full((3, 2), np.nan, np.float32), np.zeros(2)])))
        with pytest.raises(StateError, match="not the file written for round 2"):  # valid .npz, full of NaN
            st.load_checkpoint(run)


def test_a_checkpoint_holding_nan_is_not_resumed(db):
    with ServerState(db) as st:
        run = st.start_run("r", "")
        st.open_round(run, 1)
        st.complete_round(run, 1, [np.full((3, 2), np.nan, np.float32), np.zeros(2)], NAMES, {})
        with pytest.raises(StateError, match="round-000001.npz of round 1 holds NaN or Inf .in layer.weight."):
            st.load_checkpoint(run)


def test_checkpoints_the_database_does_not_account_for_are_refused(db):
    with ServerState(db) as st:
        run = st.start_run("r", "")
        for rnd in range(1, 6):
            _complete(st, run, rnd)
        st.check_files()  # all accounted for
        st._conn.execute("DELETE FROM rounds WHERE round > 2")  # as if the WAL holding rounds 3-5 were cut off
        with pytest.raises(StateError, match="round-000005.npz exists but .* records run 'r' only up to round 2: the "
                                             "database has lost committed rounds"):
            st.check_files()
        st._conn.execute("DELETE FROM rounds")
        st._conn.execute("DELETE FROM runs")
        with pytest.raises(StateError, match="run-0001 holds checkpoints up to round 5 but .* records no run with id"):
            st.check_files()


def test_the_round_after_the_last_done_may_have_a_checkpoint(db):
    with ServerState(db) as st:  # written, then the server crashed before marking the round done
        run = st.start_run("r", "")
        _complete(st, run, 1)
        st.open_round(run, 2)
        np.savez(db.parent / "checkpoints" / "run-0001" / "round-000002.npz", **dict(zip(NAMES, _params(2))))
        st.check_files()


def test_state_files_are_private(db):
    with ServerState(db) as st:
        run = st.start_run("r", "")
        _complete(st, run, 1)
        files = [db, db.with_name(db.name + "-wal"), db.parent / "checkpoints" / "run-0001" / "round-000001.npz"]
        assert [oct(p.stat().st_mode & 0o777) for p in files] == ["0o600"] * 3
        dirs = [db.parent, db.parent / "checkpoints", db.parent / "checkpoints" / "run-0001"]
        assert [oct(p.stat().st_mode & 0o777) for p in dirs] == ["0o700"] * 3


def test_a_schema_1_database_is_migrated(db):
    with ServerState(db) as st:
        run = st.start_run("r", "")
        _complete(st, run, 1)
        st._conn.execute("ALTER TABLE rounds DROP COLUMN checkpoint_sha256")
        st._conn.execute("PRAGMA user_version = 1")
    with ServerState(db) as st:
        assert st._conn.execute("PRAGMA user_version").fetchone()[0] == 4
        assert st.tasks(run) == [] and st.presence(run) == {} and st.buffered(run) == []  # later schemas' tables
        _assert_params(st.load_checkpoint(run)[2], _params(1))  # no digest was recorded for it: read as before
        _complete(st, run, 2)
        path = db.parent / "checkpoints" / "run-0001" / "round-000002.npz"
        path.write_bytes(path.read_bytes() + b"\0")
        with pytest.raises(StateError, match="SHA-256"):
            st.load_checkpoint(run)
