"""The plain-HTTP listener: console upgrades are served here, every other request goes to Tornado.

Why not Tornado for everything: profiles put its request path — the HTTP/1 connection, routing,
a RequestHandler, then the socket handed over after the 101 — at about a fifth of the proxy's
CPU per console open. A plain, well-formed ``GET /websockify`` (:func:`httphead.parse_head`) goes
through the upgrade pipeline (:mod:`console_proxy.upgrade`) here, on the asyncio transport that
then carries the websocket. Anything else — another path or method, an odd head, a bare-LF
head, a body, a head over ``MAX_HEAD`` (``MAX_UPGRADE_HEAD`` for an upgrade's) — goes to
Tornado's HTTP server with the bytes already read, and Tornado serves it as if it had accepted
the connection (the first head must still be complete within the front door's window). Behind
the front door Tornado's ``/websockify`` route never upgrades: what reaches it is refused
(``websocket_required``) through the same pipeline, so one set of upgrade rules applies.

A proxy that terminates TLS itself keeps Tornado's own listener (and its route upgrades).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from asyncio import Future
from collections.abc import Awaitable

import tornado.httpserver
import tornado.netutil
from tornado.iostream import IOStream

from console_proxy import origin, proxyproto, server, tornado_compat, upgrade, wsconn
from console_proxy.protocol import httphead
from console_proxy.protocol.httphead import Head

log = logging.getLogger("consolegate.proxy")

#: The longest head read here; a longer one is Tornado's (it has its own, larger limit).
MAX_HEAD = 8192
#: The longest upgrade head read here: Tornado's own limit (``max_header_size``, 64 KiB), since
#: Tornado's route never upgrades behind the front door, and a browser with many cookies for
#: the console's site can send a head over ``MAX_HEAD``.
MAX_UPGRADE_HEAD = 65536
#: How an upgrade's head begins (then a space or the query's ``?``).
UPGRADE_START = b"GET " + upgrade.PATH.encode()
#: Pending connections the kernel holds for us (a burst of console opens).
BACKLOG = 1024
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
        """The upgrade pipeline (:mod:`console_proxy.upgrade`) on this head; a single-use
        token's redemption (it awaits the broker) runs as a task."""
        request = upgrade.UpgradeRequest.from_head(head, doorway.peer, doorway.started)
        redemption = upgrade.serve(self.state, request, doorway)
        if redemption is not None:
            task = asyncio.ensure_future(redemption)
            self._redeeming.add(task)
            task.add_done_callback(self._redeeming.discard)


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
            if len(buffer) > _limit(buffer):
                self._hand_over()
            return
        ours = end.group() == b"\r\n\r\n" and end.end() <= _limit(buffer)  # one read can bring a longer one
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

    def browser(self, max_message_size: int) -> wsconn.PlainBrowser:
        return wsconn.PlainBrowser(max_message_size)

    def hand_over(self, browser: wsconn.PlainBrowser | wsconn.TlsBrowser, greeting: bytes) -> None:
        """The transport carries on with the websocket, what the browser sent behind its head
        included. Should that fail half-way, nobody else would close it: aborted here."""
        assert isinstance(browser, wsconn.PlainBrowser) and self.transport is not None
        self.open = False
        early, self.buffer = bytes(self.buffer), bytearray()
        try:
            browser.take_over(self.transport, greeting, early)
        except BaseException:
            self.transport.abort()
            raise

    def answer(self, response: bytes) -> None:
        """Write a refusal and end our side; the browser gets ``upgrade.LINGER`` seconds to read it
        (closing at once with its unread bytes in our buffer would reset the connection)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(response)
        transport.write_eof()
        if not transport.is_reading():
            transport.resume_reading()
        self._linger = asyncio.get_running_loop().call_later(upgrade.LINGER, transport.abort)

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


def _limit(buffer: bytearray) -> int:
    """How long the head begun in ``buffer`` may be and still be read here."""
    if buffer.startswith((UPGRADE_START + b" ", UPGRADE_START + b"?")):
        return MAX_UPGRADE_HEAD
    return MAX_HEAD


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
