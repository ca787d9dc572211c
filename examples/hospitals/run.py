"""One command for the cross-silo example: certificates, a server and three hospital clients.

    .venv/bin/python examples/hospitals/run.py

Creates a development CA and certificates and each hospital's own data files (once,
``sites.py``), starts `fedloom server` (which holds no data) and three `fedloom client` processes
with mutual TLS on 127.0.0.1, each naming only its own data: two by file (`data.path`: a CSV, an
`.npz`), one by a function (`data.loader`). It prints the server's per-round federated accuracy (each
hospital tests on its own held-out patients) and waits for all of them. Run it again and the
server resumes from its saved state: a finished run just reports that it is finished.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]  # the repository: examples.hospitals.sites is imported from it, here and by the university
sys.path.insert(0, str(ROOT))
from examples.hospitals import sites  # noqa: E402

CONFIG = HERE / "hospitals.toml"
PKI = Path("runs/hospitals-pki")
STATE = Path("runs/hospitals-server")
HOSPITALS = ["st-mary", "general", "university"]
DATA = {"st-mary": 'data.path="runs/hospitals-data/st-mary.csv"',  # each hospital's own data, and nothing else
        "general": 'data.path="runs/hospitals-data/general.npz"',
        "university": 'data.loader="examples.hospitals.sites:university"'}


def fedloom(*args: str, **kw) -> subprocess.Popen:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.Popen([sys.executable, "-m", "fedloom.cli", *args], env={**os.environ, "PYTHONPATH": path}, **kw)


def main() -> int:
    if not (PKI / "ca.pem").exists():
        subprocess.run([sys.executable, "-m", "fedloom.cli", "certs", str(PKI),
                        *[a for h in HOSPITALS for a in ("--client", h)]], check=True, stdout=subprocess.DEVNULL)
    if not (sites.DATA / "university.tsv").exists():
        sites.write_sites()
    server = fedloom("server", "--config", str(CONFIG), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not all((STATE / "tokens" / f"{h}.token").exists() for h in HOSPITALS):
        if server.poll() is not None or time.monotonic() > deadline:
            print("the server did not start", file=sys.stderr)
            return 1
        time.sleep(0.2)
    clients = [fedloom("client", "--config", str(CONFIG), "--set", f'deploy.name="{h}"',
                       "--set", f'deploy.token_file="{STATE / "tokens" / f"{h}.token"}"',
                       "--set", DATA[h],
                       "--set", f'deploy.cert="{PKI / "clients" / f"{h}.pem"}"',
                       "--set", f'deploy.key="{PKI / "clients" / f"{h}.key"}"',
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for h in HOSPITALS]
    print(f"watch it live: .venv/bin/fedloom dashboard {STATE}  (then open http://127.0.0.1:8050/)", flush=True)
    code = server.wait()
    codes = [c.wait(timeout=60) for c in clients]
    print(f"server exit {code}, hospital clients exit {codes}; state and checkpoints in {STATE}")
    return max([code, *codes])


if __name__ == "__main__":
    sys.exit(main())
