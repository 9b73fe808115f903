"""The browser's websocket once upgraded: frames in and out around one console session.

The upgrade pipeline (:mod:`console_proxy.upgrade`) answers the HTTP request with the 101 and
hands over the connection; from there this module owns it.
:class:`WsConnection` holds what both kinds of connection share — the frame codec
(:mod:`console_proxy.protocol.wsframes`), pings, the close handshake — and leaves the socket to two
small shells: :class:`PlainBrowser`, an asyncio protocol on the bare socket (the fast path:
one callback per received chunk, writes attempted at once, flow control from the transport's
write limits), and :class:`TlsBrowser` for a proxy that terminates TLS itself, driving
Tornado's SSL stream with one read loop.

The close handshake is bounded: after sending Close the proxy reads (and drops) what the
browser still sends until its Close or end of stream, at most ``CLOSE_TIMEOUT`` seconds, so a
close code is never lost to a reset and a silent browser cannot hold the socket.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from tornado.iostream import IOStream, StreamClosedError

from console_proxy import codes
from console_proxy.protocol.wsframes import (
    OP_PING,
    OP_PONG,
    Close,
    FrameReader,
    Ping,
    WsError,
    binary_header,
    close_frame,
    frame,
)
from console_proxy.relay import FRAME_HEADROOM, Ending

if TYPE_CHECKING:
    from console_proxy.relay import ConsoleSession

#: Seconds the proxy waits for the browser's Close after sending its own.
CLOSE_TIMEOUT = 5.0
#: Bytes read from a TLS browser per read.
TLS_READ = 64 * 1024
#: TCP_INFO's first byte is the connection's state on Linux (other systems number states
#: differently, so there this is None and departures are left to the idle timeout).
_TCP_INFO = getattr(socket, "TCP_INFO", None) if sys.platform.startswith("linux") else None
TCP_CLOSE, TCP_CLOSE_WAIT = 7, 8  # linux/tcp_states.h: it reset; its FIN arrived


class WsConnection:
    """What a server-side websocket does whatever carries it; shells supply the I/O.

    Every way out is bounded: once the proxy sends Close, or shuts the connection, or the
    browser half-closes, the connection is aborted if it is not gone within ``CLOSE_TIMEOUT``
    (a browser that stops reading cannot hold a socket). Pings are answered, but while the
    browser is not taking our writes only the latest one is kept (RFC 6455 5.5.3), so a ping
    flood cannot grow memory.
    """

    def __init__(self, max_frame: int) -> None:
        self.session: ConsoleSession | None = None
        self.close_code: int | None = None  # the browser's, once its Close arrived
        self._reader = FrameReader(max_frame)
        self._open = False  # the connection is ours (the 101 can be written)
        self._closing = False  # our Close was sent, or is waiting for the connection
        self._final = b""  # our Close, when the session ended before the connection was ours
        self._gone = False  # the connection is closed
        self._timer: asyncio.TimerHandle | None = None
        self._cork: list[bytes] | None = None  # frames held to go out in one write
        self._backlogged = False  # the browser is not taking our writes
        self._pong: bytes | None = None  # the latest ping's payload, answered once writable
        self._dropping = False  # the browser departed: its data is read and dropped
        self._on_gone: Callable[[], None] | None = None

    # --- to be provided by the shell ---
    def _write(self, data: bytes | memoryview) -> bool:
        """Write; True if the transport kept part of ``data`` to send later."""
        raise NotImplementedError

    def _shut(self) -> None:
        """Close once queued bytes are written (bounded by the caller's timer)."""
        raise NotImplementedError

    def _abort(self) -> None:
        raise NotImplementedError

    def _end_writing(self) -> None:
        """Send what is queued, then end our direction (half-close) where the transport can."""
        raise NotImplementedError

    def pause_reading(self) -> None:
        raise NotImplementedError

    def resume_reading(self) -> None:
        raise NotImplementedError

    def _held(self) -> bool:
        """Reading is paused (the hypervisor is not taking the browser's input)."""
        raise NotImplementedError

    def _socket(self) -> socket.socket | None:
        raise NotImplementedError

    def watch_held(self) -> None:
        """Called by the periodic sweep. While the browser's input is held (a stuck hypervisor:
        backpressure), nothing reads its socket, so its end would go unseen for as long as the
        hypervisor stays stuck. The kernel's TCP state tells (Linux): once the browser's FIN or
        a reset has arrived, what it left is read and dropped, so its Close, end of stream or
        reset ends the session the usual way, with its own code. Otherwise it gets a Ping: a
        browser that closed while its FIN sat behind input we never took is answered by its
        kernel with a reset, which the next sweep sees."""
        if self._gone or self._dropping or self._closing or _TCP_INFO is None or not self._held():
            return
        sock = self._socket()
        if sock is None:
            return
        try:
            state = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)
        except OSError:
            return
        if state and state[0] in (TCP_CLOSE, TCP_CLOSE_WAIT):
            self._dropping = True
            self.resume_reading()
        elif not self._backlogged:
            self._write(frame(OP_PING, b""))

    def keepalive(self) -> None:
        """A Ping, so that whatever sits between us and the browser (nginx's 60 s
        ``proxy_read_timeout``, a balancer's idle timer) sees traffic on an idle console. Not
        input: neither it nor the browser's Pong touches the session's idle timer. Skipped while
        the browser is not taking our writes (data is queued then, and a Ping would only wait
        behind it)."""
        if self._open and not (self._closing or self._gone or self._dropping or self._backlogged):
            self._write(frame(OP_PING, b""))

    # --- the relay's Browser interface ---
    def send(self, data: bytes) -> None:
        if self._closing:
            return
        if self._cork is not None:
            self._cork.append(binary_header(len(data)) + data)
        else:
            self._write(binary_header(len(data)) + data)

    def send_framed(self, buffer: bytearray, size: int) -> bool:
        if self._closing:
            return False
        header = binary_header(size)
        start = FRAME_HEADROOM - len(header)
        buffer[start:FRAME_HEADROOM] = header
        with memoryview(buffer) as view:
            return self._write(view[start : FRAME_HEADROOM + size])

    def close(self, code: int, reason: str) -> None:
        """Send Close once; the connection ends at the browser's Close, its EOF or the timeout."""
        if self._closing or self._gone:
            return
        self._closing = True
        final = close_frame(None) if code in codes.REPORT_ONLY else close_frame(code, reason)
        if not self._open:  # the session ended before the connection was handed over
            self._final = final
            return
        self._write(final)
        if self.close_code is not None:
            self._shut()
        else:
            self.resume_reading()  # to see the browser's Close even under backpressure
        self._arm()

    def _arm(self) -> None:
        if self._timer is None and not self._gone:
            self._timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self._abort)

    def _let_go(self) -> None:
        """Close after what is queued, aborting if that has not happened in ``CLOSE_TIMEOUT``.
        Reading resumes, so the end of the connection is seen even if the relay had paused it."""
        self.resume_reading()
        self._shut()
        self._arm()

    # --- events from the shell ---
    def opened(self, greeting: bytes, early: bytes = b"") -> None:
        """The connection is ours: the 101 first, then the session's first words, then what the
        browser already sent. The 101 and the RFB greeting leave in one write."""
        self._open = True
        if self._closing:  # ended meanwhile (drain, revocation): the 101 and the Close only
            self._write(greeting + self._final)
            self._let_go()
            return
        self._cork = [greeting]
        if self.session is not None:
            self.session.start()
        cork, self._cork = self._cork, None
        self._write(b"".join(cork))
        if early:
            self.received(early)

    def received(self, data: bytes) -> None:
        try:
            events = self._reader.feed(data)
        except WsError as error:
            self._failed(error)
            return
        payloads: list[bytes] = []  # consecutive payloads go to the session in one call
        for event in events:
            if type(event) is bytes:
                payloads.append(event)
                continue
            self._to_session(payloads)
            if type(event) is Ping:
                self._ping(event.payload)
            elif type(event) is Close:
                self._peer_closed(event)
        self._to_session(payloads)

    def _to_session(self, data: list[bytes]) -> None:
        if data and not self._closing and not self._dropping and self.session is not None:
            self.session.from_browser(data[0] if len(data) == 1 else b"".join(data))
        data.clear()

    def _ping(self, payload: bytes) -> None:
        if self._closing:
            return
        if self._backlogged:
            self._pong = payload
        else:
            self._write(frame(OP_PONG, payload))

    def writable(self, ready: bool) -> None:
        """The browser stopped (False) or resumed (True) taking our writes."""
        self._backlogged = not ready
        if ready and self._pong is not None:
            pong, self._pong = self._pong, None
            self._ping(pong)  # may find the browser backlogged again: told below as it stands
        if self.session is not None:
            self.session.browser_backlogged(self._backlogged)

    def _failed(self, error: WsError) -> None:
        ending = Ending.of(error.code, str(error))
        if self.session is not None:
            self.session.finish(ending)
        self.close(ending.code, ending.reason)
        # Nothing after a violation can be parsed, so the browser's Close would never be seen:
        # end our side instead (RFC 6455 7.1.7), and the browser's EOF ends the connection.
        self._end_writing()

    def _peer_closed(self, event: Close) -> None:
        self.close_code = event.code or codes.Close.NO_STATUS  # a Close without a status code
        if not self._closing:
            self._closing = True
            self._write(close_frame(event.code))  # echo the code (RFC 6455 5.5.1)
        self._let_go()
        if self.session is not None:
            self.session.browser_closed(self.close_code)

    def half_closed(self) -> None:
        """The browser ended its direction without a Close: the session ends (1006), and no
        Close is sent — a browser that went without one is not waiting for ours."""
        self._closing = True
        if self.session is not None:
            self.session.browser_closed(self.close_code or codes.Close.ABNORMAL)
        self._let_go()

    def lost(self) -> None:
        """The connection is gone (EOF, reset, or our own close); no Close seen means 1006."""
        self._gone = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.session is not None:
            self.session.browser_closed(self.close_code or codes.Close.ABNORMAL)
        if self._on_gone is not None:
            callback, self._on_gone = self._on_gone, None
            callback()

    def when_gone(self, callback: Callable[[], None]) -> None:
        if self._gone:
            callback()
        else:
            self._on_gone = callback


