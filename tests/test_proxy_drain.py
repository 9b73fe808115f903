"""Drain on SIGTERM, through a real proxy process and a real Xvnc (DESIGN, "Limits").

/healthz turns 503 at once so balancers stop routing; new websockets get 503 ``draining``
before the token is even looked at; open sessions keep working for ``--drain-grace`` and are
then closed with 1001; the process exits with status 0, at once when no session is open.
"""

from __future__ import annotations

import asyncio
import json
import signal
import struct
import time
from collections.abc import Callable

from proxyproc import ProxyProcess
from rfbclient import Console, try_upgrade
from tornado.httpclient import AsyncHTTPClient
from xvnc import XvncServer

GRACE = 1.5
EXIT_TIMEOUT = 5.0

Mint = Callable[..., str]


async def healthz(proxy: ProxyProcess) -> tuple[int, dict[str, object]]:
    response = await AsyncHTTPClient().fetch(f"{proxy.base}/healthz", raise_error=False, request_timeout=5)
    return response.code, json.loads(response.body)


async def read_update(console: Console) -> int:
    """One whole FramebufferUpdate (32 bpp, as Xvnc's default format); the pixels it covered."""
    kind, _pad, count = struct.unpack(">BBH", await console.read(4))
    assert kind == 0, f"expected a FramebufferUpdate, got message type {kind}"
    pixels = 0
    for _ in range(count):
        _x, _y, w, h, encoding = struct.unpack(">HHHHi", await console.read(12))
        assert encoding == 0, f"asked for Raw only, got encoding {encoding}"
        await console.read(w * h * 4)
        pixels += w * h
    return pixels


async def open_console(proxy: ProxyProcess, token: str) -> Console:
    """A console past its handshake, with Raw encoding only, so updates are simple to read whole."""
    console = await Console.open(proxy.ws_url, token)
    await console.handshake()
    await console.send(struct.pack(">BBHi", 2, 0, 1, 0))
    return console


def test_sigterm_drains_then_closes_open_sessions_with_1001(
        proxy_factory: Callable[..., ProxyProcess], mint: Mint, xvnc_vncauth: XvncServer) -> None:
    proxy = proxy_factory("--drain-grace", str(GRACE))
    token = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password)

    async def scenario() -> None:
        console = await open_console(proxy, token)
        await console.request_update()
        assert await read_update(console) == 800 * 600
        assert (await healthz(proxy))[0] == 200

        proxy.signal(signal.SIGTERM)
        signalled = time.monotonic()
        await asyncio.to_thread(proxy.wait_for_log, "draining")
        status, body = await healthz(proxy)
        assert (status, body["status"]) == (503, "draining"), body

        refused = await try_upgrade(proxy.ws_url, "not-even-a-token")  # draining is checked first
        assert refused is not None and (refused.status, refused.body["error"]) == (503, "draining"), refused
        refused = await try_upgrade(proxy.ws_url, token)  # a good token is turned away too
        assert refused is not None and (refused.status, refused.body["error"]) == (503, "draining"), refused

        await console.request_update()  # the open session still works during the grace
        assert await read_update(console) == 800 * 600
        assert time.monotonic() - signalled < GRACE, "too slow to show the session working in the grace"
        assert console.ws.close_code is None

        code, reason = await asyncio.wait_for(console.wait_closed(), GRACE + EXIT_TIMEOUT)
        waited = time.monotonic() - signalled
        assert (code, reason) == (1001, "going_away")
        assert GRACE - 0.05 <= waited < GRACE + 2.0, f"closed {waited:.2f}s after SIGTERM, grace is {GRACE}s"

    asyncio.run(scenario())
    assert proxy.process.wait(EXIT_TIMEOUT) == 0
    assert "console-proxy stopped" in proxy.log_text()


def test_sigterm_without_sessions_exits_at_once(proxy_factory: Callable[..., ProxyProcess]) -> None:
    """Default grace is 30 s: it must not be waited for when no session is open."""
    proxy = proxy_factory()
    assert asyncio.run(healthz(proxy))[0] == 200
    started = time.monotonic()
    proxy.signal(signal.SIGTERM)
    assert proxy.process.wait(EXIT_TIMEOUT) == 0
    assert time.monotonic() - started < 2.0


def test_sigterm_after_the_last_session_ended_exits_at_once(
        proxy_factory: Callable[..., ProxyProcess], mint: Mint, xvnc_vncauth: XvncServer) -> None:
    """A session that came and went leaves nothing to wait for."""
    proxy = proxy_factory()
    token = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password)

    async def scenario() -> None:
        console = await open_console(proxy, token)
        console.close()
        await asyncio.to_thread(proxy.wait_for_log, '"event":"closed"')

    asyncio.run(scenario())
    proxy.signal(signal.SIGTERM)
    assert proxy.process.wait(EXIT_TIMEOUT) == 0


def test_drain_ends_when_the_last_session_closes_within_the_grace(
        proxy_factory: Callable[..., ProxyProcess], mint: Mint, xvnc_vncauth: XvncServer) -> None:
    """With a 30 s grace, the proxy exits as soon as its last browser leaves, not after 30 s."""
    proxy = proxy_factory()
    token = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password)

    async def scenario() -> None:
        console = await open_console(proxy, token)
        proxy.signal(signal.SIGTERM)
        await asyncio.to_thread(proxy.wait_for_log, "draining")
        await console.request_update()
        assert await read_update(console) == 800 * 600
        console.close()

    asyncio.run(scenario())
    started = time.monotonic()
    assert proxy.process.wait(EXIT_TIMEOUT) == 0
    assert time.monotonic() - started < 2.0
