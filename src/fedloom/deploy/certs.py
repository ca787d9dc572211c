"""A development certificate authority for mutual TLS between the fedloom server and its clients.

:func:`make_dev_pki` writes a self-signed CA, a server certificate (with the DNS names and IP
addresses it is reached by) and one certificate per client, all signed by that CA, with EC P-256
keys. The server trusts client certificates signed by the CA (``require_client_auth``), and clients
trust the server certificate through the same CA; a client's name is its certificate's CN.

This is for development and small trusted deployments: private keys are written as UNENCRYPTED
PEM files (mode 0600). For production, use your organisation's PKI and keep the CA key offline.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedloom.errors import CertError

_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_CLOCK_SKEW = datetime.timedelta(minutes=5)


def issue_token() -> str:
    """A fresh random enrollment token (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


def client_name_from_cert(pem: bytes | str) -> str:
    """The common name (CN) of a PEM certificate, e.g. the peer's ``x509_pem_cert`` in a gRPC auth context."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError as e:
        raise CertError(f"not a PEM certificate: {e}", stage="certs") from None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise CertError("certificate has no common name (CN)", stage="certs")
    return str(names[0].value)


def make_dev_pki(
    out_dir: Path,
    server_names: Sequence[str] = ("localhost", "127.0.0.1"),
    clients: Sequence[str] = (),
    days: int = 365,
    *,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write a development CA, a server certificate and client certificates under ``out_dir``.

    Files: ``ca.pem``/``ca.key``, ``server.pem``/``server.key`` (SANs: each of ``server_names``,
    as an IP address when it parses as one, else a DNS name; serverAuth) and, per client name,
    ``clients/NAME.pem``/``clients/NAME.key`` (CN=NAME; clientAuth). Keys are unencrypted PEM, mode 0600.

    Returns the paths keyed ``ca``, ``ca_key``, ``server``, ``server_key``, ``client:NAME`` and
    ``client_key:NAME``. Raises :class:`CertError` when ``out_dir/ca.pem`` or ``ca.key`` already
    exists and ``overwrite`` is false, or for an empty ``server_names``, a bad client name or ``days < 1``.
    With ``overwrite=True`` the CA and server files are replaced; client files signed by the old CA
    and not named in ``clients`` stay on disk but are no longer trusted.
    """
    out_dir = Path(out_dir)
    _check_request(out_dir, server_names, clients, days, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    ca_key = _new_key()
    ca_cert = _ca_certificate(ca_key, days)
    paths = {"ca": out_dir / "ca.pem", "ca_key": out_dir / "ca.key"}
    _write_pair(paths["ca"], paths["ca_key"], ca_cert, ca_key)
    paths["server"], paths["server_key"] = out_dir / "server.pem", out_dir / "server.key"
    key = _new_key()
    server_cert = _server_certificate(key, server_names, ca_cert, ca_key, days)
    _write_pair(paths["server"], paths["server_key"], server_cert, key)
    for name in clients:
        paths[f"client:{name}"], paths[f"client_key:{name}"] = add_client(out_dir, name, days)
    return paths


def add_client(out_dir: Path, name: str, days: int = 365) -> tuple[Path, Path]:
    """Issue ``clients/NAME.pem``/``clients/NAME.key`` with the CA already in ``out_dir``; returns both paths."""
    out_dir = Path(out_dir)
    check_client_name(name)
    if days < 1:
        raise CertError(f"days must be at least 1, got {days}", stage="certs")
    ca_cert, ca_key = _load_ca(out_dir)
    key = _new_key()
    cert = _client_certificate(key, name, ca_cert, ca_key, days)
    pem_path, key_path = out_dir / "clients" / f"{name}.pem", out_dir / "clients" / f"{name}.key"
    pem_path.parent.mkdir(parents=True, exist_ok=True)
    _write_pair(pem_path, key_path, cert, key)
    return pem_path, key_path


def _check_request(out_dir: Path, server_names: Sequence[str], clients: Sequence[str], days: int,
                   overwrite: bool) -> None:
    if isinstance(server_names, str) or isinstance(clients, str):
        raise CertError("server_names and clients must be lists of names, not one string", stage="certs")
    if not server_names:
        raise CertError("server_names is empty: the server certificate needs at least one name", stage="certs")
    if days < 1:
        raise CertError(f"days must be at least 1, got {days}", stage="certs")
    for name in clients:
        check_client_name(name)
    if len(set(clients)) != len(clients):
        raise CertError(f"duplicate client names in {list(clients)}", stage="certs")
    existing = [p for p in (out_dir / "ca.pem", out_dir / "ca.key") if p.exists()]
    if existing and not overwrite:
        raise CertError(f"{existing[0]} already exists; pass overwrite=True to replace the CA "
                        "(every certificate it signed stops being trusted)", stage="certs")


def check_client_name(name: str) -> None:
    """Raise :class:`CertError` unless ``name`` is a client name: 1-64 letters, digits, ".", "_" or "-"."""
    if not isinstance(name, str) or not _CLIENT_NAME.fullmatch(name):
        raise CertError(f"bad client name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit", stage="certs")


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedloom dev"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey,
             days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def _ca_certificate(key: ec.EllipticCurvePrivateKey, days: int) -> x509.Certificate:
    name = _name("fedloom dev CA")
    usage = x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False)
    return (
        _builder(name, name, key, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .sign(key, hashes.SHA256())
    )


def _leaf_builder(key: ec.EllipticCurvePrivateKey, cn: str, ca_cert: x509.Certificate, days: int,
                  purpose: x509.ObjectIdentifier) -> x509.CertificateBuilder:
    usage = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        _builder(_name(cn), ca_cert.subject, key, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )


def _server_certificate(key: ec.EllipticCurvePrivateKey, names: Sequence[str], ca_cert: x509.Certificate,
                        ca_key: ec.EllipticCurvePrivateKey, days: int) -> x509.Certificate:
    san = x509.SubjectAlternativeName([_general_name(n) for n in names])
    return (
        _leaf_builder(key, names[0], ca_cert, days, ExtendedKeyUsageOID.SERVER_AUTH)
        .add_extension(san, critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _client_certificate(key: ec.EllipticCurvePrivateKey, name: str, ca_cert: x509.Certificate,
                        ca_key: ec.EllipticCurvePrivateKey, days: int) -> x509.Certificate:
    return _leaf_builder(key, name, ca_cert, days, ExtendedKeyUsageOID.CLIENT_AUTH).sign(ca_key, hashes.SHA256())


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not name or any(c.isspace() for c in name):
        raise CertError(f"bad server name {name!r}", stage="certs")
    return x509.DNSName(name)


def _load_ca(out_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((out_dir / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((out_dir / "ca.key").read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise CertError(f"cannot load the CA in {out_dir}: {e}", stage="certs") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{out_dir / 'ca.key'} is not an EC private key", stage="certs")
    return cert, key


def _write_pair(pem_path: Path, key_path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    _write_file(key_path, key_pem, 0o600)
    _write_file(pem_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a temp file created with ``mode`` (never wider), then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # exactly ``mode``, whatever the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
