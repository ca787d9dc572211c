"""Load benchmark for the gRPC deployment: one real server process, many lightweight clients as threads.

    python -m benchmarks.run load        # 200 clients, 5 rounds, TLS (server certificate only)

:func:`run_load` writes a throw-away config (synthetic data, logistic regression, two local steps,
every client in every round), starts ``fedloom server`` as a child process listening on a free
127.0.0.1 port, waits for the enrolment tokens it writes, and runs one
:func:`fedloom.deploy.client.serve_client` per client in a thread of this process (each thread
with its own :class:`TorchClientWork`, since one instance reuses one model and is not
thread-safe). All traffic stays on loopback and everything is bounded: the clients stop when the
server says the run is finished (or on the shared ``stop`` event), the server is terminated on
any error, and the temporary folder is deleted.

Fields of the record:

- ``updates_expected``: ``clients * rounds``;
- ``updates_received``: the updates the server accepted, summed over its ``round N: ... K updates``
  lines (fewer than expected means lost or refused updates);
- ``rounds_per_s``: round intervals per second between the first and the last round line, timed
  as the lines arrive: ``(rounds - 1) / (t_last - t_first)``; ``None`` with a single round;
- ``server_rss_mb``: peak resident memory of the server process (the max of ``VmRSS`` and ``VmHWM``
  from ``/proc/PID/status``, polled every 0.2 s until it exits);
- ``wall_s``: the whole call, PKI, server start-up, data and shutdown included.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import IO, Any

import fedloom
from fedloom.build import build_clients
from fedloom.client.torch_work import TorchClientWork
from fedloom.config import Config, config_from_dict, to_toml
from fedloom.deploy.certs import make_dev_pki
from fedloom.deploy.client import serve_client

log = logging.getLogger("fedloom.benchmarks.load")

ROUND_LINE = re.compile(r"^round (\d+): .*?(\d+) updates")
POLL_S = 0.2


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


def run_load(clients: int = 200, rounds: int = 5, tls: bool = True, timeout_s: float = 900.0) -> dict[str, Any]:
    """Run ``clients`` threaded clients against a real server process for ``rounds`` rounds; return the record.

    Raises ``RuntimeError`` when the server fails (with the tail of its log) and ``TimeoutError`` when
    the run takes longer than ``timeout_s``; either way the server is killed and the folder removed.
    """
    if clients < 1 or rounds < 1:
        raise ValueError("clients and rounds must be >= 1")
    start = time.monotonic()
    deadline = start + timeout_s
    tmp = Path(tempfile.mkdtemp(prefix="fedloom-load-"))
    stop = threading.Event()
    threads: list[threading.Thread] = []
    server: subprocess.Popen[str] | None = None
    try:
        pki, state = tmp / "pki", tmp / "state"
        if tls:
            make_dev_pki(pki)  # CA and server certificate (localhost, 127.0.0.1); no client certificates
        port = _free_port()
        cfg = _config(clients, rounds, tls, port, state, pki)
        config_path = tmp / "load.toml"
        config_path.write_text(to_toml(cfg))

        cmd = [sys.executable, "-m", "fedloom.cli", "server", "--config", str(config_path)]
        if tls:
            cmd += ["--set", f'deploy.cert="{pki / "server.pem"}"', "--set", f'deploy.key="{pki / "server.key"}"']
        src = str(Path(fedloom.__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
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

        work, dataset = build_clients(cfg)  # while the server starts; the data is the same (same config)
        ready_by = min(deadline, time.monotonic() + 120)
        tokens = _read_tokens(state / "tokens", list(cfg.deploy.clients), server, ready_by)
        _wait_listening(port, server, ready_by)  # else every client starts in a reconnect backoff
        errors: list[str] = []
        done: list[int] = []

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
        stragglers = sum(t.is_alive() for t in threads)
        if errors or stragglers:
            log.warning("%d client errors, %d clients still running after the server stopped; first errors: %s",
                        len(errors), stragglers, "; ".join(errors[:5]))
        times = [t for t, _, _ in round_lines]
        span = times[-1] - times[0] if len(times) > 1 else 0.0
        return {
            "clients": clients,
            "rounds": rounds,
            "updates_expected": clients * rounds,
            "updates_received": sum(k for _, _, k in round_lines),
            "rounds_per_s": round((len(times) - 1) / span, 3) if span > 0 else None,
            "server_rss_mb": round(peak_kb[0] / 1024, 1),
            "wall_s": round(time.monotonic() - start, 2),
        }
    finally:
        stop.set()
        if server is not None and server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=10)
        end = time.monotonic() + 15.0  # with the server gone, polls fail at once and the clients see ``stop``
        for t in threads:  # daemon threads: any still in a (bounded) backoff sleep cannot keep the process alive
            t.join(timeout=max(0.0, end - time.monotonic()))
        shutil.rmtree(tmp, ignore_errors=True)
