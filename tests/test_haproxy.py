"""Behind a real HAProxy in TCP mode sending the PROXY protocol (v1 ``send-proxy``, v2
``send-proxy-v2``), run from ``contrib/haproxy/consolegate.cfg``.

The browser stand-in connects from 127.0.0.5 (any 127/8 address is this machine's), HAProxy
from 127.0.0.1: the proxy can only know the browser's address from the header. A token bound
to 127.0.0.5 opens a console through HAProxy; one bound to 127.0.0.1 (HAProxy's own address) is
refused ``client_ip_mismatch``. Straight to the proxy: a trusted peer without a header, a
malformed header, and a header from an untrusted peer are each closed and counted.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import rawws
from lbproc import haproxy
from proxyproc import ProxyProcess, free_port
from xvnc import TestPki, XvncServer

BROWSER = "127.0.0.5"
TIMEOUT = 10.0


@pytest.fixture
def pp_proxy(proxy_factory: Callable[..., ProxyProcess]) -> ProxyProcess:
    """A proxy that requires the PROXY header from 127.0.0.1 (HAProxy) and trusts nobody else."""
    return proxy_factory("--trusted-proxy", "127.0.0.1", "--proxy-protocol")


@pytest.fixture(params=[1, 2], ids=["send-proxy", "send-proxy-v2"])
def balancer(request: pytest.FixtureRequest, pp_proxy: ProxyProcess, tmp_path: Path) -> Iterator[int]:
    """HAProxy's port, in front of ``pp_proxy``."""
    port = free_port()
    with haproxy(tmp_path, port, pp_proxy.port, version=request.param):
        yield port


def _connect(port: int, source: str) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(TIMEOUT)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def _refused_closed(sock: socket.socket) -> bytes:
    """What the proxy sent before closing (it closes a refused connection without a word)."""
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def _counter(proxy: ProxyProcess, reason: str) -> float:
    """consolegate_proxy_proxy_protocol_refused_total{reason=...}, asked from an untrusted address."""
    sock = _connect(proxy.port, BROWSER)
    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    text = _refused_closed(sock).decode()
    sock.close()
    prefix = f'consolegate_proxy_proxy_protocol_refused_total{{reason="{reason}"}} '
    return float(next((line[len(prefix) :] for line in text.splitlines() if line.startswith(prefix)), 0))


def test_a_console_through_haproxy_sees_the_browsers_address(
    balancer: int, pp_proxy: ProxyProcess, mint: Callable[..., str], xvnc_none: XvncServer
) -> None:
    tok = mint(host="127.0.0.1", port=xvnc_none.port, client_ip=BROWSER, vm="through-haproxy")
    sock = _connect(balancer, BROWSER)
    _, rest = rawws.upgrade(sock, balancer, tok, rawws.new_key())
    client = rawws.RawClient(sock, rest)
    assert client.read(12) == b"RFB 003.008\n"
    client.close()
    line = pp_proxy.wait_for_log('"event":"closed"', '"vm":"through-haproxy"')
    assert f'"client":"{BROWSER}"' in line


def test_a_token_bound_to_the_balancers_address_is_refused(
    balancer: int, pp_proxy: ProxyProcess, mint: Callable[..., str], xvnc_none: XvncServer
) -> None:
    tok = mint(host="127.0.0.1", port=xvnc_none.port, client_ip="127.0.0.1")
    sock = _connect(balancer, BROWSER)
    sock.sendall(rawws.get_request(balancer, "/websockify", rawws.upgrade_headers(rawws.new_key(), f"token.{tok}")))
    head, body = rawws.recv_head(sock)
    sock.close()
    assert head.startswith(b"HTTP/1.1 403 ")
    assert b"client_ip_mismatch" in body


def test_plain_requests_through_haproxy_reach_tornado_with_the_address(balancer: int, pp_proxy: ProxyProcess) -> None:
    """A request the front door hands to Tornado (here /healthz) carries the header's address too."""
    sock = _connect(balancer, BROWSER)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    reply = _refused_closed(sock)
    sock.close()
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["status"] == "ok"
    pp_proxy.wait_for_log("GET /healthz", f"({BROWSER})")


