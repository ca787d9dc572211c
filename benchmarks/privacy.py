"""Differential privacy's price in accuracy: DP-FedAvg at epsilon 1, 4 and 8 (delta 1e-5) against no DP.

    python -m benchmarks.run privacy
    python -m benchmarks.run privacy --figure privacy.png

One JSON line per (task, target): ``task``, ``epsilon`` (the epsilon the run actually reached, from
its last round's ``dp_noise.epsilon``; ``null`` without DP), ``delta`` and ``final_accuracy``. Each
row's ``target`` (the epsilon the noise was calibrated for with ``fedloom privacy``'s function,
``null`` without DP) goes to stderr. The tasks:

- ``keyboard``: the keyboard example (``examples/keyboard.toml``: Shakespeare roles, character
  LSTM, 20 of 227 clients a round, 60 rounds), with uniform weighting and clip bound 0.5;
- ``synthetic``: Synthetic(1, 1) with 1,000 clients (W-A's data), logistic regression, 100 clients
  a round, 30 rounds, clip bound 0.2.

Both sample a fixed number of clients without replacement, accounted as such (replace-one
neighbours: stricter than the Poisson approximation often quoted; docs/robustness-and-privacy.md).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.rows import emit, finish
from fedloom.config import Config, config_from_dict, load_config

DELTA = 1e-5
TARGETS = (None, 1.0, 4.0, 8.0)
FIELDS = ("task", "epsilon", "delta", "final_accuracy")  # what a stdout line holds (issue 10)
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "keyboard.toml"


def _keyboard() -> Config:
    cfg = load_config(EXAMPLE, ["aggregation.weighting=\"uniform\"", "privacy.clip=0.5", "eval.every=60"])
    return replace(cfg, run=replace(cfg.run, name="privacy-keyboard"))


def _synthetic() -> Config:
    return config_from_dict({
        "run": {"name": "privacy-synthetic", "seed": 0, "rounds": 30},
        "data": {"dataset": "synthetic", "num_clients": 1000},
        "model": {"name": "logreg"},
        "client": {"lr": 0.05, "batch_size": 10, "max_steps": 20},
        "server": {"clients_per_round": 100},
        "aggregation": {"weighting": "uniform"},
        "privacy": {"clip": 0.2},
        "eval": {"every": 30},
        "engine": {"executor": "vectorized"},
    })


TASKS = {"keyboard": _keyboard, "synthetic": _synthetic}


def private(cfg: Config, target: float | None) -> Config:
    """``cfg`` with the noise that keeps its run within ``target`` (no DP for None)."""
    from fedloom.build import accountant, load_dataset
    from fedloom.stages.privacy import noise_for_epsilon

    if target is None:
        return cfg
    acct = accountant(replace(cfg, privacy=replace(cfg.privacy, noise_multiplier=1.0, delta=DELTA)),
                      len(load_dataset(cfg)))
    z = noise_for_epsilon(target, cfg.run.rounds, acct.sampling, acct.population, acct.per_round, DELTA)
    return replace(cfg, privacy=replace(cfg.privacy, noise_multiplier=z, delta=DELTA))


def run_privacy(tasks: list[str] | None = None, figure: str | None = None) -> list[dict[str, Any]]:
    """Every (task, target); one JSON line each (see the module docstring)."""
    from fedloom.simulation.runner import simulate

    records = []
    for task in tasks or list(TASKS):
        for target in TARGETS:
            result = simulate(private(TASKS[task](), target), progress=False, write=False)
            reached = result.history[-1].get("dp_noise.epsilon")
            record = {"task": task, "epsilon": None if reached is None else round(reached, 3), "delta": DELTA,
                      "final_accuracy": round(result.final_accuracy, 4), "target": target}
            emit(record, FIELDS)
            records.append(record)
    return finish(records, figure, _plot)


def _plot(records: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for task in dict.fromkeys(r["task"] for r in records):
        rows = [r for r in records if r["task"] == task]
        dp = [r for r in rows if r["epsilon"] is not None]
        line = ax.plot([r["epsilon"] for r in dp], [r["final_accuracy"] for r in dp], marker="o", label=task)[0]
        for r in rows:
            if r["epsilon"] is None:
                ax.axhline(r["final_accuracy"], color=line.get_color(), linestyle="--", alpha=0.6)
    ax.set(xscale="log", xlabel=f"epsilon reached (delta {DELTA:g})", ylabel="final test accuracy",
           title="DP-FedAvg: accuracy against epsilon (dashed: no DP)", ylim=(0, None))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
