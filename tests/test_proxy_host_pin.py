"""Host pinning against DNS rebinding, on the wire of a real proxy, through both upgrade paths.

A page at ``evil.example`` whose name is re-pointed at the proxy's address opens a websocket
with ``Origin: http://evil.example:P`` and ``Host: evil.example:P``: its own origin, which the
Origin check alone allows. With ``--public-url`` the proxy refuses any Host other than the public
URL's (or an allowed origin's) with 403 ``origin_denied``. Each case is sent twice: with CRLF line
ends (the front door admits it) and with bare LF (handed to Tornado's handler), so both paths
are seen to apply the same rule.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass

import pytest
from proxyproc import ProxyProcess, free_port, start_proxy
from rawws import new_key, open_socket

Mint = Callable[..., str]

IO_TIMEOUT = 5.0
PATHS = ["front door", "tornado"]


@dataclass
class Answer:
    status: int
    fields: dict[str, str]
    body: bytes

    def error(self) -> str:
        return json.loads(self.body)["error"]


def upgrade(
    port: int, host: str, tok: str, *, path: str, origin: str | None = None, forwarded_host: str | None = None
) -> Answer:
    """One upgrade request with this Host (and Origin), the answer's head and JSON body if any."""
    eol = "\r\n" if path == "front door" else "\n"
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
    with closing(open_socket(port, timeout=IO_TIMEOUT)) as sock:
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
    server = found.get("server", "")
    assert (path == "tornado") == server.startswith("TornadoServer/") or int(status_line.split()[1]) == 101, (
        f"answered by the wrong path: {raw!r}"
    )
    return Answer(int(status_line.split()[1]), found, body)


@pytest.fixture(scope="module")
def pinned(broker_ring, tmp_path_factory: pytest.TempPathFactory):
    """A proxy whose public URL is http://127.0.0.1:PORT (pinning on by default)."""
    port = free_port()
    process = start_proxy(
        tmp_path_factory.mktemp("pinned"), broker_ring[1], "--public-url", f"http://127.0.0.1:{port}/", port=port
    )
    yield process
    process.stop()


def _token(mint: Mint) -> str:
    return mint(host="127.0.0.1", port=free_port())  # admission is the question here, not the desktop


@pytest.mark.parametrize("path", PATHS)
def test_a_rebinding_host_is_refused_origin_denied(pinned: ProxyProcess, mint: Mint, path: str) -> None:
    evil = f"evil.example:{pinned.port}"
    answer = upgrade(pinned.port, evil, _token(mint), path=path, origin=f"http://{evil}")
    assert (answer.status, answer.error()) == (403, "origin_denied")
    assert "host_not_pinned" in pinned.wait_for_log("host_not_pinned")


@pytest.mark.parametrize("path", PATHS)
def test_the_public_urls_host_is_accepted(pinned: ProxyProcess, mint: Mint, path: str) -> None:
    own = f"127.0.0.1:{pinned.port}"
    assert upgrade(pinned.port, own, _token(mint), path=path, origin=f"http://{own}").status == 101


@pytest.mark.parametrize("path", PATHS)
def test_no_pin_host_accepts_any_host(proxy_factory: Callable[..., ProxyProcess], mint: Mint, path: str) -> None:
    unpinned = proxy_factory("--public-url", "https://consoles.example.com", "--no-pin-host")
    evil = f"evil.example:{unpinned.port}"
    assert upgrade(unpinned.port, evil, _token(mint), path=path, origin=f"http://{evil}").status == 101


@pytest.fixture(scope="module")
def behind_tls(broker_ring, tmp_path_factory: pytest.TempPathFactory):
    """A proxy behind a TLS-terminating balancer: public URL https://consoles.example.com (port 443)."""
    process = start_proxy(
        tmp_path_factory.mktemp("behind"), broker_ring[1], "--public-url", "https://consoles.example.com/consoles/"
    )
    yield process
    process.stop()


@pytest.mark.parametrize("path", PATHS)
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
    behind_tls: ProxyProcess, mint: Mint, path: str, host: str, status: int
) -> None:
    answer = upgrade(behind_tls.port, host, _token(mint), path=path)
    assert answer.status == status
    if status == 403:
        assert answer.error() == "origin_denied"


@pytest.mark.parametrize("path", PATHS)
def test_behind_a_trusted_balancer_the_forwarded_host_is_pinned(
    proxy_factory: Callable[..., ProxyProcess], mint: Mint, path: str
) -> None:
    """The balancer (trusted) passes the browser's Host as X-Forwarded-Host; its own Host is the
    proxy's address. The forwarded one is what must match."""
    balanced = proxy_factory("--public-url", "https://consoles.example.com", "--trusted-proxy", "127.0.0.1/32")
    upstream = f"127.0.0.1:{balanced.port}"
    assert (
        upgrade(balanced.port, upstream, _token(mint), path=path, forwarded_host="consoles.example.com").status == 101
    )
    refused = upgrade(balanced.port, upstream, _token(mint), path=path, forwarded_host="evil.example")
    assert (refused.status, refused.error()) == (403, "origin_denied")
