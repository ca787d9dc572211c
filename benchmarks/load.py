"""Load benchmark for the gRPC deployment: one real server process, many clients, each with its own channel.

    python -m benchmarks.run load        # both modes, one JSON line each:
    #   sync:  200 training clients as threads, 5 synchronous rounds, TLS (server certificate only)
    #   async: 1,000 clients in 4 processes, FedBuff on a model of 1,000,010 float32 values, TLS

:func:`run_load` writes a throw-away config (synthetic data, logistic regression, two local steps,
every client in every round), starts ``fedloom server`` as a child process listening on a free
127.0.0.1 port, waits for the enrolment tokens it writes, and runs one
:func:`fedloom.deploy.client.serve_client` per client in a thread of this process (each thread
with its own :class:`TorchClientWork`, since one instance reuses one model and is not
thread-safe). All traffic stays on loopback and everything is bounded: the clients stop when the
server says the run is finished (or on the shared ``stop`` event), the server is terminated on
any error, and the temporary folder is deleted.

The asynchronous mode measures the server, not training: the server holds no data (``data.dataset =
"site"``, a logistic regression of 100,000 features and 10 classes built from the config, a small
held-out file to test on), keeps ``concurrency`` tasks out among the 1,000 connected clients and
aggregates every ``buffer_size`` arrivals; each client (:class:`Echo`, :func:`serve_client` in a
thread of one of 4 processes) decodes the model it is sent and replies at once with the same small
change. Every byte crosses TLS and the server's door, journal and aggregator as a trained update would.

Fields of the record: ``mode`` (``"sync"`` or ``"async"``), ``clients``, ``updates_per_s`` (updates
the server used per second between its first and last round line), ``lost`` (updates a client was
told were accepted that the server does not hold: the sync mode's ``updates_expected -
updates_received``; the async mode's accepted pushes counted by the clients minus the updates in the
server's journal), ``server_rss_mb``, ``wall_s``; and

- ``updates_expected``: ``clients * rounds``;
- ``updates_received``: the updates the server accepted, summed over its ``round N: ... K updates``
  lines (fewer than expected means lost or refused updates);
- ``rounds_per_s``: round intervals per second between the first and the last round line, timed
  as the lines arrive: ``(rounds - 1) / (t_last - t_first)``; ``None`` with a single round;
- ``server_rss_mb``: peak resident memory of the server process (the max of ``VmRSS`` and ``VmHWM``
  from ``/proc/PID/status``, polled every 0.2 s until it exits);
- ``wall_s``: the whole call, PKI, server start-up, data and shutdown included;
- async only: ``values`` (the model's size), ``concurrency``, ``buffer_size``, ``versions``,
  ``accepted`` (the clients' count), ``journaled`` and ``left_in_buffer`` (accepted after the last version);
  ``ceiling_updates_per_s`` and ``of_ceiling``: the reference, run in the same script after the run, is bare
  gRPC (:func:`grpc_ceiling`) moving the same bytes (the model down, an update of its size up, 1 MiB chunks,
  the same TLS, ``concurrency`` exchanges at once from as many client threads in 4 processes) with no
  decoding, checking, journal or aggregation: what any server could do with this traffic on this machine.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import IO, Any

import numpy as np

import fedloom
from fedloom.build import build_clients
from fedloom.client.torch_work import TorchClientWork
from fedloom.config import Config, config_from_dict, load_config, to_toml
from fedloom.data.dataset import ClientDataset
from fedloom.deploy.certs import make_dev_pki
from fedloom.deploy.client import serve_client
from fedloom.messages import EvaluateConfig, Evaluation, TrainConfig, Update
from fedloom.params import Params

log = logging.getLogger("fedloom.benchmarks.load")

ROUND_LINE = re.compile(r"^round (\d+): .*?(\d+) updates")
POLL_S = 0.2
FEATURES, CLASSES = 100_000, 10  # the asynchronous mode's logistic regression: 1,000,010 values
PROCESSES = 4  # the asynchronous mode's client processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(clients: int, rounds: int, tls: bool, port: int, state: Path, pki: Path) -> Config:
    deploy: dict[str, Any] = {
        "address": f"127.0.0.1:{port}", "state_dir": str(state),
        "clients": [f"c{i:03d}" for i in range(clients)], "min_clients": clients,
        "heartbeat_s": 5.0, "round_timeout_s": 120.0, "tls": tls, "mutual_tls": False,
    }
    if tls:
        deploy["ca"] = str(pki / "ca.pem")  # clients trust the CA; the server's cert/key are set on its command line
    return config_from_dict({
        "run": {"name": "load", "seed": 0, "rounds": rounds, "out_dir": str(state.parent / "runs")},
        "data": {"dataset": "synthetic", "num_clients": clients},
        "model": {"name": "logreg"},
        "client": {"max_steps": 2},
        "server": {"clients_per_round": clients},
        "eval": {"every": rounds},
        "engine": {"executor": "sequential"},
        "deploy": deploy,
    })


def _async_config(clients: int, versions: int, concurrency: int, buffer_size: int, tls: bool, port: int, state: Path,
                  pki: Path, test_data: Path) -> Config:
    deploy: dict[str, Any] = {
        "address": f"127.0.0.1:{port}", "state_dir": str(state),
        "clients": [f"c{i:04d}" for i in range(clients)], "min_clients": clients, "test_data": str(test_data),
        "heartbeat_s": 10.0, "round_timeout_s": 120.0, "tls": tls, "mutual_tls": False,
    }
    if tls:
        deploy["ca"] = str(pki / "ca.pem")
    return config_from_dict({
        "run": {"name": "load-async", "seed": 0, "rounds": versions, "out_dir": str(state.parent / "runs")},
        "data": {"dataset": "site"},
        "model": {"name": "logreg", "input_shape": [FEATURES], "num_classes": CLASSES},
        "server": {"aggregation": "fedbuff", "clients_per_round": concurrency, "concurrency": concurrency,
                   "buffer_size": buffer_size},
        "eval": {"every": versions},
        "deploy": deploy,
    })


class Echo:
    """A load client's work: no training, the same small change for every task (the server is what is measured)."""

    def __init__(self) -> None:
        self.delta: Params | None = None

    def train(self, params: Params, data: ClientDataset, config: TrainConfig) -> Update:
        if self.delta is None:
            self.delta = [np.full(p.shape, 1e-6, p.dtype) for p in params]
        return Update(self.delta, 1.0, "delta", {"loss": 0.0, "examples": 1.0})

    def evaluate(self, params: Params, data: ClientDataset, config: EvaluateConfig) -> Evaluation:
        return Evaluation(0.0, 0.0, 1.0)


