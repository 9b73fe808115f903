"""The proxy's HTTP surface: Tornado handlers that wire requests to the cores, and draining.

Handlers read what the cores need off the request (token, Origin, addresses), call
:func:`admission.admit` and the session in :mod:`relay`, and write the answer. The process's
shared state (keyring, open sessions, draining flag, metrics) is one :class:`ProxyState`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import tornado.web
from tornado.httputil import HTTPServerRequest
from tornado.ioloop import PeriodicCallback
from tornado.iostream import SSLIOStream

from console_proxy import clock, forwarded, openapi, origin, wsconn
from console_proxy.admission import Refusal, Request, SpentTokens, admit, bearer_token, token_from
from console_proxy.codes import Close, Refused
from console_proxy.config import ProxyConfig
from console_proxy.events import Events
from console_proxy.handlerlog import PathOnlyLogging, access_log
from console_proxy.httperrors import JsonErrors, NotFound
from console_proxy.keyring import Keyring
from console_proxy.metrics import ProxyMetrics
from console_proxy.pages import page_routes
from console_proxy.protocol import wsframes
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
        self.metrics = ProxyMetrics(
            lambda: len(self.sessions), lambda: float(self.draining), self._relayed, self._cut_text_dropped
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
        if not claims.once:
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


class View(NamedTuple):
    """What admission reads off a request beyond its token, trusting forwarded headers only from proxies."""

    client: str
    own: str | None
    host: str | None


def request_view(state: ProxyState, peer: str, protocol: str, host: str | None, headers: Mapping[str, str]) -> View:
    """The client address, the request's own origin and the Host it was addressed to: from a
    trusted peer's RFC 7239 ``Forwarded`` if it sends one that parses, else X-Forwarded-*."""
    trusted = state.config.trusted_proxies
    said = forwarded.believed(peer, headers.get("Forwarded"), trusted)
    if said is not None:
        asked = said.host or host
        return View(said.client, origin.origin_of(said.proto or protocol, asked), asked)
    client = origin.client_address(peer, headers.get("X-Forwarded-For"), trusted)
    own = origin.effective_origin(
        peer,
        protocol,
        host,
        {"X-Forwarded-Proto": headers.get("X-Forwarded-Proto"), "X-Forwarded-Host": headers.get("X-Forwarded-Host")},
        trusted,
    )
    return View(client, own, origin.effective_host(peer, host, headers.get("X-Forwarded-Host"), trusted))


def _request_view(handler: tornado.web.RequestHandler, state: ProxyState) -> View:
    request: HTTPServerRequest = handler.request
    return request_view(state, request.remote_ip or "", request.protocol, request.host, request.headers)


def admit_upgrade(
    state: ProxyState, headers: Mapping[str, str], query_token: Callable[[], str | None], view: View
) -> tuple[Claims, str, bool]:
    """Claims, the websocket key and whether "binary" was offered; or Refusal. Spends nothing:
    a request that is not a version-13 upgrade is refused before any token work (the query's
    token is not even read)."""
    try:
        key = wsframes.check_upgrade(headers)
    except wsframes.UpgradeError as error:
        raise Refusal(error.code, reason=str(error), status=error.status) from None
    offered = [p.strip() for p in (headers.get("Sec-WebSocket-Protocol") or "").split(",")]
    candidate = token_from(offered, None) or query_token()
    claims = state.admit(Request(candidate, headers.get("Origin"), view.own, view.client, view.host))
    return claims, key, "binary" in offered


async def redeem_upgrade(state: ProxyState, claims: Claims) -> None:
    """A single-use token's redemption, holding a session slot while the broker answers."""
    state.pending += 1
    try:
        await state.redeem(claims)
        if state.draining:  # began while the broker answered: no new session now
            raise Refusal(Refused.DRAINING, reason="the proxy began draining during the upgrade", claims=claims)
    finally:
        state.release_pending()  # a session takes the slot in this same turn, or none


