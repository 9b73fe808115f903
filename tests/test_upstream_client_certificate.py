"""A VeNCrypt server that demands a client certificate the OpenSSL way: with an alert.

QEMU (GnuTLS, tests/test_qemu_tls.py) completes the TLS handshake and hangs up silently; a
server built on OpenSSL with ``SSL_VERIFY_FAIL_IF_NO_PEER_CERT`` (x11vnc ``-sslverify``,
libvncserver builds) refuses with an alert instead: ``handshake_failure`` inside a TLS 1.2
handshake, ``certificate_required`` right after a TLS 1.3 one. No such server is installed
here, so a stand-in speaks the few VeNCrypt bytes before TLS and lets Python's ``ssl`` (real
OpenSSL) do the TLS part; the session under test is the proxy's own ``ConsoleSession``.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from test_relay_units import QuietBrowser
from xvnc import TestPki

from console_proxy import token
from console_proxy.config import ProxyConfig
from console_proxy.relay import ConsoleSession

VENCRYPT_X509NONE = 260


class CertificateDemandingServer:
    """RFB 3.8, VeNCrypt X509None, then TLS that requires a client certificate; one connection."""

    def __init__(self, pki: TestPki, tls_version: ssl.TLSVersion) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(pki.cert_path, pki.key_path)
        self.context.load_verify_locations(pki.ca_path)
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.minimum_version = self.context.maximum_version = tls_version
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.outcome: str | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(10)
        with conn:
            conn.sendall(b"RFB 003.008\n")
            assert conn.recv(12) == b"RFB 003.008\n"
            conn.sendall(bytes([1, 19]))
            assert conn.recv(1) == bytes([19])
            conn.sendall(b"\x00\x02")
            assert conn.recv(2) == b"\x00\x02"
            conn.sendall(b"\x00" + bytes([1]) + struct.pack(">I", VENCRYPT_X509NONE))
            assert conn.recv(4) == struct.pack(">I", VENCRYPT_X509NONE)
            conn.sendall(b"\x01")
            try:
                with self.context.wrap_socket(conn, server_side=True) as secure:
                    secure.recv(1)  # TLS 1.3: the client's (empty) certificate is judged here
                self.outcome = "accepted"
            except ssl.SSLError as error:
                self.outcome = error.reason

    def close(self) -> None:
        self.listener.close()
        self.thread.join(10)


@pytest.fixture(params=[ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"])
def demanding_server(request: pytest.FixtureRequest, test_pki: TestPki) -> Iterator[CertificateDemandingServer]:
    server = CertificateDemandingServer(test_pki, request.param)
    yield server
    server.close()


def test_an_alert_about_the_missing_client_certificate_is_4501(
    demanding_server: CertificateDemandingServer, test_pki: TestPki
) -> None:
    async def scenario() -> ConsoleSession:
        claims = token.new_claims(
            host="127.0.0.1", port=demanding_server.port, now=time.time(), ttl=60, tls={"ca": test_pki.ca_pem}
        )
        ended: asyncio.Future[ConsoleSession] = asyncio.get_running_loop().create_future()
        session = ConsoleSession(
            claims, ProxyConfig(), QuietBrowser(), "127.0.0.1", on_open=lambda _s: None, on_end=ended.set_result
        )
        session.start()
        return await asyncio.wait_for(ended, 10)

    session = asyncio.run(scenario())
    assert session.ending is not None
    assert (session.ending.code, session.ending.detail) == (4501, "the console server requires a client certificate")
    demanding_server.thread.join(10)
    assert demanding_server.outcome in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_REQUIRED")
