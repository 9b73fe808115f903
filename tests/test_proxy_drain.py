"""Drain on SIGTERM, through a real proxy process and a real Xvnc (DESIGN, "Limits").

/healthz turns 503 at once so balancers stop routing; new websockets get 503 ``draining``
before the token is even looked at; open sessions keep working for ``--drain-grace`` and are
then closed with 1001; the process exits with status 0, at once when no session is open and
no upgrade is at the broker (one caught mid-redeem is refused, and waited for, first).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

import pytest
from proxyproc import ProxyProcess, start_proxy
from rfbclient import Console, try_upgrade
from tornado.httpclient import AsyncHTTPClient
from xvnc import XvncServer

from console_proxy.brokerlink import API, ProxyCredential
from console_proxy.keyring import Keyring

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
    proxy_factory: Callable[..., ProxyProcess], mint: Mint, xvnc_vncauth: XvncServer
) -> None:
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
    proxy_factory: Callable[..., ProxyProcess], mint: Mint, xvnc_vncauth: XvncServer
) -> None:
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
    proxy_factory: Callable[..., ProxyProcess], mint: Mint, xvnc_vncauth: XvncServer
) -> None:
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


# --- a drain that begins while a single-use token is at the broker ---------------------------

REDEEM_TIMEOUT = 3.0
"""BrokerLink's request timeout: the held redeem must be released well within it, or the proxy
would refuse the upgrade with ``broker_unavailable`` instead."""


class StandInBroker:
    """The broker's proxy API, minimal, on 127.0.0.1: heartbeats answered as the real broker does
    (the keyring when the proxy's version differs), events accepted, and ``/proxy/redeem`` held
    until the test releases it. A real broker cannot be made to hold a redeem in mid-flight."""

    def __init__(self, ring: Keyring, credential: ProxyCredential) -> None:
        self.ring, self.authorization = ring, credential.authorization
        self.redeem_received = threading.Event()
        self.release = threading.Event()
        self.redeem_answer: tuple[int, dict[str, object]] = (200, {"redeemed": True})
        self.redeems: list[dict[str, Any]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def _answer(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, object]]:
        if path == f"{API}/proxy/heartbeat":
            answer: dict[str, object] = {"keyring_version": self.ring.version, "revoked": []}
            if body.get("version") != self.ring.version:
                answer["keyring"] = self.ring.for_proxy().to_jwks()
            return 200, answer
        if path == f"{API}/proxy/events":
            return 200, {"accepted": len(body.get("events", []))}
        if path == f"{API}/proxy/redeem":
            self.redeems.append(body)
            self.redeem_received.set()
            if not self.release.wait(10):
                return 500, {"error": "the test never released the redeem"}
            return self.redeem_answer
        return 404, {"error": "not_found"}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        broker = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Authorization") != broker.authorization:
                    status, answer = 401, {"error": "unauthorized"}
                else:
                    status, answer = broker._answer(self.path, json.loads(raw or b"{}"))
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                # the proxy went away while its request was held: that is the test's to judge
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release.set()  # a redeem still held must not keep its thread waiting
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def linked(broker_ring: tuple[Keyring, Path], tmp_path: Path) -> Iterator[tuple[StandInBroker, ProxyProcess]]:
    """A proxy started with only ``--broker`` (no ``--keyring``), so its keys come from the stand-in."""
    credential = ProxyCredential("proxy-drain", "s3cret-" + "x" * 32)
    path = tmp_path / "credential.json"
    path.write_text(json.dumps({"proxy_id": credential.proxy_id, "secret": credential.secret}))
    path.chmod(0o600)
    with StandInBroker(broker_ring[0], credential) as broker:
        proxy = start_proxy(tmp_path, None, "--broker", broker.base, "--proxy-credential", str(path))
        try:
            yield broker, proxy
        finally:
            proxy.stop()


async def healthz_now(proxy: ProxyProcess) -> tuple[int, dict[str, object] | str]:
    """Like :func:`healthz`, but a proxy that stopped listening is an answer (0, why), not an error."""
    try:
        response = await AsyncHTTPClient().fetch(f"{proxy.base}/healthz", raise_error=False, request_timeout=5)
    except OSError as exc:
        return 0, repr(exc)
    return response.code, json.loads(response.body)


@pytest.mark.parametrize(
    ("broker_says", "refusal"),
    [
        ((200, {"redeemed": True}), (503, "draining")),
        ((409, {"error": "token_used"}), (409, "token_used")),
    ],
    ids=["redeemed", "token_used"],
)
def test_drain_during_a_redeem_refuses_that_upgrade_and_waits_for_it(
    linked: tuple[StandInBroker, ProxyProcess],
    mint: Mint,
    broker_says: tuple[int, dict[str, object]],
    refusal: tuple[int, str],
) -> None:
    """SIGTERM while a single-use token is at the broker: the proxy must neither exit under the
    upgrade (no session is open yet, but one is on its way) nor open a session once the broker
    answers; it refuses the upgrade (503 draining, or the broker's own refusal) and then exits 0."""
    broker, proxy = linked
    broker.redeem_answer = broker_says
    token = mint(host="127.0.0.1", port=5900, single_use=True, session_id="drain-sid")  # no VNC needed: refused

    async def scenario() -> float:
        upgrade = asyncio.ensure_future(try_upgrade(proxy.ws_url, token))
        assert await asyncio.to_thread(broker.redeem_received.wait, 5), "the proxy never asked the broker"
        proxy.signal(signal.SIGTERM)
        await asyncio.to_thread(proxy.wait_for_log, "draining: 0 open sessions")

        status, body = await healthz_now(proxy)  # drain began, the redeem is still held
        assert (status, body) == (503, {"status": "draining", "sessions": 0}), (
            f"the proxy stopped serving while an upgrade was pending: {status} {body}\n{proxy.log_text()}"
        )
        assert proxy.process.poll() is None and "console-proxy stopped" not in proxy.log_text()
        assert not upgrade.done()

        broker.release.set()
        released = time.monotonic()
        refused = await asyncio.wait_for(upgrade, REDEEM_TIMEOUT)
        assert refused is not None and (refused.status, refused.body["error"]) == refusal, refused
        return released

    released = asyncio.run(scenario())
    assert proxy.process.wait(EXIT_TIMEOUT) == 0
    assert time.monotonic() - released < 2.0, "the proxy lingered after its last pending upgrade"
    assert "console-proxy stopped" in proxy.log_text()
    assert [r["session_id"] for r in broker.redeems] == ["drain-sid"]  # asked once, for this token