def start_session(
    state: ProxyState, claims: Claims, browser: wsconn.PlainBrowser | wsconn.TlsBrowser, client_ip: str
) -> ConsoleSession:
    """The session, registered before anything can await, so it is counted throughout."""
    session = ConsoleSession(
        claims, state.config, browser, client_ip, on_open=state.session_opened, on_end=state.session_ended
    )
    browser.session = session
    state.sessions[session] = None
    return session


#: Headers that must accompany a refusal's JSON, by code.
REFUSAL_HINTS = {"websocket_version": ("Sec-WebSocket-Version", "13")}
#: Every JSON answer's headers beyond its Content-Type.
NO_STORE = (("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"))


class JsonHandler(JsonErrors, PathOnlyLogging, tornado.web.RequestHandler):
    def initialize(self, state: ProxyState) -> None:
        self.state = state

    def set_default_headers(self) -> None:
        for name, value in NO_STORE:
            self.set_header(name, value)

    def answer(self, status: int, body: dict[str, Any]) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body))

    def refuse(self, refusal: Refusal, client_ip: str) -> None:
        """Count and log the refusal, then answer it as JSON (the websocket refuses before upgrading)."""
        self.state.refused(refusal, client_ip, self.request.path)
        if refusal.code in REFUSAL_HINTS:
            self.set_header(*REFUSAL_HINTS[refusal.code])
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
                "view_only": claims.ro,
                "single_use": claims.once,
                "desktop_name": claims.dn,
                "clip": claims.clip or "both",
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
    """``/websockify``: admit before the upgrade, answer 101, hand the connection to a session.

    Tornado parses the request; the websocket after it is ours (:mod:`console_proxy.wsconn`).
    """

    def initialize(self, state: ProxyState) -> None:
        super().initialize(state)
        self.client_ip = ""

    async def get(self) -> None:
        view = _request_view(self, self.state)
        client = self.client_ip = view.client
        try:
            claims, key, binary = admit_upgrade(self.state, self.request.headers, self._query_token, view)
            await redeem_upgrade(self.state, claims)
        except Refusal as refusal:
            self.refuse(refusal, client)
            return
        await self._upgrade(claims, key, binary)

    def _query_token(self) -> str | None:
        """``?token=``; one that is not UTF-8 comes back as text no token matches, so it is
        refused like any bad token (counted, as JSON) rather than with Tornado's bare 400."""
        try:
            return self.get_query_argument("token", None)
        except tornado.web.HTTPError:
            return "\ufffd"

    async def _upgrade(self, claims: Claims, key: str, binary: bool) -> None:
        """101, then the session."""
        self.set_status(101)
        self.application.log_request(self)
        stream = self.detach()
        if stream.closed():
            return
        config = self.state.config
        browser: wsconn.PlainBrowser | wsconn.TlsBrowser
        if isinstance(stream, SSLIOStream):
            browser = wsconn.TlsBrowser(stream, config.max_message_size)
        else:
            browser = wsconn.PlainBrowser(config.max_message_size)
        session = start_session(self.state, claims, browser, self.client_ip)
        greeting = switching(key, binary)
        if isinstance(browser, wsconn.TlsBrowser):
            browser.opened(greeting)
            return
        try:
            await browser.adopt(stream, greeting)
        except Exception:
            session.finish(LEFT_DURING_UPGRADE)


#: How a session ends whose browser went away between the 101 and the session's start.
LEFT_DURING_UPGRADE = Ending(Close.ABNORMAL, "browser_closed", "the browser left during the upgrade")


def switching(key: str, binary: bool) -> bytes:
    """The 101 answer. The subprotocol is "binary" when offered, never the token one."""
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {wsframes.accept_value(key)}",
    ]
    if binary:
        lines.append("Sec-WebSocket-Protocol: binary")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def _log_request(handler: tornado.web.RequestHandler) -> None:
    request = handler.request
    access_log(
        handler.get_status(), request.method or "", request.path, request.remote_ip or "", request.request_time()
    )


def make_app(state: ProxyState) -> tornado.web.Application:
    routes: list[Any] = [
        (r"/websockify", ConsoleSocket, {"state": state}),
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
