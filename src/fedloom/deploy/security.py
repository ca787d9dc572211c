"""TLS credentials for the server and the clients, read from the ``[deploy]`` section's PEM files."""

from __future__ import annotations

from pathlib import Path

import grpc

from fedloom.config import DeployConfig
from fedloom.errors import ConfigError


def _read(key: str, path: str) -> bytes:
    if not path:
        raise ConfigError(f"deploy.{key}", "TLS needs this PEM file (create development ones with `fedloom certs`)")
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"deploy.{key}", f"cannot read {path}: {exc.strerror}") from None


def server_credentials(d: DeployConfig) -> grpc.ServerCredentials:
    """The server's certificate and key; with ``mutual_tls`` clients must present a certificate from ``ca``."""
    pair = [(_read("key", d.key), _read("cert", d.cert))]
    if d.mutual_tls:
        return grpc.ssl_server_credentials(pair, root_certificates=_read("ca", d.ca), require_client_auth=True)
    return grpc.ssl_server_credentials(pair)


def channel_credentials(d: DeployConfig) -> grpc.ChannelCredentials:
    """Trust ``ca``; present this client's certificate when one is configured (mutual TLS)."""
    ca = _read("ca", d.ca)
    if d.cert or d.key:
        key, cert = _read("key", d.key), _read("cert", d.cert)
        return grpc.ssl_channel_credentials(ca, private_key=key, certificate_chain=cert)
    return grpc.ssl_channel_credentials(ca)
