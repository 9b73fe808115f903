"""``console-broker serve --tls-auto --tls-san NAME…``: the broker's HTTPS certificate from its own
CA, renewed at two thirds of ``--cert-lifetime`` with no restart, a failed renewal logged with
its retry schedule while the current certificate keeps serving.

The real broker runs with a 60 s lifetime (the least allowed), so one renewal comes 40 s after
start: the test waits for it on the log, not with a sleep.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from brokerproc import BrokerState, start_broker
from cryptography import x509
from proxyproc import REPO, free_port
from tornado.httpclient import HTTPClient, HTTPRequest

from broker import ca, tlsauto
from broker.service import Broker
from console_proxy.metrics import CERTIFICATE_EXPIRY

TIMEOUT = 10.0


def test_renewal_comes_at_two_thirds_and_retries_double() -> None:
    assert tlsauto.renew_at(1000.0, 1060.0) == 1040.0
    assert tlsauto.retry_pauses(5, 300) == [5, 10, 20, 40, 80, 160, 300]
    assert tlsauto.retry_pauses(300, 300) == [300]


def _serve(state: BrokerState, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "broker.cli", "serve", "--state-dir", str(state.root)]
    return subprocess.run(
        [*command, "--listen", f"127.0.0.1:{free_port()}", *extra],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tls-auto"], "--tls-auto needs --tls-san NAME"),
        (["--tls-auto", "--tls-san", "bad name"], "--tls-san: 'bad name' is neither a DNS name nor an IP address"),
        (["--tls-san", "broker.example"], "--tls-san goes with --tls-auto"),
        (["--tls-auto", "--tls-san", "b", "--tls-cert", "c.pem", "--tls-key", "k.pem"], "not both"),
        (["--tls-auto", "--tls-san", "b", "--cert-lifetime", "59"], "--cert-lifetime must be at least 60 seconds"),
    ],
)
def test_tls_auto_refuses_what_cannot_work(tmp_path: Path, extra: list[str], message: str) -> None:
    result = _serve(BrokerState.create(tmp_path / "state"), *extra)
    assert result.returncode == 1 and message in result.stderr, result.stderr


def served(port: int, context: ssl.SSLContext) -> x509.Certificate:
    """The certificate a new verified TLS connection to 127.0.0.1:port is shown."""

    async def handshake() -> bytes:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        await writer.wait_closed()
        return bytes(der)

    return x509.load_der_x509_certificate(asyncio.run(asyncio.wait_for(handshake(), TIMEOUT)))


def metric(port: int, context: ssl.SSLContext, use: str) -> float:
    body = HTTPClient().fetch(HTTPRequest(f"https://127.0.0.1:{port}/metrics", ssl_options=context)).body.decode()
    line = next(line for line in body.splitlines() if line.startswith(f'{CERTIFICATE_EXPIRY}{{use="{use}"}}'))
    return float(line.rsplit(" ", 1)[1])


def healthz_over(stream: ssl.SSLSocket) -> bytes:
    """One GET /healthz on an open keep-alive connection; the status line."""
    stream.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = stream.recv(4096)
        assert chunk, "the broker closed the connection"
        head += chunk
    return head.split(b"\r\n", 1)[0]


@pytest.mark.slow
def test_tls_auto_serves_renews_and_survives_a_failed_renewal(tmp_path: Path) -> None:
    state = BrokerState.create(tmp_path / "state")
    opened = Broker(state.root)
    try:
        trust = ssl.create_default_context(cadata=ca.cert_pem(opened.ca.certificate()))
        ca_expiry = ca.expiry(opened.ca.certificate())
    finally:
        opened.close()
    broker = start_broker(
        state, "--tls-auto", "--tls-san", "127.0.0.1", "--tls-san", "broker.test", "--cert-lifetime", "60"
    )
    try:
        first = served(broker.port, trust)  # verified: chain to the broker's CA, name 127.0.0.1
        assert first == x509.load_pem_x509_certificate((state.root / "https-cert.pem").read_bytes())
        assert (first.not_valid_after_utc - first.not_valid_before_utc).total_seconds() == 60 + ca.BACKDATE
        assert metric(broker.port, trust, "https") == ca.expiry(first)
        assert metric(broker.port, trust, "ca") == ca_expiry
        assert (state.root / "https-key.pem").stat().st_mode & 0o777 == 0o600
        kept = trust.wrap_socket(
            socket.create_connection(("127.0.0.1", broker.port), TIMEOUT), server_hostname="127.0.0.1"
        )
        kept.settimeout(TIMEOUT)
        assert healthz_over(kept) == b"HTTP/1.1 200 OK"

        # the renewal at 40 s fails: the certificate's name is taken by a directory
        shutil.move(state.root / "https-cert.pem", tmp_path / "moved.pem")
        (state.root / "https-cert.pem").mkdir()
        warning = broker.wait_for_log("HTTPS certificate renewal failed", timeout=70)
        assert " WARNING " in warning and "retrying in 5, 10, 20, 40, 80, 160, 300 s, then every 300 s" in warning
        assert "the current certificate expires in" in warning
        assert served(broker.port, trust) == first  # still serving

        (state.root / "https-cert.pem").rmdir()  # the next try (5 s later) succeeds
        broker.wait_for_log("HTTPS certificate renewed", timeout=30)
        second = served(broker.port, trust)
        assert second != first and second.serial_number != first.serial_number
        assert metric(broker.port, trust, "https") == ca.expiry(second) > ca.expiry(first)
        assert healthz_over(kept) == b"HTTP/1.1 200 OK"  # the connection opened before is untouched
        assert kept.getpeercert(binary_form=True) == served_der(first)
        kept.close()
    finally:
        broker.stop()
    audit = [json.loads(line) for line in _audit(state)]
    broker_certs = [e for e in audit if e["type"] == "cert_issued" and e["detail"]["purpose"] == "broker"]
    assert len(broker_certs) >= 3 and all(e["detail"]["via"] == "tls-auto" for e in broker_certs)


def served_der(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return cert.public_bytes(Encoding.DER)


def _audit(state: BrokerState) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-m", "broker.cli", "audit", "tail", "--state-dir", str(state.root)],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
    )
    return result.stdout.splitlines()
