"""Compare run folders: accuracy against simulated time and rounds, and time to a target accuracy.

``compare_runs`` reads the ``metrics.csv`` of each run folder, draws one figure with two panels
(accuracy against simulated seconds, accuracy against rounds) and summarises each run. The device
simulation columns (``sim_time_s``, ``trips``) are optional: a run without them still appears in the
rounds panel, and its time figures are None.
"""

from __future__ import annotations

import math
from pathlib import Path

from fedloom.errors import DataError
from fedloom.simulation.report import figure, read_metrics


def _value(row: dict[str, float], key: str) -> float | None:
    """The row's value of ``key``, or None where the column is absent or the cell empty."""
    v = row.get(key, math.nan)
    return None if math.isnan(v) else v


def _last(rows: list[dict[str, float]], key: str) -> float | None:
    """The last non-empty value of ``key`` in the run, or None."""
    for row in reversed(rows):
        v = _value(row, key)
        if v is not None:
            return v
    return None


def _accuracies(rows: list[dict[str, float]]) -> list[float]:
    return [v for r in rows if (v := _value(r, "test_accuracy")) is not None]


def time_to_target(rows: list[dict[str, float]], target: float, x: str = "sim_time_s") -> float | None:
    """The ``x`` value (simulated seconds, or the round number with ``x="round"``) of the first evaluated
    row whose ``test_accuracy`` is at least ``target``.

    Returns None if no evaluated row reaches the target, or if that row has no ``x`` value (a run without
    device simulation has no ``sim_time_s``).
    """
    for row in rows:
        acc = _value(row, "test_accuracy")
        if acc is not None and acc >= target:
            return _value(row, x)
    return None


def _read_run(run_dir: Path) -> list[dict[str, float]]:
    if not run_dir.is_dir():
        raise DataError(f"no run folder at {run_dir}")
    rows = read_metrics(run_dir / "metrics.csv")
    if not _accuracies(rows):
        raise DataError(f"{run_dir / 'metrics.csv'} has no evaluated round (no test_accuracy)")
    return rows


def _summary(name: str, rows: list[dict[str, float]], target: float | None) -> dict:
    accs = _accuracies(rows)
    last_round = _last(rows, "round")
    sim_time = _last(rows, "sim_time_s")
    trips = _last(rows, "trips")
    to_round = time_to_target(rows, target, x="round") if target is not None else None
    return {
        "run": name,
        "final_accuracy": accs[-1],
        "best_accuracy": max(accs),
        "rounds": int(last_round) if last_round is not None else len(rows),
        "sim_time_s": sim_time,
        "trips": int(trips) if trips is not None else None,
        "time_to_target_s": time_to_target(rows, target) if target is not None else None,
        "rounds_to_target": int(to_round) if to_round is not None else None,
    }


def compare_runs(run_dirs: list[Path], target: float | None = None,
                 out: Path | None = None) -> tuple[Path, list[dict]]:
    """Draw one comparison figure of ``run_dirs`` and summarise each run.

    Each run is labelled by its folder's name. The left panel plots test accuracy against simulated
    seconds (only the runs with a ``sim_time_s`` column; the title names the ones left out), the right
    panel against rounds. The figure goes to ``out`` (default: ``compare.png`` in the current directory).

    ``target`` is the accuracy for the time-to-target figures. When None, the default is the lowest of the
    runs' best test accuracies, so that every run reaches it and the times compare like with like.

    Returns the figure's path and one dict per run, in the order given: ``run``, ``final_accuracy``,
    ``best_accuracy``, ``rounds``, ``sim_time_s`` (final, or None), ``trips`` (final, or None),
    ``time_to_target_s`` and ``rounds_to_target`` (None where the target, or the simulated time, is not
    reached or not known). Raises :class:`DataError` for a missing or unreadable run folder.
    """
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise DataError("no run folders to compare")
    runs = [(d.name, _read_run(d)) for d in run_dirs]
    if target is None:
        target = min(max(_accuracies(rows)) for _, rows in runs)
    summaries = [_summary(name, rows, target) for name, rows in runs]
    out = Path("compare.png") if out is None else Path(out)
    _plot(runs, target, out)
    return out, summaries


def _plot(runs: list[tuple[str, list[dict[str, float]]]], target: float, out: Path) -> None:
    def series(rows: list[dict[str, float]], x: str) -> tuple[list[float], list[float]]:
        pts = [(xv, acc) for r in rows
               if (xv := _value(r, x)) is not None and (acc := _value(r, "test_accuracy")) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig = figure(11, 4)
    ax_time, ax_round = fig.subplots(1, 2)
    untimed = []
    for i, (name, rows) in enumerate(runs):
        color = f"C{i % 10}"
        xs, ys = series(rows, "sim_time_s")
        if xs:
            ax_time.plot(xs, ys, marker="o", markersize=3, color=color, label=name)
        else:
            untimed.append(name)
        xs, ys = series(rows, "round")
        ax_round.plot(xs, ys, marker="o", markersize=3, color=color, label=name)
    title = "accuracy against simulated time"
    if untimed:
        title += f"\n(no simulated time: {', '.join(untimed)})"
    if len(untimed) == len(runs):
        ax_time.text(0.5, 0.5, "no run has simulated time", ha="center", va="center", transform=ax_time.transAxes)
    ax_time.set(xlabel="simulated time (s)", ylabel="test accuracy", title=title)
    ax_round.set(xlabel="round", ylabel="test accuracy", title="accuracy against rounds")
    for ax in (ax_time, ax_round):
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.4f}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