class PlainBrowser(WsConnection, asyncio.Protocol):
    """A browser on a plain TCP socket, driven by asyncio's transport."""

    def __init__(self, max_frame: int) -> None:
        super().__init__(max_frame)
        self.transport: asyncio.Transport | None = None
        self._greeting = self._early = b""

    def take_over(self, transport: asyncio.Transport, greeting: bytes, early: bytes) -> None:
        """Carry on on a transport whose request head the front door read (no socket hand-over)."""
        self._greeting, self._early = greeting, early
        transport.set_protocol(self)
        if not transport.is_reading():  # held while a single-use token was redeemed
            transport.resume_reading()  # (takes effect next loop turn: after connection_made)
        self.connection_made(transport)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        greeting, early = self._greeting, self._early
        self._greeting = self._early = b""
        self.opened(greeting, early)

    def data_received(self, data: bytes) -> None:
        self.received(data)

    def eof_received(self) -> bool:
        self.half_closed()
        return True  # the transport stays until our shut (bounded) completes

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost()

    def pause_writing(self) -> None:
        self.writable(False)

    def resume_writing(self) -> None:
        self.writable(True)

    def _write(self, data: bytes | memoryview) -> bool:
        """A view of the shared read buffer is handed over only when nothing is queued: behind
        a queue it is copied, since a queued view (Python 3.12+) would pin the whole buffer."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        if type(data) is memoryview and transport.get_write_buffer_size():
            transport.write(bytes(data))
            return False
        transport.write(data)
        return transport.get_write_buffer_size() > 0

    def _shut(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _end_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write_eof()

    def pause_reading(self) -> None:
        if self.transport is not None and not self._closing and not self._dropping and self.transport.is_reading():
            self.transport.pause_reading()

    def _held(self) -> bool:
        return self.transport is not None and not self.transport.is_closing() and not self.transport.is_reading()

    def _socket(self) -> socket.socket | None:
        return None if self.transport is None else self.transport.get_extra_info("socket")

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing() and not self.transport.is_reading():
            self.transport.resume_reading()


class TlsBrowser(WsConnection):
    """A browser on Tornado's SSL stream (the proxy terminates TLS itself): one read loop."""

    def __init__(self, stream: IOStream, max_frame: int) -> None:
        super().__init__(max_frame)
        self.stream = stream
        # Nagle off, as asyncio has it on the plain path: a handshake reply or a keystroke must
        # not wait for the ACK of the segment before it (~40 ms with delayed ACKs)
        stream.set_nodelay(True)
        self._readable = asyncio.Event()
        self._readable.set()
        self._writes = 0  # writes not yet flushed
        self._shut_when_flushed = False
        self._reading: asyncio.Task[None] | None = None

    def opened(self, greeting: bytes, early: bytes = b"") -> None:
        super().opened(greeting)  # bytes Tornado already buffered come first from read_bytes
        # Tornado reads an idle stream itself to see it close; wake the loop then, even while
        # reading is paused, so the end is not missed until the hypervisor unsticks
        self.stream.set_close_callback(self._readable.set)
        self._reading = asyncio.get_running_loop().create_task(self._read_loop())

    async def _read_loop(self) -> None:
        stream = self.stream
        try:
            while True:
                await self._readable.wait()
                self.received(await stream.read_bytes(TLS_READ, partial=True))
        except StreamClosedError:
            pass
        finally:
            stream.close()
            self.lost()

    def _write(self, data: bytes | memoryview) -> bool:
        if self.stream.closed():
            return False
        copied = self._writes > 0 and type(data) is memoryview  # as PlainBrowser: never pin behind a queue
        written = self.stream.write(bytes(data) if copied else data)
        if written.done():
            return False
        self._writes += 1
        written.add_done_callback(self._flushed)
        if not self._backlogged:
            self.writable(False)
        return not copied

    def _flushed(self, written: asyncio.Future[None]) -> None:
        if not written.cancelled():
            written.exception()  # a closed stream is reported by the read loop
        self._writes -= 1
        if self._writes == 0 and self._shut_when_flushed:
            self.stream.close()
        if self._writes == 0 and self._backlogged:
            self.writable(True)

    def _shut(self) -> None:
        """Close once what is queued (the Close frame) is written; the close timer bounds it."""
        if self._writes:
            self._shut_when_flushed = True
        else:
            self.stream.close()

    def _abort(self) -> None:
        self._readable.set()  # the read loop must see the close, even if reading was paused
        self.stream.close()

    def _end_writing(self) -> None:
        self._shut()  # TLS over Tornado's stream has no half-close

    def pause_reading(self) -> None:
        if not self._closing and not self._dropping:
            self._readable.clear()

    def resume_reading(self) -> None:
        self._readable.set()

    def _held(self) -> bool:
        return not self._readable.is_set()

    def _socket(self) -> socket.socket | None:
        return self.stream.socket
