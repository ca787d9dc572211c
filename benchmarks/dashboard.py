"""Does watching slow the federation? A deployed run alone, and with `fedloom dashboard` asked hard.

    python -m benchmarks.run dashboard   # the sync load (benchmarks/load.py): 50 clients, 30 rounds, TLS;
                                         # alone, watched every 2 s and every 0.1 s, interleaved, 3 times each

Watched: a `fedloom dashboard` process on the folder that holds the server's state and a thread of this
script that asks its ``/api/state`` every 2 s (one open page, at the default rate) or every 0.1 s (twenty
of them), from before the server starts until it has exited. Each look reads the state database anew (read-only, in WAL
mode), with the clients table's join over every task the server measured.

One JSON line per run: the load record (``rounds_per_s``, ``updates_per_s``, ``server_rss_mb``, ...),
``every_s`` (None: alone), and for watched runs ``polls``, ``poll_errors``, ``poll_ms_median``, ``poll_ms_p95``,
``dashboard_rss_mb`` and ``rounds_seen`` (the last look's rounds done: the page kept up). Then a summary
line: ``ratio_every_2s`` and ``ratio_every_0.1s`` = the median ``rounds_per_s`` watched at that rate / the median
alone (1.0: no cost to the server).
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.load import _rss_kb, run_load

EVERY_S = 0.1
RATES = (2.0, EVERY_S)  # the page's default, and twenty open pages
CLIENTS, ROUNDS, REPEAT = 50, 30, 3


class Watcher:
    """A `fedloom dashboard` process on a state folder and a thread asking it for the page's data every ``every_s``."""

    def __init__(self, every_s: float = EVERY_S):
        self.every_s = every_s
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.ms: list[float] = []
        self.errors = 0
        self.peak_kb = 0

    def look(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "api/state", timeout=10) as answer:
            return json.loads(answer.read())

    def _ask(self) -> None:
        while not self.stop_event.wait(self.every_s):
            t0 = time.perf_counter()
            try:
                self.look()
                self.ms.append(1000 * (time.perf_counter() - t0))
            except OSError:
                self.errors += 1
            if self.proc is not None:
                self.peak_kb = max(self.peak_kb, _rss_kb(self.proc.pid))

    def start(self, state: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "fedloom.cli", "dashboard", str(state), "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        found = re.search(r"http://127\.0\.0\.1:\d+/", self.proc.stdout.readline())  # type: ignore[union-attr]
        if not found:
            raise RuntimeError("the dashboard did not start")
        self.url = found.group(0)
        self.thread = threading.Thread(target=self._ask, name="watcher", daemon=True)
        self.thread.start()

    def stop(self) -> dict[str, Any]:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=30)
        runs = self.look()["runs"]
        ms = sorted(self.ms) or [float("nan")]
        return {"polls": len(self.ms), "poll_errors": self.errors, "poll_ms_median": round(statistics.median(ms), 1),
                "poll_ms_p95": round(ms[int(0.95 * (len(ms) - 1))], 1),
                "dashboard_rss_mb": round(self.peak_kb / 1024, 1),
                "rounds_seen": runs[0]["summary"]["rounds_done"] if runs else 0}

    def close(self) -> None:
        self.stop_event.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def run_dashboard(repeat: int = REPEAT) -> list[dict[str, Any]]:
    """Interleaved runs alone, watched at the page's default rate and watched hard; one JSON line each, then the
    summary: each rate's median ``rounds_per_s`` over the median alone."""
    records: list[dict[str, Any]] = []
    for _ in range(repeat):
        for every in (None, *RATES):
            record = run_load("sync", clients=CLIENTS, rounds=ROUNDS, watcher=Watcher(every) if every else None)
            record["every_s"] = every
            print(json.dumps(record), flush=True)
            records.append(record)
    alone = statistics.median(r["rounds_per_s"] for r in records if r["every_s"] is None)
    summary: dict[str, Any] = {"summary": "dashboard", "clients": CLIENTS, "rounds": ROUNDS,
                               "rounds_per_s_alone": alone}
    for every in RATES:
        watched = statistics.median(r["rounds_per_s"] for r in records if r["every_s"] == every)
        summary[f"ratio_every_{every:g}s"] = round(watched / alone, 3)
    print(json.dumps(summary), flush=True)
    return [*records, summary]
