"""The run's plot, drawn by a helper process forked when the run starts, so that importing matplotlib
(most of a plot's cost: about 0.7 s here) overlaps the run instead of following it.

The helper is a ``fork`` of the simulation made before any training (Linux only; elsewhere the plot
is drawn in the run's own process, as it is when the helper fails for any reason). It imports the
plotting modules at the lowest priority (``nice 19``: the run's own work comes first), waits for the
run folder's path, draws ``accuracy.png`` and answers; it touches nothing else, ignores Ctrl-C (the
run then asks it for the plot of the rounds done) and ends with the run.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import traceback
from multiprocessing.connection import Connection
from pathlib import Path

from fedloom.simulation.pool import START_METHOD, child_pipe, forget_parent_ends
from fedloom.simulation.report import plot_run

log = logging.getLogger("fedloom")

_WAIT_S = 60.0  # how long a run waits for its plot before drawing it itself


def _draw(conn: Connection) -> None:
    """The helper's life: import what a plot needs, then draw the one plot it is asked for."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the run's: it then asks for the plot of its rounds
    forget_parent_ends()
    os.nice(19)  # the run's own work comes first: this uses what cycles it leaves
    try:
        import matplotlib.backends.backend_agg  # noqa: F401 - the imports are what this process is for
        import matplotlib.figure  # noqa: F401

        path = conn.recv()
        if path is None:
            return
        plot_run(path)
        conn.send("")
    except (EOFError, OSError):  # the run is gone: nothing to draw for
        return
    except Exception:  # noqa: BLE001 - the run draws the plot itself and logs why
        conn.send(traceback.format_exc())


class Plotter:
    """Draws a run folder's plot, in the helper when one could start, else in this process."""

    def __init__(self) -> None:
        self.conn: Connection | None = None
        self.process = None
        if START_METHOD != "fork":
            return
        ctx = mp.get_context("fork")
        self.conn, child = child_pipe(ctx)
        self.process = ctx.Process(target=_draw, args=(child,), name="fedloom-plot", daemon=True)
        try:
            self.process.start()
        except OSError as exc:  # no process could be made (limits, memory): draw here instead
            log.info("plot helper not started (%s); the plot is drawn at the end", exc)
            self.conn = self.process = None
        finally:
            child.close()

    def draw(self, run_dir: Path) -> Path:
        """Draw ``run_dir/accuracy.png``; the helper's answer, or a plot drawn here when it has none."""
        if self.conn is not None:
            conn, self.conn = self.conn, None
            try:
                conn.send(str(run_dir))
                answer = conn.recv() if conn.poll(_WAIT_S) else "no answer"
            except (EOFError, OSError):
                answer = f"it ended (exit code {self.process.exitcode})"
            conn.close()
            self.close()
            if answer == "":
                return run_dir / "accuracy.png"
            log.info("plot helper failed, drawing here: %s", answer)
        return plot_run(run_dir)

    def close(self) -> None:
        """End the helper (a run that stopped before its plot); safe to call more than once."""
        if self.conn is not None:
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.conn.close()
            self.conn = None
        if self.process is not None:
            self.process.join(1.0)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
            self.process = None
