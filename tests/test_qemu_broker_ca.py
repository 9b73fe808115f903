"""``tls: {"ca": "broker"}``: a target verified against the broker's CA, with the proxy's own
certificate as the VeNCrypt client certificate, through a real proxy to real QEMU (TCG) with
``tls-creds-x509 … verify-peer=on`` (QEMU's default: it requires a client certificate).

The broker is a real state directory (``init`` makes its CA); the hypervisor's files come from
the real ``console-broker ca issue-host`` (QEMU's layout). The proxy's state directory
(``console-proxy serve --state-dir D``) holds what enrollment leaves there: the broker's CA
(``ca-cert.pem``) and the proxy's certificate and key, issued here in-process by the same CA.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import test_qemu_tls
from cryptography import x509
from proxyproc import ProxyProcess, run_python, start_proxy
from qemu import QemuVnc
from test_qemu_tls import PASSWORD, closed_with, reaches_server_init
from tornado.httpclient import HTTPClient
from xvnc import TestPki

from broker import ca, hostcerts
from broker.service import Broker, init_state_dir
from console_proxy import proxycerts
from console_proxy.keyring import Keyring
from console_proxy.metrics import CERTIFICATE_EXPIRY

Mint = Callable[..., str]
BROKER = {"ca": "broker"}


@dataclass
class BrokerCa:
    """A broker state directory (``console-broker init``: its CA) and what it issues."""

    root: Path

    def certificate(self) -> bytes:
        broker = Broker(self.root)
        try:
            return ca.cert_pem(broker.ca.certificate()).encode()
        finally:
            broker.close()

    def issue_host(self, out: Path, *extra: str) -> TestPki:
        """``console-broker ca issue-host --host 127.0.0.1 --out OUT`` (the real command)."""
        command = ["-m", "broker.cli", "ca", "issue-host", "--state-dir", str(self.root)]
        done = run_python(*command, "--host", "127.0.0.1", "--out", str(out), *extra)
        assert done.returncode == 0, done.stderr
        files = (out / "ca-cert.pem", out / "server-cert.pem", out / "server-key.pem")
        return TestPki(files[0].read_text(), *files)

    def enroll(self, directory: Path) -> Path:
        """What ``console-proxy enroll`` leaves in a proxy's state dir: the CA, and the proxy's
        certificate (client and server authentication, CN the proxy id) and key, 0600."""
        broker = Broker(self.root)
        try:
            cert, key = hostcerts.new_leaf(
                broker,
                common_name="proxy-1",
                names=["127.0.0.1"],
                client_auth=True,
                server_auth=True,
                lifetime=3600,
                now=time.time(),
            )
            ca_pem = ca.cert_pem(broker.ca.certificate())
        finally:
            broker.close()
        directory.mkdir(parents=True, mode=0o700)
        (directory / proxycerts.CA_CERT).write_text(ca_pem)
        (directory / proxycerts.PROXY_CERT).write_text(ca.cert_pem(cert))
        (directory / proxycerts.PROXY_KEY).write_bytes(ca.key_pem(key))
        for name in (proxycerts.CA_CERT, proxycerts.PROXY_CERT, proxycerts.PROXY_KEY):
            (directory / name).chmod(0o600)
        return directory


def new_broker_ca(directory: Path) -> BrokerCa:
    init_state_dir(directory)
    return BrokerCa(directory)


def trusting_also(pki: TestPki, other: BrokerCa) -> TestPki:
    """QEMU's ca-cert.pem checks its own certificate and its clients': add ``other``'s CA."""
    pki.ca_path.write_bytes(pki.ca_path.read_bytes() + other.certificate())
    return pki


@pytest.fixture(scope="module")
def broker_ca(tmp_path_factory: pytest.TempPathFactory) -> BrokerCa:
    return new_broker_ca(tmp_path_factory.mktemp("broker") / "state")


qemu_factory = test_qemu_tls.qemu_factory  # fixture, shared: QEMUs started on demand, stopped at the end