def echo_clients(config: str, token_dir: str, first: int, count: int) -> dict[str, Any]:
    """Run clients ``first .. first + count - 1`` of an asynchronous load run as threads until the server finishes;
    the replies the server accepted and the errors."""
    cfg = load_config(config)
    work = Echo()  # one per process: its change is read, never written
    empty = np.zeros((0, FEATURES), np.float32)
    accepted: list[int] = []
    errors: list[str] = []

    def client(i: int) -> None:
        token = (Path(token_dir) / f"c{i:04d}.token").read_text().strip()
        data = ClientDataset(i, empty, np.zeros(0, np.int64), empty, np.zeros(0, np.int64))
        try:
            accepted.append(serve_client(work, data, cfg, cfg.deploy.address, token, give_up_s=120.0))
        except Exception as exc:  # noqa: BLE001 - reported, must not end the other clients
            errors.append(f"c{i:04d}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(first, first + count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"accepted": sum(accepted), "errors": errors}


def _pump(stream: IO[str], sink: Any) -> None:
    """Hand every line of ``stream`` to ``sink(time, line)`` until EOF (keeps the pipe from filling up)."""
    for line in stream:
        sink(time.monotonic(), line.rstrip("\n"))


def _rss_kb(pid: int) -> int:
    """The larger of VmRSS and VmHWM of ``pid`` in kB; 0 when it is gone (or a zombie, which has neither)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    values = [int(line.split()[1]) for line in text.splitlines() if line.startswith(("VmRSS:", "VmHWM:"))]
    return max(values, default=0)


def _read_tokens(token_dir: Path, names: list[str], server: subprocess.Popen[str], deadline: float) -> list[str]:
    """Every client's token, waiting until the server has written all of them (it enrols in order)."""
    tokens: list[str] = []
    for name in names:
        path = token_dir / f"{name}.token"
        while True:
            token = path.read_text().strip() if path.exists() else ""
            if token:
                tokens.append(token)
                break
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with code {server.returncode} before enrolling {name}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server never wrote {path}")
            time.sleep(0.1)
    return tokens


def _wait_listening(port: int, server: subprocess.Popen[str], deadline: float) -> None:
    """Wait until the server accepts connections: it writes the tokens before it loads its data and listens."""
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            pass
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode} before it listened")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server never listened on 127.0.0.1:{port}")
        time.sleep(0.1)


