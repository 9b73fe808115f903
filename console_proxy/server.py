"""The proxy's HTTP surface: Tornado handlers that wire requests to the cores, and draining.

Handlers read what the cores need off the request (token, Origin, addresses), call
:func:`admission.admit`, and write the answer; ``/websockify`` hands its connection to the
upgrade pipeline (:mod:`console_proxy.upgrade`), which every listener shares. The process's
shared state (keyring, open sessions, draining flag, metrics) is one :class:`ProxyState`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import time
from collections.abc import Awaitable
from typing import Any, Protocol

import tornado.web
from tornado.httputil import HTTPServerRequest
from tornado.ioloop import PeriodicCallback
from tornado.iostream import IOStream, SSLIOStream, StreamClosedError

from console_proxy import clock, openapi, upgrade, wsconn
from console_proxy.admission import Refusal, Request, SpentTokens, admit, bearer_token
from console_proxy.codes import Close, Refused
from console_proxy.config import ProxyConfig
from console_proxy.events import Events
from console_proxy.handlerlog import PathOnlyLogging, access_log
from console_proxy.httperrors import JsonErrors, NotFound
from console_proxy.keyring import Keyring
from console_proxy.metrics import ProxyMetrics
from console_proxy.offers import Offers
from console_proxy.pages import page_routes
from console_proxy.relay import ConsoleSession, Ending
from console_proxy.token import Claims

log = logging.getLogger("consolegate.proxy")


class BrokerLink(Protocol):
    """What the proxy asks of a broker; absent, single-use tokens fail closed."""

    async def redeem(self, claims: Claims) -> None:
        """Return when redeemed; raise Refusal (token_used or broker_unavailable) otherwise."""

    def nudge(self) -> None:
        """Report this proxy's state to the broker now rather than at the next interval."""


