"""Run a reference workload with fedloom and with a plain PyTorch loop; print one JSON line each.

    python -m benchmarks.run wa        # W-A: FedProx Synthetic(1, 1), 1000 clients, logistic regression
    python -m benchmarks.run wb        # W-B: Shakespeare roles, character LSTM
    python -m benchmarks.run wa --repeat 5   # best of 5 training times per implementation (default 3)

Fields: workload, implementation, rounds, clients_per_round, total_clients, wall_s (start-up,
data and training), train_s (the rounds alone), per_round_s, accuracy, examples, and for
fedloom ``ratio`` = fedloom train_s / plain train_s.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

T0 = time.perf_counter()

from benchmarks.workloads import WORKLOADS, load, plain_fedavg  # noqa: E402
from fedloom.simulation.runner import simulate  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run")
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed runs per implementation, after one untimed round each; the fastest is reported")
    args = parser.parse_args(argv)
    wl = WORKLOADS[args.workload]
    cfg = wl.config
    import_s = time.perf_counter() - T0
    warm = replace(cfg, run=replace(cfg.run, rounds=1))  # one untimed round each: lazy init, thread pools
    plain_fedavg(warm, load(wl))
    simulate(warm, progress=False, write=False)
    plain_runs, fed_runs = [], []
    for _ in range(args.repeat):
        t = time.perf_counter()
        dataset = load(wl)
        plain = plain_fedavg(cfg, dataset)
        plain_runs.append((plain, import_s + time.perf_counter() - t))
        t = time.perf_counter()
        fed = simulate(cfg, progress=False, write=False)
        fed_runs.append((fed, import_s + time.perf_counter() - t))
    plain, plain_wall = min(plain_runs, key=lambda r: r[0].train_s)
    fed, fed_wall = min(fed_runs, key=lambda r: r[0].train_s)
    common = {"workload": wl.name, "rounds": cfg.run.rounds, "clients_per_round": cfg.server.clients_per_round,
              "total_clients": len(dataset)}
    print(json.dumps({**common, "implementation": "plain-pytorch", "wall_s": round(plain_wall, 3),
                      "train_s": round(plain.train_s, 3), "per_round_s": round(plain.train_s / cfg.run.rounds, 4),
                      "accuracy": round(plain.accuracy, 4), "examples": plain.examples}))
    examples = int(sum(r["examples"] for r in fed.history))
    print(json.dumps({**common, "implementation": "fedloom-sequential", "wall_s": round(fed_wall, 3),
                      "train_s": round(fed.train_s, 3), "per_round_s": round(fed.train_s / cfg.run.rounds, 4),
                      "accuracy": round(fed.final_accuracy, 4), "examples": examples,
                      "ratio": round(fed.train_s / plain.train_s, 3)}))


if __name__ == "__main__":
    main()