@pytest.fixture(scope="module")
def enrolled_proxy(
    broker_ring: tuple[Keyring, Path], tmp_path_factory: pytest.TempPathFactory, broker_ca: BrokerCa
) -> Iterator[ProxyProcess]:
    """A proxy with the broker's CA and its certificate, and --allow-anonymous-tls (which must
    not loosen a token that pins the broker's CA)."""
    root = tmp_path_factory.mktemp("proxy-enrolled")
    directory = broker_ca.enroll(root / "state")
    process = start_proxy(root, broker_ring[1], "--state-dir", str(directory), "--allow-anonymous-tls")
    yield process
    process.stop()


def _token(mint: Mint, server: QemuVnc, session_id: str) -> str:
    return mint(host=server.host, port=server.port, password=server.password, tls=BROKER, session_id=session_id)


def test_a_broker_ca_target_with_verify_peer_opens_with_the_proxys_certificate(
    enrolled_proxy: ProxyProcess, mint: Mint, qemu_factory: Callable[..., QemuVnc], broker_ca: BrokerCa, tmp_path: Path
) -> None:
    server = qemu_factory(tls="x509", pki=broker_ca.issue_host(tmp_path / "host"), verify_peer=True, password=PASSWORD)
    assert reaches_server_init(enrolled_proxy, _token(mint, server, "broker-ca-open"))
    line = enrolled_proxy.wait_for_log('"session_id":"broker-ca-open"', '"event":"opened"')
    assert '"security":"vencrypt-x509vnc"' in line


def test_a_server_certificate_from_another_ca_closes_4501(
    enrolled_proxy: ProxyProcess, mint: Mint, qemu_factory: Callable[..., QemuVnc], broker_ca: BrokerCa, tmp_path: Path
) -> None:
    """QEMU trusts the broker's CA for clients, but its own certificate is from another CA."""
    other = new_broker_ca(tmp_path / "other-broker")
    pki = trusting_also(other.issue_host(tmp_path / "host"), broker_ca)
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
    proxy: ProxyProcess, mint: Mint, qemu_factory: Callable[..., QemuVnc], broker_ca: BrokerCa, tmp_path: Path
) -> None:
    """No --state-dir: nothing to verify against, so closed (never opened unverified)."""
    server = qemu_factory(tls="x509", pki=broker_ca.issue_host(tmp_path / "host"), verify_peer=False, password=PASSWORD)
    code, reason, detail = closed_with(proxy, _token(mint, server, "broker-ca-none"), "broker-ca-none")
    assert (code, reason) == (4501, "target_auth_failed")
    assert "pins the broker's CA, and this proxy holds none" in detail


def test_a_client_certificate_qemu_does_not_trust_is_4501(
    broker_ring: tuple[Keyring, Path],
    mint: Mint,
    qemu_factory: Callable[..., QemuVnc],
    broker_ca: BrokerCa,
    tmp_path: Path,
) -> None:
    """The proxy's certificate is from another CA than the one QEMU checks clients with (a
    proxy enrolled elsewhere): QEMU hangs up, the proxy says why."""
    directory = new_broker_ca(tmp_path / "other-broker").enroll(tmp_path / "state")
    (directory / proxycerts.CA_CERT).write_bytes(broker_ca.certificate())  # the server verifies
    proxy = start_proxy(tmp_path, broker_ring[1], "--state-dir", str(directory))
    try:
        server = qemu_factory(
            tls="x509", pki=broker_ca.issue_host(tmp_path / "host"), verify_peer=True, password=PASSWORD
        )
        code, reason, _ = closed_with(proxy, _token(mint, server, "broker-ca-untrusted"), "broker-ca-untrusted")
        assert (code, reason) == (4501, "target_auth_failed")
    finally:
        proxy.stop()


def test_the_proxys_certificates_are_on_metrics(enrolled_proxy: ProxyProcess, broker_ca: BrokerCa) -> None:
    body = HTTPClient().fetch(f"{enrolled_proxy.base}/metrics").body.decode()
    values = {
        line.split('"')[1]: float(line.rsplit(" ", 1)[1])
        for line in body.splitlines()
        if line.startswith(CERTIFICATE_EXPIRY + "{")
    }
    assert values["ca"] == ca.expiry(x509.load_pem_x509_certificate(broker_ca.certificate()))
    assert set(values) == {"ca", "client"} and values["client"] < values["ca"]
