"""One command for the cross-silo example: certificates, a server and three hospital clients.

    .venv/bin/python examples/hospitals/run.py

Creates a development CA and certificates (once), starts `fedloom server` and three
`fedloom client` processes with mutual TLS on 127.0.0.1, prints the server's per-round accuracy,
and waits for all of them. Run it again and the server resumes from its saved state: a finished
run just reports that it is finished.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "hospitals.toml"
PKI = Path("runs/hospitals-pki")
STATE = Path("runs/hospitals-server")
HOSPITALS = ["st-mary", "general", "university"]


def fedloom(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedloom.cli", *args], **kw)


def main() -> int:
    if not (PKI / "ca.pem").exists():
        subprocess.run([sys.executable, "-m", "fedloom.cli", "certs", str(PKI),
                        *[a for h in HOSPITALS for a in ("--client", h)]], check=True, stdout=subprocess.DEVNULL)
    server = fedloom("server", "--config", str(CONFIG), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not all((STATE / "tokens" / f"{h}.token").exists() for h in HOSPITALS):
        if server.poll() is not None or time.monotonic() > deadline:
            print("the server did not start", file=sys.stderr)
            return 1
        time.sleep(0.2)
    clients = [fedloom("client", "--config", str(CONFIG), "--set", f'deploy.name="{h}"',
                       "--set", f'deploy.token_file="{STATE / "tokens" / f"{h}.token"}"',
                       "--set", f"deploy.client_index={i}",
                       "--set", f'deploy.cert="{PKI / "clients" / f"{h}.pem"}"',
                       "--set", f'deploy.key="{PKI / "clients" / f"{h}.key"}"',
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for i, h in enumerate(HOSPITALS)]
    code = server.wait()
    codes = [c.wait(timeout=60) for c in clients]
    print(f"server exit {code}, hospital clients exit {codes}; state and checkpoints in {STATE}")
    return max([code, *codes])


if __name__ == "__main__":
    sys.exit(main())
