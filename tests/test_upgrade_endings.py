"""One refusal, every listener: the same bytes on the wire and the same event, whoever read the head.

Why: a browser's upgrade reaches the proxy through the front door (plain HTTP), Tornado's route
(a proxy serving TLS itself), and either of them behind a balancer's PROXY protocol header. They
once rendered refusals separately and ended them differently; now all go through
:mod:`console_proxy.upgrade`. Here four real proxy processes, one per listener, get the same
refused requests over raw sockets; every answer is read to the end of the connection and the
answers are compared byte for byte (the Date field aside, which only says when), and so are the
``refused`` events (what the broker's audit and the metrics are told), the time aside.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest
from proxyproc import ProxyProcess, start_proxy
from rawws import new_key
from xvnc import TestPki

from console_proxy.keyring import Keyring

Mint = Callable[..., str]

IO_TIMEOUT = 10.0
#: The PROXY header a balancer on this machine sends: the browser is 127.0.0.1 as without it.
PROXY_HEADER = b"PROXY TCP4 127.0.0.1 127.0.0.1 40000 80\r\n"
LISTENERS = ["plain", "plain-proxy-protocol", "tls", "tls-proxy-protocol"]


@pytest.fixture(scope="module")
def proxies(
    broker_ring: tuple[Keyring, Path], test_pki: TestPki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, ProxyProcess]]:
    tls = ("--tls-cert", str(test_pki.cert_path), "--tls-key", str(test_pki.key_path))
    behind = ("--proxy-protocol", "--trusted-proxy", "127.0.0.1")
    options = {
        "plain": (),
        "plain-proxy-protocol": behind,
        "tls": tls,
        "tls-proxy-protocol": (*tls, *behind),
    }
    started: dict[str, ProxyProcess] = {}
    try:
        for name, extra in options.items():
            started[name] = start_proxy(tmp_path_factory.mktemp(name), broker_ring[1], *extra)
        yield started
    finally:
        for process in started.values():
            process.stop()


def ending(listener: str, port: int, request: bytes, ca_path: Path) -> bytes:
    """The proxy's whole answer on one connection: its head and Content-Length bytes of body.
    (The connection then ends at the browser's close, which a real browser does after
    ``Connection: close``; that the front door also half-closes is tested in test_frontdoor.)"""
    sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    if listener.endswith("proxy-protocol"):
        sock.sendall(PROXY_HEADER)
    if listener.startswith("tls"):
        context = ssl.create_default_context(cafile=str(ca_path))
        sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
    with closing(sock):
        sock.sendall(request)
        received = b""
        while b"\r\n\r\n" not in received or len(received) < whole(received):
            chunk = sock.recv(65536)
            assert chunk, f"the connection ended inside the answer: {received!r}"
            received += chunk
    return received


def whole(received: bytes) -> int:
    """How long the answer whose head is in ``received`` is, head and body."""
    head, _, _ = received.partition(b"\r\n\r\n")
    lengths = [line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    assert len(lengths) == 1, head
    return len(head) + 4 + int(lengths[0])


def undated(response: bytes) -> bytes:
    """The response with its Date field's value blanked (it says when, not what)."""
    head, _, body = response.partition(b"\r\n\r\n")
    lines = [b"Date: -" if line.startswith(b"Date: ") else line for line in head.split(b"\r\n")]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def upgrade_request(*fields: str, target: str = "/websockify") -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: 127.0.0.1", *fields, "", ""]
    return "\r\n".join(lines).encode("latin-1")


def browser_fields(protocols: str = "binary", version: str = "13") -> list[str]:
    return [
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {new_key()}",
        f"Sec-WebSocket-Version: {version}",
        f"Sec-WebSocket-Protocol: {protocols}",
    ]


def refused_event(proxy: ProxyProcess, code: str) -> dict[str, object]:
    line = proxy.wait_for_log('"event":"refused"', f'"code":"{code}"')
    record = json.loads(line[line.index("{") :])
    del record["at"]
    return record


CASES: dict[str, tuple[int, Callable[[Mint], bytes]]] = {
    "token_missing": (400, lambda mint: upgrade_request(*browser_fields())),
    "websocket_version": (426, lambda mint: upgrade_request(*browser_fields(version="8"))),
    "websocket_required": (400, lambda mint: upgrade_request()),
    "token_expired": (
        401,
        lambda mint: upgrade_request(
            *browser_fields(f"binary, token.{mint(host='127.0.0.1', port=5900, now=time.time() - 3600)}")
        ),
    ),
    # past admission: the single-use token's redemption fails closed (no broker)
    "broker_unavailable": (
        503,
        lambda mint: upgrade_request(
            *browser_fields(), target=f"/websockify?token={mint(host='127.0.0.1', port=5900, single_use=True)}"
        ),
    ),
}


@pytest.mark.parametrize("code", list(CASES))
def test_a_refusal_ends_the_same_on_every_listener(
    proxies: dict[str, ProxyProcess], test_pki: TestPki, mint: Mint, code: str
) -> None:
    status, build = CASES[code]
    request = build(mint)
    answers = {name: undated(ending(name, proxies[name].port, request, test_pki.ca_path)) for name in LISTENERS}
    plain = answers["plain"]
    assert plain.startswith(f"HTTP/1.1 {status} ".encode()), plain
    assert json.loads(plain.partition(b"\r\n\r\n")[2])["error"] == code
    assert b"\r\nConnection: close\r\n" in plain and b"Server:" not in plain
    for name, answer in answers.items():
        assert answer == plain, f"{name} answered differently from plain:\n{answer!r}\n{plain!r}"
    events = {name: refused_event(proxies[name], code) for name in LISTENERS}
    assert events["plain"]["client"] == "127.0.0.1" and events["plain"]["status"] == status
    for name, event in events.items():
        assert event == events["plain"], f"{name}'s refused event differs: {event} != {events['plain']}"
