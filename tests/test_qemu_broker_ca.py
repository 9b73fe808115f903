"""``tls: {"ca": "broker"}``: a target verified against the broker's CA, with the proxy's own
certificate as the VeNCrypt client certificate, through a real proxy to real QEMU (TCG) with
``tls-creds-x509 … verify-peer=on`` (QEMU's default: it requires a client certificate).

The proxy's state directory (``console-proxy serve --state-dir D``) holds what enrollment writes
there: the broker's CA (``ca-cert.pem``) and the proxy's certificate and key. The hypervisor's
directory is QEMU's layout (``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``). Both are
made here with ``cryptography`` by a stand-in for the broker's CA (a P-256 root, as the broker's).
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from proxyproc import ProxyProcess, start_proxy
from qemu import QemuVnc, qemu_available, start_qemu
from test_qemu_tls import PASSWORD, closed_with, reaches_server_init
from tornado.httpclient import HTTPClient
from xvnc import TestPki

from console_proxy import proxycerts
from console_proxy.keyring import Keyring
from console_proxy.metrics import CERTIFICATE_EXPIRY

Mint = Callable[..., str]
BROKER = {"ca": "broker"}


@dataclass
class Ca:
    """A stand-in for the broker's CA: a P-256 root that issues leaves."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str) -> Ca:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, name: str, *, server: bool, client: bool) -> tuple[bytes, bytes]:
        """A leaf (certificate PEM, key PEM) for 127.0.0.1 and ``name``."""
        key = ec.generate_private_key(ec.SECP256R1())
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] * server + [ExtendedKeyUsageOID.CLIENT_AUTH] * client
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem


def host_pki(directory: Path, ca: Ca, *, trusting: Ca | None = None) -> TestPki:
    """QEMU's files for a server certificate from ``ca``; QEMU's ``ca-cert.pem`` (which it
    checks its own certificate and its clients' with) also holds ``trusting``, if given."""
    directory.mkdir(parents=True)
    cert, key = ca.issue("hypervisor.test", server=True, client=False)
    bundle = ca.pem + (trusting.pem if trusting is not None else b"")
    (directory / "ca.pem").write_bytes(bundle)
    (directory / "server.pem").write_bytes(cert)
    (directory / "server.key").write_bytes(key)
    (directory / "server.key").chmod(0o600)
    return TestPki(bundle.decode(), directory / "ca.pem", directory / "server.pem", directory / "server.key")


def state_dir(directory: Path, ca: Ca) -> Path:
    """What ``console-proxy enroll`` leaves: the CA, the proxy's certificate and key (0600)."""
    directory.mkdir(parents=True, mode=0o700)
    cert, key = ca.issue("proxy-1", server=True, client=True)
    (directory / proxycerts.CA_CERT).write_bytes(ca.pem)
    (directory / proxycerts.PROXY_CERT).write_bytes(cert)
    (directory / proxycerts.PROXY_KEY).write_bytes(key)
    for name in (proxycerts.CA_CERT, proxycerts.PROXY_CERT, proxycerts.PROXY_KEY):
        (directory / name).chmod(0o600)
    return directory


@pytest.fixture(scope="module")
def broker_ca() -> Ca:
    return Ca.create("consolegate broker CA (test)")


@pytest.fixture(scope="module")
def qemu_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., QemuVnc]]:
    if not qemu_available():
        pytest.fail("qemu-system-x86_64 is not installed: run scripts/setup.sh (tests never skip real parts)")
    started: list[QemuVnc] = []

    def start(**options: object) -> QemuVnc:
        server = start_qemu(tmp_path_factory.mktemp("qemu"), **options)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def enrolled_proxy(
    broker_ring: tuple[Keyring, Path], tmp_path_factory: pytest.TempPathFactory, broker_ca: Ca
) -> Iterator[ProxyProcess]:
    """A proxy with the broker's CA and its certificate, and --allow-anonymous-tls (which must
    not loosen a token that pins the broker's CA)."""
    root = tmp_path_factory.mktemp("proxy-enrolled")
    directory = state_dir(root / "state", broker_ca)
    process = start_proxy(root, broker_ring[1], "--state-dir", str(directory), "--allow-anonymous-tls")
    yield process
    process.stop()


def _token(mint: Mint, server: QemuVnc, session_id: str) -> str:
    return mint(host=server.host, port=server.port, password=server.password, tls=BROKER, session_id=session_id)


