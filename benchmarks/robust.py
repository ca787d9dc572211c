"""Robust aggregation under simulated attacks, and what each aggregator costs.

    python -m benchmarks.run robust                       # both tasks, every attack, every aggregator
    python -m benchmarks.run robust --figure robust.png
    python -m benchmarks.run aggregation-cost             # reducers on 100 updates of 1M values; a W-A round

``robust`` prints one JSON line per (task, attack, aggregator): ``task``, ``attack`` (``"none"``
without attackers), ``aggregator`` (``"fedavg"`` for the plain examples-weighted mean) and
``final_accuracy`` (on every client's test data, as the run reports it; the mean over the seeds 0,
1 and 2). Each row's ``honest_accuracy`` (on the honest clients' test data, the same mean) and
``seeds`` (each seed's pair) go to stderr. 20% of the clients attack, drawn from the seed. The tasks:

- ``synthetic``: FedProx Synthetic(1, 1), 1,000 clients (W-A's data), logistic regression,
  50 clients per round, 60 rounds;
- ``digits``: the digits data, Dirichlet(0.5) over 100 clients, an MLP, 20 clients per round,
  100 rounds (trained close to convergence: at 40 rounds, merely leaving out a fifth of the
  clients costs 3 to 6 points, which no defence could win back).

``honest_accuracy`` shows whom a defence serves: on Synthetic(1, 1) every client has its own
model, and a fifth of the test users are the attackers' own.

The thresholds of the norm-based defences are each task's median honest update norm in its first
rounds (0.6 and 0.4), and the weight cap its median client size (90 and 14), as an operator
would set them from what honest clients send. Attack strengths: ``scale`` multiplies the
poisoned update by the number of clients per round (model replacement's boost n/eta,
Bagdasaryan et al. 2020); ``sign_flip`` sends the update times -4 (Li et al. 2019, "RSA");
``gaussian`` sends noise of std 1 (several times an honest update's norm).

``aggregation-cost`` prints one line per reducer: ``reducer``, ``seconds_100x1m`` (100 updates of
1M float32 values, the fastest of 3), ``wa_round_s`` (a W-A round with that reducer, vectorized,
the fastest of 3), ``ratio`` (that round over the weighted mean's).
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from benchmarks.rows import emit, finish
from fedloom.config import config_from_dict

ATTACK_KINDS = ("none", "scale", "weight", "sign_flip", "gaussian", "label_flip")
STRENGTH = {"sign_flip": 4.0, "gaussian": 1.0}  # scale: the number of clients per round (model replacement)
SEEDS = (0, 1, 2)
FIELDS = ("task", "attack", "aggregator", "final_accuracy")  # what a stdout line holds (issue 10)
TASKS: dict[str, dict[str, Any]] = {
    "synthetic": {
        "run": {"name": "robust-synthetic", "seed": 0, "rounds": 60},
        "data": {"dataset": "synthetic", "num_clients": 1000},
        "model": {"name": "logreg"},
        "client": {"lr": 0.05, "batch_size": 10, "max_steps": 20},
        "server": {"clients_per_round": 50},
        "eval": {"every": 60},
        "engine": {"executor": "vectorized"},
        "norm": 0.6, "size": 90,
    },
    "digits": {
        "run": {"name": "robust-digits", "seed": 0, "rounds": 100},
        "data": {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5, "num_clients": 100},
        "model": {"name": "mlp", "hidden": [64]},
        "client": {"lr": 0.1, "batch_size": 10, "local_epochs": 2},
        "server": {"clients_per_round": 20},
        "eval": {"every": 100},
        "engine": {"executor": "vectorized"},
        "norm": 0.4, "size": 14,
    },
}
AGGREGATORS = ("fedavg", "median", "trimmed_mean", "multi_krum", "norm_bound", "centered_clip", "capped",
               "centered_clip+capped")


def aggregation(name: str, norm: float, size: float, per_round: int) -> dict[str, Any]:
    """An aggregator's ``[aggregation]`` settings for a task (its honest norm and size, clients per round)."""
    capped = {"weighting": "capped", "max_weight": size}
    return {"fedavg": {},
            "median": {"reducer": "median", "weighting": "uniform"},
            "trimmed_mean": {"reducer": "trimmed_mean", "trim": 0.25, "weighting": "uniform"},
            "multi_krum": {"reducer": "multi_krum", "byzantine": per_round // 4, "weighting": "uniform"},
            "norm_bound": {"norm_bound": norm},
            "centered_clip": {"centered_clip": norm},
            "capped": capped,
            "centered_clip+capped": {"centered_clip": norm, **capped}}[name]


def task_config(task: str, attack: str, aggregator: str, seed: int = 0):
    raw = {k: dict(v) for k, v in TASKS[task].items() if isinstance(v, dict)}
    raw["run"]["seed"] = seed
    per_round = raw["server"]["clients_per_round"]
    raw["aggregation"] = aggregation(aggregator, TASKS[task]["norm"], TASKS[task]["size"], per_round)
    if attack != "none":
        raw["attack"] = {"kind": attack, "fraction": 0.2, "strength": STRENGTH.get(attack, float(per_round))}
    return config_from_dict(raw)


def honest_test(task: str, seed: int):
    """The client work and the honest clients' test data of a task's run with ``seed``."""
    from fedloom.build import build_clients
    from fedloom.stages.attacks import attackers

    work, dataset = build_clients(task_config(task, "none", "fedavg", seed))
    bad = attackers(0.2, len(dataset), seed)
    honest = [c for c in dataset.clients if c.client_id not in bad and c.num_test]
    return work, np.concatenate([c.x_test for c in honest]), np.concatenate([c.y_test for c in honest])


def run_robust(tasks: list[str] | None = None, attacks: list[str] | None = None,
               aggregators: list[str] | None = None, figure: str | None = None,
               seeds: tuple[int, ...] = SEEDS) -> list[dict[str, Any]]:
    """Every (task, attack, aggregator) over ``seeds``; one JSON line each (see the module docstring)."""
    from fedloom.simulation.runner import simulate

    records = []
    for task in tasks or list(TASKS):
        tests = {seed: honest_test(task, seed) for seed in seeds}
        for attack in attacks or list(ATTACK_KINDS):
            for name in aggregators or list(AGGREGATORS):
                pairs = []
                for seed in seeds:
                    result = simulate(task_config(task, attack, name, seed), progress=False, write=False)
                    work, x, y = tests[seed]
                    honest = work.evaluate_params(result.params, x, y).accuracy
                    pairs.append([round(result.final_accuracy, 4), round(honest, 4)])
                record = {"task": task, "attack": attack, "aggregator": name,
                          "final_accuracy": round(float(np.mean([p[0] for p in pairs])), 4),
                          "honest_accuracy": round(float(np.mean([p[1] for p in pairs])), 4), "seeds": pairs}
                emit(record, FIELDS)
                records.append(record)
    return finish(records, figure, _plot)


def _plot(records: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in records))
    attacks = list(dict.fromkeys(r["attack"] for r in records))
    names = list(dict.fromkeys(r["aggregator"] for r in records))
    fig, axes = plt.subplots(1, len(tasks), figsize=(7 * len(tasks), 4), squeeze=False)
    width = 0.8 / len(names)
    for ax, task in zip(axes[0], tasks):
        acc = {(r["attack"], r["aggregator"]): r["final_accuracy"] for r in records if r["task"] == task}
        for j, name in enumerate(names):
            xs = np.arange(len(attacks)) + (j - len(names) / 2 + 0.5) * width
            ax.bar(xs, [acc.get((a, name), np.nan) for a in attacks], width, label=name)
        ax.set_xticks(np.arange(len(attacks)), attacks)
        ax.set(title=f"{task}: 20% attackers (mean of 3 seeds)", ylabel="final test accuracy", ylim=(0, 1))
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_cost(repeat: int = 3) -> list[dict[str, Any]]:
    """Each reducer on 100 updates of 1M float32 values, and a W-A round with it (see the module docstring)."""
    from dataclasses import replace

    from benchmarks.workloads import WORKLOADS
    from fedloom.build import build_aggregator
    from fedloom.params import ParamSpec
    from fedloom.simulation.runner import simulate
    from fedloom.stages.base import Contribution

    rng = np.random.default_rng(0)
    updates = [Contribution(i, [rng.standard_normal(1_000_000, dtype=np.float32)], 1.0, 1.0) for i in range(100)]
    wa = WORKLOADS["wa"].with_engine("fedloom-vectorized")
    records, base = [], None
    for name in AGGREGATORS:
        cfg = replace(wa, aggregation=replace(wa.aggregation, **aggregation(name, 0.6, 90, 100)))
        aggregator = build_aggregator(cfg, 1000)
        state = aggregator.init(ParamSpec.of(updates[0].delta))
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            aggregator.aggregate(updates, state, 1, 100)
            times.append(time.perf_counter() - start)
        one = replace(cfg, run=replace(cfg.run, rounds=5))
        simulate(replace(one, run=replace(one.run, rounds=1)), progress=False, write=False)  # warm-up
        rounds = [simulate(one, progress=False, write=False).train_s / 5 for _ in range(repeat)]
        record = {"reducer": name, "seconds_100x1m": round(min(times), 3), "wa_round_s": round(min(rounds), 4)}
        base = base or record["wa_round_s"]
        record["ratio"] = round(record["wa_round_s"] / base, 2)
        print(json.dumps(record), flush=True)
        records.append(record)
    return records