class ProxyState:
    """Everything one proxy process shares between requests. No durable state."""

    def __init__(
        self, config: ProxyConfig, keyring: Keyring, *, broker: BrokerLink | None = None, events: Events | None = None
    ) -> None:
        self.config, self.keyring, self.broker = config, keyring, broker
        self.events = events or Events()
        self.sessions: dict[ConsoleSession, None] = {}
        self.pending = 0
        self.draining = False
        self.revoked: set[str] = set()
        self.spent = SpentTokens()
        self.stopped = asyncio.Event()
        self.closed_bytes = {"up": 0, "down": 0}
        self.closing: set[object] = set()  # while draining: browsers whose connection is closing
        self.closed_cut_text: dict[tuple[str, ...], float] = {}
        self.offers = Offers(enabled=config.pipeline_upstream)
        self.metrics = ProxyMetrics(
            lambda: len(self.sessions),
            lambda: float(self.draining),
            self._relayed,
            self._cut_text_dropped,
            self.offers.counted,
        )

    def _relayed(self) -> dict[tuple[str, ...], float]:
        up = self.closed_bytes["up"] + sum(s.bytes_up for s in self.sessions)
        down = self.closed_bytes["down"] + sum(s.bytes_down for s in self.sessions)
        return {("up",): up, ("down",): down}

    def _cut_text_dropped(self) -> dict[tuple[str, ...], float]:
        totals = dict(self.closed_cut_text)
        for session in self.sessions:
            for key, count in session.clip.dropped.items():
                totals[key] = totals.get(key, 0) + count
        return totals

    def admit(self, request: Request) -> Claims:
        """The pure admission, then what only this process knows: revoked sessions."""
        claims = admit(
            request,
            keyring=self.keyring,
            config=self.config,
            now=clock.now(),
            draining=self.draining,
            sessions=len(self.sessions) + self.pending,
        )
        if claims.sid in self.revoked:  # a reusable token must not reopen a revoked session
            raise Refusal(Refused.SESSION_REVOKED, reason="the broker revoked this session", claims=claims)
        return claims

    async def redeem(self, claims: Claims) -> None:
        if not claims.single_use:
            return
        self.spent.check(claims)
        if self.broker is None:
            raise Refusal(Refused.BROKER_UNAVAILABLE, reason="single-use token and no broker configured", claims=claims)
        try:
            await self.broker.redeem(claims)
        except Refusal as refusal:
            if refusal.code == "token_used":
                self.spent.add(claims, clock.now())
            raise
        self.spent.add(claims, clock.now())

    def refused(self, refusal: Refusal, client_ip: str, path: str) -> None:
        self.metrics.refusals.inc(refusal.code)
        self.events.refused(refusal, client_ip, path)

    def session_opened(self, session: ConsoleSession) -> None:
        if session.handshake_seconds is not None:
            self.metrics.handshake.observe(session.handshake_seconds)
        self.events.opened(session)

    def session_ended(self, session: ConsoleSession) -> None:
        self.sessions.pop(session, None)
        ending = session.ending
        assert ending is not None
        self.metrics.sessions.inc(ending.reason)
        self.closed_bytes["up"] += session.bytes_up
        self.closed_bytes["down"] += session.bytes_down
        for key, count in session.clip.dropped.items():
            self.closed_cut_text[key] = self.closed_cut_text.get(key, 0) + count
        self.events.closed(session)
        if self.draining:  # its Close may still be queued behind data the browser has yet to read
            browser = session.browser
            self.closing.add(browser)
            browser.when_gone(lambda: self._browser_gone(browser))
        self._stop_if_idle()

    def _browser_gone(self, browser: object) -> None:
        self.closing.discard(browser)
        self._stop_if_idle()

    def release_pending(self) -> None:
        self.pending -= 1
        self._stop_if_idle()

    def _stop_if_idle(self) -> None:
        """A draining proxy stops once no session is open, no upgrade is under way, and every
        ended session's browser has had its Close (exiting would drop what is still queued)."""
        if self.draining and not self.sessions and not self.pending and not self.closing:
            self.stopped.set()

    def sweep(self) -> None:
        """Close idle, expired and revoked sessions (one timer for all, not one per session)."""
        now, wall = time.monotonic(), clock.now()
        for session in list(self.sessions):
            try:
                ending = self._due_ending(session, now, wall)
                if ending is not None:
                    session.finish(ending)
                else:
                    session.browser.watch_held()  # a stuck hypervisor must not hide a browser's end
            except Exception:  # a bug with one session must not stop the sweep for all
                log.exception("sweeping session %s failed", session.sid)

    def _due_ending(self, session: ConsoleSession, now: float, wall: float) -> Ending | None:
        config = self.config
        if session.sid in self.revoked:
            return Ending.of(Close.SESSION_ENDED, "revoked by the broker")
        if config.end_at_expiry and wall >= session.claims.exp + config.expiry_grace:
            return Ending.of(Close.SESSION_ENDED, "the console's time ran out")
        if config.idle_timeout and now - session.last_input >= config.idle_timeout:
            return Ending.of(Close.IDLE_TIMEOUT, "no input from the browser")
        return None

    def begin_drain(self) -> None:
        """Stop taking sessions; close the open ones after the grace period (1001)."""
        if self.draining:
            return
        self.draining = True
        log.info(
            "draining: %d open sessions, %d upgrades under way, grace %.0fs",
            len(self.sessions),
            self.pending,
            self.config.drain_grace,
        )
        if self.broker is not None:
            self.broker.nudge()  # so the broker stops assigning consoles here at once
        asyncio.get_running_loop().call_later(self.config.drain_grace, self._going_away)
        self._stop_if_idle()

    def _going_away(self) -> None:
        for session in list(self.sessions):
            session.finish(Ending.of(Close.GOING_AWAY, "the proxy is shutting down"))
        # Each connection ends within CLOSE_TIMEOUT of its Close; a connection the browser
        # object never got (a failed hand-over) would never report: stop then regardless.
        asyncio.get_running_loop().call_later(wsconn.CLOSE_TIMEOUT + 1.0, self.stopped.set)
        self._stop_if_idle()


