"""``fedloom dashboard``: serve the page, on loopback by default, elsewhere only with TLS and a token."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

from fedloom.dashboard.app import LOOPBACK_NAMES, make_app
from fedloom.dashboard.sources import Watched
from fedloom.deploy.certs import issue_token
from fedloom.errors import ConfigError

DEFAULT_PORT = 8050


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (127.0.0.0/8, ::1) or ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def read_token(path: Path) -> tuple[str, bool]:
    """The token in ``path``, or a new one written there (readable by this user only); and whether it is new."""
    if path.exists():
        token = path.read_text().strip()
        if len(token) < 16:
            raise ConfigError("dashboard.token_file", f"{path} holds no token of at least 16 characters")
        return token, False
    token = issue_token()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token, True


def check_bind(host: str, cert: str | None, key: str | None, token_file: str | None) -> None:
    """Refuse a bind beyond loopback without TLS and a token, and TLS given by halves."""
    if (cert is None) != (key is None):
        raise ConfigError("dashboard", "TLS needs both --cert and --key (PEM files)")
    if not is_loopback(host) and (cert is None or token_file is None):
        missing = " and ".join(w for w, v in (("--cert/--key (TLS)", cert), ("--token-file", token_file)) if v is None)
        raise ConfigError("dashboard", f"--host {host} is reachable from other machines: that needs {missing}. "
                          "The page shows who takes part and how the run goes; bound beyond 127.0.0.1 it is "
                          "served only over TLS to those who hold the token")


def serve(paths: list[str], host: str = "127.0.0.1", port: int = DEFAULT_PORT, cert: str | None = None,
          key: str | None = None, token_file: str | None = None, refresh_s: float = 2.0) -> None:
    """Serve the dashboard of ``paths`` until interrupted; prints where, and how it is protected, first."""
    import uvicorn

    check_bind(host, cert, key, token_file)
    if refresh_s <= 0:
        raise ConfigError("dashboard", f"--refresh must be > 0 seconds, got {refresh_s}")
    for f in (cert, key):
        if f is not None and not Path(f).is_file():
            raise ConfigError("dashboard", f"no file at {f}")
    watched = Watched(paths)
    token, new = read_token(Path(token_file)) if token_file else (None, False)
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise ConfigError("dashboard", f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(64)
    bound = sock.getsockname()[1]
    scheme = "https" if cert else "http"
    shown = f"[{host.strip('[]')}]" if family == socket.AF_INET6 else host
    print(f"fedloom dashboard: {scheme}://{shown}:{bound}/ (read-only) watching {', '.join(paths)}", flush=True)
    if token_file:
        said = "a new token was written to" if new else "the token is in"
        print(f"  TLS with {cert}; every request needs the token ({said} {token_file}): open "
              f"{scheme}://{shown}:{bound}/?token=<token> once", flush=True)
    elif is_loopback(host):
        print("  bound to loopback only: other machines cannot reach it (--host, --cert, --key and --token-file "
              "serve it further)", flush=True)
    names = (*LOOPBACK_NAMES, host.strip("[]")) if is_loopback(host) else None
    config = uvicorn.Config(make_app(watched, token, refresh_s, names), ssl_certfile=cert, ssl_keyfile=key,
                            log_level="warning", access_log=False, server_header=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
