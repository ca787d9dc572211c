"""Run folders: the per-round metrics file and the plots drawn from it."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import IO, TYPE_CHECKING

from fedloom.errors import DataError, reason_code

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRIC_COLUMNS = ("round", "train_loss", "test_loss", "test_accuracy", "fed_loss", "fed_accuracy", "clients",
                  "accepted", "rejected", "examples", "round_s", "elapsed_s", "sim_time_s", "trips", "bytes_down",
                  "bytes_up", "total_bytes_down", "total_bytes_up", "dense_bytes_up")


def _columns(rows: list[dict[str, float]]) -> list[str]:
    extra = [k for k in dict.fromkeys(k for row in rows for k in row) if k not in METRIC_COLUMNS]
    return [*METRIC_COLUMNS, *extra]


def _write_rows(f: IO[str], columns: list[str], rows: list[dict[str, float]]) -> None:
    writer = csv.DictWriter(f, fieldnames=columns)
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})


def write_metrics(path: Path, rows: list[dict[str, float]]) -> None:
    """Write one CSV row per round; a metric not measured in a round is left empty.

    The standard columns come first, then the aggregator's measurements (``clip.clip_bound``,
    ``dp_noise.epsilon``, ...) and the refusals by code (``rejected.client_failed``) in the order
    they first appear.
    """
    columns = _columns(rows)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerow(columns)
        _write_rows(f, columns, rows)


class MetricsFile:
    """``metrics.csv`` written as rounds complete: each row is appended and flushed; a round that brings
    a new column rewrites the file (rare: the first rounds that evaluate or measure something)."""

    def __init__(self, path: Path, rows: list[dict[str, float]] | None = None):
        """``rows`` (a list this file appends to) are the rows already done, e.g. of a resumed run."""
        self.path = path
        self.rows = rows if rows is not None else []
        self.columns: list[str] = []
        if self.rows:
            self.columns = _columns(self.rows)
            write_metrics(self.path, self.rows)

    def append(self, row: dict[str, float]) -> None:
        self.rows.append(row)
        if any(k not in self.columns for k in row) or not self.columns:
            self.columns = _columns(self.rows)
            write_metrics(self.path, self.rows)
            return
        with open(self.path, "a", newline="") as f:
            _write_rows(f, self.columns, [row])


def read_metrics(path: Path) -> list[dict[str, float]]:
    """Read a ``metrics.csv``; empty cells become NaN."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise DataError(f"no metrics file at {path}") from None
    if not rows or "round" not in rows[0]:
        raise DataError(f"{path} has no per-round metrics")
    try:
        return [{k: float(v) if v not in ("", None) else math.nan for k, v in row.items()} for row in rows]
    except ValueError as exc:
        raise DataError(f"{path}: {exc}") from None


def figure(width: float, height: float) -> Figure:
    """A figure drawn straight to PNG (Agg), without pyplot: no GUI backend is looked for, nothing global is kept."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def plot_run(run_dir: str | Path) -> Path:
    """Draw ``accuracy.png`` (test accuracy and losses against rounds) from a run folder's metrics."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.csv")
    rounds = [r["round"] for r in rows]

    def series(key: str) -> tuple[list[float], list[float]]:
        pts = [(r["round"], r[key]) for r in rows if not math.isnan(r.get(key, math.nan))]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig = figure(10, 4)
    ax_acc, ax_loss = fig.subplots(1, 2)
    for key, label in (("test_accuracy", "centralised test"), ("fed_accuracy", "federated (clients' test)")):
        xs, ys = series(key)
        if xs:
            ax_acc.plot(xs, ys, marker="o", markersize=3, label=label)
    ax_acc.set(xlabel="round", ylabel="accuracy", title=f"{run_dir.name}: accuracy")
    ax_acc.grid(alpha=0.3)
    ax_acc.legend()
    for key, label in (("train_loss", "train (clients)"), ("test_loss", "centralised test")):
        xs, ys = series(key)
        if xs:
            ax_loss.plot(xs, ys, label=label)
    ax_loss.set(xlabel="round", ylabel="loss", title="loss", xlim=(min(rounds), max(rounds)))
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.92, wspace=0.22)  # tight_layout costs a render
    out = run_dir / "accuracy.png"
    fig.savefig(out, dpi=110)
    return out


CLIENT_COLUMNS = ("round", "client", "status", "loss", "loss_sq", "examples", "steps", "seconds")


def append_client_rows(path: Path, round: int, selected: list[int], accepted: list[int],
                       rejected: dict[int, str], reports: dict[int, dict[str, float]],
                       durations: dict[int, float]) -> None:
    """``clients.csv``: a row per client asked in ``round``: ``accepted`` or the refusal's code, its report, and
    its round trip in ``seconds`` where one was measured (on the simulated clock; empty without one)."""
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(CLIENT_COLUMNS)
        for cid in dict.fromkeys([*selected, *accepted, *rejected]):
            status = "accepted" if cid in accepted else reason_code(rejected.get(cid, "no_reply: no reply"))
            report = reports.get(cid, {})
            writer.writerow([round, cid, status, *(report.get(k, "") for k in CLIENT_COLUMNS[3:-1]),
                             durations.get(cid, "")])


def keep_client_rows(path: Path, last_round: int) -> None:
    """Drop the ``clients.csv`` rows of rounds after ``last_round`` (a resumed or interrupted run)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([rows[0], *(r for r in rows[1:] if int(r[0]) <= last_round)])