def test_a_broker_ca_target_with_verify_peer_opens_with_the_proxys_certificate(
    enrolled_proxy: ProxyProcess, mint: Mint, qemu_factory: Callable[..., QemuVnc], broker_ca: Ca, tmp_path: Path
) -> None:
    server = qemu_factory(tls="x509", pki=host_pki(tmp_path / "host", broker_ca), verify_peer=True, password=PASSWORD)
    assert reaches_server_init(enrolled_proxy, _token(mint, server, "broker-ca-open"))
    line = enrolled_proxy.wait_for_log('"session_id":"broker-ca-open"', '"event":"opened"')
    assert '"security":"vencrypt-x509vnc"' in line


def test_a_server_certificate_from_another_ca_closes_4501(
    enrolled_proxy: ProxyProcess, mint: Mint, qemu_factory: Callable[..., QemuVnc], broker_ca: Ca, tmp_path: Path
) -> None:
    """QEMU trusts the broker's CA for clients, but its own certificate is from another CA."""
    pki = host_pki(tmp_path / "host", Ca.create("some other CA"), trusting=broker_ca)
    server = qemu_factory(tls="x509", pki=pki, verify_peer=True, password=PASSWORD)
    code, reason, detail = closed_with(enrolled_proxy, _token(mint, server, "broker-ca-other"), "broker-ca-other")
    assert (code, reason, detail) == (4501, "target_auth_failed", "the console server's certificate did not verify")


def test_an_anonymous_tls_server_never_satisfies_the_broker_pin(
    enrolled_proxy: ProxyProcess, mint: Mint, qemu_factory: Callable[..., QemuVnc]
) -> None:
    server = qemu_factory(tls="anon", password=PASSWORD)
    code, reason, detail = closed_with(enrolled_proxy, _token(mint, server, "broker-ca-anon"), "broker-ca-anon")
    assert (code, reason) == (4501, "target_auth_failed")
    assert "offers only anonymous TLS" in detail and "pins a CA" in detail


def test_a_plain_server_never_satisfies_the_broker_pin(
    enrolled_proxy: ProxyProcess, mint: Mint, qemu_factory: Callable[..., QemuVnc]
) -> None:
    server = qemu_factory(password=PASSWORD)
    code, _, detail = closed_with(enrolled_proxy, _token(mint, server, "broker-ca-plain"), "broker-ca-plain")
    assert code == 4501 and "offers no TLS" in detail


def test_a_proxy_without_the_brokers_ca_refuses_the_pin(
    proxy: ProxyProcess, mint: Mint, qemu_factory: Callable[..., QemuVnc], broker_ca: Ca, tmp_path: Path
) -> None:
    """No --state-dir: nothing to verify against, so closed (never opened unverified)."""
    server = qemu_factory(tls="x509", pki=host_pki(tmp_path / "host", broker_ca), verify_peer=False, password=PASSWORD)
    code, reason, detail = closed_with(proxy, _token(mint, server, "broker-ca-none"), "broker-ca-none")
    assert (code, reason) == (4501, "target_auth_failed")
    assert "pins the broker's CA, and this proxy holds none" in detail


def test_a_client_certificate_qemu_does_not_trust_is_4501(
    broker_ring: tuple[Keyring, Path], mint: Mint, qemu_factory: Callable[..., QemuVnc], broker_ca: Ca, tmp_path: Path
) -> None:
    """The proxy's certificate is from another CA than the one QEMU checks clients with (a
    proxy enrolled elsewhere): QEMU hangs up, the proxy says why."""
    other = Ca.create("another broker")
    directory = state_dir(tmp_path / "state", other)
    (directory / proxycerts.CA_CERT).write_bytes(broker_ca.pem)  # it verifies the server fine
    proxy = start_proxy(tmp_path, broker_ring[1], "--state-dir", str(directory))
    try:
        server = qemu_factory(
            tls="x509", pki=host_pki(tmp_path / "host", broker_ca), verify_peer=True, password=PASSWORD
        )
        code, reason, _ = closed_with(proxy, _token(mint, server, "broker-ca-untrusted"), "broker-ca-untrusted")
        assert (code, reason) == (4501, "target_auth_failed")
    finally:
        proxy.stop()


def test_the_proxys_certificates_are_on_metrics(enrolled_proxy: ProxyProcess, broker_ca: Ca) -> None:
    body = HTTPClient().fetch(f"{enrolled_proxy.base}/metrics").body.decode()
    values = {
        line.split('"')[1]: float(line.rsplit(" ", 1)[1])
        for line in body.splitlines()
        if line.startswith(CERTIFICATE_EXPIRY + "{")
    }
    assert values["ca"] == broker_ca.cert.not_valid_after_utc.timestamp()
    assert set(values) == {"ca", "client"} and values["client"] < values["ca"]