def run_load(mode: str = "sync", clients: int | None = None, rounds: int | None = None, tls: bool = True,
             timeout_s: float = 900.0, concurrency: int = 50, buffer_size: int = 25,
             ceiling: bool = False, watcher: Any = None) -> dict[str, Any]:
    """Run ``clients`` clients against a real server process for ``rounds`` rounds (server updates, for ``"async"``);
    return the record. Defaults: sync, 200 clients, 5 rounds; async, 1,000 clients, 40 versions. With ``ceiling``
    the async record adds the reference, :func:`grpc_ceiling`, and the run's share of it. A ``watcher``
    (``benchmarks/dashboard.py``) is started on the folder that will hold the state before the server starts,
    stopped when the server has exited, and adds its fields to the record.

    Raises ``RuntimeError`` when the server fails (with the tail of its log) and ``TimeoutError`` when
    the run takes longer than ``timeout_s``; either way the server and the clients are killed and the folder removed.
    """
    if mode not in ("sync", "async"):
        raise ValueError(f"mode is sync or async, not {mode!r}")
    clients = clients or (200 if mode == "sync" else 1000)
    rounds = rounds or (5 if mode == "sync" else 40)
    if clients < 1 or rounds < 1:
        raise ValueError("clients and rounds must be >= 1")
    start = time.monotonic()
    deadline = start + timeout_s
    tmp = Path(tempfile.mkdtemp(prefix="fedloom-load-"))
    stop = threading.Event()
    threads: list[threading.Thread] = []
    procs: list[subprocess.Popen[str]] = []
    server: subprocess.Popen[str] | None = None
    try:
        pki, state = tmp / "pki", tmp / "state"
        if tls:
            make_dev_pki(pki)  # CA and server certificate (localhost, 127.0.0.1); no client certificates
        port = _free_port()
        if mode == "sync":
            cfg = _config(clients, rounds, tls, port, state, pki)
        else:
            test = tmp / "test.npz"
            rng = np.random.default_rng(0)
            np.savez(test, x=rng.normal(size=(8, FEATURES)).astype(np.float32), y=np.arange(8) % CLASSES)
            cfg = _async_config(clients, rounds, min(concurrency, clients), buffer_size, tls, port, state, pki, test)
        config_path = tmp / "load.toml"
        config_path.write_text(to_toml(cfg))
        if watcher is not None:  # on the folder that will hold the state: it looks from the server's first round
            watcher.start(tmp)

        cmd = [sys.executable, "-m", "fedloom.cli", "server", "--config", str(config_path)]
        if tls:
            cmd += ["--set", f'deploy.cert="{pki / "server.pem"}"', "--set", f'deploy.key="{pki / "server.key"}"']
        src = str(Path(fedloom.__file__).resolve().parents[1])
        here = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, here, os.environ.get("PYTHONPATH")) if p)}
        server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        pid = server.pid

        round_lines: list[tuple[float, int, int]] = []  # (arrival time, round, accepted updates)
        stderr_tail: deque[str] = deque(maxlen=40)

        def on_stdout(t: float, line: str) -> None:
            m = ROUND_LINE.match(line)
            if m:
                round_lines.append((t, int(m.group(1)), int(m.group(2))))

        readers = [threading.Thread(target=_pump, args=(server.stdout, on_stdout), daemon=True),
                   threading.Thread(target=_pump, args=(server.stderr, lambda _t, s: stderr_tail.append(s)),
                                    daemon=True)]
        for r in readers:
            r.start()
        peak_kb = [0]

        def poll_rss() -> None:
            while server.poll() is None:
                peak_kb[0] = max(peak_kb[0], _rss_kb(pid))
                time.sleep(POLL_S)

        poller = threading.Thread(target=poll_rss, daemon=True)
        poller.start()

        names = list(cfg.deploy.clients)
        ready_by = min(deadline, time.monotonic() + 120)
        errors: list[str] = []
        done: list[int] = []
        if mode == "sync":
            work, dataset = build_clients(cfg)  # while the server starts; the data is the same (same config)
            tokens = _read_tokens(state / "tokens", names, server, ready_by)
            _wait_listening(port, server, ready_by)  # else every client starts in a reconnect backoff

            def client(i: int) -> None:
                try:
                    done.append(serve_client(TorchClientWork(work.model_fn), dataset[i], cfg, cfg.deploy.address,
                                             tokens[i], give_up_s=60.0, stop=stop))
                except Exception as exc:  # noqa: BLE001 - reported below, must not kill the other clients
                    errors.append(f"c{i:03d}: {type(exc).__name__}: {exc}")

            for i in range(clients):
                t = threading.Thread(target=client, args=(i,), name=f"load-c{i:03d}", daemon=True)
                t.start()
                threads.append(t)
        else:
            _read_tokens(state / "tokens", names, server, ready_by)
            _wait_listening(port, server, ready_by)
            share = -(-clients // PROCESSES)
            for first in range(0, clients, share):
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.load", str(config_path), str(state / "tokens"), str(first),
                     str(min(share, clients - first))], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                    env=env))

        try:
            server.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"the run took longer than {timeout_s:g} s; server log:\n"
                               + "\n".join(stderr_tail)) from None
        for r in readers:
            r.join(timeout=10)
        poller.join(timeout=5)
        if server.returncode != 0:
            raise RuntimeError(f"the server exited with code {server.returncode}:\n" + "\n".join(stderr_tail))
        for t in threads:  # the server said "finished" to every poller before it stopped
            t.join(timeout=max(0.1, min(30.0, deadline - time.monotonic())))
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, min(120.0, deadline - time.monotonic())))
            got = json.loads(out.strip().splitlines()[-1]) if out.strip() else {"accepted": 0, "errors": ["no record"]}
            done.append(got["accepted"])
            errors += got["errors"]
        stragglers = sum(t.is_alive() for t in threads)
        if errors or stragglers:
            log.warning("%d client errors, %d clients still running after the server stopped; first errors: %s",
                        len(errors), stragglers, "; ".join(errors[:5]))
        times = [t for t, _, _ in round_lines]
        span = times[-1] - times[0] if len(times) > 1 else 0.0
        applied = sum(k for _, _, k in round_lines[1:])  # the updates used after the first line, over its span
        record: dict[str, Any] = {
            "mode": mode,
            "clients": clients,
            "rounds": rounds,
            "updates_per_s": round(applied / span, 1) if span > 0 else None,
            "server_rss_mb": round(peak_kb[0] / 1024, 1),
        }
        if mode == "sync":
            received = sum(k for _, _, k in round_lines)
            record.update(updates_expected=clients * rounds, updates_received=received,
                          lost=clients * rounds - received,
                          rounds_per_s=round((len(times) - 1) / span, 3) if span > 0 else None)
        else:
            with sqlite3.connect(f"file:{state / 'server.db'}?mode=ro", uri=True) as conn:
                journaled, left = conn.execute("SELECT COUNT(*), SUM(applied IS NULL) FROM updates").fetchone()
            record.update(values=FEATURES * CLASSES + CLASSES, concurrency=cfg.server.concurrency,
                          buffer_size=buffer_size, versions=len(round_lines), accepted=sum(done),
                          journaled=journaled, left_in_buffer=left or 0, lost=max(0, sum(done) - journaled))
            if ceiling:  # after the run, alone on the machine: the same bytes each way, as many at once
                size = 4 * (FEATURES * CLASSES + CLASSES)
                record["ceiling_updates_per_s"] = round(grpc_ceiling(cfg.server.concurrency, size, tls), 1)
                if record["updates_per_s"]:
                    record["of_ceiling"] = round(record["updates_per_s"] / record["ceiling_updates_per_s"], 3)
        record["wall_s"] = round(time.monotonic() - start, 2)
        if watcher is not None:
            record.update(watcher.stop())
        return record
    finally:
        stop.set()
        if watcher is not None:
            watcher.close()
        if server is not None and server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=10)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        end = time.monotonic() + 15.0  # with the server gone, polls fail at once and the clients see ``stop``
        for t in threads:  # daemon threads: any still in a (bounded) backoff sleep cannot keep the process alive
            t.join(timeout=max(0.0, end - time.monotonic()))
        shutil.rmtree(tmp, ignore_errors=True)