@pytest.mark.parametrize(
    ("source", "send", "reason"),
    [
        ("127.0.0.1", b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", "missing"),
        ("127.0.0.1", b"PROXY TCP4 127.0.0.5 127.0.0.1 99999 80\r\nGET /healthz HTTP/1.1\r\n\r\n", "malformed"),
        ("127.0.0.1", b"\r\n\r\n\x00\r\nQUIT\n\x21\x11" + struct.pack("!H", 4) + b"\x00" * 4, "malformed"),
        (BROWSER, b"PROXY TCP4 10.9.8.7 127.0.0.1 1234 80\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", "untrusted"),
    ],
)
def test_bad_or_unwelcome_headers_close_the_connection_and_are_counted(
    pp_proxy: ProxyProcess, source: str, send: bytes, reason: str
) -> None:
    before = _counter(pp_proxy, reason)
    sock = _connect(pp_proxy.port, source)
    sock.sendall(send)
    assert _refused_closed(sock) == b""
    sock.close()
    assert _counter(pp_proxy, reason) == before + 1
    pp_proxy.wait_for_log("PROXY protocol: closed a connection")


def test_an_untrusted_peer_without_a_header_is_served(pp_proxy: ProxyProcess) -> None:
    """Only trusted peers must send the header: others (e.g. a monitor) are served as usual."""
    sock = _connect(pp_proxy.port, BROWSER)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    reply = _refused_closed(sock)
    sock.close()
    assert reply.startswith(b"HTTP/1.1 200 ")


# --- a proxy serving TLS itself behind HAProxy (the header comes before the TLS handshake) ---


@pytest.fixture
def tls_pp_proxy(proxy_factory: Callable[..., ProxyProcess], test_pki: TestPki) -> ProxyProcess:
    return proxy_factory(
        "--trusted-proxy",
        "127.0.0.1",
        "--proxy-protocol",
        "--tls-cert",
        str(test_pki.cert_path),
        "--tls-key",
        str(test_pki.key_path),
    )


def _tls(sock: socket.socket, test_pki: TestPki) -> ssl.SSLSocket:
    """What a browser does: verify the proxy's certificate for 127.0.0.1 against the test CA."""
    return ssl.create_default_context(cafile=str(test_pki.ca_path)).wrap_socket(sock, server_hostname="127.0.0.1")


@pytest.mark.parametrize("version", [1, 2])
def test_wss_through_haproxy_to_a_tls_proxy_sees_the_browsers_address(
    tls_pp_proxy: ProxyProcess,
    mint: Callable[..., str],
    xvnc_none: XvncServer,
    test_pki: TestPki,
    tmp_path: Path,
    version: int,
) -> None:
    tok = mint(host="127.0.0.1", port=xvnc_none.port, client_ip=BROWSER, vm=f"tls-haproxy-{version}")
    port = free_port()
    with haproxy(tmp_path, port, tls_pp_proxy.port, version=version):
        sock = _tls(_connect(port, BROWSER), test_pki)
        _, rest = rawws.upgrade(sock, port, tok, rawws.new_key())  # type: ignore[arg-type]
        client = rawws.RawClient(sock, rest)  # type: ignore[arg-type]
        assert client.read(12) == b"RFB 003.008\n"
        client.close()
    line = tls_pp_proxy.wait_for_log('"event":"closed"', f'"vm":"tls-haproxy-{version}"')
    assert f'"client":"{BROWSER}"' in line


def test_tls_proxy_refuses_a_missing_or_untrusted_header_and_serves_untrusted_tls(
    tls_pp_proxy: ProxyProcess, test_pki: TestPki
) -> None:
    missing = _connect(tls_pp_proxy.port, "127.0.0.1")  # trusted: the header is required
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _tls(missing, test_pki)
    missing.close()
    untrusted = _connect(tls_pp_proxy.port, BROWSER)
    untrusted.sendall(b"PROXY TCP4 10.9.8.7 127.0.0.1 1234 443\r\n")
    assert _refused_closed(untrusted) == b""
    untrusted.close()
    tls_pp_proxy.wait_for_log("PROXY protocol: closed a connection from 127.0.0.1")
    tls_pp_proxy.wait_for_log("PROXY protocol: closed a connection from 127.0.0.5")
    plain = _tls(_connect(tls_pp_proxy.port, BROWSER), test_pki)  # an untrusted peer's own TLS
    plain.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert _refused_closed(plain).startswith(b"HTTP/1.1 200 ")  # type: ignore[arg-type]
    plain.close()


def test_proxy_protocol_needs_trusted_proxies(proxy_factory: Callable[..., ProxyProcess]) -> None:
    """Without --trusted-proxy no peer could send the header: refused at start, in one line."""
    with pytest.raises(AssertionError, match="--proxy-protocol needs --trusted-proxy"):
        proxy_factory("--proxy-protocol")
