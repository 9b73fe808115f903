"""UpstreamHandshake against a real TigerVNC Xvnc, over a plain blocking socket (and ssl).

The sans-I/O core is driven here by the simplest possible I/O loop, so a failure points at the
core or at Xvnc, never at Tornado.
"""

from __future__ import annotations

import shutil
import socket
import ssl
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from console_proxy.protocol.rfb import (
    Authenticated,
    RfbError,
    Send,
    ServerInitReady,
    StartTls,
    TlsPolicy,
    UpstreamAction,
    UpstreamHandshake,
)
from console_proxy.upstream_tls import Pin, client_context

if TYPE_CHECKING:  # the fixtures come from conftest.py, which imports tests/xvnc.py
    from xvnc import TestPki, XvncServer

    StartXvnc = Callable[..., XvncServer]

pytestmark = pytest.mark.skipif(
    shutil.which("Xvnc") is None or shutil.which("vncpasswd") is None,
    reason="TigerVNC Xvnc not installed",
)

IO_TIMEOUT = 10.0


def run_handshake(
    server: XvncServer,
    handshake: UpstreamHandshake,
    *,
    ca_pem: str | None = None,
    shared: bool = True,
) -> tuple[ServerInitReady, socket.socket]:
    """Drive ``handshake`` to ServerInitReady; returns it with the (maybe TLS) connection."""
    conn: socket.socket = socket.create_connection((server.host, server.port), IO_TIMEOUT)
    try:
        while True:
            data = conn.recv(65536)
            if not data:
                raise ConnectionError("Xvnc closed the connection during the handshake")
            pending: deque[UpstreamAction] = deque(handshake.feed(data))
            while pending:
                action = pending.popleft()
                if isinstance(action, Send):
                    conn.sendall(action.data)
                elif isinstance(action, StartTls):
                    ctx = client_context(TlsPolicy(ca_pem=ca_pem), action.verify)  # the relay's own
                    conn = ctx.wrap_socket(conn, server_hostname=server.host)
                    pending.extend(handshake.tls_started())
                elif isinstance(action, Authenticated):
                    if not handshake.client_init_sent:  # else it went with the last security message
                        conn.sendall(handshake.send_client_init(shared))
                else:
                    return action, conn
    except BaseException:
        conn.close()
        raise


def first_update_header(conn: socket.socket, ready: ServerInitReady) -> bytes:
    """Ask for a full update and read the FramebufferUpdate header: the stream is usable."""
    width, height = ready.server_init.width, ready.server_init.height
    conn.sendall(b"\x03\x00\x00\x00\x00\x00" + width.to_bytes(2, "big") + height.to_bytes(2, "big"))
    header = ready.rest
    while len(header) < 4:
        header += conn.recv(4 - len(header))
    return header[:4]


def assert_desktop(ready: ServerInitReady, server: XvncServer) -> None:
    init = ready.server_init
    assert (init.width, init.height) == server.geometry == (800, 600)
    assert init.name.startswith(server.desktop_name.encode())
    assert init.pixel_format[0] == 32  # -depth 24 is served as 32 bits per pixel


def test_security_none(xvnc_none: XvncServer) -> None:
    handshake = UpstreamHandshake(password=None, tls=TlsPolicy())
    ready, conn = run_handshake(xvnc_none, handshake)
    with conn:
        assert handshake.security_type == "none"
        assert handshake.version == (3, 8)
        assert_desktop(ready, xvnc_none)
        assert first_update_header(conn, ready)[0] == 0


def test_none_refused_when_tls_required(xvnc_none: XvncServer) -> None:
    handshake = UpstreamHandshake(password=None, tls=TlsPolicy(Pin.REQUIRE))
    with pytest.raises(RfbError) as info:
        run_handshake(xvnc_none, handshake)
    assert info.value.close_code == 4501


def test_vncauth_right_password(xvnc_vncauth: XvncServer) -> None:
    handshake = UpstreamHandshake(password=xvnc_vncauth.password, tls=TlsPolicy())
    ready, conn = run_handshake(xvnc_vncauth, handshake, shared=False)
    with conn:
        assert handshake.security_type == "vnc"
        assert_desktop(ready, xvnc_vncauth)
        assert first_update_header(conn, ready)[0] == 0


def test_vncauth_wrong_password(xvnc_vncauth: XvncServer) -> None:
    handshake = UpstreamHandshake(password="wrong-pw", tls=TlsPolicy())
    with pytest.raises(RfbError) as info:
        run_handshake(xvnc_vncauth, handshake)
    assert info.value.code == "target_auth_failed"
    assert info.value.close_code == 4501
    assert "wrong-pw" not in str(info.value)
    assert str(info.value).startswith("target rejected authentication")


@pytest.mark.parametrize("server", ["xvnc_none", "xvnc_vncauth"])
def test_pipelined_client_init_gets_server_init(server: str, request: pytest.FixtureRequest) -> None:
    xvnc: XvncServer = request.getfixturevalue(server)
    handshake = UpstreamHandshake(password=xvnc.password, tls=TlsPolicy(), client_init=True)
    ready, conn = run_handshake(xvnc, handshake)
    with conn:
        assert handshake.client_init_sent
        assert_desktop(ready, xvnc)
        assert first_update_header(conn, ready)[0] == 0


