"""The ``fedloom`` command: ``simulate`` a config, ``report`` a run folder."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from fedloom.errors import FedloomError


def _simulate(args: argparse.Namespace) -> int:
    from fedloom.simulation.config import load_config, with_rounds
    from fedloom.simulation.runner import simulate

    cfg = load_config(args.config, args.set or [])
    if args.rounds is not None:
        cfg = with_rounds(cfg, args.rounds)
    result = simulate(cfg, progress=not args.quiet)
    accs = [(r["test_accuracy"], int(r["round"])) for r in result.history if not math.isnan(r.get("test_accuracy",
                                                                                                 math.nan))]
    best, best_round = max(accs)
    print(
        f"{cfg.run.name}: {cfg.run.rounds} rounds, final test accuracy {result.final_accuracy:.4f} "
        f"(best {best:.4f} at round {best_round}), training {result.train_s:.1f} s -> {result.run_dir} "
        f"(metrics.csv, model.npz, accuracy.png)"
    )
    return 0


def _report(args: argparse.Namespace) -> int:
    from fedloom.simulation.report import plot_run

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise FedloomError(f"no run folder at {run_dir}")
    print(f"wrote {plot_run(run_dir)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedloom", description="Federated learning: simulate and report.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("simulate", help="run an in-process simulation from a TOML config")
    p.add_argument("config", help="TOML config file (see examples/)")
    p.add_argument("--rounds", type=int, help="override run.rounds")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting, e.g. client.lr=0.5")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_simulate)
    p = sub.add_parser("report", help="redraw the plots of a run folder")
    p.add_argument("run_dir")
    p.set_defaults(func=_report)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FedloomError as exc:
        print(f"fedloom: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
