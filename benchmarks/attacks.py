"""Resource-exhaustion attacks on a real deployment, beside honest clients.

    python -m benchmarks.run attacks                 # every mix, 20 s of baseline and 20 s of attack each
    python -m benchmarks.run attacks --seconds 10

:class:`Deployment` starts a real ``fedloom server`` (TLS, on a free 127.0.0.1 port) and
three honest ``fedloom client`` processes on the breast-cancer data, with four more clients
(``mallory``..``mallory4``) enrolled for the attacker (``benchmarks/attacker.py``, a separate process
built from the ``.proto`` alone; each attack of a mix has its own identity, ``slow-joins`` none: it
holds a CA-signed certificate that was never enrolled). The tests of
``tests/deploy/test_attacks.py`` use it too.

:func:`run_attacks` keeps one deployment running and, for each mix, measures the honest rounds
completed in a window without attack, then in a window with it, and prints one JSON line:

- ``attack``: the mix;
- ``baseline_rounds_per_min`` / ``honest_rounds_per_min``: rounds completed per minute in the
  window before the attack and during it, from the server's ``round N:`` lines as they arrive;
- ``server_peak_rss_mb``: the server's largest resident memory during the attack (``VmRSS`` of
  ``/proc/PID/status``, every 0.1 s);
- ``lost_updates``: honest updates missing from the attack window's rounds (every connected
  client is asked every round: 3 per round, minus the updates the server accepted).

The benchmark runs the server with TLS but without client certificates, the setting in which
anyone can reach it (with mutual TLS a certificate of no enrolled client is refused at once, so
the slow Joins hold nothing). The attacker answers each task it gets with an error reply, so that
no round waits for it: what is measured is the server's resources, not a straggler. After each
mix the run settles for ``SETTLE_S`` (a task the attacker held when it left waits until the client is taken for lost).
With two or more CPUs, the server and honest clients run on one half of them and the attacker on
the other (``sched_setaffinity``), so that the attacker's own hundreds of threads measure the
server's resilience, not this machine's contention; baseline and attack windows run alike.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fedloom
from fedloom.deploy.certs import make_dev_pki

HONEST = ("c0", "c1", "c2")
ATTACKERS = ("mallory", "mallory2", "mallory3", "mallory4")  # enrolled identities, one per attack of a mix
ATTACKER = Path(__file__).resolve().parent / "attacker.py"
ROUND_LINE = re.compile(r"^round (\d+): .*?(\d+) updates")
MiB = 1 << 20
SETTLE_S = 8.0  # 3 heartbeats (heartbeat_s = 2) and a margin

CONFIG = """
[run]
name = "attacked"
rounds = {rounds}
seed = 0

[data]
dataset = "breast_cancer"
partition = "iid"
num_clients = 4

[model]
name = "logreg"

[client]
lr = 0.1

[server]
clients_per_round = 8  # every connected client, every round

[eval]
every = 1

[engine]
executor = "sequential"

[deploy]
address = "127.0.0.1:{port}"
state_dir = "{state}"
clients = ["c0", "c1", "c2", "mallory", "mallory2", "mallory3", "mallory4"]
min_clients = 3
heartbeat_s = 2.0
round_timeout_s = 20.0
mutual_tls = {mutual_tls}
ca = "{pki}/ca.pem"
cert = "{pki}/server.pem"
key = "{pki}/server.key"
"""

MIXES: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "slow-joins": [("slow-joins", {"identity": "intruder", "token": False, "count": 500, "conns": 50})],
    "long-polls": [("long-polls", {"identity": "mallory", "count": 20})],
    "big-declare": [("big-declare", {"identity": "mallory2", "count": 8, "size": 256 * MiB})],
    "zlib-bomb": [("zlib-bomb", {"identity": "mallory3", "count": 6, "size": 1024 * MiB})],
    "tiny-chunks": [("tiny-chunks", {"identity": "mallory4", "count": 300_000})],
}
MIXES["all"] = [step for steps in MIXES.values() for step in steps]


def _cpus() -> tuple[set[int] | None, set[int] | None]:
    """The federation's CPUs and the attacker's: apart when there are two or more, so that the attacker's own
    work (hundreds of threads) does not compete with the server for a core; shared on one CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    half = len(cpus) // 2
    return set(cpus[:half]), set(cpus[half:])


