"""Broken and hostile console servers behind a real proxy process: bounded, quick, isolated.

Each case points a token at a stand-in server from tests/hostile.py (no real VNC server
misbehaves on purpose) and checks the websocket close code and reason the browser gets after the
upgrade (DESIGN: 4500 unreachable, 4501 refused, 4502 protocol error), how long it took against
the 2 s handshake timeout, and that the proxy neither allocated what the server announced nor
stopped serving everyone else: a real Xvnc console still works through the same process, also
while other sessions are stalled.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hostile import HostileServer
from proxyproc import ProxyProcess, start_proxy
from rfbclient import Console
from tornado.websocket import WebSocketClosedError
from xvnc import XvncServer

from console_proxy.keyring import Keyring

HANDSHAKE_TIMEOUT = 2.0
#: A failure the proxy can see at once must beat the handshake timeout by a clear margin.
QUICK = 1.2
PASSWORD = "hunter2!"  # VNC passwords are cut to 8 bytes; all 8 must stay secret
RSS_SLACK = 4 << 20
CLOSE_WAIT = 10.0
REASONS = {4500: "target_unreachable", 4501: "target_auth_failed", 4502: "target_protocol_error"}

Mint = Callable[..., str]


@pytest.fixture(scope="module")
def hostile_proxy(
    broker_ring: tuple[Keyring, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """One proxy for the whole module, so every case also shows that the process survives."""
    process = start_proxy(
        tmp_path_factory.mktemp("hostile-proxy"), broker_ring[1], "--handshake-timeout", str(HANDSHAKE_TIMEOUT)
    )
    yield process
    process.stop()


@dataclass
class Closed:
    code: int | None
    reason: str | None
    seconds: float


def rss(proxy: ProxyProcess) -> int:
    """The proxy process's resident set size in bytes (VmRSS)."""
    for line in Path(f"/proc/{proxy.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc status")


def closed_port() -> int:
    """A loopback port that was just bound and released: nothing listens there."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def close_of(ws_url: str, token: str) -> Closed:
    """Open a console, play the browser's handshake as far as the proxy lets us, and report the close.

    The browser's side must reach ClientInit, else failures after the upstream's SecurityResult
    (a bad ServerInit) would never be provoked.
    """
    console = await Console.open(ws_url, token)
    started = time.monotonic()
    try:
        await console.handshake()
    except ConnectionError:
        pass  # read() already consumed tornado's one end-of-stream None: the code is known
    except WebSocketClosedError:
        await asyncio.wait_for(console.wait_closed(), CLOSE_WAIT)
    else:
        console.close()
        raise AssertionError("the handshake with a hostile server completed")
    return Closed(console.ws.close_code, console.ws.close_reason, time.monotonic() - started)


def hostile_token(mint: Mint, port: int) -> str:
    return mint(host="127.0.0.1", port=port, password=PASSWORD)


def assert_closed(closed: Closed, code: int) -> None:
    assert (closed.code, closed.reason) == (code, REASONS[code]), closed
    assert PASSWORD not in (closed.reason or "")


FAST_CASES = [
    ("bad_version", 4502),
    ("http", 4502),
    ("garbage", 4502),
    ("close_at_once", 4502),
    ("huge_name", 4502),
    ("refuse_huge_reason", 4501),
    ("refuse_endless_reason", 4501),
    ("auth_fail_huge_reason", 4501),
]


@pytest.mark.parametrize(("behaviour", "code"), FAST_CASES)
def test_hostile_upstream_is_closed_quickly_with_its_code(
    hostile_proxy: ProxyProcess, mint: Mint, behaviour: str, code: int
) -> None:
    """Failures the proxy can recognise from the bytes must not wait for the handshake timeout,
    nor for the 4 GiB a length field announces: the proxy's memory stays flat."""
    with HostileServer(behaviour) as server:
        before = rss(hostile_proxy)
        closed = asyncio.run(close_of(hostile_proxy.ws_url, hostile_token(mint, server.port)))
        after = rss(hostile_proxy)
        assert server.accepted.is_set()
        received = bytes(server.received)
    assert_closed(closed, code)
    assert closed.seconds < QUICK, f"{behaviour}: closed after {closed.seconds:.2f}s, not at once"
    assert after - before < RSS_SLACK, f"{behaviour}: proxy RSS grew by {(after - before) >> 10} KiB"
    assert PASSWORD.encode() not in received  # VNC auth sends a DES response, never the password


