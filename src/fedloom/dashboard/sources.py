"""What the dashboard shows, read without changing anything: run folders and deployed servers' state.

A **run folder** (``fedloom simulate``) is read from its files: ``metrics.csv`` (a row per round),
``config.toml`` (the rounds planned, the privacy budget), ``clients.csv`` (a row per client asked in a
round, when ``run.client_metrics`` is on). A **state folder** (``fedloom server``'s ``deploy.state_dir``,
or its ``server.db``) holds one or more runs in SQLite: ``rounds`` (the same metrics rows, as JSON),
``clients`` (the registry), ``tasks`` (what the server measured of every task) and ``presence`` (when each
client was connected).

The database is opened read-only (``mode=ro``, ``query_only``) for each look and closed after it, in
autocommit mode: in WAL mode a reader takes no lock that holds up the server's writes, and a server that
restarts (or a state folder that is moved aside) is simply read anew at the next look. A file that is
missing or half-written is an empty run, never an error that stops the dashboard.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import json
import logging
import math
import sqlite3
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedloom.errors import DataError
from fedloom.simulation.report import read_metrics

log = logging.getLogger("fedloom")
HEARTBEAT_S = 5.0  # deploy.heartbeat_s's default: a client not heard from in 3 of them (and a second) is not connected
MAX_CLIENTS = 200  # the clients table lists at most this many: the most recently asked or heard from


def _finite(value: Any) -> float | None:
    """``value`` as a float for JSON, or None where it is missing, NaN or infinite."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _clean(row: dict[str, Any]) -> dict[str, float | None]:
    return {k: _finite(v) for k, v in row.items()}


def _config(text: str) -> dict[str, Any]:
    """The TOML text a run was started with, parsed; {} when it cannot be read."""
    try:
        return tomllib.loads(text)
    except (tomllib.TOMLDecodeError, TypeError):
        return {}


def summarize(rows: list[dict[str, float | None]], planned: int, config: dict[str, Any]) -> dict[str, Any]:
    """What the page shows above the curves, from a run's metrics rows: progress, ETA, refusals by reason,
    the aggregator's latest measurements, epsilon against its budget, the simulated clock and the traffic."""
    done = int(rows[-1]["round"] or 0) if rows else 0
    rejected: dict[str, float] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("rejected.") and value:
                code = key.removeprefix("rejected.")
                rejected[code] = rejected.get(code, 0) + value
    measured: dict[str, float] = {}
    for row in rows:  # each measurement's latest value
        measured.update({k: v for k, v in row.items() if "." in k and not k.startswith("rejected.") and v is not None})
    epsilon = next((v for k, v in measured.items() if k.endswith(".epsilon")), None)
    privacy = config.get("privacy", {})
    durations = [r["round_s"] for r in rows[-10:] if r.get("round_s") is not None]
    eta = (planned - done) * sum(durations) / len(durations) if durations and planned > done else None
    last = rows[-1] if rows else {}
    dense, up = sum(r.get("dense_bytes_up") or 0 for r in rows), sum(r.get("bytes_up") or 0 for r in rows)
    return {
        "rounds_done": done, "rounds_planned": planned, "eta_s": eta,
        "rejected": dict(sorted(rejected.items(), key=lambda kv: -kv[1])),
        "measurements": measured,
        "epsilon": epsilon, "epsilon_budget": _finite(privacy.get("epsilon_budget")) or None,
        "delta": _finite(privacy.get("delta", 1e-5)) if epsilon is not None else None,
        "sim_time_s": last.get("sim_time_s"), "trips": last.get("trips"),
        "bytes_down": last.get("total_bytes_down"), "bytes_up": last.get("total_bytes_up"),
        "compression_ratio": dense / up if dense and up else None,
        "accepted": sum(r.get("accepted") or 0 for r in rows), "refused": sum(r.get("rejected") or 0 for r in rows),
    }


@dataclass
class Run:
    """One run as the page shows it: its rows (metrics per round) and a summary."""

    key: str
    name: str
    kind: str  # "simulation" or "server"
    where: str
    rows: list[dict[str, float | None]]
    summary: dict[str, Any]
    clients: list[dict[str, Any]] = field(default_factory=list)
    status: str = "running"
    updated: float | None = None  # wall-clock seconds of the latest change seen
    clients_total: int = 0  # the clients there are, of which ``clients`` lists at most MAX_CLIENTS

    def view(self, since: int = 0) -> dict[str, Any]:
        """The JSON the page asks for: the rows after round ``since``, and everything else whole."""
        rows = self.rows[bisect.bisect_right(self.rows, since, key=lambda r: r.get("round") or 0):]  # in round order
        return {"key": self.key, "name": self.name, "kind": self.kind, "where": self.where, "status": self.status,
                "updated": self.updated, "summary": self.summary, "clients": self.clients,
                "clients_total": self.clients_total, "rows": rows,
                "reset": bool(self.rows) and since > (self.rows[-1].get("round") or 0)}


