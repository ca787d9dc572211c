"""Accuracy against uplink bytes: the keyboard example with each compression scheme, and the same schemes on
simulated mobile devices.

    python -m benchmarks.run compression [--figure PATH] [--tasks keyboard,mobile] [--budget TRIPS]

``keyboard``: ``examples/keyboard.toml`` as it is (60 rounds, 20 roles a round, seed 0), once per scheme:
no compression; 8-bit, 4-bit, and 2-bit with randomized Hadamard rotation (stochastic uniform
quantization, a scale pair per 1,024 values); top-1% with error feedback, alone and with its values
at 8 bits; and 5x fewer rounds with 5x more local steps (12 rounds, up to 250 steps and 25 epochs:
the same local SGD steps in all, a fifth of the uploads), and that with 4-bit and with 2-bit rotated
updates. ``bytes_up`` is the run's total uplink,
every update's encoded message as ``metrics.csv`` counts it. stdout: one JSON line per row with
exactly ``scheme`` ("none" when uncompressed), ``bytes_up`` and ``final_accuracy``; on stderr the
rest (the ratio to "none", the accuracy difference, the run folder).

``mobile``: the same schemes on the heterogeneity benchmark's mobile population (``benchmarks/hetero.py``,
synchronous FedAvg, a budget of ``--budget`` client trips, a fifth of it for the rows with 5x the local
steps: the same local SGD steps in all): simulated seconds to the target accuracy
(95% of what "none" reaches with the budget), and the speed-up over no compression, on stderr, with
``scheme``, ``bytes_up`` and ``final_accuracy`` on stdout.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from benchmarks.rows import Record, emit, finish
from fedloom.config import load_config
from fedloom.simulation.compare import time_to_target
from fedloom.simulation.runner import simulate

EF = "compression.error_feedback=true"
SCHEMES: dict[str, list[str]] = {
    "none": [],
    "uniform8": ["compression.uplink=\"uniform8\""],
    "uniform4": ["compression.uplink=\"uniform4\""],
    "uniform2+rotate": ["compression.uplink=\"uniform2+rotate\""],
    "topk0.01+ef": ["compression.uplink=\"topk0.01\"", EF],
    "topk0.01+uniform8+ef": ["compression.uplink=\"topk0.01+uniform8\"", EF],
    "5x-local-steps": ["run.rounds=12", "client.local_epochs=25", "client.max_steps=250", "eval.every=1"],
}
FEWER = SCHEMES["5x-local-steps"]
SCHEMES |= {  # the two levers together
    "5x-local-steps+uniform4": [*FEWER, *SCHEMES["uniform4"]],
    "5x-local-steps+uniform2+rotate": [*FEWER, *SCHEMES["uniform2+rotate"]],
}
FIELDS = ("scheme", "bytes_up", "final_accuracy")


def _keyboard(name: str, settings: list[str], out_dir: str, overrides: tuple[str, ...]) -> Record:
    t = time.perf_counter()
    cfg = load_config("examples/keyboard.toml", [f"run.name=\"{name}\"", f"run.out_dir=\"{out_dir}\"", *settings,
                                                 *overrides])
    result = simulate(cfg, progress=False)
    last = result.history[-1]
    return {"scheme": name, "bytes_up": int(last["total_bytes_up"]), "final_accuracy": round(result.final_accuracy, 4),
            "rounds": int(last["round"]), "run_dir": str(result.run_dir), "host_s": round(time.perf_counter() - t, 1)}


def _mobile(name: str, settings: list[str], out_dir: str, budget: int, overrides: tuple[str, ...]) -> Record:
    t = time.perf_counter()
    steps = [s for s in settings if not s.startswith(("run.rounds", "eval.every"))]
    fewer = any(s.startswith("client.local_epochs") for s in settings)
    budget = budget // 5 if fewer else budget  # 5x the local steps a trip: a fifth of the trips, the same steps
    cfg = load_config("examples/keyboard.toml", [
        "hetero.population=\"mobile\"", f"hetero.trip_budget={budget}", "run.rounds=100000",
        f"eval.every={1 if fewer else 2}",
        f"run.name=\"mobile-{name}\"", f"run.out_dir=\"{out_dir}\"", *steps, *overrides])
    result = simulate(cfg, progress=False)
    last = result.history[-1]
    return {"scheme": name, "bytes_up": int(last["total_bytes_up"]), "final_accuracy": round(result.final_accuracy, 4),
            "task": "mobile", "sim_time_s": round(last["sim_time_s"], 1), "run_dir": str(result.run_dir),
            "host_s": round(time.perf_counter() - t, 1), "rows": result.history}


def run_compression(figure: str | None = None, tasks: list[str] | None = None, budget: int = 1200,
                    out_dir: str = "runs/compression", schemes: list[str] | None = None,
                    overrides: tuple[str, ...] = ()) -> list[Record]:
    """Run every scheme on each task ("none" first: the reference); print the rows and return them.

    ``overrides`` (``section.key=value``) apply to every run, after the scheme's own settings.
    """
    names = ["none", *[s for s in schemes or SCHEMES if s != "none"]]
    records: list[Record] = []
    for task in tasks or ["keyboard", "mobile"]:
        base: Record | None = None
        target = None
        for name in names:
            if task == "keyboard":
                record = _keyboard(name, SCHEMES[name], out_dir, overrides)
            else:
                record = _mobile(name, SCHEMES[name], out_dir, budget, overrides)
                target = target if base is not None else round(0.95 * record["final_accuracy"], 4)
                t = time_to_target(record.pop("rows"), target)
                record.update(target=target, time_to_target_s=None if t is None else round(t, 1))
            base = base or record
            record["ratio"] = round(base["bytes_up"] / record["bytes_up"], 2)
            record["accuracy_change"] = round(record["final_accuracy"] - base["final_accuracy"], 4)
            if task == "mobile" and base.get("time_to_target_s") and record.get("time_to_target_s"):
                record["speedup"] = round(base["time_to_target_s"] / record["time_to_target_s"], 2)
            emit(record, FIELDS)
            records.append(record)
    return finish(records, figure, plot)


def plot(records: list[Record], path: str) -> None:
    """Test accuracy against total uplink bytes, one line per keyboard row (read from its run folder)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedloom.simulation.report import read_metrics

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for r in records:
        if r.get("task") == "mobile":
            continue
        rows = [m for m in read_metrics(Path(r["run_dir"]) / "metrics.csv") if not math.isnan(m["test_accuracy"])]
        ax.plot([m["total_bytes_up"] / 1e6 for m in rows], [m["test_accuracy"] for m in rows], marker=".",
                label=f"{r['scheme']} ({r['ratio']}x fewer bytes, {r['final_accuracy']:.3f})")
    ax.set_xscale("log")
    ax.set_xlabel("uplink MB (all clients, cumulative)")
    ax.set_ylabel("test accuracy")
    ax.set_title("keyboard example: accuracy against uplink bytes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
