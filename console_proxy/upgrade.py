"""The one upgrade pipeline: how a request for ``/websockify`` becomes a console session.

Every listener ends here: the front door (:mod:`console_proxy.frontdoor`, plain HTTP, its own
head parser) and Tornado's ``/websockify`` route (:mod:`console_proxy.server`, a proxy serving
TLS itself, with or without :mod:`console_proxy.tlsdoor` in front). Each reads the request its
own way and hands over an :class:`UpgradeRequest` and a :class:`Door` (the connection); from
there the steps are the same for all, in this order:

1. the request view: client address, own origin and Host, trusting forwarded headers only from
   ``--trusted-proxy`` peers (:func:`request_view`);
2. the websocket handshake's own checks (:func:`console_proxy.wsframes.check_upgrade`), then
   admission (:meth:`console_proxy.server.ProxyState.admit`: draining, Origin, Host pin,
   capacity, the token, revocation);
3. a single-use token's redemption at the broker (the connection's reading held meanwhile);
4. the session, registered before anything can await, and the 101 with the connection handed to
   the websocket (:mod:`console_proxy.wsconn`).

A refusal before the 101 is one response (:func:`refusal_response`: the same bytes whatever the
listener), counted, sent to the broker's audit and access-logged here; the connection then ends.
A failure after the session was registered (a bug, or the connection lost at the hand-over) ends
that session with :data:`UPGRADE_FAILED` on every path. An unexpected error before it answers a
bare 500. So an upgrade rule changes in this module, and nowhere else.
"""

from __future__ import annotations

import email.utils
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol

from console_proxy import forwarded, origin, wsconn
from console_proxy.admission import Refusal, Request, token_from
from console_proxy.codes import Close, Refused
from console_proxy.handlerlog import access_log
from console_proxy.protocol import httphead, wsframes
from console_proxy.relay import ConsoleSession, Ending
from console_proxy.token import Claims

if TYPE_CHECKING:
    from console_proxy.server import ProxyState

log = logging.getLogger("consolegate.proxy")

#: The path of the console websocket.
PATH = "/websockify"
#: Seconds a refused browser gets to read our answer before the connection is cut.
LINGER = 5.0
#: Headers that must accompany a refusal's JSON, by code.
REFUSAL_HINTS = {Refused.WEBSOCKET_VERSION.value: ("Sec-WebSocket-Version", "13")}
#: Every JSON answer's headers beyond its Content-Type.
NO_STORE = (("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"))
#: How a session ends that was registered but whose connection never became its websocket (a bug
#: between admission and the 101, or the browser gone at the hand-over). The same on every path.
#: 1006, as the browser sees it: no Close can be sent on a connection that never was a
#: websocket, and a 4502 would blame the virtual machine for what happened in the proxy.
UPGRADE_FAILED = Ending(Close.ABNORMAL, "browser_closed", "the connection was lost during the upgrade")
#: Why Tornado's route refuses when the front door serves upgrades (the reason is logged only).
DECLINED = "the front door serves console upgrades; this request was not a plain HTTP/1.1 upgrade head"


@dataclass(frozen=True, slots=True)
class UpgradeRequest:
    """What an upgrade needs from an HTTP head, whichever parser read it.

    ``peer`` is the connection's peer (or its PROXY header's source), ``protocol`` the scheme the
    listener serves ("http" or "https"), ``host`` the Host it was addressed to.
    ``query_token`` reads ``?token=`` only when asked: a request that is not a websocket upgrade
    is refused before any token work.
    """

    method: str
    path: str
    peer: str
    protocol: str
    host: str | None
    headers: Mapping[str, str]
    query_token: Callable[[], str | None]
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def from_head(cls, head: httphead.Head, peer: str, started: float) -> UpgradeRequest:
        """A head the front door parsed (plain HTTP: the front door never serves TLS)."""
        return cls(
            head.method,
            head.path,
            peer,
            "http",
            head.headers.get("Host"),
            head.headers,
            lambda: head.query_argument("token"),
            started,
        )


class Door(Protocol):
    """The listener's connection as the pipeline sees it. Before the 101 it is the listener's;
    :meth:`hand_over` gives it to the websocket."""

    @property
    def open(self) -> bool:
        """Still connected, and not yet handed over."""

    def hold(self) -> None:
        """Stop reading while the broker answers (what follows the head is the websocket's)."""

    def answer(self, response: bytes) -> None:
        """Write a complete response (it says ``Connection: close``) and end the connection,
        giving the browser a bounded time to read it."""

    def browser(self, max_message_size: int) -> wsconn.PlainBrowser | wsconn.TlsBrowser:
        """The websocket this connection will become (not yet handed over)."""

    def hand_over(self, browser: wsconn.PlainBrowser | wsconn.TlsBrowser, greeting: bytes) -> None:
        """The connection is the browser's from here: ``greeting`` (the 101) first."""


class View(NamedTuple):
    """What admission reads off a request beyond its token, trusting forwarded headers only from proxies."""

    client: str
    own: str | None
    host: str | None