# -- the reference: the same bytes through bare gRPC ------------------------------------------------

CEILING = "fedloom.bench.Ceiling"


def _ceiling_server(pki: str, seconds: float, size: int) -> None:
    """A bare gRPC server (asyncio, as fedloom's): ``Pull`` streams ``size`` bytes in 1 MiB chunks, ``Push`` reads
    a chunked message and counts it. Prints its port, waits for a line on stdin, then counts pushes for ``seconds``
    and prints ``{"updates_per_s": ...}``."""
    import asyncio

    import grpc

    from fedloom.transport import wire
    from fedloom.transport.proto import fedloom_pb2 as pb

    blob = os.urandom(size)
    count = [0]
    port: list[int] = []
    ready = threading.Event()

    async def pull(requests: Any, context: Any) -> Any:
        async for _ in requests:
            break
        for chunk in wire.slices(blob):
            yield chunk

    async def push(requests: Any, context: Any) -> Any:
        buf = bytearray()
        async for chunk in requests:
            buf += chunk.data
        count[0] += 1
        return pb.PushReply(accepted=True)

    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(CEILING, {
            "Pull": grpc.stream_stream_rpc_method_handler(pull, request_deserializer=pb.PullRequest.FromString,
                                                          response_serializer=pb.Chunk.SerializeToString),
            "Push": grpc.stream_unary_rpc_method_handler(push, request_deserializer=pb.Chunk.FromString,
                                                         response_serializer=pb.PushReply.SerializeToString)}),))
        if pki:
            creds = grpc.ssl_server_credentials([(Path(pki, "server.key").read_bytes(),
                                                  Path(pki, "server.pem").read_bytes())])
            port.append(server.add_secure_port("127.0.0.1:0", creds))
        else:
            port.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        ready.set()
        await asyncio.sleep(seconds + 600)

    threading.Thread(target=lambda: asyncio.run(main()), daemon=True).start()
    ready.wait()
    print(port[0], flush=True)
    sys.stdin.readline()
    first, start = count[0], time.monotonic()
    time.sleep(seconds)
    print(json.dumps({"updates_per_s": (count[0] - first) / (time.monotonic() - start)}), flush=True)


