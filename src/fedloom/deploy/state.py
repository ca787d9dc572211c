"""The deployed server's crash-safe state: runs, rounds, checkpoints and the client registry, in SQLite.

One database file (WAL journal, ``synchronous=FULL``) holds:

* ``runs``: one row per named run with its configuration (TOML text);
* ``rounds``: per run and round, ``open`` or ``done``, timestamps, metrics (JSON) and the checkpoint file;
* ``clients``: enrolled clients, each with a dense ``client_id`` (0, 1, 2, ...), the SHA-256 hash of its
  token (never the token), and whether it is revoked;
* ``tasks``: what the server measured of every task it sent (``transport/dispatch.Measured``: seconds to
  hand it over, the client's seconds, seconds for its reply, bytes each way, examples, outcome), written
  with each completed round;
* ``presence``: the intervals in which each client was connected (wall-clock seconds);
* ``updates``: the asynchronous server's journal (``deploy/journal.py``): each accepted update's task, client,
  the model version it trained on, its weight and metrics, the file holding its change, and the server update
  that used it (NULL while it waits in the buffer), marked in the transaction that marks that update done;
* ``counters``: per run, numbers that must only grow across restarts (the asynchronous server's task numbers).

Model checkpoints are ``.npz`` files (written by :func:`fedloom.paramfiles.save_params`, read
without unpickling) under ``checkpoints/run-NNNN/round-NNNNNN.npz`` next to the database.
:meth:`ServerState.complete_round` first writes the checkpoint atomically (temp file, fsync,
``os.replace``, fsync of the directory) and only then marks the round done in one transaction. A crash
between the two leaves the round open, so the next start resumes from the previous done round's
checkpoint; stray temp files and checkpoints of rounds not marked done are never read.

Every failure on purpose is a :class:`StateError` (or :class:`~fedloom.errors.ShapeError` for bad
parameters), never a raw ``sqlite3`` error. One connection is shared by all threads behind a lock.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from fedloom.deploy.certs import issue_token
from fedloom.errors import ShapeError, StateError
from fedloom.paramfiles import load_params, save_params
from fedloom.params import Params
from fedloom.transport.dispatch import Measured

SCHEMA_VERSION = 4  # 2: rounds.checkpoint_sha256; 3: tasks, presence; 4: updates, counters
APPLICATION_ID = 0x466C6F6D  # "Flom": marks the SQLite file as a fedloom state database
_TABLES = (
    """CREATE TABLE IF NOT EXISTS runs (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        config_toml TEXT NOT NULL,
        created REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS rounds (
        run_id INTEGER NOT NULL REFERENCES runs(id),
        round INTEGER NOT NULL CHECK (round >= 1),
        status TEXT NOT NULL CHECK (status IN ('open', 'done')),
        started REAL NOT NULL,
        finished REAL,
        metrics_json TEXT,
        checkpoint TEXT,
        checkpoint_sha256 TEXT,
        PRIMARY KEY (run_id, round)
    )""",
    """CREATE TABLE IF NOT EXISTS clients (
        client_id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        token_hash TEXT NOT NULL UNIQUE,
        enrolled REAL NOT NULL,
        revoked INTEGER NOT NULL DEFAULT 0 CHECK (revoked IN (0, 1)),
        last_seen REAL
    )""",
    """CREATE TABLE IF NOT EXISTS tasks (
        run_id INTEGER NOT NULL REFERENCES runs(id),
        round INTEGER NOT NULL,
        client_id INTEGER NOT NULL,
        kind TEXT NOT NULL,
        outcome TEXT NOT NULL,
        sent_at REAL,
        down_s REAL,
        work_s REAL,
        up_s REAL,
        down_bytes INTEGER NOT NULL,
        up_bytes INTEGER NOT NULL,
        examples REAL NOT NULL,
        flops_per_example REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS presence (
        run_id INTEGER NOT NULL REFERENCES runs(id),
        client_id INTEGER NOT NULL,
        start REAL NOT NULL,
        end REAL NOT NULL,
        PRIMARY KEY (run_id, client_id, start)
    )""",
    """CREATE TABLE IF NOT EXISTS updates (
        task_id TEXT PRIMARY KEY,
        run_id INTEGER NOT NULL REFERENCES runs(id),
        client_id INTEGER NOT NULL,
        dispatch INTEGER NOT NULL,
        version_sent INTEGER NOT NULL,
        weight REAL NOT NULL,
        metrics_json TEXT NOT NULL,
        file TEXT NOT NULL,
        slot INTEGER NOT NULL,
        received REAL NOT NULL,
        applied INTEGER
    )""",
    """CREATE TABLE IF NOT EXISTS counters (
        run_id INTEGER NOT NULL REFERENCES runs(id),
        name TEXT NOT NULL,
        value INTEGER NOT NULL,
        PRIMARY KEY (run_id, name)
    )""",
)
JOURNAL_COLUMNS = ("task_id", "client_id", "dispatch", "version_sent", "weight", "metrics_json", "file", "slot")
TASK_COLUMNS = ("round", "client_id", "kind", "outcome", "sent_at", "down_s", "work_s", "up_s", "down_bytes",
                "up_bytes", "examples", "flops_per_example")


_LOST = ("the database has lost committed rounds (was server.db-wal deleted or truncated, or an older copy "
         "restored?). Restore server.db and server.db-wal together from a backup; to start over, move the state "
         "folder aside")


def hash_token(token: str) -> str:
    """The hex SHA-256 of a token: what the registry stores instead of the token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class ServerState:
    """The server's durable state in the SQLite database at ``path`` (created when missing)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoint_dir = self.path.parent / "checkpoints"
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = _connect(self.path)

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the database (idempotent). Nothing uncommitted exists between calls, so nothing is lost."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> ServerState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- runs and rounds -------------------------------------------------------------------------

    def start_run(self, name: str, config_toml: str) -> int:
        """Record a new run and return its id; a run of that name must not exist yet (see :meth:`resume_run`)."""
        if not isinstance(name, str) or not name.strip():
            raise StateError(f"a run needs a non-empty name, got {name!r}", stage="state")
        if not isinstance(config_toml, str):
            raise StateError("config_toml must be TOML text", stage="state")
        with self._tx("start run") as conn:
            row = conn.execute("SELECT id FROM runs WHERE name = ?", (name,)).fetchone()
            if row is not None:
                raise StateError(f"run {name!r} already exists (id {row[0]}); resume it with resume_run",
                                 stage="state")
            return int(conn.execute("INSERT INTO runs (name, config_toml, created) VALUES (?, ?, ?)",
                                    (name, config_toml, time.time())).lastrowid)

    def resume_run(self, name: str) -> int | None:
        """The id of the run called ``name``, or None when there is none."""
        row = self._one("SELECT id FROM runs WHERE name = ?", (name,))
        return None if row is None else int(row[0])

    def run_config(self, run_id: int) -> str:
        """The configuration (TOML text) a run was started with."""
        with self._tx("read run", write=False) as conn:
            self._check_run(conn, run_id)
            return str(conn.execute("SELECT config_toml FROM runs WHERE id = ?", (run_id,)).fetchone()[0])

    def last_completed_round(self, run_id: int) -> int:
        """The highest round of the run marked done; 0 before the first."""
        with self._tx("read rounds", write=False) as conn:
            self._check_run(conn, run_id)
            return _last_done(conn, run_id)

    def open_round(self, run_id: int, round: int) -> None:
        """Mark ``round`` (which must be the last completed round + 1) as started.

        Opening a round that is already open (the server crashed during it) starts it again.
        """
        _check_round_number(round)
        with self._tx("open round") as conn:
            self._check_run(conn, run_id)
            status = _round_status(conn, run_id, round)
            if status == "done":
                raise StateError(f"round {round} of run {run_id} is already done", stage="state")
            expected = _last_done(conn, run_id) + 1
            if round != expected:
                raise StateError(f"cannot open round {round} of run {run_id}: the next round is {expected}",
                                 stage="state")
            if status == "open":
                conn.execute("UPDATE rounds SET started = ? WHERE run_id = ? AND round = ?",
                             (time.time(), run_id, round))
            else:
                conn.execute("INSERT INTO rounds (run_id, round, status, started) VALUES (?, ?, 'open', ?)",
                             (run_id, round, time.time()))

    def complete_round(self, run_id: int, round: int, params: Params, names: list[str],
                       metrics: dict[str, Any], applied: Sequence[str] = ()) -> None:
        """Checkpoint ``params`` (keyed by ``names``) for an open round, then mark the round done.

        The checkpoint is durable on disk before the transaction that marks the round done commits;
        that transaction also marks the journaled updates ``applied`` (task ids) as used by this round.
        """
        _check_round_number(round)
        _check_params(params, names)
        metrics_json = _metrics_json(metrics)
        with self._tx("check round", write=False) as conn:
            self._check_open(conn, run_id, round)
        path = self.checkpoint_path(run_id, round)
        digest = self._write_checkpoint(path, params, names)
        self._mark_done(run_id, round, metrics_json, path.relative_to(self.checkpoint_dir).as_posix(), digest,
                        applied)

    def checkpoint_path(self, run_id: int, round: int) -> Path:
        """Where the checkpoint of ``round`` of run ``run_id`` is written."""
        return self.checkpoint_dir / f"run-{run_id:04d}" / f"round-{round:06d}.npz"

    def load_checkpoint(self, run_id: int) -> tuple[int, list[str], Params] | None:
        """``(round, names, params)`` of the latest done round, or None when no round is done.

        The file must have the SHA-256 digest recorded when the round was marked done (rounds
        recorded by schema 1 have none), and hold only finite numbers; else :class:`StateError`.
        """
        with self._tx("read checkpoint", write=False) as conn:
            self._check_run(conn, run_id)
            row = conn.execute("SELECT round, checkpoint, checkpoint_sha256 FROM rounds WHERE run_id = ? AND "
                               "status = 'done' ORDER BY round DESC LIMIT 1", (run_id,)).fetchone()
        if row is None:
            return None
        round, path = int(row[0]), self.checkpoint_dir / row[1]
        names, params = _read_checkpoint(path, round, row[2])
        bad = [n for n, a in zip(names, params) if a.dtype.kind in "fc" and not np.isfinite(a).all()]
        if bad:
            raise StateError(f"checkpoint {path} of round {round} holds NaN or Inf (in {', '.join(bad[:3])}): it "
                             "cannot be resumed. Restore it from a backup, or move the state folder aside and start "
                             "afresh", stage="checkpoint")
        return round, names, params

    def check_files(self) -> None:
        """Refuse a database that has lost committed rounds: checkpoint files it does not account for.

        A checkpoint of the round after the last done one is expected (the server may crash between
        writing it and marking the round done); any later one, or a run folder of a run the
        database does not know, means the database is older than its files (its WAL was deleted or
        truncated, or an old copy was restored): resuming would silently redo or overwrite rounds.
        """
        if not self.checkpoint_dir.is_dir():
            return
        with self._tx("read runs", write=False) as conn:
            runs = {int(i): (str(n), _last_done(conn, int(i))) for i, n in conn.execute("SELECT id, name FROM runs")}
        for folder in sorted(self.checkpoint_dir.glob("run-*")):
            run_id = int(folder.name[4:]) if folder.name[4:].isdigit() else None
            files = sorted(folder.glob("round-*.npz"))
            rounds = [int(f.stem[6:]) for f in files if f.stem[6:].isdigit()]
            if not rounds:
                continue
            if run_id not in runs:
                known = "no run" if run_id is None else f"no run with id {run_id}"
                raise StateError(f"{folder} holds checkpoints up to round {max(rounds)} but {self.path} records "
                                 f"{known}: {_LOST}", stage="state")
            name, done = runs[run_id]
            if max(rounds) > done + 1:
                late = folder / f"round-{max(rounds):06d}.npz"
                raise StateError(f"{late} exists but {self.path} records run {name!r} only up to round {done}: "
                                 f"{_LOST}", stage="state")

    def history(self, run_id: int) -> list[dict[str, Any]]:
        """Done rounds in order: ``{"round", "started", "finished", "metrics"}`` each."""
        with self._tx("read history", write=False) as conn:
            self._check_run(conn, run_id)
            rows = conn.execute("SELECT round, started, finished, metrics_json FROM rounds "
                                "WHERE run_id = ? AND status = 'done' ORDER BY round", (run_id,)).fetchall()
        return [{"round": r, "started": s, "finished": f, "metrics": json.loads(m)} for r, s, f, m in rows]

    # -- what the server measured ------------------------------------------------------------------

    def record_tasks(self, run_id: int, tasks: Sequence[Measured], flops_per_example: float,
                     presence: dict[int, list[tuple[float, float]]]) -> None:
        """Add the measured ``tasks`` (their training cost ``flops_per_example``) and bring each client's connected
        intervals up to date (an interval is keyed by its start: one that grew is rewritten), in one transaction."""
        rows = [(run_id, m.round, m.client_id, m.kind, m.outcome, *(_finite_or_none(v) for v in (
            m.sent_at, m.down_s, m.work_s, m.up_s)), int(m.down_bytes), int(m.up_bytes), float(m.examples),
            float(flops_per_example)) for m in tasks]
        spans = [(run_id, c, float(a), float(b)) for c, pairs in presence.items() for a, b in pairs]
        with self._tx("record what was measured") as conn:
            self._check_run(conn, run_id)
            conn.executemany(f"INSERT INTO tasks (run_id, {', '.join(TASK_COLUMNS)}) VALUES "
                             f"({', '.join('?' * (len(TASK_COLUMNS) + 1))})", rows)
            conn.executemany("INSERT OR REPLACE INTO presence (run_id, client_id, start, end) VALUES (?, ?, ?, ?)",
                             spans)

    def tasks(self, run_id: int) -> list[dict[str, Any]]:
        """Every measured task of the run, in the order recorded (None: a part that did not happen)."""
        with self._tx("read tasks", write=False) as conn:
            self._check_run(conn, run_id)
            rows = conn.execute(f"SELECT {', '.join(TASK_COLUMNS)} FROM tasks WHERE run_id = ? ORDER BY rowid",
                                (run_id,)).fetchall()
        return [dict(zip(TASK_COLUMNS, r, strict=True)) for r in rows]

    def presence(self, run_id: int) -> dict[int, list[tuple[float, float]]]:
        """Each client's connected intervals (wall-clock seconds), in order."""
        with self._tx("read presence", write=False) as conn:
            self._check_run(conn, run_id)
            rows = conn.execute("SELECT client_id, start, end FROM presence WHERE run_id = ? ORDER BY client_id, "
                                "start", (run_id,)).fetchall()
        out: dict[int, list[tuple[float, float]]] = {}
        for c, a, b in rows:
            out.setdefault(int(c), []).append((float(a), float(b)))
        return out

    # -- the asynchronous server's journal -----------------------------------------------------------

    def journal_updates(self, run_id: int, rows: Sequence[tuple[Any, ...]]) -> None:
        """Record accepted updates (:data:`JOURNAL_COLUMNS` each; their file is already durable), in one transaction."""
        with self._tx("journal updates") as conn:
            self._check_run(conn, run_id)
            conn.executemany(f"INSERT INTO updates (run_id, received, {', '.join(JOURNAL_COLUMNS)}) VALUES "
                             f"({', '.join('?' * (len(JOURNAL_COLUMNS) + 2))})",
                             [(run_id, time.time(), *r) for r in rows])

    def buffered(self, run_id: int) -> list[dict[str, Any]]:
        """The journaled updates no done round used, in the order they were accepted."""
        with self._tx("read the journal", write=False) as conn:
            self._check_run(conn, run_id)
            rows = conn.execute(f"SELECT {', '.join(JOURNAL_COLUMNS)} FROM updates WHERE run_id = ? AND applied IS "
                                "NULL ORDER BY rowid", (run_id,)).fetchall()
        return [dict(zip(JOURNAL_COLUMNS, r, strict=True)) for r in rows]

    def journaled(self, run_id: int, limit: int) -> list[tuple[str, int]]:
        """The latest ``limit`` journaled updates' ``(task_id, client_id)``, oldest first."""
        with self._tx("read the journal", write=False) as conn:
            rows = conn.execute("SELECT task_id, client_id FROM updates WHERE run_id = ? ORDER BY rowid DESC "
                                "LIMIT ?", (run_id, limit)).fetchall()
        return [(str(t), int(c)) for t, c in reversed(rows)]

    def journal_files(self, run_id: int) -> tuple[set[str], set[str]]:
        """The run's journal files still holding an update no done round used, and those that hold none."""
        with self._tx("read the journal", write=False) as conn:
            rows = conn.execute("SELECT file, SUM(applied IS NULL) FROM updates WHERE run_id = ? GROUP BY file",
                                (run_id,)).fetchall()
        return {f for f, n in rows if n}, {f for f, n in rows if not n}

    def counter(self, run_id: int, name: str) -> int:
        """A run's counter ``name`` (0 when never set)."""
        row = self._one("SELECT value FROM counters WHERE run_id = ? AND name = ?", (run_id, name))
        return 0 if row is None else int(row[0])

    def set_counter(self, run_id: int, name: str, value: int) -> None:
        with self._tx("set a counter") as conn:
            self._check_run(conn, run_id)
            conn.execute("INSERT OR REPLACE INTO counters (run_id, name, value) VALUES (?, ?, ?)",
                         (run_id, name, int(value)))

    def run_names(self) -> list[str]:
        """The names of the runs this state holds, oldest first."""
        with self._tx("list runs", write=False) as conn:
            return [r[0] for r in conn.execute("SELECT name FROM runs ORDER BY id").fetchall()]

    def run_started(self, run_id: int) -> float:
        """When the run was created (wall-clock seconds)."""
        row = self._one("SELECT created FROM runs WHERE id = ?", (run_id,))
        if row is None:
            raise StateError(f"no run with id {run_id} in {self.path}", stage="state")
        return float(row[0])

    # -- client registry -------------------------------------------------------------------------

    def enroll(self, name: str, *, reissue: bool = False) -> tuple[int, str]:
        """Register client ``name`` and return ``(client_id, token)``; only the token's hash is stored.

        Client ids are dense from 0. ``reissue=True`` gives an enrolled (or revoked) client a new
        token under its old id, which invalidates the old token and lifts a revocation.
        """
        if not isinstance(name, str) or not name.strip():
            raise StateError(f"a client needs a non-empty name, got {name!r}", stage="enroll")
        token = issue_token()
        with self._tx("enroll") as conn:
            row = conn.execute("SELECT client_id FROM clients WHERE name = ?", (name,)).fetchone()
            if row is not None and not reissue:
                raise StateError(f"client {name!r} is already enrolled (id {row[0]}); pass reissue=True "
                                 "for a new token", client_id=int(row[0]), stage="enroll")
            if row is not None:
                conn.execute("UPDATE clients SET token_hash = ?, revoked = 0 WHERE client_id = ?",
                             (hash_token(token), row[0]))
                return int(row[0]), token
            client_id = int(conn.execute("SELECT COALESCE(MAX(client_id) + 1, 0) FROM clients").fetchone()[0])
            conn.execute("INSERT INTO clients (client_id, name, token_hash, enrolled) VALUES (?, ?, ?, ?)",
                         (client_id, name, hash_token(token), time.time()))
        return client_id, token

    def authenticate(self, token: str) -> tuple[int, str] | None:
        """``(client_id, name)`` of the enrolled, not revoked client holding ``token``; None otherwise."""
        if not isinstance(token, str) or not token:
            return None
        digest = hash_token(token)
        row = self._one("SELECT client_id, name, token_hash, revoked FROM clients WHERE token_hash = ?", (digest,))
        # The lookup is by a hash the caller cannot steer; the final check is constant-time all the same.
        if row is None or not hmac.compare_digest(row[2], digest) or row[3]:
            return None
        return int(row[0]), str(row[1])

    def revoke(self, name: str) -> None:
        """Revoke client ``name``: its token stops authenticating (its id stays reserved)."""
        with self._tx("revoke") as conn:
            if conn.execute("UPDATE clients SET revoked = 1 WHERE name = ?", (name,)).rowcount == 0:
                raise StateError(f"no enrolled client named {name!r}", stage="revoke")

    def touch(self, client_id: int) -> None:
        """Record that ``client_id`` was seen now."""
        with self._tx("touch") as conn:
            cur = conn.execute("UPDATE clients SET last_seen = ? WHERE client_id = ?", (time.time(), client_id))
            if cur.rowcount == 0:
                raise StateError(f"no enrolled client with id {client_id}", client_id=client_id, stage="touch")

    def clients(self) -> list[dict[str, Any]]:
        """All enrolled clients by id: ``{"client_id", "name", "enrolled", "revoked", "last_seen"}``."""
        with self._tx("list clients", write=False) as conn:
            rows = conn.execute("SELECT client_id, name, enrolled, revoked, last_seen FROM clients "
                                "ORDER BY client_id").fetchall()
        return [{"client_id": c, "name": n, "enrolled": e, "revoked": bool(r), "last_seen": s}
                for c, n, e, r, s in rows]

    # -- internals -------------------------------------------------------------------------------

    @contextmanager
    def _tx(self, what: str, *, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction (``BEGIN`` .. ``COMMIT``, rolled back on any error), sqlite errors wrapped.

        Writers begin ``IMMEDIATE`` (taking the write lock up front, so checks and writes see one state).
        """
        with self._lock:
            if self._conn is None:
                raise StateError(f"{what}: the state database {self.path} is closed", stage="state")
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                _rollback(conn)
                if isinstance(exc, sqlite3.Error):
                    raise StateError(f"{what}: database error in {self.path}: {exc}", stage="state") from exc
                raise

    def _one(self, sql: str, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        with self._tx("read", write=False) as conn:
            return conn.execute(sql, args).fetchone()

    @staticmethod
    def _check_run(conn: sqlite3.Connection, run_id: int) -> None:
        if conn.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is None:
            raise StateError(f"no run with id {run_id!r}", stage="state")

    def _check_open(self, conn: sqlite3.Connection, run_id: int, round: int) -> None:
        self._check_run(conn, run_id)
        status = _round_status(conn, run_id, round)
        if status == "done":
            raise StateError(f"round {round} of run {run_id} is already done", stage="state")
        if status is None:
            raise StateError(f"round {round} of run {run_id} was never opened (call open_round first)",
                             stage="state")

    def _write_checkpoint(self, path: Path, params: Params, names: list[str]) -> str:
        """Write ``path`` atomically, readable by this user only (:func:`write_durably`); returns its SHA-256."""
        try:
            write_durably(path, lambda f: save_params(f, params, names))
            return _sha256(path)
        except (OSError, TypeError, ValueError) as exc:
            raise StateError(f"cannot write checkpoint {path}: {exc}", stage="checkpoint") from exc

    def _mark_done(self, run_id: int, round: int, metrics_json: str, checkpoint: str, digest: str,
                   applied: Sequence[str]) -> None:
        with self._tx("complete round") as conn:
            self._check_open(conn, run_id, round)
            conn.execute("UPDATE rounds SET status = 'done', finished = ?, metrics_json = ?, checkpoint = ?, "
                         "checkpoint_sha256 = ? WHERE run_id = ? AND round = ?",
                         (time.time(), metrics_json, checkpoint, digest, run_id, round))
            marked = conn.executemany("UPDATE updates SET applied = ? WHERE task_id = ? AND run_id = ? AND "
                                      "applied IS NULL", [(round, t, run_id) for t in applied]).rowcount
            if marked != len(applied):
                raise StateError(f"round {round} of run {run_id} used {len(applied)} journaled updates but only "
                                 f"{marked} are in the journal and unused", stage="state")


# -- opening the database --------------------------------------------------------------------------


def _connect(path: Path) -> sqlite3.Connection:
    """Open (creating when missing) the database and its schema; a file that is not one is a StateError."""
    try:
        private_dir(path.parent)
        for f in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            if f.exists():
                f.chmod(0o600)  # SQLite creates its WAL and shm files with the database file's mode
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    except (OSError, sqlite3.Error) as exc:
        raise StateError(f"cannot open the state database {path}: {exc}", stage="state") from exc
    try:
        _configure(conn, path)
        _init_schema(conn, path)
    except sqlite3.Error as exc:
        conn.close()
        raise StateError(f"{path} is not a usable fedloom state database (corrupt or not SQLite): {exc}",
                         stage="state") from exc
    except StateError:
        conn.close()
        raise
    return conn


def _configure(conn: sqlite3.Connection, path: Path) -> None:
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StateError(f"{path}: cannot switch the database to WAL mode (got {mode!r})", stage="state")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")


def _init_schema(conn: sqlite3.Connection, path: Path) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app_id not in (0, APPLICATION_ID) or (app_id == 0 and tables):
            raise StateError(f"{path} is an SQLite database but not a fedloom state database", stage="state")
        if version > SCHEMA_VERSION:
            raise StateError(f"{path} has schema version {version}, newer than this fedloom's "
                             f"{SCHEMA_VERSION}", stage="state")
        if version == 1:  # schema 1 had no checkpoint digests; its rounds keep none
            conn.execute("ALTER TABLE rounds ADD COLUMN checkpoint_sha256 TEXT")
        for sql in _TABLES:
            conn.execute(sql)
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the original error is the one worth reporting


# -- rounds --------------------------------------------------------------------------------------


def _last_done(conn: sqlite3.Connection, run_id: int) -> int:
    row = conn.execute("SELECT MAX(round) FROM rounds WHERE run_id = ? AND status = 'done'", (run_id,)).fetchone()
    return 0 if row[0] is None else int(row[0])


def _round_status(conn: sqlite3.Connection, run_id: int, round: int) -> str | None:
    row = conn.execute("SELECT status FROM rounds WHERE run_id = ? AND round = ?", (run_id, round)).fetchone()
    return None if row is None else str(row[0])


def _check_round_number(round: int) -> None:
    if isinstance(round, bool) or not isinstance(round, int | np.integer) or round < 1:
        raise StateError(f"rounds are numbered from 1, got {round!r}", stage="state")


def _check_params(params: Params, names: list[str]) -> None:
    if len(params) != len(names):
        raise ShapeError(f"{len(params)} arrays but {len(names)} names", stage="checkpoint")
    if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise ShapeError(f"parameter names must be distinct non-empty strings, got {names!r}", stage="checkpoint")
    for i, p in enumerate(params):
        if not isinstance(p, np.ndarray) or p.dtype.hasobject:
            raise ShapeError(f"array {i} ({names[i]}) is not a numeric numpy array", stage="checkpoint")


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _metrics_json(metrics: dict[str, Any]) -> str:
    if not isinstance(metrics, dict):
        raise StateError(f"metrics must be a dict, got {type(metrics).__name__}", stage="state")
    try:
        return json.dumps(metrics, default=_json_default, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise StateError(f"metrics are not JSON-serializable: {exc}", stage="state") from exc


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


# -- checkpoint files ------------------------------------------------------------------------------


def _read_checkpoint(path: Path, round: int, digest: str | None) -> tuple[list[str], Params]:
    try:
        if digest is not None and _sha256(path) != digest:
            raise StateError(f"checkpoint {path} is not the file written for round {round} (its SHA-256 differs "
                             "from the one recorded): it was replaced or damaged. Restore it from a backup, or move "
                             "the state folder aside and start afresh", stage="checkpoint")
        return load_params(path)
    except FileNotFoundError:
        raise StateError(f"checkpoint {path} of done round {round} is missing", stage="checkpoint") from None
    except StateError:
        raise
    except Exception as exc:  # zipfile, numpy and OS errors of a damaged file all land here
        raise StateError(f"checkpoint {path} of done round {round} is corrupt: {exc}",
                         stage="checkpoint") from exc


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_durably(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Make ``path`` (this user only) hold what ``write`` writes, whole or absent after any crash: a temp file,
    fsync, ``os.replace``, fsync of the folder."""
    _make_dirs(path.parent)
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _make_dirs(directory: Path) -> None:
    """Create ``directory`` and missing parents (private: 0700), fsyncing each new entry's parent."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for d in reversed(missing):
        d.mkdir(mode=0o700, exist_ok=True)
        _fsync_dir(d.parent)


def private_dir(directory: Path) -> None:
    """Make ``directory`` (created when missing) readable by this user only."""
    _make_dirs(directory)
    directory.chmod(0o700)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
