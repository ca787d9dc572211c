"""The heterogeneity benchmark: time to a target accuracy on simulated mobile devices, per strategy.

    python -m benchmarks.run hetero

The keyboard example (``examples/keyboard.toml``) on the ``mobile`` population, every strategy
given the same budget of client trips (``hetero.trip_budget``, default 3000 = 150 rounds of the
example's 20 clients, where all three have nearly stopped improving): synchronous FedAvg with
uniform selection, synchronous FedAvg with Oort, and FedBuff (10 clients training at once, a
server update every 5 arrivals; more concurrency is faster in simulated time but learns less per
trip, see BENCHMARKS.md). One JSON line per
strategy: implementation, time_to_target_s (simulated seconds to the first evaluation at or above
the target), target, final_accuracy, client_trips, sim_time_s, updates, ``speedup`` = sync
uniform's time to target / this one's, and host_s (wall seconds on this machine, which do not
enter the simulated results). The target defaults to 95% of the accuracy sync uniform reaches
with the whole budget. ``figure`` (accuracy against simulated time and against server updates,
all strategies) is written with ``fedloom compare``'s plotting.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from fedloom.config import load_config
from fedloom.simulation.compare import compare_runs, time_to_target
from fedloom.simulation.runner import simulate

STRATEGIES = {
    "sync-fedavg-uniform": ["server.selection=\"uniform\"", "eval.every=2"],
    "sync-fedavg-oort": ["server.selection=\"oort\"", "eval.every=2"],
    "fedbuff": ["server.aggregation=\"fedbuff\"", "server.concurrency=10", "server.buffer_size=5", "eval.every=4"],
}


def run_hetero(budget: int = 3000, target: float | None = None, out_dir: str = "runs/hetero",
               figure: str | None = None, strategies: list[str] | None = None,
               overrides: tuple[str, ...] = ()) -> list[dict]:
    """Run the strategies (sync uniform first: it sets the default target); print and return their records.

    ``overrides`` (``section.key=value``) apply to every strategy, after the benchmark's own settings.
    """
    names = ["sync-fedavg-uniform", *[s for s in strategies or STRATEGIES if s != "sync-fedavg-uniform"]]
    records, run_dirs = [], []
    for name in names:
        t = time.perf_counter()
        cfg = load_config("examples/keyboard.toml", [
            "hetero.population=\"mobile\"", f"hetero.trip_budget={budget}", "run.rounds=100000",
            f"run.name=\"{name}\"", f"run.out_dir=\"{out_dir}\"", *STRATEGIES[name], *overrides])
        result = simulate(cfg, progress=False)
        run_dirs.append(result.run_dir)
        if target is None:
            target = round(0.95 * result.final_accuracy, 4)
        last = result.history[-1]
        record = {"implementation": name, "time_to_target_s": time_to_target(result.history, target),
                  "target": target, "final_accuracy": round(result.final_accuracy, 4),
                  "client_trips": int(last["trips"]), "sim_time_s": round(last["sim_time_s"], 1),
                  "updates": int(last["round"]), "host_s": round(time.perf_counter() - t, 1)}
        if record["time_to_target_s"] is not None:
            record["time_to_target_s"] = round(record["time_to_target_s"], 1)
        base = records[0]["time_to_target_s"] if records else record["time_to_target_s"]
        mine = record["time_to_target_s"]
        record["speedup"] = round(base / mine, 2) if base and mine else None
        records.append(record)
        print(json.dumps(record), flush=True)
    fig, _ = compare_runs(run_dirs, target, Path(figure) if figure else Path(out_dir) / "compare.png")
    print(json.dumps({"figure": str(fig)}), flush=True)
    return records