def _ceiling_clients(pki: str, port: int, count: int, size: int) -> None:
    """``count`` threads, each with its own channel, pulling ``size`` bytes and pushing as many back, until killed."""
    import grpc

    from fedloom.transport import wire
    from fedloom.transport.proto import fedloom_pb2 as pb

    blob = os.urandom(size)

    def client() -> None:
        options = [("grpc.max_receive_message_length", 8 << 20)]
        address = f"127.0.0.1:{port}"
        channel = (grpc.secure_channel(address, grpc.ssl_channel_credentials(Path(pki, "ca.pem").read_bytes()),
                                       options) if pki else grpc.insecure_channel(address, options))
        pull = channel.stream_stream(f"/{CEILING}/Pull", request_serializer=pb.PullRequest.SerializeToString,
                                     response_deserializer=pb.Chunk.FromString)
        push = channel.stream_unary(f"/{CEILING}/Push", request_serializer=pb.Chunk.SerializeToString,
                                    response_deserializer=pb.PushReply.FromString)
        try:
            while True:
                b"".join(c.data for c in pull(iter([pb.PullRequest()])))
                push(wire.slices(blob))
        except grpc.RpcError:  # the reference is over: its server is gone
            return

    for _ in range(count):
        threading.Thread(target=client, daemon=True).start()
    threading.Event().wait()


def grpc_ceiling(streams: int, size: int, tls: bool, seconds: float = 20.0) -> float:
    """Exchanges per second of bare gRPC on this machine: ``streams`` clients (in :data:`PROCESSES` processes) each
    pulling ``size`` bytes and pushing as many back, with no decoding, checking, journal or aggregation: the most
    any server could do with the asynchronous mode's traffic here."""
    tmp = Path(tempfile.mkdtemp(prefix="fedloom-ceiling-"))
    procs: list[subprocess.Popen[str]] = []
    here = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}
    try:
        pki = ""
        if tls:
            make_dev_pki(tmp / "pki")
            pki = str(tmp / "pki")
        server = subprocess.Popen([sys.executable, "-m", "benchmarks.load", "ceiling-server", pki, str(seconds),
                                   str(size)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        procs.append(server)
        port = int(server.stdout.readline())  # type: ignore[union-attr]
        share = -(-streams // PROCESSES)
        for first in range(0, streams, share):
            procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.load", "ceiling-clients", pki, str(port),
                                           str(min(share, streams - first)), str(size)], env=env))
        time.sleep(5.0)  # connected and flowing
        server.stdin.write("go\n")  # type: ignore[union-attr]
        server.stdin.flush()  # type: ignore[union-attr]
        return float(json.loads(server.stdout.readline())["updates_per_s"])  # type: ignore[union-attr]
    finally:
        for p in reversed(procs):  # the clients first
            p.kill()
            p.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":  # the asynchronous mode's client processes, and the reference's server and clients
    logging.basicConfig(level=logging.WARNING)
    if sys.argv[1] == "ceiling-server":
        _ceiling_server(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
    elif sys.argv[1] == "ceiling-clients":
        _ceiling_clients(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:  # CONFIG TOKEN_DIR FIRST COUNT
        print(json.dumps(echo_clients(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
