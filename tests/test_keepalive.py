"""Keepalive Pings (``--ping-interval``): they reach an idle browser, and are not input.

Every way a websocket reaches a session is covered: the front door's own upgrade, Tornado's
handler (a request head longer than the front door reads is handed to Tornado), and the proxy
serving TLS itself. Real proxy processes and a real Xvnc; the client is Tornado's websocket,
which answers each Ping with a Pong (as browsers do), and files each Ping here.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

import pytest
from proxyproc import ProxyProcess
from rfbclient import Console
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect
from xvnc import TestPki, XvncServer

#: Pings a test waits for before it lets the idle timer run out.
PINGS = 3
SCENARIO_TIMEOUT = 20.0


async def _open(
    url: str, tok: str, *, tls: ssl.SSLContext | None = None, pad: bool = False
) -> tuple[Console, asyncio.Queue[bytes]]:
    """A console whose Pings are queued (Tornado's client has answered each with a Pong)."""
    headers = {"Sec-WebSocket-Protocol": f"binary, token.{tok}"}
    if pad:  # longer than the front door's head limit: Tornado's handler serves it
        headers["X-Pad"] = "p" * 9000
    ws = await websocket_connect(HTTPRequest(url, headers=headers, ssl_options=tls, request_timeout=10))
    pings: asyncio.Queue[bytes] = asyncio.Queue()
    ws.on_ping = pings.put_nowait  # type: ignore[method-assign]
    return Console(ws), pings


async def _pings_then_idle_end(url: str, tok: str, **kwargs: object) -> tuple[int, tuple[int | None, str | None]]:
    """Handshake, then nothing from the browser but Pongs: how many Pings came, and the end."""
    console, pings = await _open(url, tok, **kwargs)  # type: ignore[arg-type]
    await console.handshake()
    closed = asyncio.ensure_future(console.wait_closed())
    for _ in range(PINGS):
        getter = asyncio.ensure_future(pings.get())
        done, _ = await asyncio.wait({getter, closed}, return_when=asyncio.FIRST_COMPLETED)
        assert getter in done, f"the session ended before {PINGS} pings: {closed.result()}"
    return PINGS + pings.qsize(), await closed


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, SCENARIO_TIMEOUT))


@pytest.mark.parametrize("pad", [False, True], ids=["front-door", "tornado-handler"])
def test_pings_reach_an_idle_browser_and_do_not_count_as_input(
    proxy_factory: Callable[..., ProxyProcess], mint: Callable[..., str], xvnc_none: XvncServer, pad: bool
) -> None:
    """Pings every 0.2 s while the browser is silent, each answered; the idle timeout (1.5 s)
    still ends the session with 4408: neither the Pings nor the Pongs are the browser's input."""
    proxy = proxy_factory("--ping-interval", "0.2", "--idle-timeout", "1.5")
    tok = mint(host="127.0.0.1", port=xvnc_none.port)
    pings, ending = _run(_pings_then_idle_end(proxy.ws_url, tok, pad=pad))
    assert pings >= PINGS
    assert ending == (4408, "idle_timeout")


def test_pings_over_wss(
    proxy_factory: Callable[..., ProxyProcess], mint: Callable[..., str], xvnc_none: XvncServer, test_pki: TestPki
) -> None:
    """The proxy serving TLS itself pings the same way (its browser is an SSL stream)."""
    proxy = proxy_factory(
        "--tls-cert",
        str(test_pki.cert_path),
        "--tls-key",
        str(test_pki.key_path),
        "--ping-interval",
        "0.2",
        "--idle-timeout",
        "1.5",
    )
    tls = ssl.create_default_context(cafile=str(test_pki.ca_path))
    tok = mint(host="127.0.0.1", port=xvnc_none.port)
    pings, ending = _run(_pings_then_idle_end(f"wss://127.0.0.1:{proxy.port}/websockify", tok, tls=tls))
    assert pings >= PINGS
    assert ending == (4408, "idle_timeout")


def test_no_pings_when_disabled(
    proxy_factory: Callable[..., ProxyProcess], mint: Callable[..., str], xvnc_none: XvncServer
) -> None:
    """``--ping-interval 0``: an idle console hears nothing until the idle timeout ends it."""
    proxy = proxy_factory("--ping-interval", "0", "--idle-timeout", "1")
    tok = mint(host="127.0.0.1", port=xvnc_none.port)

    async def scenario() -> tuple[int, tuple[int | None, str | None]]:
        console, pings = await _open(proxy.ws_url, tok)
        await console.handshake()
        ending = await console.wait_closed()
        return pings.qsize(), ending

    assert _run(scenario()) == (0, (4408, "idle_timeout"))


def test_negative_ping_interval_is_refused(proxy_factory: Callable[..., ProxyProcess]) -> None:
    with pytest.raises(AssertionError, match="--ping-interval must be 0"):
        proxy_factory("--ping-interval", "-1")
