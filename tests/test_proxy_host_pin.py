"""Host pinning against DNS rebinding, on the wire of a real proxy, through both upgrade paths.

A page at ``evil.example`` whose name is re-pointed at the proxy's address opens a websocket
with ``Origin: http://evil.example:P`` and ``Host: evil.example:P``: its own origin, which the
Origin check alone allows. With ``--public-url`` the proxy refuses any Host other than the public
URL's (or an allowed origin's) with 403 ``origin_denied``. Each case is sent twice: to a plain
proxy (the front door admits it) and to the same proxy serving TLS itself (Tornado's route), so
both listeners are seen to apply the same rule (they share :mod:`console_proxy.upgrade`).
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from proxyproc import ProxyProcess, free_port, start_proxy
from rawws import new_key, open_socket
from xvnc import TestPki

Mint = Callable[..., str]

IO_TIMEOUT = 5.0
PATHS = ["front door", "tls"]


@dataclass
class Answer:
    status: int
    fields: dict[str, str]
    body: bytes

    def error(self) -> str:
        return json.loads(self.body)["error"]


def connect(proxy: ProxyProcess, ca_path: Path | None) -> socket.socket:
    """A connection to the proxy, in TLS (verifying its certificate) when it serves TLS."""
    sock = open_socket(proxy.port, timeout=IO_TIMEOUT)
    if ca_path is None:
        return sock
    return ssl.create_default_context(cafile=str(ca_path)).wrap_socket(sock, server_hostname="127.0.0.1")


def upgrade(
    proxy: ProxyProcess,
    host: str,
    tok: str,
    *,
    ca_path: Path | None = None,
    origin: str | None = None,
    forwarded_host: str | None = None,
) -> Answer:
    """One upgrade request with this Host (and Origin), the answer's head and JSON body if any."""
    eol = "\r\n"
    fields = [
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {new_key()}",
        "Sec-WebSocket-Version: 13",
        f"Sec-WebSocket-Protocol: binary, token.{tok}",
    ]
    if origin is not None:
        fields.append(f"Origin: {origin}")
    if forwarded_host is not None:
        fields.append(f"X-Forwarded-Host: {forwarded_host}")
    head = eol.join(["GET /websockify HTTP/1.1", *fields, "", ""]).encode("latin-1")
    with connect(proxy, ca_path) as sock:
        sock.sendall(head)
        raw = b""
        while b"\r\n\r\n" not in raw:
            chunk = sock.recv(65536)
            assert chunk, f"the connection ended inside the answer's head: {raw!r}"
            raw += chunk
        top, _, body = raw.partition(b"\r\n\r\n")
        status_line, *lines = top.decode("latin-1").split("\r\n")
        found = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
        length = int(found.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            assert chunk, "the connection ended inside the answer's body"
            body += chunk
    assert "server" not in found, f"not the upgrade pipeline's answer: {raw!r}"
    return Answer(int(status_line.split()[1]), found, body)


class Listener:
    """A proxy for one path: plain (the front door) or serving TLS itself (Tornado's route)."""

    def __init__(self, path: str, pki: TestPki) -> None:
        self.tls = path == "tls"
        self.scheme = "https" if self.tls else "http"  # a rebinding page's own origin is on the proxy's scheme
        self.ca_path = pki.ca_path if self.tls else None
        self.options = ("--tls-cert", str(pki.cert_path), "--tls-key", str(pki.key_path)) if self.tls else ()

    def ask(self, proxy: ProxyProcess, host: str, tok: str, **fields: str | None) -> Answer:
        return upgrade(proxy, host, tok, ca_path=self.ca_path, **fields)


@pytest.fixture(params=PATHS)
def listener(request: pytest.FixtureRequest, test_pki: TestPki) -> Listener:
    return Listener(request.param, test_pki)


def started_per_path(
    tmp_path_factory: pytest.TempPathFactory, keyring_path: Path, pki: TestPki, *extra: str, pin_port: bool = False
) -> Iterator[dict[str, ProxyProcess]]:
    """One proxy per path with the same options; ``pin_port``: --public-url names its own port."""
    started: dict[str, ProxyProcess] = {}
    try:
        for path in PATHS:
            port = free_port()
            url = ("--public-url", f"http://127.0.0.1:{port}/") if pin_port else ()
            options = Listener(path, pki).options
            started[path] = start_proxy(
                tmp_path_factory.mktemp("proxy"), keyring_path, *url, *extra, *options, port=port
            )
        yield started
    finally:
        for process in started.values():
            process.stop()


@pytest.fixture(scope="module")
def pinned(broker_ring, tmp_path_factory: pytest.TempPathFactory, test_pki: TestPki):
    """Proxies whose public URL is http://127.0.0.1:PORT (pinning on by default), by path."""
    yield from started_per_path(tmp_path_factory, broker_ring[1], test_pki, pin_port=True)


def _token(mint: Mint) -> str:
    return mint(host="127.0.0.1", port=free_port())  # admission is the question here, not the desktop


def test_a_rebinding_host_is_refused_origin_denied(
    pinned: dict[str, ProxyProcess], mint: Mint, listener: Listener
) -> None:
    proxy = pinned["tls" if listener.tls else "front door"]
    evil = f"evil.example:{proxy.port}"
    answer = listener.ask(proxy, evil, _token(mint), origin=f"{listener.scheme}://{evil}")
    assert (answer.status, answer.error()) == (403, "origin_denied")
    assert "host_not_pinned" in proxy.wait_for_log("host_not_pinned")


def test_the_public_urls_host_is_accepted(pinned: dict[str, ProxyProcess], mint: Mint, listener: Listener) -> None:
    proxy = pinned["tls" if listener.tls else "front door"]
    own = f"127.0.0.1:{proxy.port}"
    assert listener.ask(proxy, own, _token(mint), origin=f"http://{own}").status == 101


def test_no_pin_host_accepts_any_host(
    proxy_factory: Callable[..., ProxyProcess], mint: Mint, listener: Listener
) -> None:
    unpinned = proxy_factory("--public-url", "https://consoles.example.com", "--no-pin-host", *listener.options)
    evil = f"evil.example:{unpinned.port}"
    assert listener.ask(unpinned, evil, _token(mint), origin=f"{listener.scheme}://{evil}").status == 101


@pytest.fixture(scope="module")
def behind_tls(broker_ring, tmp_path_factory: pytest.TempPathFactory, test_pki: TestPki):
    """Proxies behind a TLS-terminating balancer: public URL https://consoles.example.com (port 443)."""
    yield from started_per_path(
        tmp_path_factory, broker_ring[1], test_pki, "--public-url", "https://consoles.example.com/consoles/"
    )


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("consoles.example.com", 101),
        ("consoles.example.com:443", 101),
        ("Consoles.EXAMPLE.com", 101),
        ("CONSOLES.example.com:443", 101),
        ("consoles.example.com:80", 403),
        ("consoles.example.com:8443", 403),
        ("consoles.example.com.evil.example", 403),
    ],
)
def test_default_port_and_case_are_normalised(
    behind_tls: dict[str, ProxyProcess], mint: Mint, listener: Listener, host: str, status: int
) -> None:
    answer = listener.ask(behind_tls["tls" if listener.tls else "front door"], host, _token(mint))
    assert answer.status == status
    if status == 403:
        assert answer.error() == "origin_denied"


def test_behind_a_trusted_balancer_the_forwarded_host_is_pinned(
    proxy_factory: Callable[..., ProxyProcess], mint: Mint, listener: Listener
) -> None:
    """The balancer (trusted) passes the browser's Host as X-Forwarded-Host; its own Host is the
    proxy's address. The forwarded one is what must match."""
    balanced = proxy_factory(
        "--public-url", "https://consoles.example.com", "--trusted-proxy", "127.0.0.1/32", *listener.options
    )
    upstream = f"127.0.0.1:{balanced.port}"
    assert listener.ask(balanced, upstream, _token(mint), forwarded_host="consoles.example.com").status == 101
    refused = listener.ask(balanced, upstream, _token(mint), forwarded_host="evil.example")
    assert (refused.status, refused.error()) == (403, "origin_denied")
