"""Where a run's time went: the phases of a simulation, timed, written to the run folder as ``timings.json``.

``start`` is the process's life before the run began (the interpreter, and the imports of
``fedloom`` and torch), read from ``/proc`` on Linux, when the run is the ``fedloom`` command's
(:data:`COMMAND`); from Python, where the process may be hours old, it is 0. The other phases are
timed in the run. What happens after the run returns (the interpreter's exit) is outside every phase.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PHASES = ("start", "data", "engine", "train", "evaluate", "write", "plot")
TIMINGS = "timings.json"
COMMAND = False  # set by the fedloom command: this process was started for the run, so its age is the start


def process_age() -> float | None:
    """Seconds since this process started (Linux), or None where ``/proc`` does not say."""
    try:
        stat = Path("/proc/self/stat").read_text()
        started = int(stat.rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(uptime - started, 0.0)


class Timings:
    """Seconds per phase of one run, accumulated: ``with timings("data"): ...``."""

    def __init__(self) -> None:
        self.began = time.perf_counter()
        age = process_age() if COMMAND else None
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        if age is not None:
            self.seconds["start"] = age

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        """Time the block as ``phase``; ``other`` is never timed (it is what no phase took)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            if phase in self.seconds:
                self.seconds[phase] += time.perf_counter() - t

    def summary(self) -> dict[str, float]:
        """Each phase, ``other`` (the run's time in no phase: building the server, trying the model on the data,
        metrics rows, the progress bar) and ``total``, in seconds rounded to milliseconds."""
        run = time.perf_counter() - self.began
        out = {k: round(v, 3) for k, v in self.seconds.items()}
        out["other"] = round(max(run - sum(v for k, v in self.seconds.items() if k != "start"), 0.0), 3)
        out["total"] = round(run + self.seconds["start"], 3)
        return out

    @staticmethod
    def line_of(summary: dict[str, float]) -> str:
        """A :meth:`summary` on one line: ``total 7.41 s = start 2.90 + data 0.70 + ...``."""
        parts = " + ".join(f"{k} {v:.2f}" for k, v in summary.items() if k != "total" and v >= 0.005)
        return f"total {summary['total']:.2f} s = {parts}"

    def write(self, run_dir: Path) -> dict[str, float]:
        """Write :meth:`summary` to ``run_dir/timings.json``; return it."""
        summary = self.summary()
        (run_dir / TIMINGS).write_text(json.dumps(summary, indent=1) + "\n")
        return summary