def _signature(path: Path) -> tuple[int, int, int] | None:
    """What tells a file's new content from its old: inode, size and modification time (None: no file)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class Folder:
    """A simulation's run folder. ``metrics.csv`` is read again only when it changed; ``clients.csv`` (a row per
    client and round: long) only from where the last look stopped, while it only grows."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key
        self._read_at: tuple[int, int, int] | None | bool = False  # metrics.csv's signature when read (False: never)
        self._rows: list[dict[str, float | None]] = []
        self._config: dict[str, Any] = {}
        self._summary: dict[str, Any] = {}
        self._table: dict[int, dict[str, Any]] = {}
        self._read: tuple[int, int, list[str]] | None = None  # clients.csv: inode, bytes read, header
        self._listing: list[dict[str, Any]] | None = None  # the clients as listed, until clients.csv grows

    def runs(self) -> list[Run]:
        metrics = self.path / "metrics.csv"
        sig = _signature(metrics)
        if sig != self._read_at:  # the rows, the config and the summary change only with metrics.csv
            try:
                self._rows = [_clean(r) for r in read_metrics(metrics)]
                self._read_at = sig
            except (DataError, OSError):
                self._rows, self._read_at = [], False  # missing, or caught being rewritten: the next look reads it
            try:
                self._config = _config((self.path / "config.toml").read_text())
            except OSError:
                self._config = {}
            self._summary = summarize(self._rows, int(self._config.get("run", {}).get("rounds", 0) or 0),
                                      self._config)
        rows, config, summary = self._rows, self._config, self._summary
        updated = sig[2] / 1e9 if sig is not None else None
        finished = (self.path / "model.npz").exists() and bool(rows)
        status = "finished" if finished else "waiting" if not rows else \
            "running" if updated is not None and time.time() - updated < _stale_after(rows) else "stopped"
        clients = self._clients()
        return [Run(self.key, config.get("run", {}).get("name", self.path.name), "simulation", str(self.path), rows,
                    summary, clients[:MAX_CLIENTS], status, updated, len(clients))]

    def _clients(self) -> list[dict[str, Any]]:
        """Each client asked so far (``clients.csv``): rounds asked, accepted, its latest status and report."""
        path = self.path / "clients.csv"
        sig = _signature(path)
        if sig is None:
            self._table, self._read, self._listing = {}, None, None
            return []
        if self._read is not None and (self._read[0] != sig[0] or self._read[1] > sig[1]):
            self._table, self._read = {}, None  # rewritten (a resumed run drops the rows of rounds it redoes)
        if self._read is not None and self._read[1] == sig[1] and self._listing is not None:
            return self._listing  # nothing new
        try:
            with open(path, "rb") as f:
                f.seek(0 if self._read is None else self._read[1])
                data = f.read()
        except OSError:
            return self._listed()
        complete = data[:data.rfind(b"\n") + 1]  # a row being written waits for the next look
        lines = complete.decode("utf-8", "replace").splitlines()
        if self._read is None:
            if not lines:
                return []
            header, lines = lines[0].split(","), lines[1:]
        else:
            header = self._read[2]
        self._read = (sig[0], (0 if self._read is None else self._read[1]) + len(complete), header)
        for r in csv.DictReader(lines, fieldnames=header):
            try:
                cid = int(r["client"])
                c = self._table.setdefault(cid, {"client_id": cid, "name": str(cid), "asked": 0, "accepted": 0,
                                                 "_seconds": 0.0, "_timed": 0})
                c["asked"] += 1
                c["accepted"] += r["status"] == "accepted"
                c.update(last_round=int(r["round"]), state=r["status"], loss=_finite(r.get("loss")),
                         examples=_finite(r.get("examples")))
                seconds = _finite(r.get("seconds"))  # its round trip on the simulated clock
                if seconds is not None:
                    c["_seconds"] += seconds
                    c["_timed"] += 1
            except (KeyError, TypeError, ValueError):
                continue  # not a row of clients.csv's columns
        self._listing = self._listed()
        return self._listing

    def _listed(self) -> list[dict[str, Any]]:
        """Every client asked so far, the most recently asked first, with its mean round trip (``mean_s``)."""
        return [{**{k: v for k, v in c.items() if not k.startswith("_")},
                 "mean_s": c["_seconds"] / c["_timed"] if c["_timed"] else None}
                for c in sorted(self._table.values(), key=lambda c: (-c["last_round"], c["client_id"]))]


def _stale_after(rows: list[dict[str, float | None]]) -> float:
    """Seconds without a new row after which a run that is not finished is shown as stopped."""
    longest = max((r.get("round_s") or 0 for r in rows[-10:]), default=0)
    return max(60.0, 5 * longest)