FEDERATION_CPUS, ATTACKER_CPUS = _cpus()


def _pin(cpus: set[int] | None):
    return None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in text.splitlines() if line.startswith("VmRSS:")), 0.0)


def _env() -> dict[str, str]:
    src = str(Path(fedloom.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}


class Proc:
    """A child process whose output is read as it comes (a full pipe would block it), kept whole."""

    def __init__(self, args: list[str], env: dict[str, str], cpus: set[int] | None,
                 on_line: Callable[[str], None] | None = None):
        self.popen = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                      preexec_fn=_pin(cpus))
        self.pid = self.popen.pid
        self._out: list[str] = []
        self._err: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(self.popen.stdout, self._out, on_line), daemon=True),
                         threading.Thread(target=self._read, args=(self.popen.stderr, self._err, None), daemon=True)]
        for r in self._readers:
            r.start()

    @staticmethod
    def _read(stream: Any, lines: list[str], on_line: Callable[[str], None] | None) -> None:
        for line in stream:
            lines.append(line)
            if on_line is not None:
                on_line(line)

    @property
    def out(self) -> str:
        return "".join(self._out)

    @property
    def err(self) -> str:
        return "".join(self._err)

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit, then for the rest of its output."""
        code = self.popen.wait(timeout)
        for r in self._readers:
            r.join(timeout=10)
        return code

    def send_signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def kill(self) -> None:
        self.popen.kill()


class Deployment:
    """A real server, three honest clients and an enrolled attacker identity, in folder ``root``."""

    def __init__(self, root: Path, rounds: int = 100_000, settings: tuple[str, ...] = (), mutual_tls: bool = True):
        self.root, self.pki, self.state = root, root / "pki", root / "state"
        make_dev_pki(self.pki, clients=[*HONEST, *ATTACKERS, "intruder"])  # intruder: CA-signed, never enrolled
        self.config = root / "run.toml"
        self.config.write_text(CONFIG.format(rounds=rounds, port=free_port(), state=self.state, pki=self.pki,
                                             mutual_tls=str(mutual_tls).lower()))
        self.settings = [a for s in settings for a in ("--set", s)]
        self.address = f"127.0.0.1:{self.config.read_text().split('127.0.0.1:')[1].split(chr(34))[0]}"
        self.rounds: list[tuple[float, int, int]] = []  # (arrival, round, accepted updates)
        self.server: Proc | None = None
        self.clients: dict[str, Proc] = {}

    # -- processes ---------------------------------------------------------------------------------

    def fedloom(self, *args: str, on_line: Callable[[str], None] | None = None) -> Proc:
        return Proc([sys.executable, "-m", "fedloom.cli", *args], _env(), FEDERATION_CPUS, on_line)

    def _round_line(self, line: str) -> None:
        m = ROUND_LINE.match(line)
        if m:
            self.rounds.append((time.monotonic(), int(m.group(1)), int(m.group(2))))

    def start_server(self, *extra: str) -> Proc:
        self.server = self.fedloom("server", "--config", str(self.config), *self.settings, *extra,
                                   on_line=self._round_line)
        self.wait_for(self.state / "tokens" / f"{ATTACKERS[-1]}.token")
        return self.server

    def start_client(self, name: str) -> Proc:
        i = HONEST.index(name)
        self.clients[name] = self.fedloom(
            "client", "--config", str(self.config), *self.settings, "--set", f'deploy.name="{name}"',
            "--set", f'deploy.token_file="{self.state / "tokens" / f"{name}.token"}"',
            "--set", f"deploy.client_index={i}", "--set", f'deploy.cert="{self.pki / "clients" / f"{name}.pem"}"',
            "--set", f'deploy.key="{self.pki / "clients" / f"{name}.key"}"',
            "--set", f'deploy.client_state_dir="{self.root / "clients" / name}"')
        return self.clients[name]

    def start(self) -> Deployment:
        self.start_server()
        for name in HONEST:
            self.start_client(name)
        return self

    def attacker(self, mode: str, identity: str = "mallory", token: bool = True, **options: Any) -> Proc:
        """``benchmarks/attacker.py MODE`` against this server as ``identity`` (a certificate in the PKI)."""
        args = [sys.executable, str(ATTACKER), mode, "--address", self.address, "--ca", str(self.pki / "ca.pem"),
                "--cert", str(self.pki / "clients" / f"{identity}.pem"),
                "--key", str(self.pki / "clients" / f"{identity}.key")]
        if token:
            args += ["--token-file", str(self.state / "tokens" / f"{identity}.token")]
        for k, v in options.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of fedloom's on its path
        return Proc(args, env, ATTACKER_CPUS)

    def stop(self) -> None:
        for p in [self.server, *self.clients.values()]:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(timeout=30)

    # -- observing -----------------------------------------------------------------------------------

    @staticmethod
    def wait_for(path: Path, timeout: float = 90) -> None:
        end = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > end:
                raise TimeoutError(f"{path} never appeared")
            time.sleep(0.1)

    def wait_round(self, n: int, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while not self.rounds or self.rounds[-1][1] < n:
            if time.monotonic() > end or (self.server is not None and self.server.poll() is not None):
                clients = "\n".join(f"{name} ({'running' if c.poll() is None else f'exit {c.poll()}'}):\n"
                                     f"{c.err[-1500:]}" for name, c in self.clients.items())
                raise AssertionError(f"round {n} never came; the server said:\n{self.server.err[-3000:]}\n"
                                     f"the clients said:\n{clients}")
            time.sleep(0.05)

    def window(self, seconds: float) -> dict[str, float]:
        """Watch the run for ``seconds``: rounds per minute, lost honest updates, the server's peak RSS."""
        assert self.server is not None
        before, start, peak = len(self.rounds), time.monotonic(), rss_mb(self.server.pid)
        while time.monotonic() - start < seconds:
            time.sleep(0.1)
            peak = max(peak, rss_mb(self.server.pid))
        done = self.rounds[before:]
        return {"rounds_per_min": round(len(done) * 60 / seconds, 1), "peak_rss_mb": round(peak, 1),
                "lost_updates": sum(len(HONEST) - k for _, _, k in done)}