def _request_view(handler: tornado.web.RequestHandler, state: ProxyState) -> upgrade.View:
    request: HTTPServerRequest = handler.request
    return upgrade.request_view(state, request.remote_ip or "", request.protocol, request.host, request.headers)


class JsonHandler(JsonErrors, PathOnlyLogging, tornado.web.RequestHandler):
    def initialize(self, state: ProxyState) -> None:
        self.state = state

    def set_default_headers(self) -> None:
        for name, value in upgrade.NO_STORE:
            self.set_header(name, value)

    def answer(self, status: int, body: dict[str, Any]) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body))

    def refuse(self, refusal: Refusal, client_ip: str) -> None:
        """Count and log the refusal, then answer it as JSON (the websocket refuses before upgrading)."""
        self.state.refused(refusal, client_ip, self.request.path)
        if refusal.code in upgrade.REFUSAL_HINTS:
            self.set_header(*upgrade.REFUSAL_HINTS[refusal.code])
        self.answer(refusal.status, refusal.body())


class TokenStatusHandler(JsonHandler):
    """The verdict the websocket would give now, without redeeming anything."""

    def get(self) -> None:
        view = _request_view(self, self.state)
        client = view.client
        request = Request(
            bearer_token(self.request.headers.get("Authorization")),
            self.request.headers.get("Origin"),
            view.own,
            client,
            view.host,
        )
        try:
            claims = self.state.admit(request)
            self.state.spent.check(claims)
        except Refusal as refusal:
            self.refuse(refusal, client)
            return
        self.answer(
            200,
            {
                "ok": True,
                "expires_at": claims.exp,
                "view_only": claims.view_only,
                "single_use": claims.single_use,
                "desktop_name": claims.desktop_name,
                "clip": claims.clip_policy.name,
                "max_cut_text": self.state.config.max_cut_text,
            },
        )


class HealthHandler(JsonHandler):
    def get(self) -> None:
        if self.state.draining:
            self.answer(503, {"status": "draining", "sessions": len(self.state.sessions)})
        else:
            self.answer(
                200, {"status": "ok", "sessions": len(self.state.sessions), "capacity": self.state.config.max_sessions}
            )