class _Tally:
    """What the server measured of each client's tasks in one run, added up from the ``tasks`` rows recorded since
    the last look (rows are only ever appended)."""

    def __init__(self) -> None:
        self.last_rowid = 0
        self.sums: dict[int, dict[str, Any]] = {}

    def add(self, conn: sqlite3.Connection, run_id: int) -> None:
        if (conn.execute("SELECT max(rowid) FROM tasks").fetchone()[0] or 0) < self.last_rowid:
            self.last_rowid, self.sums = 0, {}  # another database in the same place: count afresh
        for rowid, cid, kind, outcome, rnd, work, down, up, bytes_down, bytes_up in conn.execute(
                "SELECT rowid, client_id, kind, outcome, round, work_s, down_s, up_s, down_bytes, up_bytes FROM tasks "
                "WHERE run_id = ? AND rowid > ? ORDER BY rowid", (run_id, self.last_rowid)):
            self.last_rowid = rowid
            s = self.sums.setdefault(int(cid), {"asked": 0, "accepted": 0, "work": [0.0, 0], "down": [0.0, 0],
                                                "up": [0.0, 0], "bytes_down": 0, "bytes_up": 0, "last_round": None,
                                                "failures": {}})
            if outcome not in ("ok", "late"):
                s["failures"][outcome] = s["failures"].get(outcome, 0) + 1
            if kind != "TrainRequest":
                continue
            s["asked"] += 1
            s["accepted"] += outcome == "ok"
            for key, value in (("work", work if outcome == "ok" else None), ("down", down), ("up", up)):
                if value is not None:
                    s[key][0] += value
                    s[key][1] += 1
            s["bytes_down"] += int(bytes_down)
            s["bytes_up"] += int(bytes_up)
            s["last_round"] = max(int(rnd), s["last_round"] or 0)

    def of(self, cid: int) -> dict[str, Any]:
        """The client's columns of the table: tasks, updates, mean seconds, bytes, last round, most frequent failure."""
        s = self.sums.get(cid)
        if s is None:
            return {"asked": 0, "accepted": 0, "work_s": None, "down_s": None, "up_s": None, "bytes_down": 0,
                    "bytes_up": 0, "last_round": None, "failure": None}
        mean = {f"{k}_s": _finite(s[k][0] / s[k][1]) if s[k][1] else None for k in ("work", "down", "up")}
        worst = max(s["failures"].items(), key=lambda kv: kv[1], default=None)
        return {"asked": s["asked"], "accepted": s["accepted"], **mean, "bytes_down": s["bytes_down"],
                "bytes_up": s["bytes_up"], "last_round": s["last_round"],
                "failure": f"{worst[0]} x{worst[1]}" if worst else None}