class Admitted(NamedTuple):
    """An upgrade admission let through: the claims, the websocket key, whether "binary" was
    offered, and the client address the session is recorded under."""

    claims: Claims
    key: str
    binary: bool
    client: str


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


def admit(state: ProxyState, request: UpgradeRequest, view: View) -> Admitted:
    """Admitted, or Refusal. Spends nothing: a request that is not a version-13 upgrade is
    refused before any token work (the query's token is not even read)."""
    headers = request.headers
    try:
        key = wsframes.check_upgrade(headers)
    except wsframes.UpgradeError as error:
        raise Refusal(error.code, reason=str(error), status=error.status) from None
    offered = [p.strip() for p in (headers.get("Sec-WebSocket-Protocol") or "").split(",")]
    candidate = token_from(offered, None) or request.query_token()
    claims = state.admit(Request(candidate, headers.get("Origin"), view.own, view.client, view.host))
    return Admitted(claims, key, "binary" in offered, view.client)


async def redeem(state: ProxyState, claims: Claims) -> None:
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
        claims,
        state.config,
        browser,
        client_ip,
        on_open=state.session_opened,
        on_end=state.session_ended,
        offers=state.offers,
    )
    browser.session = session
    state.sessions[session] = None
    return session


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


def date_field() -> tuple[str, str]:
    """RFC 9110 6.6.1: a server with a clock dates its responses (Tornado's do too)."""
    return "Date", email.utils.formatdate(usegmt=True)


def refusal_response(refusal: Refusal) -> bytes:
    """The one rendering of a refusal before the 101, whichever listener writes it: its status,
    ``{"error", "message"}`` as JSON, no caching, and ``Connection: close``."""
    fields = [date_field(), ("Content-Type", "application/json"), *NO_STORE]
    if refusal.code in REFUSAL_HINTS:
        fields.append(REFUSAL_HINTS[refusal.code])
    return httphead.response(refusal.status, fields, json.dumps(refusal.body()).encode())


def failure_response() -> bytes:
    """A bare 500: a bug, whose details are in the log only."""
    return httphead.response(500, [date_field(), *NO_STORE])


def serve(state: ProxyState, request: UpgradeRequest, door: Door) -> Awaitable[None] | None:
    """Run the pipeline on one upgrade request. A reusable token is opened in this same call
    (nothing to await: the fast path); for a single-use one the connection is held and the
    redemption returned, for the listener to run as a task or await."""
    try:
        view = request_view(state, request.peer, request.protocol, request.host, request.headers)
        try:
            admitted = admit(state, request, view)
        except Refusal as refusal:
            refuse(state, request, door, refusal, view.client)
            return None
        if not admitted.claims.single_use:
            _open(state, request, door, admitted)
            return None
        door.hold()
    except Exception:
        failed(request, door)
        return None
    return _redeem_then_open(state, request, door, admitted)


async def _redeem_then_open(state: ProxyState, request: UpgradeRequest, door: Door, admitted: Admitted) -> None:
    try:
        try:
            await redeem(state, admitted.claims)
        except Refusal as refusal:
            refuse(state, request, door, refusal, admitted.client)
            return
        _open(state, request, door, admitted)
    except Exception:
        failed(request, door)


def _open(state: ProxyState, request: UpgradeRequest, door: Door, admitted: Admitted) -> None:
    """The session, then the 101 and the connection handed over. Should the hand-over fail, the
    session ends with :data:`UPGRADE_FAILED` and the error goes on to :func:`failed`."""
    if not door.open:  # the browser left while the broker answered
        return
    browser = door.browser(state.config.max_message_size)
    session = start_session(state, admitted.claims, browser, admitted.client)
    try:
        access_log(101, request.method, request.path, request.peer, time.monotonic() - request.started)
        door.hand_over(browser, switching(admitted.key, admitted.binary))
    except BaseException:
        session.finish(UPGRADE_FAILED)
        raise


def refuse(state: ProxyState, request: UpgradeRequest, door: Door, refusal: Refusal, client: str) -> None:
    """Count it, tell the broker's audit, log it by path, answer it, end the connection."""
    state.refused(refusal, client, request.path)
    access_log(refusal.status, request.method, request.path, request.peer, time.monotonic() - request.started)
    door.answer(refusal_response(refusal))


def decline(state: ProxyState, request: UpgradeRequest, door: Door) -> None:
    """Refuse an upgrade the listener does not serve (Tornado's route behind the front door)."""
    view = request_view(state, request.peer, request.protocol, request.host, request.headers)
    refuse(state, request, door, Refusal(Refused.WEBSOCKET_REQUIRED, reason=DECLINED), view.client)


def failed(request: UpgradeRequest, door: Door) -> None:
    """An unexpected error (a bug): logged by path only (the query may hold the token); the
    browser gets a bare 500 if its connection is still the listener's, so nothing is held."""
    log.exception("unexpected error serving %s %s (%s)", request.method, request.path, request.peer)
    if door.open:
        door.answer(failure_response())