class MetricsHandler(JsonHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(self.state.metrics.render())


class OpenApiHandler(JsonHandler):
    def get(self) -> None:
        self.answer(200, openapi.document())


class ConsoleSocket(JsonHandler):
    """``/websockify`` on Tornado's listener: the request goes through the upgrade pipeline
    (:mod:`console_proxy.upgrade`) on the connection Tornado lets go of (``detach``), or, behind
    the front door (``upgrades`` off), is refused there: Tornado never upgrades a head the front
    door declined (see :mod:`console_proxy.frontdoor`)."""

    def initialize(self, state: ProxyState, upgrades: bool = False) -> None:
        super().initialize(state)
        self.upgrades = upgrades

    async def get(self) -> None:
        request = self.request
        upgrade_request = upgrade.UpgradeRequest(
            request.method or "GET",
            request.path,
            request.remote_ip or "",
            request.protocol,
            request.host,
            request.headers,
            self._query_token,
        )
        door = StreamDoor(self.detach())
        if not self.upgrades:
            upgrade.decline(self.state, upgrade_request, door)
            return
        redemption = upgrade.serve(self.state, upgrade_request, door)
        if redemption is not None:
            await redemption

    def _query_token(self) -> str | None:
        """``?token=``; one that is not UTF-8 comes back as text no token matches, so it is
        refused like any bad token (counted, as JSON) rather than with Tornado's bare 400."""
        try:
            return self.get_query_argument("token", None)
        except tornado.web.HTTPError:
            return "\ufffd"


class StreamDoor:
    """A connection Tornado read the request of and then let go (``detach``): the upgrade
    pipeline's :class:`console_proxy.upgrade.Door` on Tornado's stream (TLS, or plain)."""

    def __init__(self, stream: IOStream) -> None:
        self.stream = stream
        self.handed = False

    @property
    def open(self) -> bool:
        return not self.handed and not self.stream.closed()

    def hold(self) -> None:
        """Nothing to do: a detached stream is read only when asked."""

    def answer(self, response: bytes) -> None:
        if self.stream.closed():
            return
        ending = asyncio.ensure_future(_answer_and_close(self.stream, self.stream.write(response)))
        _ANSWERING.add(ending)
        ending.add_done_callback(_ANSWERING.discard)

    def browser(self, max_message_size: int) -> wsconn.TlsBrowser:
        return wsconn.TlsBrowser(self.stream, max_message_size)

    def hand_over(self, browser: wsconn.PlainBrowser | wsconn.TlsBrowser, greeting: bytes) -> None:
        """The stream is the browser's; should that fail half-way, nobody else would close it."""
        assert isinstance(browser, wsconn.TlsBrowser)
        self.handed = True
        try:
            browser.opened(greeting)
        except BaseException:
            self.stream.close()
            raise


#: Bytes read (and dropped) per read while a refused browser is given time to read the answer.
LINGER_READ = 64 * 1024
#: Answers being written and lingered over (held here so that no task is collected mid-way).
_ANSWERING: set[asyncio.Future[None]] = set()


async def _answer_and_close(stream: IOStream, written: Awaitable[None]) -> None:
    """Once the answer is written, end our side as the front door does (on a plain stream: TLS
    over Tornado's stream has no half-close; there the browser closes after ``Connection:
    close``), then read and drop what the browser still sends until it closes, at most
    ``upgrade.LINGER`` seconds: closing with its bytes unread would reset the connection and
    could destroy the answer in flight."""
    try:
        await written
        if not isinstance(stream, SSLIOStream) and stream.socket is not None:
            stream.socket.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(_drop_until_closed(stream), upgrade.LINGER)
    except (StreamClosedError, TimeoutError, OSError):
        pass
    finally:
        stream.close()


async def _drop_until_closed(stream: IOStream) -> None:
    while True:
        await stream.read_bytes(LINGER_READ, partial=True)


def _log_request(handler: tornado.web.RequestHandler) -> None:
    request = handler.request
    access_log(
        handler.get_status(), request.method or "", request.path, request.remote_ip or "", request.request_time()
    )


def make_app(state: ProxyState, *, upgrades: bool = False) -> tornado.web.Application:
    """The proxy's routes. ``upgrades``: whether ``/websockify`` upgrades here (a proxy serving
    TLS itself), or is refused because the front door serves console upgrades (plain HTTP)."""
    routes: list[Any] = [
        (upgrade.PATH, ConsoleSocket, {"state": state, "upgrades": upgrades}),
        (r"/token-status", TokenStatusHandler, {"state": state}),
        (r"/healthz", HealthHandler, {"state": state}),
        (r"/metrics", MetricsHandler, {"state": state}),
        (r"/openapi.json", OpenApiHandler, {"state": state}),
        *page_routes(state.config),
    ]
    return tornado.web.Application(routes, log_function=_log_request, default_handler_class=NotFound)


def install_signal_handlers(state: ProxyState) -> None:
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, state.begin_drain)
    loop.add_signal_handler(signal.SIGINT, state.begin_drain)


def start_sweeper(state: ProxyState) -> PeriodicCallback:
    sweeper = PeriodicCallback(state.sweep, state.config.sweep_interval * 1000)
    sweeper.start()
    return sweeper


def start_pinger(state: ProxyState) -> PeriodicCallback | None:
    """Keepalive Pings to every open console's browser (one timer for all), or None if off."""
    interval = state.config.ping_interval
    if not interval:
        return None

    def ping_all() -> None:
        for session in list(state.sessions):
            session.browser.keepalive()

    pinger = PeriodicCallback(ping_all, interval * 1000)
    pinger.start()
    return pinger