def test_pipelined_client_init_keeps_the_refusal_and_its_reason(xvnc_vncauth: XvncServer) -> None:
    handshake = UpstreamHandshake(password="wrong-pw", tls=TlsPolicy(), client_init=True)
    with pytest.raises(RfbError) as info:
        run_handshake(xvnc_vncauth, handshake)
    assert (info.value.code, info.value.close_code) == ("target_auth_failed", 4501)
    assert str(info.value).startswith("target rejected authentication: ")  # Xvnc's reason arrived


def test_pipelined_client_init_inside_x509vnc(xvnc_x509: XvncServer, test_pki: TestPki) -> None:
    policy = TlsPolicy(ca_pem=test_pki.ca_pem, server_name="127.0.0.1")
    handshake = UpstreamHandshake(password=xvnc_x509.password, tls=policy, client_init=True)
    ready, conn = run_handshake(xvnc_x509, handshake, ca_pem=test_pki.ca_pem)
    with conn:
        assert handshake.client_init_sent and handshake.security_type == "vencrypt-x509vnc"
        assert first_update_header(conn, ready)[0] == 0


def test_vncauth_without_password_is_refused(xvnc_vncauth: XvncServer) -> None:
    handshake = UpstreamHandshake(password=None, tls=TlsPolicy())
    with pytest.raises(RfbError) as info:
        run_handshake(xvnc_vncauth, handshake)
    assert info.value.code == "target_auth_failed"


def test_x509vnc_verified(xvnc_x509: XvncServer, test_pki: TestPki) -> None:
    policy = TlsPolicy(Pin.CA, test_pki.ca_pem, server_name="127.0.0.1")
    handshake = UpstreamHandshake(password=xvnc_x509.password, tls=policy)
    ready, conn = run_handshake(xvnc_x509, handshake, ca_pem=test_pki.ca_pem)
    with conn:
        assert isinstance(conn, ssl.SSLSocket)
        assert handshake.security_type == "vencrypt-x509vnc"
        assert_desktop(ready, xvnc_x509)
        assert first_update_header(conn, ready)[0] == 0


def test_x509vnc_wrong_password(xvnc_x509: XvncServer, test_pki: TestPki) -> None:
    handshake = UpstreamHandshake(password="nope", tls=TlsPolicy(Pin.CA, test_pki.ca_pem))
    with pytest.raises(RfbError) as info:
        run_handshake(xvnc_x509, handshake, ca_pem=test_pki.ca_pem)
    assert info.value.close_code == 4501


def test_x509vnc_wrong_ca_fails_verification(xvnc_x509: XvncServer, other_pki: TestPki) -> None:
    """Another CA must not vouch for the server: this is why the policy carries ca_pem."""
    policy = TlsPolicy(Pin.CA, other_pki.ca_pem)
    handshake = UpstreamHandshake(password=xvnc_x509.password, tls=policy)
    with pytest.raises(ssl.SSLCertVerificationError):
        run_handshake(xvnc_x509, handshake, ca_pem=other_pki.ca_pem)


def test_x509_preferred_over_vncauth(xvnc_factory: StartXvnc, test_pki: TestPki) -> None:
    server = xvnc_factory(security="X509Vnc,VncAuth", password="pw-x509", pki=test_pki)
    policy = TlsPolicy(Pin.CA, test_pki.ca_pem)
    handshake = UpstreamHandshake(password=server.password, tls=policy)
    ready, conn = run_handshake(server, handshake, ca_pem=test_pki.ca_pem)
    conn.close()
    assert handshake.security_type == "vencrypt-x509vnc"
    assert_desktop(ready, server)
    # A token that pins nothing keeps plain VncAuth, even with a proxy CA (--upstream-ca) to
    # verify X.509 with: see UpstreamHandshake.
    for unpinned in (TlsPolicy(), TlsPolicy(ca_pem=test_pki.ca_pem)):
        plain = UpstreamHandshake(password=server.password, tls=unpinned)
        _, conn = run_handshake(server, plain)
        conn.close()
        assert plain.security_type == "vnc"


def test_anonymous_tls_only_when_allowed(xvnc_factory: StartXvnc) -> None:
    server = xvnc_factory(security="TLSVnc", password="pw-anon")
    refused = UpstreamHandshake(password=server.password, tls=TlsPolicy())
    with pytest.raises(RfbError) as info:
        run_handshake(server, refused)
    assert info.value.close_code == 4501
    policy = TlsPolicy(allow_anonymous=True)
    allowed = UpstreamHandshake(password=server.password, tls=policy)
    ready, conn = run_handshake(server, allowed)
    conn.close()
    assert allowed.security_type == "vencrypt-tlsvnc"
    assert_desktop(ready, server)


def test_blacklist_reason_is_reported(xvnc_factory: StartXvnc) -> None:
    """Xvnc's "Too many security failures" arrives as a zero type count plus a reason."""
    server = xvnc_factory(security="VncAuth", password="pw-black", blacklist=True)
    for _ in range(10):
        handshake = UpstreamHandshake(password="bad", tls=TlsPolicy())
        with pytest.raises(RfbError) as info:
            run_handshake(server, handshake)
        assert info.value.close_code == 4501
        if "Too many security failures" in str(info.value):
            break
    else:
        pytest.fail("Xvnc never blacklisted us: " + server.log()[-500:])
    assert str(info.value).startswith("target refused the connection")
