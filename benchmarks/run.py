"""Run a reference workload with a plain PyTorch loop and with fedloom's engines; one JSON line each.

    python -m benchmarks.run wa          # W-A: FedProx Synthetic(1, 1), 1000 clients, logistic regression
    python -m benchmarks.run wb          # W-B: Shakespeare roles, character LSTM
    python -m benchmarks.run wa-scaled   # W-A with 10,000 clients, 1,000 per round
    python -m benchmarks.run wa --repeat 5
    python -m benchmarks.run load        # gRPC deployment: sync (200 training clients) and async (1,000 clients,
                                         # FedBuff, a 1M-value model), one line each (benchmarks/load.py)
    python -m benchmarks.run hetero      # simulated mobile devices: time to target accuracy (benchmarks/hetero.py)
    python -m benchmarks.run attacks     # resource-exhaustion attacks beside honest clients (benchmarks/attacks.py)
    python -m benchmarks.run robust      # robust aggregation under simulated attackers (benchmarks/robust.py)
    python -m benchmarks.run aggregation-cost   # each reducer's cost, and its share of a W-A round
    python -m benchmarks.run privacy     # DP-FedAvg at epsilon 1, 4, 8 against no DP (benchmarks/privacy.py)
    python -m benchmarks.run codecs      # encode + decode speed of each codec, 10M values (benchmarks/codecs.py)
    python -m benchmarks.run compression # accuracy against uplink bytes per codec (benchmarks/compression.py)
    python -m benchmarks.run secagg      # secure aggregation's round against a plain one (benchmarks/secagg.py)
    python -m benchmarks.run dashboard   # the sync load alone and watched by the dashboard (benchmarks/dashboard.py)

Each implementation runs in its own child process of this script (so start-up and peak memory are
its own): imports, data, one untimed warm-up round, then ``--repeat`` timed runs, of which the
fastest counts. Fields: workload, implementation, rounds, clients_per_round, total_clients,
wall_s (imports + data + the fastest run with its evaluation), train_s (the rounds alone),
per_round_s, accuracy, examples, peak_rss_mb, and ``ratio`` = plain train_s / this train_s
(the speed-up over the plain loop; 1.0 for the plain loop itself).

Before those, each implementation's whole command is timed cold, as a user runs it from a shell:
``python -m benchmarks.plain wa`` for the plain loop, ``python -m fedloom.cli simulate wa.toml
--quiet`` for fedloom with that engine (writing its run folder and plot), each a new process,
the implementations interleaved, ``--repeat`` times. ``whole_s`` is the median, ``whole_ratio`` =
the plain script's whole_s / this whole_s. ``fedloom-auto`` is fedloom's default engine choice.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

T0 = time.perf_counter()

from benchmarks.workloads import WORKLOADS, Workload, load, plain_fedavg  # noqa: E402
from fedloom.simulation.runner import simulate  # noqa: E402


def _one_round(cfg):
    return replace(cfg, run=replace(cfg.run, rounds=1))


def measure(wl: Workload, implementation: str, repeat: int) -> dict:
    """Run one implementation in this process and return its JSON record (without the ratio)."""
    import_s = time.perf_counter() - T0
    cfg = wl.config
    runs = []
    if implementation == "plain-pytorch":
        t = time.perf_counter()
        dataset = load(wl)
        data_s = time.perf_counter() - t
        plain_fedavg(_one_round(cfg), dataset)
        for _ in range(repeat):
            t = time.perf_counter()
            r = plain_fedavg(cfg, dataset)
            runs.append((r.train_s, time.perf_counter() - t, r.accuracy, r.examples))
    else:
        cfg = wl.with_engine(implementation)
        data_s = 0.0  # simulate() loads its own data: it is inside the run's total
        simulate(_one_round(cfg), progress=False, write=False)
        for _ in range(repeat):
            t = time.perf_counter()
            r = simulate(cfg, progress=False, write=False)
            runs.append((r.train_s, time.perf_counter() - t, r.final_accuracy,
                         int(sum(row["examples"] for row in r.history))))
    train_s, total_s, accuracy, examples = min(runs)
    return {"workload": wl.name, "implementation": implementation, "rounds": cfg.run.rounds,
            "clients_per_round": cfg.server.clients_per_round, "total_clients": cfg.data.num_clients or None,
            "wall_s": round(import_s + data_s + total_s, 3), "train_s": round(train_s, 3),
            "per_round_s": round(train_s / cfg.run.rounds, 4), "accuracy": round(accuracy, 4),
            "examples": examples, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def whole_commands(name: str, wl: Workload, implementations: list[str], repeat: int) -> dict[str, float | str]:
    """Each implementation's whole command, cold, in a new process, interleaved ``repeat`` times: the median
    seconds per implementation (or why it failed)."""
    from fedloom.config import to_toml

    times: dict[str, list[float]] = {impl: [] for impl in implementations}
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="fedloom-whole-") as tmp:
        commands = {}
        for impl in implementations:
            if impl == "plain-pytorch":
                commands[impl] = [sys.executable, "-m", "benchmarks.plain", name]
                continue
            cfg = wl.with_engine(impl)
            path = Path(tmp) / f"{impl}.toml"
            path.write_text(to_toml(replace(cfg, run=replace(cfg.run, out_dir=str(Path(tmp) / "runs")))))
            commands[impl] = [sys.executable, "-m", "fedloom.cli", "simulate", str(path), "--quiet"]
        for _ in range(repeat):
            for impl, cmd in commands.items():
                if impl in failed:
                    continue
                t = time.perf_counter()
                done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    failed[impl] = done.stderr.strip()[-500:]
                times[impl].append(time.perf_counter() - t)
    return {impl: failed.get(impl) or round(statistics.median(ts), 3) for impl, ts in times.items()}


def _subset(text: str | None) -> list[str] | None:
    return text.split(",") if text else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run")
    parser.add_argument("workload", choices=sorted([*WORKLOADS, "load", "hetero", "attacks", "robust",
                                                    "aggregation-cost", "privacy", "codecs",
                                                    "compression", "secagg", "dashboard"]))
    parser.add_argument("--repeat", type=int, help="timed runs per implementation (default: the workload's)")
    parser.add_argument("--only", help="run one implementation in this process (used by the parent)")
    parser.add_argument("--implementations", help="comma-separated subset to run after plain-pytorch "
                        "(default: the workload's; fedloom-vectorized-cuda is added where a GPU is present)")
    parser.add_argument("--budget", type=int, help="hetero (default 3000), compression (default 1200): client trips "
                                                     "per strategy or scheme on the mobile population")
    parser.add_argument("--target", type=float, help="hetero: target accuracy (default: 95%% of sync uniform's final)")
    parser.add_argument("--figure", help="hetero, robust, privacy: where to write the figure")
    parser.add_argument("--tasks", help="robust, privacy: comma-separated subset of the tasks")
    parser.add_argument("--seconds", type=float, default=20.0, help="attacks: length of each measuring window")
    args = parser.parse_args(argv)
    if args.workload == "load":
        from benchmarks.load import run_load  # imported here: grpc must not count in the other workloads' import_s

        for mode in ("sync", "async"):
            print(json.dumps(run_load(mode, ceiling=mode == "async")), flush=True)
        return
    if args.workload == "dashboard":
        from benchmarks.dashboard import run_dashboard

        run_dashboard(repeat=args.repeat or 3)
        return
    if args.workload == "robust":
        from benchmarks.robust import run_robust

        run_robust(_subset(args.tasks), aggregators=_subset(args.implementations), figure=args.figure)
        return
    if args.workload == "codecs":
        from benchmarks.codecs import run_codecs

        run_codecs()
        return
    if args.workload == "compression":
        from benchmarks.compression import run_compression

        run_compression(args.figure, _subset(args.tasks), budget=args.budget or 1200,
                        schemes=_subset(args.implementations))
        return
    if args.workload == "secagg":
        from benchmarks.secagg import run_secagg

        run_secagg(_subset(args.tasks), repeat=args.repeat or 3)
        return
    if args.workload == "aggregation-cost":
        from benchmarks.robust import run_cost

        run_cost()
        return
    if args.workload == "privacy":
        from benchmarks.privacy import run_privacy

        run_privacy(_subset(args.tasks), figure=args.figure)
        return
    if args.workload == "attacks":
        from benchmarks.attacks import run_attacks

        run_attacks(args.seconds, args.implementations.split(",") if args.implementations else None)
        return
    if args.workload == "hetero":
        from benchmarks.hetero import run_hetero

        run_hetero(args.budget or 3000, args.target, figure=args.figure,
                   strategies=args.implementations.split(",") if args.implementations else None)
        return
    wl = WORKLOADS[args.workload]
    repeat = args.repeat or wl.repeat
    if args.only:
        print(json.dumps(measure(wl, args.only, repeat)), flush=True)
        return
    import torch

    variants = args.implementations.split(",") if args.implementations else list(wl.variants)
    if not args.implementations and torch.cuda.is_available():
        variants.append("fedloom-vectorized-cuda")
    whole = whole_commands(args.workload, wl, ["plain-pytorch", *variants], repeat)
    base = None
    for impl in ("plain-pytorch", *variants):
        cmd = [sys.executable, "-m", "benchmarks.run", args.workload, "--only", impl, "--repeat", str(repeat)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(json.dumps({"workload": wl.name, "implementation": impl, "error": done.stderr.strip()[-500:]}))
            continue
        record = json.loads(done.stdout.strip().splitlines()[-1])
        base = base or record["train_s"]
        record["ratio"] = round(base / record["train_s"], 2)
        record["whole_s"] = whole[impl]
        if isinstance(whole[impl], float) and isinstance(whole["plain-pytorch"], float):
            record["whole_ratio"] = round(whole["plain-pytorch"] / whole[impl], 2)
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