def finish(proc: Proc, timeout: float = 120) -> dict[str, Any]:
    """Wait for an attacker and return its JSON line (its stderr tail when it printed none)."""
    code = proc.wait(timeout)
    lines = [line for line in proc.out.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"the attacker exited {code} without a result:\n{proc.err[-2000:]}")
    return json.loads(lines[-1])


def run_attacks(seconds: float = 20.0, mixes: list[str] | None = None) -> list[dict[str, Any]]:
    """Each mix beside three honest clients; prints and returns one record per mix (see the module docstring)."""
    root = Path(tempfile.mkdtemp(prefix="fedloom-attacks-"))
    deployment = Deployment(root, mutual_tls=False).start()
    records = []
    try:
        deployment.wait_round(3)
        for name in mixes or list(MIXES):
            base = deployment.window(seconds)
            attackers = [deployment.attacker(mode, seconds=seconds, **options)
                         for mode, options in MIXES[name]]
            hit = deployment.window(seconds)
            for a in attackers:
                finish(a)
            time.sleep(SETTLE_S)  # a task the attacker took when it left waits until it is taken for lost
            record = {"attack": name, "honest_rounds_per_min": hit["rounds_per_min"],
                      "baseline_rounds_per_min": base["rounds_per_min"], "server_peak_rss_mb": hit["peak_rss_mb"],
                      "lost_updates": hit["lost_updates"]}
            print(json.dumps(record), flush=True)
            records.append(record)
    finally:
        deployment.stop()
        shutil.rmtree(root, ignore_errors=True)
    return records
