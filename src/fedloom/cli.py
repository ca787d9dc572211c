"""The ``fedloom`` command: ``simulate`` a config, ``report`` a run folder, ``server``/``client`` a deployment,
``dashboard`` any of them."""

from __future__ import annotations

import argparse
import math
import signal
import sys
from dataclasses import replace
from pathlib import Path

from fedloom.errors import FedloomError


def _simulate(args: argparse.Namespace) -> int:
    from fedloom.config import load_config, with_rounds
    from fedloom.errors import ConfigError
    from fedloom.simulation import timings
    from fedloom.simulation.runner import simulate

    timings.COMMAND = True  # this process is the command's: its age when the run begins is the start-up

    if (args.config is None) == (args.resume is None):
        raise ConfigError("simulate", "give a config file, or --resume RUN_DIR (whose config.toml is used)")
    config = args.config if args.resume is None else str(Path(args.resume) / "config.toml")
    cfg = load_config(config, args.set or [])
    if args.rounds is not None:
        cfg = with_rounds(cfg, args.rounds)
    try:
        result = simulate(cfg, progress=not args.quiet, resume=args.resume)
    except KeyboardInterrupt:
        print("fedloom: interrupted", file=sys.stderr)
        return 130
    accs = [(r["test_accuracy"], int(r["round"])) for r in result.history if not math.isnan(r.get("test_accuracy",
                                                                                                 math.nan))]
    best, best_round = max(accs)
    print(
        f"{cfg.run.name}: {len(result.history)} rounds, final test accuracy {result.final_accuracy:.4f} "
        f"(best {best:.4f} at round {best_round}), training {result.train_s:.1f} s "
        f"({result.engine.split(':')[0]} engine) -> {result.run_dir} "
        f"(metrics.csv, model.npz, model.pt, accuracy.png)"
    )
    if args.profile:
        from fedloom.simulation.timings import TIMINGS, Timings

        print(f"where the time went ({TIMINGS}): {Timings.line_of(result.timings)}")
    if result.failed:
        print(f"fedloom: error: the run failed: {result.failed}", file=sys.stderr)
        return 1
    return 0


