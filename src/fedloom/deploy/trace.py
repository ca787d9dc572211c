"""A deployed run's devices as a population trace: what the server measured, replayed by a simulation.

``fedloom trace STATE_DIR`` reads the ``tasks`` and ``presence`` tables of a deployed server's state
(``deploy/state.py``) and writes one device profile per enrolled client in the format
``hetero.population`` reads (``hetero/profiles.load_population``, CSV or JSON by suffix):

- ``compute_sps``: the reference samples per second its training took: the FLOPs of the examples it
  trained on (``examples x`` the model's training FLOPs per example) over ``REFERENCE_FLOPS``, divided
  by its measured seconds with its training tasks (decoding, training, encoding, and the network's
  latency: a deployed client's fixed costs are folded in here, so ``latency_s`` is 0);
- ``down_bps``, ``up_bps``: the bytes of its tasks and replies over the seconds the server took to hand
  them over and to receive them (on a fast network these are the server's own speeds);
- ``dropout_p``: the share of its training tasks that brought no update (a timeout, a lost client, an
  error), at most 0.99;
- ``available``: the intervals in which it was connected, in seconds from the run's start; the last one
  stays open (to 1e9 s) when the client was still connected when the record ends.

A client with no measured training task gets the median speeds of those with one (and its own
availability: never connected, never available). Nothing is unpickled; the trace is plain text.
"""

from __future__ import annotations

import csv
import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedloom.deploy.state import ServerState as StateStore
from fedloom.errors import ConfigError, StateError
from fedloom.hetero.profiles import REFERENCE_FLOPS, load_population

OPEN_END_S = 1e9  # the end of a last interval still open when the record ends
MIN_SECONDS = 1e-6  # a transfer measured as instantaneous


@dataclass(frozen=True)
class Device:
    """One client's measured profile (the fields of a population trace) and what it was measured from."""

    client_id: int
    name: str
    compute_sps: float
    down_bps: float
    up_bps: float
    dropout_p: float
    available: tuple[tuple[float, float], ...]
    trained: int  # training tasks that brought an update
    asked: int  # training tasks sent

    def row(self) -> dict[str, Any]:
        return {"client_id": self.client_id, "compute_sps": self.compute_sps, "down_bps": self.down_bps,
                "up_bps": self.up_bps, "latency_s": 0.0, "dropout_p": self.dropout_p}


def _rate(amount: float, seconds: float) -> float:
    return amount / max(seconds, MIN_SECONDS) if amount > 0 else math.nan


def _speeds(tasks: list[dict[str, Any]]) -> tuple[float, float, float]:
    """``(compute_sps, down_bps, up_bps)`` of one client's answered tasks (NaN where nothing was measured)."""
    trained = [t for t in tasks if t["kind"] == "TrainRequest" and t["outcome"] == "ok" and t["work_s"] is not None]
    work = sum(t["examples"] * t["flops_per_example"] for t in trained) / REFERENCE_FLOPS
    answered = [t for t in tasks if t["outcome"] == "ok" and t["down_s"] is not None and t["up_s"] is not None]
    return (_rate(work, sum(t["work_s"] for t in trained)),
            _rate(8 * sum(t["down_bytes"] for t in answered), sum(t["down_s"] for t in answered)),
            _rate(8 * sum(t["up_bytes"] for t in answered), sum(t["up_s"] for t in answered)))


def devices(store: StateStore, run_id: int, gap_s: float) -> list[Device]:
    """Every enrolled client's measured profile in run ``run_id``; ``gap_s``: how long a client may be silent and
    still count as connected (the server's ``3 x deploy.heartbeat_s``)."""
    tasks = store.tasks(run_id)
    if not any(t["kind"] == "TrainRequest" and t["outcome"] == "ok" for t in tasks):
        raise StateError(f"run {run_id} in {store.path} has no measured training task to make a trace from (was it "
                         "run by a fedloom older than the tasks table?)", stage="trace")
    t0 = store.run_started(run_id)
    presence = store.presence(run_id)
    end = max([b for spans in presence.values() for _, b in spans] + [t["sent_at"] or 0 for t in tasks])
    found = []
    for client in store.clients():
        cid = client["client_id"]
        mine = [t for t in tasks if t["client_id"] == cid]
        asked = [t for t in mine if t["kind"] == "TrainRequest"]
        trained = sum(t["outcome"] == "ok" for t in asked)
        spans = [(max(0.0, a - t0), max(0.0, b - t0)) for a, b in presence.get(cid, [])]
        if spans and end - presence[cid][-1][1] <= gap_s:
            spans[-1] = (spans[-1][0], OPEN_END_S)
        spans = [(a, b if b > a else a + MIN_SECONDS) for a, b in spans]
        found.append(Device(cid, client["name"], *_speeds(mine), min(0.99, 1 - trained / len(asked)) if asked else 0.0,
                            tuple(spans), trained, len(asked)))
    medians = [float(np.nanmedian([getattr(d, f) for d in found])) for f in ("compute_sps", "down_bps", "up_bps")]
    filled = []
    for d in found:  # unmeasured speeds: the median of the measured clients'
        values = [m if math.isnan(v) else v for v, m in zip((d.compute_sps, d.down_bps, d.up_bps), medians)]
        filled.append(Device(d.client_id, d.name, *values, d.dropout_p, d.available, d.trained, d.asked))
    return filled


def write_trace(found: list[Device], path: str | Path) -> Path:
    """Write ``found`` as a population trace (``.csv`` or ``.json``) and check that ``load_population`` reads it."""
    path = Path(path)
    if path.suffix not in (".csv", ".json"):
        raise ConfigError("--out", f"a population trace ends in .csv or .json, got {path.name!r}")
    if path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([*found[0].row(), "available"])
            for d in found:
                writer.writerow([*(repr(v) if isinstance(v, float) else v for v in d.row().values()),
                                 ";".join(f"{a!r}-{b!r}" for a, b in d.available) if d.available else "0-1e-06"])
    else:
        path.write_text(json.dumps([{**d.row(), "availability": [list(s) for s in d.available] or [[0, 1e-6]]}
                                    for d in found], indent=1))
    load_population(path)  # what a simulation will read
    return path


def trace_run(state_dir: str | Path, run: str | None, out: str | Path) -> list[Device]:
    """The devices of run ``run`` (default: the state's only run) written to ``out``; returns them. A client counts
    as connected while silent for up to 3 heartbeats (the run's ``deploy.heartbeat_s``), as the server counts."""
    db = Path(state_dir) / "server.db"
    if not db.exists():
        raise StateError(f"{db} does not exist: name the state folder of a deployed server (deploy.state_dir)",
                         stage="trace")
    store = StateStore(db)
    try:
        names = store.run_names()
        if run is None and len(names) != 1:
            raise ConfigError("--run", f"{db} holds the runs {names}: name one")
        run_id = store.resume_run(run or names[0])
        if run_id is None:
            raise ConfigError("--run", f"{db} has no run {run!r}; it holds {names}")
        heartbeat_s = tomllib.loads(store.run_config(run_id)).get("deploy", {}).get("heartbeat_s", 5.0)
        found = devices(store, run_id, 3 * float(heartbeat_s))
    finally:
        store.close()
    write_trace(found, out)
    return found
