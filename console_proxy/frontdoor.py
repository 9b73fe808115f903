"""The plain-HTTP listener: console upgrades are served here, every other request goes to Tornado.

Why not Tornado for everything: profiles put its request path — the HTTP/1 connection, routing,
a RequestHandler, then the socket handed over after the 101 — at about a fifth of the proxy's
CPU per console open. A plain, well-formed ``GET /websockify`` (:func:`httphead.parse_head`) is
admitted here by the same functions Tornado's handler calls (:mod:`console_proxy.server`), on
the asyncio transport that then carries the websocket. Anything else — another path or method,
an odd head, a bare-LF head, a body, a head over ``MAX_HEAD`` — goes to Tornado's HTTP server
with the bytes already read, and Tornado serves it as if it had accepted the connection (the
first head must still be complete within the front door's window).

A proxy that terminates TLS itself keeps Tornado's own listener.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import socket
import time
from asyncio import Future
from collections.abc import Awaitable

import tornado.httpserver
import tornado.netutil
from tornado.iostream import IOStream

from console_proxy import origin, proxyproto, server, tornado_compat, wsconn
from console_proxy.admission import Refusal
from console_proxy.codes import Close
from console_proxy.handlerlog import access_log
from console_proxy.protocol import httphead
from console_proxy.protocol.httphead import Head
from console_proxy.relay import Ending
from console_proxy.token import Claims

log = logging.getLogger("consolegate.proxy")

#: The longest head read here; a longer one is Tornado's (it has its own, larger limit).
MAX_HEAD = 8192
#: Pending connections the kernel holds for us (a burst of console opens).
BACKLOG = 1024
#: Seconds a refused browser gets to read our answer before the connection is cut.
LINGER = 5.0
#: Seconds between looks for connections whose head is overdue.
SWEEP = 1.0


class FrontDoor:
    """The listening sockets of a plain-HTTP proxy, and what to do with each request head."""

    def __init__(self, state: server.ProxyState, http: tornado.httpserver.HTTPServer, head_timeout: float) -> None:
        self.state, self.http, self.head_timeout = state, http, head_timeout
        self.servers: list[asyncio.Server] = []
        self.waiting: dict[Doorway, float] = {}  # connections still sending their head, since when
        self._redeeming: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    async def listen(self, host: str, port: int) -> None:
        await self.listen_on(tornado.netutil.bind_sockets(port, host))

    async def listen_on(self, sockets: list[socket.socket]) -> None:
        """Serve sockets bound beforehand (all of them bound, or the proxy did not start)."""
        loop = asyncio.get_running_loop()
        for sock in sockets:
            self.servers.append(await loop.create_server(lambda: Doorway(self), sock=sock, backlog=BACKLOG))
        self._sweeper = loop.call_later(SWEEP, self._sweep)

    def close(self) -> None:
        for listener in self.servers:
            listener.close()
        if self._sweeper is not None:
            self._sweeper.cancel()

    def _sweep(self) -> None:
        """Cut connections whose head is overdue: one timer for all (most heads come in one read,
        and a timer per connection costs more than the rest of reading it)."""
        due = time.monotonic() - self.head_timeout
        for doorway in [d for d, since in self.waiting.items() if since <= due]:
            doorway.overdue()
        self._sweeper = asyncio.get_running_loop().call_later(SWEEP, self._sweep)

    def to_tornado(self, sock: socket.socket, early: bytes, address: tuple[str, int], since: float) -> None:
        """Tornado serves the connection; its first head must still come within our window."""
        stream = _Prefilled(
            sock,
            early,
            since + self.head_timeout,
            max_buffer_size=self.http.max_buffer_size,
            read_chunk_size=self.http.read_chunk_size,
        )
        self.http.handle_stream(stream, address)

    def upgrade(self, doorway: Doorway, head: Head) -> None:
        """Admit (no await), redeem a single-use token (awaits the broker), then the session.
        A bug on the way never leaves a connection or a session behind (see ``_failed``)."""
        try:
            self._upgrade(doorway, head)
        except Exception:
            self._failed(doorway, head)

    def _upgrade(self, doorway: Doorway, head: Head) -> None:
        state = self.state
        view = server.request_view(state, doorway.peer, "http", head.headers.get("Host"), head.headers)
        client = view.client
        try:
            claims, key, binary = server.admit_upgrade(state, head.headers, lambda: head.query_argument("token"), view)
        except Refusal as refusal:
            self._refuse(doorway, head, refusal, client)
            return
        if not claims.once:
            self._open(doorway, head, claims, key, binary, client)
            return
        doorway.hold()  # what follows the head is the websocket's: read once it is one
        task = asyncio.ensure_future(self._redeem_then_open(doorway, head, claims, key, binary, client))
        self._redeeming.add(task)
        task.add_done_callback(self._redeeming.discard)

    async def _redeem_then_open(
        self, doorway: Doorway, head: Head, claims: Claims, key: str, binary: bool, client: str
    ) -> None:
        try:
            try:
                await server.redeem_upgrade(self.state, claims)
            except Refusal as refusal:
                self._refuse(doorway, head, refusal, client)
                return
            self._open(doorway, head, claims, key, binary, client)
        except Exception:
            self._failed(doorway, head)

    def _open(self, doorway: Doorway, head: Head, claims: Claims, key: str, binary: bool, client: str) -> None:
        if not doorway.open:  # the browser left while the broker answered
            return
        browser = wsconn.PlainBrowser(self.state.config.max_message_size)
        session = server.start_session(self.state, claims, browser, client)
        try:
            doorway.log(101, head)
            doorway.become(browser, server.switching(key, binary))
        except BaseException:
            session.finish(Ending.of(Close.TARGET_PROTOCOL_ERROR, "internal error"))
            if not doorway.open and doorway.transport is not None:
                doorway.transport.abort()  # handed over half-way: nobody else will close it
            raise

    def _failed(self, doorway: Doorway, head: Head) -> None:
        """An unexpected error (a bug): logged by path only (the query may hold the token); the
        browser gets a bare 500 if its connection is still ours, so nothing is held."""
        log.exception("unexpected error serving %s %s (%s)", head.method, head.path, doorway.peer)
        if doorway.open:
            doorway.answer(httphead.response(500, [_date(), *server.NO_STORE]))

    def _refuse(self, doorway: Doorway, head: Head, refusal: Refusal, client: str) -> None:
        self.state.refused(refusal, client, head.path)
        fields = [_date(), ("Content-Type", "application/json"), *server.NO_STORE]
        if refusal.code in server.REFUSAL_HINTS:
            fields.append(server.REFUSAL_HINTS[refusal.code])
        doorway.log(refusal.status, head)
        doorway.answer(httphead.response(refusal.status, fields, json.dumps(refusal.body()).encode()))


def _date() -> tuple[str, str]:
    """RFC 9110 6.6.1: a server with a clock dates its responses (Tornado's do too)."""
    return "Date", email.utils.formatdate(usegmt=True)


class Doorway(asyncio.Protocol):
    """One accepted connection until its request head is read; then a console's, or Tornado's."""

    def __init__(self, door: FrontDoor) -> None:
        self.door = door
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.address: tuple[str, int] | None = None  # the peer's, or the PROXY header's source
        self.preamble: str | None = None  # with --proxy-protocol: "header" due, or "screen" for one
        self.buffer = bytearray()
        self.open = False  # connected and not yet handed on
        self.started = 0.0
        self._linger: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport, self.open = transport, True
        peer = transport.get_extra_info("peername")  # None if the browser reset before we looked
        self.peer = peer[0] if peer else ""
        self.address = peer[:2] if peer else None
        config = self.door.state.config
        if config.proxy_protocol:
            self.preamble = "header" if origin.is_trusted(self.peer, config.trusted_proxies) else "screen"
        self.door.waiting[self] = time.monotonic()

    def data_received(self, data: bytes) -> None:
        if self.started:  # refused: what the browser still sends is read and dropped
            return
        buffer = self.buffer
        buffer += data
        if self.preamble is not None and not self._read_preamble():
            return
        end = httphead.HEAD_END.search(buffer)
        if end is None:
            if len(buffer) > MAX_HEAD:
                self._hand_over()
            return
        ours = end.group() == b"\r\n\r\n" and end.end() <= MAX_HEAD  # one read can bring a longer one
        head = httphead.parse_head(bytes(buffer[: end.start()])) if ours else None
        if head is None or head.method != "GET" or head.path != "/websockify":
            self._hand_over()
            return
        del buffer[: end.end()]
        self.started = time.monotonic()
        self.door.waiting.pop(self, None)
        self.door.upgrade(self, head)

    def _read_preamble(self) -> bool:
        """``--proxy-protocol``: a trusted peer's connection begins with a PROXY header, whose
        source becomes the peer; an untrusted peer must not send one (it could claim any
        address). True once the HTTP request may be read; a bad start closes the connection."""
        buffer = self.buffer
        if self.preamble == "refused":  # closing: nothing more is read
            return False
        if self.preamble == "screen":
            announced = proxyproto.announces(bytes(buffer[: len(proxyproto.V2_SIGNATURE)]))
            if announced:
                self._refuse_preamble("untrusted", "a PROXY protocol header from a peer not in --trusted-proxy")
            elif announced is not None:
                self.preamble = None
            return self.preamble is None
        try:
            header = proxyproto.parse(bytes(buffer[: proxyproto.V2_MAX]))
        except proxyproto.ProxyProtocolError as error:
            self._refuse_preamble(error.reason, str(error))
            return False
        if header is None:
            return False
        self.preamble = None
        del buffer[: header.length]
        if header.source is not None:
            self.address, self.peer = header.source, header.source[0]
        return True

    def _refuse_preamble(self, reason: str, detail: str) -> None:
        self.door.state.metrics.proxy_protocol_refused.inc(reason)
        log.warning("PROXY protocol: closed a connection from %s: %s", self.peer, detail)
        self.preamble = "refused"
        self.overdue()

    def eof_received(self) -> bool:
        return False  # a browser that ends before its head was read, or after a refusal: close

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self.door.waiting.pop(self, None)
        if self._linger is not None:
            self._linger.cancel()

    def overdue(self) -> None:
        self.door.waiting.pop(self, None)
        if self.transport is not None:
            self.transport.abort()

    def hold(self) -> None:
        """Stop reading while the broker answers (the browser's next bytes are the websocket's)."""
        if self.transport is not None:
            self.transport.pause_reading()

    def become(self, browser: wsconn.PlainBrowser, greeting: bytes) -> None:
        self.open = False
        early, self.buffer = bytes(self.buffer), bytearray()
        assert self.transport is not None  # the request head was read from it
        browser.take_over(self.transport, greeting, early)

    def answer(self, response: bytes) -> None:
        """Write a refusal and end our side; the browser gets ``LINGER`` seconds to read it
        (closing at once with its unread bytes in our buffer would reset the connection)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(response)
        transport.write_eof()
        if not transport.is_reading():
            transport.resume_reading()
        self._linger = asyncio.get_running_loop().call_later(LINGER, transport.abort)

    def log(self, status: int, head: Head) -> None:
        access_log(status, head.method, head.path, self.peer, time.monotonic() - self.started)

    def _hand_over(self) -> None:
        """Tornado takes the connection: a duplicate of the socket and the bytes read so far."""
        transport = self.transport
        assert transport is not None
        since = self.door.waiting.pop(self, time.monotonic())
        self.open = False
        sock = socket.socket(fileno=socket.dup(transport.get_extra_info("socket").fileno()))
        address = self.address or transport.get_extra_info("peername")
        transport.abort()  # closes our descriptor only: the connection lives on in ``sock``
        self.door.to_tornado(sock, bytes(self.buffer), address, since)
        self.buffer = bytearray()


class _Prefilled(IOStream):
    """Tornado's stream on a socket whose first bytes the front door already read.

    They go where Tornado keeps what it has read but not consumed
    (:func:`console_proxy.tornado_compat.preload_read_buffer`), so Tornado applies its own limits
    to all of them at once — serving them through ``read_from_fd`` would hand over at most one
    read chunk and strand the rest until the socket next became readable.
    """

    def __init__(self, sock: socket.socket, early: bytes, deadline: float, **kwargs: int | None) -> None:
        super().__init__(sock, **kwargs)
        tornado_compat.preload_read_buffer(self, early)
        self._head_deadline: float | None = deadline

    def read_until_regex(self, regex: bytes, max_bytes: int | None = None) -> Awaitable[bytes]:
        """Tornado reads each request head this way. The first one must be complete by the
        front door's deadline, not in a fresh header timeout of Tornado's: a head trickled in
        slowly gets one window, not two.

        The deadline is on the front door's clock (``time.monotonic``); Tornado's
        ``IOLoop.time`` is the wall clock (``time.time``), so the timer is set by the time
        left, never with ``call_at(deadline)``: on the wall clock a monotonic deadline lies
        decades in the past, and the timer cut every connection whose head was not already
        whole in the socket at Tornado's first read (a flaky test: a head in two writes lost
        the race to Tornado's first read now and then).
        """
        future = super().read_until_regex(regex, max_bytes)
        deadline, self._head_deadline = self._head_deadline, None
        if deadline is not None and isinstance(future, Future) and not future.done():
            timer = self.io_loop.call_later(max(0.0, deadline - time.monotonic()), self.close)
            future.add_done_callback(lambda _: self.io_loop.remove_timeout(timer))
        return future