class Store:
    """A deployed server's state folder (or its ``server.db``): each run in it."""

    def __init__(self, path: Path, key: str):
        self.db = path / "server.db" if path.is_dir() else path
        self.key = key
        self._rows: dict[int, list[dict[str, float | None]]] = {}  # done rounds never change: each is read once
        self._summaries: dict[int, tuple[int, dict[str, Any]]] = {}  # by run: (rows summarized, the summary)
        self._tallies: dict[int, _Tally] = {}  # by run: its tasks, added up as they are recorded

    def runs(self) -> list[Run]:
        if not self.db.exists():
            return []
        try:
            conn = sqlite3.connect(f"{self.db.resolve().as_uri()}?mode=ro", uri=True, timeout=1.0,
                                   isolation_level=None, check_same_thread=False)
        except sqlite3.Error:
            return []
        try:
            conn.execute("PRAGMA query_only=1")
            return [self._run(conn, *r) for r in conn.execute("SELECT id, name, config_toml FROM runs ORDER BY id")]
        except sqlite3.Error:
            return []  # not (yet) a fedloom state database, or busy past the timeout: the next look tries again
        finally:
            conn.close()

    def _run(self, conn: sqlite3.Connection, run_id: int, name: str, config_toml: str) -> Run:
        config = _config(config_toml)
        rows = self._rows.setdefault(run_id, [])
        done, open_round, updated = conn.execute(
            "SELECT count(*) FILTER (WHERE status = 'done'), max(round) FILTER (WHERE status = 'open'), "
            "max(coalesce(finished, started)) FROM rounds WHERE run_id = ?", (run_id,)).fetchone()
        if done < len(rows):
            rows.clear()  # another database in the same place (a state folder started afresh)
            self._tallies.pop(run_id, None)
            self._summaries.pop(run_id, None)
        last = int(rows[-1]["round"] or 0) if rows else 0
        for rnd, started, finished, metrics in conn.execute(
                "SELECT round, started, finished, metrics_json FROM rounds WHERE run_id = ? AND status = 'done' "
                "AND round > ? ORDER BY round", (run_id, last)):
            row = _clean(json.loads(metrics or "{}"))
            row.setdefault("round", float(rnd))
            if row.get("round_s") is None and finished is not None and started is not None:
                row["round_s"] = float(finished) - float(started)  # the server's rows time their rounds here
            rows.append(row)
        planned = int(config.get("run", {}).get("rounds", 0) or 0)
        summarized, summary = self._summaries.get(run_id, (-1, {}))
        if summarized != len(rows):
            summary = summarize(rows, planned, config)
            self._summaries[run_id] = (len(rows), summary)
        summary = {**summary, "open_round": open_round}
        heartbeat = _finite(config.get("deploy", {}).get("heartbeat_s", HEARTBEAT_S)) or HEARTBEAT_S
        clients = self._clients(conn, run_id, 3 * heartbeat + 1)  # the server's own rule, and a second to write it
        done = summary["rounds_done"]
        if planned and done >= planned:
            status = "finished"
        elif any(c["state"] == "connected" for c in clients):
            status = "running" if open_round is not None or done else "waiting"
        else:
            status = "stopped"  # nobody heard from: the server is down, or no client is connected to it
        shown = clients if len(clients) <= MAX_CLIENTS else sorted(  # the most recently heard, in the registry's order
            sorted(clients, key=lambda c: -(c["last_heard"] or 0))[:MAX_CLIENTS], key=lambda c: c["client_id"])
        return Run(f"{self.key}-{run_id}", name, "server", str(self.db.parent), list(rows), summary, shown, status,
                   updated, len(clients))

    def _clients(self, conn: sqlite3.Connection, run_id: int, lost_after_s: float) -> list[dict[str, Any]]:
        """The registry joined with what the server measured of each client's tasks in this run; a client is
        connected when the server heard from it (as recorded) within ``lost_after_s``."""
        tally = self._tallies.setdefault(run_id, _Tally())
        tally.add(conn, run_id)
        heard = {int(c): float(e) for c, e in conn.execute(
            "SELECT client_id, max(end) FROM presence WHERE run_id = ? GROUP BY client_id", (run_id,))}
        now = time.time()
        out = []
        for cid, name, revoked, last_seen in conn.execute(
                "SELECT client_id, name, revoked, last_seen FROM clients ORDER BY client_id"):
            last = max((x for x in (heard.get(int(cid)), last_seen) if x is not None), default=None)
            state = "revoked" if revoked else "connected" if last is not None and now - last < lost_after_s \
                else "never connected" if last is None else "disconnected"
            out.append({"client_id": int(cid), "name": name, "state": state, "last_heard": last,
                        **tally.of(int(cid))})
        return out


def _key(path: Path) -> str:
    """A stable key for a source: the same folder has the same key at every look and in every browser tab."""
    return hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]


def _source(path: Path) -> Folder | Store | None:
    """The source ``path`` is now: a database file or a state folder (``server.db``), a run folder
    (``config.toml`` or ``metrics.csv``), or None (nothing written there yet)."""
    if path.is_file() or (path / "server.db").exists():
        return Store(path, "s" + _key(path))
    if (path / "config.toml").exists() or (path / "metrics.csv").exists():
        return Folder(path, "f" + _key(path))
    return None


class Watched:
    """The paths given to ``fedloom dashboard``, looked at anew each time: a run folder, a state folder or
    its ``server.db``, or a folder of those (``runs/``), whose new run folders appear as they are made."""

    def __init__(self, paths: list[str | Path]):
        self.paths = [Path(p) for p in paths]
        self._known: dict[str, Folder | Store] = {}  # by key: each source keeps what it has read
        self._lock = threading.Lock()  # two pages looking at once take turns with the caches
        missing = [str(p) for p in self.paths if not p.exists()]
        if missing:
            raise DataError(f"nothing at {', '.join(missing)}: give a run folder `fedloom simulate` wrote (or a "
                            "folder of them, like runs/), a server's deploy.state_dir, or its server.db")

    def sources(self) -> list[Folder | Store]:
        found: list[Folder | Store] = []
        for path in self.paths:
            here = _source(path)
            if here is None and path.is_dir():
                below = (_source(p) for p in sorted(path.iterdir()) if p.is_dir())
                found.extend(s for s in below if s is not None)
            elif here is not None:
                found.append(here)
        self._known = {s.key: self._known.get(s.key, s) for s in found}
        return list(self._known.values())

    def runs(self) -> list[Run]:
        out: list[Run] = []
        with self._lock:
            for source in self.sources():
                try:
                    out.extend(source.runs())
                except (OSError, ValueError, KeyError, TypeError, sqlite3.Error) as exc:  # e.g. a row of bad JSON
                    log.warning("cannot read %s now: %s: %s", getattr(source, "db", getattr(source, "path", "?")),
                                type(exc).__name__, exc)
        return out