def test_stall_mid_handshake_ends_at_the_handshake_timeout(hostile_proxy: ProxyProcess, mint: Mint) -> None:
    """A server that sends its version and then nothing costs one session the timeout, no more."""
    with HostileServer("stall_after_version") as server:
        closed = asyncio.run(close_of(hostile_proxy.ws_url, hostile_token(mint, server.port)))
        assert server.received.startswith(b"RFB 003.008\n")  # the proxy answered the version
    assert_closed(closed, 4502)
    assert HANDSHAKE_TIMEOUT - 0.2 <= closed.seconds < HANDSHAKE_TIMEOUT + 2.0, closed


def test_nothing_listening_is_unreachable(hostile_proxy: ProxyProcess, mint: Mint) -> None:
    closed = asyncio.run(close_of(hostile_proxy.ws_url, hostile_token(mint, closed_port())))
    assert_closed(closed, 4500)
    assert closed.seconds < QUICK


def test_close_events_are_logged_without_the_password(hostile_proxy: ProxyProcess, mint: Mint) -> None:
    """The session log line carries the code and a detail about the server, never the password."""
    with HostileServer("auth_fail") as server:
        token = mint(host="127.0.0.1", port=server.port, password=PASSWORD, session_id="hostile-logged")
        closed = asyncio.run(close_of(hostile_proxy.ws_url, token))
    assert_closed(closed, 4501)
    line = hostile_proxy.wait_for_log('"session_id":"hostile-logged"')
    record = json.loads(line[line.index("{") :])
    assert (record["event"], record["close_code"], record["close_reason"]) == ("closed", 4501, "target_auth_failed")
    assert "wrong password" in record["detail"]  # the server's reason, bounded, for the operator
    assert PASSWORD not in hostile_proxy.log_text()


async def normal_console(ws_url: str, token: str) -> tuple[int, int, int]:
    """Handshake and one full-screen update request; the size and the reply's message type."""
    console = await Console.open(ws_url, token)
    try:
        info = await console.handshake()
        await console.request_update()
        reply = await console.read(1)
    finally:
        console.close()
    return info.width, info.height, reply[0]


def test_proxy_keeps_serving_after_hostile_upstreams(
    hostile_proxy: ProxyProcess, mint: Mint, xvnc_vncauth: XvncServer
) -> None:
    """Every hostile case at once through the same process, then a real console still works."""
    servers = [HostileServer(behaviour) for behaviour, _ in FAST_CASES]
    try:

        async def scenario() -> list[Closed]:
            tokens = [hostile_token(mint, server.port) for server in servers]
            tokens.append(hostile_token(mint, closed_port()))
            return list(await asyncio.gather(*(close_of(hostile_proxy.ws_url, t) for t in tokens)))

        results = asyncio.run(scenario())
    finally:
        for server in servers:
            server.stop()
    assert all(r.code in REASONS for r in results), results  # each precise code: the tests above
    assert hostile_proxy.process.poll() is None
    token = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password)
    assert asyncio.run(normal_console(hostile_proxy.ws_url, token)) == (800, 600, 0)


def test_stalled_sessions_do_not_block_a_normal_one(
    hostile_proxy: ProxyProcess, mint: Mint, xvnc_vncauth: XvncServer
) -> None:
    """No head-of-line blocking: while three sessions hang in a stalled handshake, a normal
    console completes at once, and the stalled ones end later at their own timeout."""
    good = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password)
    with HostileServer("stall_after_version") as server:

        async def scenario() -> tuple[tuple[int, int, int], float, list[int | None], list[Closed]]:
            stalled = [
                asyncio.ensure_future(close_of(hostile_proxy.ws_url, hostile_token(mint, server.port)))
                for _ in range(3)
            ]
            deadline = time.monotonic() + HANDSHAKE_TIMEOUT / 2
            while server.connections < 3:  # until every stalled session reached the stand-in
                assert time.monotonic() < deadline, "the stalled sessions never reached the server"
                await asyncio.wait(stalled, timeout=0.01)  # a poll: a thread's counter cannot be awaited
                assert not any(task.done() for task in stalled)
            started = time.monotonic()
            result = await normal_console(hostile_proxy.ws_url, good)
            seconds = time.monotonic() - started
            still_open = [None if not task.done() else task.result().code for task in stalled]
            return result, seconds, still_open, list(await asyncio.gather(*stalled))

        result, seconds, still_open, closed = asyncio.run(scenario())
    assert result == (800, 600, 0)
    assert seconds < 1.0, f"a normal console took {seconds:.2f}s next to stalled ones"
    assert still_open == [None, None, None]  # the normal session did not wait for them to end
    for each in closed:
        assert_closed(each, 4502)