def _report(args: argparse.Namespace) -> int:
    from fedloom.simulation.report import plot_run

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise FedloomError(f"no run folder at {run_dir}")
    print(f"wrote {plot_run(run_dir)}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from fedloom.simulation.compare import compare_runs

    out = Path(args.out) if args.out else None
    path, summaries = compare_runs([Path(d) for d in args.run_dirs], target=args.target, out=out)
    for s in summaries:
        if s["rounds_to_target"] is None:
            reached = "not reached"
        else:
            secs = "n/a" if s["time_to_target_s"] is None else f"{s['time_to_target_s']:.1f} s"
            reached = f"{secs} (round {s['rounds_to_target']})"
        trips = "n/a trips" if s["trips"] is None else f"{s['trips']} trips"
        print(f"{s['run']}: time-to-target {reached}, final accuracy {s['final_accuracy']:.4f}, {trips}")
    print(f"wrote {path}")
    return 0


def _server(args: argparse.Namespace) -> int:
    import logging

    from fedloom.config import load_config
    from fedloom.deploy.server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = load_config(args.config, args.set or [])

    def show(row: dict[str, float]) -> None:
        fed = f", federated accuracy {row['fed_accuracy']:.4f}" if "fed_accuracy" in row else ""
        central = (f"test accuracy {row['test_accuracy']:.4f}, loss {row['test_loss']:.4f}, "
                   if "test_accuracy" in row else "")  # a server of sites without deploy.test_data has none
        print(f"round {int(row['round'])}: {central}{int(row['accepted'])} updates{fed}", flush=True)

    signal.signal(signal.SIGTERM, _interrupt)  # stop as on Ctrl-C: the clients are not told that the run is over
    try:
        state = serve(cfg, on_round=show)
    except KeyboardInterrupt:
        print(f"fedloom: server stopped before the run finished; its clients keep reconnecting, and the same command "
              f"resumes after the last completed round (state in {cfg.deploy.state_dir})", file=sys.stderr)
        return 130
    print(f"{cfg.run.name}: finished after round {state.round}; state in {cfg.deploy.state_dir}")
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _client(args: argparse.Namespace) -> int:
    import logging

    from fedloom.config import load_config
    from fedloom.deploy.client import run_client

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = load_config(args.config, args.set or [])
    try:
        done = run_client(cfg, args.server)
    except KeyboardInterrupt:
        print(f"fedloom: client {cfg.deploy.name} stopped before the run finished", file=sys.stderr)
        return 130
    print(f"{cfg.deploy.name}: run finished, {done} tasks done")
    return 0


def _privacy(args: argparse.Namespace) -> int:
    from fedloom.build import accountant, load_dataset
    from fedloom.config import load_config
    from fedloom.stages.privacy import noise_for_epsilon

    cfg = load_config(args.config, args.set or [])
    rounds = args.rounds or cfg.run.rounds
    acct = accountant(cfg, len(load_dataset(cfg)))
    z = noise_for_epsilon(args.epsilon, rounds, acct.sampling, acct.population, acct.per_round, acct.delta)
    how = {"fixed": f"{acct.per_round} of {acct.population} clients a round, drawn without replacement",
           "poisson": f"each of {acct.population} clients with probability {acct.per_round}/{acct.population}",
           "none": "no amplification by sampling"}[acct.sampling]
    reached = replace(acct, noise_multiplier=z).epsilon(rounds)
    print(f"noise_multiplier = {z:.4f} keeps {rounds} rounds ({how}) within epsilon {args.epsilon:g} at delta "
          f"{acct.delta:g} (it reaches {reached:.4f})")
    return 0


def _certs(args: argparse.Namespace) -> int:
    from fedloom.deploy.certs import make_dev_pki

    paths = make_dev_pki(Path(args.out_dir), server_names=args.server_name or ["localhost", "127.0.0.1"],
                         clients=args.client or [], overwrite=args.overwrite)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from fedloom.deploy.state import ServerState

    db = Path(args.state_dir) / "server.db"
    if not db.exists():
        raise FedloomError(f"no server state at {db}")
    with ServerState(db) as store:
        store.revoke(args.name)
    print(f"revoked {args.name}: the server refuses its token from now on")
    return 0


def _trace(args: argparse.Namespace) -> int:
    from fedloom.deploy.trace import trace_run

    found = trace_run(args.state_dir, args.run, args.out)
    for d in found:
        print(f"client {d.client_id} ({d.name}): {d.compute_sps:.4g} samples/s, down {d.down_bps:.3g} bit/s, up "
              f"{d.up_bps:.3g} bit/s, dropout {d.dropout_p:.2f} ({d.trained} of {d.asked} training tasks), "
              f"{len(d.available)} connected interval{'s' * (len(d.available) != 1)}")
    print(f"wrote {args.out}: use it as hetero.population = \"{args.out}\"")
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    from fedloom.dashboard.serve import serve

    try:
        serve(args.paths, host=args.host, port=args.port, cert=args.cert, key=args.key, token_file=args.token_file,
              refresh_s=args.refresh)
    except KeyboardInterrupt:
        pass
    return 0


def _init(args: argparse.Namespace) -> int:
    from fedloom.starter import write_defaults, write_project

    if args.project:
        folder = write_project(args.path)
        print(f"wrote {folder}/model.py, data.py and config.toml; run it with: cd {folder} && fedloom simulate "
              "config.toml")
    else:
        print(f"wrote {write_defaults(args.path)}: every setting at its default, with its comment")
    return 0


def main(argv: list[str] | None = None) -> int:
    from fedloom import __version__

    parser = argparse.ArgumentParser(prog="fedloom", description="Federated learning: simulate, report, deploy.")
    parser.add_argument("--version", action="version", version=f"fedloom {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("init", help="write a config with every default, or (--project) a small project to start from")
    p.add_argument("path", help="the config file to write, or with --project the folder")
    p.add_argument("--project", action="store_true", help="write model.py, data.py and config.toml into PATH")
    p.set_defaults(func=_init)
    p = sub.add_parser("simulate", help="run an in-process simulation from a TOML config")
    p.add_argument("config", nargs="?", help="TOML config file (see examples/)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run folder from its checkpoint.npz "
                                                       "(with --rounds: to that many rounds)")
    p.add_argument("--rounds", type=int, help="override run.rounds")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting, e.g. client.lr=0.5")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--profile", action="store_true", help="print where the run's time went (also in timings.json)")
    p.set_defaults(func=_simulate)
    p = sub.add_parser("report", help="redraw the plots of a run folder")
    p.add_argument("run_dir")
    p.set_defaults(func=_report)
    p = sub.add_parser("compare", help="plot several run folders together; time and rounds to a target accuracy")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--target", type=float,
                   help="target test accuracy (default: the lowest of the runs' best accuracies)")
    p.add_argument("--out", help="figure path (default: compare.png in the current directory)")
    p.set_defaults(func=_compare)
    p = sub.add_parser("server", help="run a federated server over gRPC (the [deploy] section configures it)")
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.set_defaults(func=_server)
    p = sub.add_parser("client", help="take part in a server's run with this machine's data")
    p.add_argument("--server", help="HOST:PORT of the server (default: deploy.address)")
    p.add_argument("--config", required=True, help="config naming the data, the model and the credentials")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.set_defaults(func=_client)
    p = sub.add_parser("privacy", help="the DP noise multiplier that keeps a run within a target epsilon")
    p.add_argument("config", help="the run's TOML config (its sampling, rounds and privacy.delta are used)")
    p.add_argument("--epsilon", type=float, required=True, help="target epsilon")
    p.add_argument("--rounds", type=int, help="rounds (default: run.rounds)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.set_defaults(func=_privacy)
    p = sub.add_parser("certs", help="create a development CA and server/client certificates")
    p.add_argument("out_dir")
    p.add_argument("--client", action="append", help="a client certificate to issue (repeatable)")
    p.add_argument("--server-name", action="append", help="server DNS name or IP (default: localhost, 127.0.0.1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing CA")
    p.set_defaults(func=_certs)
    p = sub.add_parser("revoke", help="revoke a client's enrolment (works while the server runs)")
    p.add_argument("--state-dir", required=True, help="the server's deploy.state_dir")
    p.add_argument("name")
    p.set_defaults(func=_revoke)
    p = sub.add_parser("trace", help="a deployed run's measured devices as a population trace a simulation replays")
    p.add_argument("state_dir", help="the server's deploy.state_dir")
    p.add_argument("--run", help="the run's name (default: the state's only run)")
    p.add_argument("--out", default="trace.csv", help="the trace file, .csv or .json (default: trace.csv)")
    p.set_defaults(func=_trace)
    p = sub.add_parser("dashboard", help="a live, read-only web page of run folders and deployed servers' state")
    p.add_argument("paths", nargs="+", help="run folders (or a folder of them, like runs/), server state folders "
                   "(deploy.state_dir) or their server.db")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1, this machine "
                   "only; any other needs --cert, --key and --token-file)")
    p.add_argument("--port", type=int, default=8050, help="the port (default: 8050; 0: any free one)")
    p.add_argument("--cert", help="TLS certificate (PEM) to serve the page over HTTPS")
    p.add_argument("--key", help="the certificate's private key (PEM)")
    p.add_argument("--token-file", help="a file holding the token every request must carry (made when missing)")
    p.add_argument("--refresh", type=float, default=2.0, help="seconds between the page's looks (default: 2)")
    p.set_defaults(func=_dashboard)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FedloomError as exc:
        print(f"fedloom: error: {exc}", file=sys.stderr)
        return 2


def entry() -> None:
    """The ``fedloom`` command: :func:`main`, then a quick exit.

    Once the command has finished, the exit handlers run (temporary folders, logging, child processes)
    and the output is flushed; then the process ends without the interpreter's teardown, which with
    torch loaded takes about a second on a 2-core machine and does nothing a finished command needs.
    """
    import atexit
    import os
    import traceback

    try:
        code = main()
    except SystemExit as exc:  # argparse's --help, --version and usage errors
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException as exc:  # noqa: BLE001 - reported as the interpreter would, then the same quick exit
        traceback.print_exc()
        code = 130 if isinstance(exc, KeyboardInterrupt) else 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
