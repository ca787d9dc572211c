"""The development CA: signatures, SANs, key modes, overwrite refusal, and real mutual TLS over gRPC."""

from __future__ import annotations

import ipaddress
import stat
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedloom.deploy.certs import add_client, client_name_from_cert, issue_token, make_dev_pki
from fedloom.errors import CertError


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_dev_pki(tmp_path_factory.mktemp("pki"), clients=["alice", "bob"])


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_dev_pki(tmp_path_factory.mktemp("other"), clients=["mallory"])


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_files_and_key_modes(pki):
    assert set(pki) == {"ca", "ca_key", "server", "server_key", "client:alice", "client_key:alice",
                        "client:bob", "client_key:bob"}
    assert pki["client:alice"] == pki["ca"].parent / "clients" / "alice.pem"
    for key, path in pki.items():
        mode = stat.S_IMODE(path.stat().st_mode)
        if key.endswith("key") or key.startswith("client_key:"):
            assert mode == 0o600, (key, oct(mode))
            assert b"BEGIN PRIVATE KEY" in path.read_bytes()  # unencrypted PKCS#8 (development)
        else:
            assert mode & 0o077 == 0o044  # certificates are public


def test_ca_signs_server_and_clients(pki, other_pki):
    ca = _cert(pki["ca"])
    ca.verify_directly_issued_by(ca)  # self-signed
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp256r1"
    for name in ("server", "client:alice", "client:bob"):
        cert = _cert(pki[name])
        cert.verify_directly_issued_by(ca)
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    with pytest.raises(Exception):  # noqa: B017 - InvalidSignature or ValueError, depending on the check that fails
        _cert(pki["client:alice"]).verify_directly_issued_by(_cert(other_pki["ca"]))


def test_server_sans_and_usages(pki):
    server = _cert(pki["server"])
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert list(server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH]
    alice = _cert(pki["client:alice"])
    assert list(alice.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]


def test_custom_server_names(tmp_path):
    paths = make_dev_pki(tmp_path, server_names=["fl.example.org", "10.0.0.7", "::1"])
    san = _cert(paths["server"]).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7"), ipaddress.ip_address("::1")]


def test_client_names_and_tokens(pki):
    assert client_name_from_cert(pki["client:alice"].read_bytes()) == "alice"
    assert client_name_from_cert(pki["client:bob"].read_text()) == "bob"
    with pytest.raises(CertError, match="not a PEM certificate"):
        client_name_from_cert(b"hello")
    tokens = {issue_token() for _ in range(5)}
    assert len(tokens) == 5 and all(len(t) >= 43 for t in tokens)


def test_overwrite_refused(tmp_path):
    first = make_dev_pki(tmp_path)
    before = first["ca"].read_bytes()
    with pytest.raises(CertError, match="already exists"):
        make_dev_pki(tmp_path)
    assert first["ca"].read_bytes() == before
    again = make_dev_pki(tmp_path, overwrite=True)
    assert again["ca"].read_bytes() != before


def test_bad_requests(tmp_path):
    with pytest.raises(CertError, match="bad client name"):
        make_dev_pki(tmp_path, clients=["../evil"])
    with pytest.raises(CertError, match="server_names is empty"):
        make_dev_pki(tmp_path, server_names=[])
    with pytest.raises(CertError, match="days"):
        make_dev_pki(tmp_path, days=0)
    assert not (tmp_path / "ca.pem").exists()
    with pytest.raises(CertError, match="cannot load the CA"):
        add_client(tmp_path, "carol")


def test_add_client_to_existing_ca(tmp_path):
    paths = make_dev_pki(tmp_path)
    pem, key = add_client(tmp_path, "carol")
    _cert(pem).verify_directly_issued_by(_cert(paths["ca"]))
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert client_name_from_cert(pem.read_bytes()) == "carol"


# -- real mutual TLS over gRPC on the loopback interface -------------------------------------------------

_METHOD = "/fedloom.test.Echo/Who"


def _who(request: bytes, context: grpc.ServicerContext) -> bytes:
    """Answer with the CN of the peer's verified client certificate."""
    pem = context.auth_context()["x509_pem_cert"][0]
    return client_name_from_cert(pem).encode() + b":" + request


@pytest.fixture(scope="module")
def tls_port(pki):
    handler = grpc.method_handlers_generic_handler(
        "fedloom.test.Echo", {"Who": grpc.unary_unary_rpc_method_handler(_who)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    creds = grpc.ssl_server_credentials([(pki["server_key"].read_bytes(), pki["server"].read_bytes())],
                                        root_certificates=pki["ca"].read_bytes(), require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    yield port
    server.stop(None)


def _call(port: int, ca: Path, cert: Path | None = None, key: Path | None = None) -> bytes:
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
    options = [("grpc.use_local_subchannel_pool", 1)]  # no connection shared between the cases
    with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=options) as channel:
        return channel.unary_unary(_METHOD)(b"hi", timeout=5)


def test_tls_client_with_certificate_connects(pki, tls_port):
    assert _call(tls_port, pki["ca"], pki["client:alice"], pki["client_key:alice"]) == b"alice:hi"
    assert _call(tls_port, pki["ca"], pki["client:bob"], pki["client_key:bob"]) == b"bob:hi"


def test_tls_client_without_certificate_refused(pki, tls_port):
    with pytest.raises(grpc.RpcError) as err:
        _call(tls_port, pki["ca"])
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_client_trusting_other_ca_refused(pki, other_pki, tls_port):
    with pytest.raises(grpc.RpcError) as err:  # the server's certificate does not verify
        _call(tls_port, other_pki["ca"], pki["client:alice"], pki["client_key:alice"])
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_client_certificate_from_other_ca_refused(pki, other_pki, tls_port):
    with pytest.raises(grpc.RpcError) as err:  # the server does not trust mallory's CA
        _call(tls_port, pki["ca"], other_pki["client:mallory"], other_pki["client_key:mallory"])
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
