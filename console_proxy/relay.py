"""One console session: connect to the hypervisor, run both RFB handshakes, relay both ways.

The protocol decisions live in :mod:`console_proxy.rfb`; this module only moves bytes between
the browser (a :class:`Browser`, implemented by the websocket handler) and the hypervisor's
socket, and decides when a session ends and with which close code.

Backpressure: every write is awaited before the next read on the other side, so a browser that
stops reading stops the proxy from reading the hypervisor; per session the proxy holds at most
one read chunk in flight each way (the kernel's socket buffers hold the rest).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from tornado.iostream import IOStream, StreamClosedError
from tornado.netutil import is_valid_ip
from tornado.tcpclient import TCPClient

from console_proxy import rfb
from console_proxy.config import ProxyConfig
from console_proxy.token import Claims

log = logging.getLogger("consolegate.proxy.session")

CLOSE_REASONS = {
    4500: "target_unreachable",
    4501: "target_auth_failed",
    4502: "target_protocol_error",
    4408: "idle_timeout",
    4410: "session_ended",
    1000: "normal",
    1001: "going_away",
    1003: "unsupported_data",
}


#: Bytes reserved before a relayed chunk for the websocket frame header (at most 10 bytes).
FRAME_HEADROOM = 10
_BUFFERS: list[bytearray] = []  # burst buffers not in use (one per session while it streams)
_POOL_LIMIT = 32


class Browser(Protocol):
    """The browser's side as the relay sees it."""

    def send(self, data: bytes) -> Awaitable[None]: ...

    def send_framed(self, buffer: bytearray, size: int) -> Awaitable[None]:
        """Send ``buffer[FRAME_HEADROOM:FRAME_HEADROOM + size]``, framing it in place: the
        header goes into the headroom. ``buffer`` must stay untouched until the awaitable is done."""

    def close(self, code: int, reason: str) -> None: ...


@dataclass
class Ending:
    """Why a session ended: websocket close code, public code, and a loggable detail."""

    code: int
    reason: str
    detail: str = ""


class SessionEnded(Exception):
    def __init__(self, ending: Ending) -> None:
        super().__init__(ending.detail or ending.reason)
        self.ending = ending


def _end(code: int, detail: str) -> SessionEnded:
    return SessionEnded(Ending(code, CLOSE_REASONS[code], detail))


def tls_policy(claims: Claims, config: ProxyConfig) -> rfb.TlsPolicy:
    """The token's ``tls`` claim, falling back to the proxy's configured CA."""
    tls = claims.tls or {}
    return rfb.TlsPolicy(
        ca_pem=tls.get("ca") or config.upstream_ca_pem,
        server_name=tls.get("sni") or claims.host,
        allow_anonymous=bool(tls.get("allow_anon")) or config.allow_anonymous_tls,
        require=bool(tls.get("require")),
    )


def ssl_context(policy: rfb.TlsPolicy, verify: bool) -> ssl.SSLContext:
    """A client context: X.509 verified against the policy's CA, or anonymous when allowed."""
    if verify:
        if not policy.ca_pem:
            raise _end(4501, "the target offers X.509 TLS but no CA is configured to verify it")
        context = ssl.create_default_context(cadata=policy.ca_pem)
        context.check_hostname = True
        return context
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("aNULL:@SECLEVEL=0")
    return context


async def _open_stream(host: str, port: int) -> IOStream:
    """A connected stream. An IP literal (the usual target) is connected directly: TCPClient
    would resolve it through getaddrinfo on the executor thread pool, a thread hop per session."""
    if not is_valid_ip(host):
        return await TCPClient().connect(host, port)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    stream = IOStream(socket.socket(family, socket.SOCK_STREAM))
    try:
        return await stream.connect((host, port))
    except BaseException:  # refused, or cancelled by the connect timeout: never leak the socket
        stream.close()
        raise


def _close_if_opened(upgrading: asyncio.Future[IOStream]) -> None:
    if not upgrading.cancelled() and upgrading.exception() is None:
        upgrading.result().close()


class ConsoleSession:
    """The life of one console, from websocket open to close. Ends exactly once."""

    def __init__(self, claims: Claims, config: ProxyConfig, browser: Browser, client_ip: str, *,
                 on_open: Callable[[ConsoleSession], None], on_end: Callable[[ConsoleSession], None]) -> None:
        self.claims, self.config, self.browser, self.client_ip = claims, config, browser, client_ip
        self.on_open, self.on_end = on_open, on_end
        self.started = time.monotonic()
        self.last_input = self.started
        self.bytes_up = self.bytes_down = 0
        self.handshake_seconds: float | None = None
        self.security_type = ""
        self.ending: Ending | None = None
        self._upstream: IOStream | None = None
        self._tls = tls_policy(claims, config)
        self._down = rfb.DownstreamHandshake()
        self._client_init: asyncio.Future[rfb.ClientInitReceived] = asyncio.get_running_loop().create_future()
        self._framer = rfb.ClientMessageFramer(max_message=config.max_message_size)
        self._relaying = False
        self._early: list[bytes] = []

    @property
    def sid(self) -> str:
        return self.claims.sid

    async def run(self) -> None:
        """Handshake within the timeout, then relay the hypervisor's stream until the end."""
        try:
            await self.browser.send(self._down.initiate())
            try:
                await asyncio.wait_for(self._handshake(), self.config.handshake_timeout)
            except TimeoutError:
                raise _end(4502, "the RFB handshake did not finish in time") from None
            await self._pump_to_browser()
        except SessionEnded as ended:
            self.finish(ended.ending)
        except StreamClosedError:
            self.finish(Ending(1000, "normal", "a connection closed"))
        except Exception:  # a bug must still end the session: close both sides, free the slot
            log.exception("session %s failed unexpectedly", self.sid)
            self.finish(Ending(4502, "target_protocol_error", "internal error"))

    async def _handshake(self) -> None:
        upstream = rfb.UpstreamHandshake(password=self.claims.pw, tls=self._tls)
        self._upstream = await self._connect()
        await self._drive(upstream, rfb.Authenticated)
        self.security_type = upstream.security_type
        client_init = await self._client_init
        await self._write_upstream(upstream.send_client_init(self.config.shared or client_init.shared))
        ready = await self._drive(upstream, rfb.ServerInitReady)
        assert isinstance(ready, rfb.ServerInitReady)
        name = self.claims.dn.encode("utf-8") if self.claims.dn else None
        await self.browser.send(ready.server_init.encode(name=name))
        self.handshake_seconds = time.monotonic() - self.started
        self.on_open(self)
        if ready.rest:
            await self._to_browser(ready.rest)
        self._relaying = True
        early = client_init.rest + b"".join(self._early)
        self._early.clear()
        if early:
            await self._forward(early)

    async def _connect(self) -> IOStream:
        try:
            stream = await asyncio.wait_for(_open_stream(self.claims.host, self.claims.port),
                                            self.config.connect_timeout)
        except (OSError, StreamClosedError, TimeoutError):
            raise _end(4500, "cannot connect to the console server") from None
        stream.set_nodelay(True)
        return stream

    async def _drive(self, handshake: rfb.UpstreamHandshake, until: type) -> object:
        """Carry out the handshake's actions until ``until``, reading from the hypervisor as needed.

        The first round feeds nothing: bytes that arrived early are already in the handshake.
        """
        data = b""
        while True:
            for action in self._guard(handshake.feed, data):
                done = await self._act(handshake, action, until)
                if done is not None:
                    return done
            try:
                data = await self._read_upstream(4096)
            except StreamClosedError:
                raise _end(4502, "the console server closed the connection during the handshake") from None

    async def _act(self, handshake: rfb.UpstreamHandshake, action: object, until: type) -> object | None:
        if isinstance(action, rfb.Send):
            await self._write_upstream(action.data)
        elif isinstance(action, rfb.StartTls):
            await self._start_tls(action)
            for follow in self._guard(handshake.tls_started):
                done = await self._act(handshake, follow, until)
                if done is not None:
                    return done
        if isinstance(action, until):
            return action
        return None

    @staticmethod
    def _guard(step: Callable[..., list[object]], *args: bytes) -> list[object]:
        try:
            return step(*args)
        except rfb.RfbError as error:
            raise SessionEnded(Ending(error.close_code, error.code, str(error))) from None

    async def _start_tls(self, action: rfb.StartTls) -> None:
        assert self._upstream is not None
        policy = self._tls
        try:
            context = ssl_context(policy, action.verify)
        except (ssl.SSLError, ValueError):
            raise _end(4501, "the CA certificate for this console server is not usable") from None
        plain, self._upstream = self._upstream, None  # start_tls consumes the plain stream
        upgrading = asyncio.ensure_future(plain.start_tls(
            False, ssl_options=context, server_hostname=policy.server_name if action.verify else None))
        try:
            # shielded: if the handshake timeout cancels us, the TLS stream is still closed below
            self._upstream = await asyncio.shield(upgrading)
        except ssl.SSLCertVerificationError:
            raise _end(4501, "the console server's certificate did not verify") from None
        except (ssl.SSLError, OSError, StreamClosedError):
            raise _end(4502, "the TLS handshake with the console server failed") from None
        except asyncio.CancelledError:
            upgrading.add_done_callback(_close_if_opened)
            raise
        self._upstream.set_nodelay(True)

    async def _read_upstream(self, limit: int) -> bytes:
        assert self._upstream is not None
        return await self._upstream.read_bytes(limit, partial=True)

    def _upstream_closed(self) -> SessionEnded:
        """The hypervisor hung up: a protocol error mid-handshake, a normal end while relaying."""
        return _end(1000 if self._relaying else 4502, "the console server closed the connection")

    async def _write_upstream(self, data: bytes) -> None:
        assert self._upstream is not None
        try:
            await self._upstream.write(data)
        except StreamClosedError:
            raise self._upstream_closed() from None

    async def _pump_to_browser(self) -> None:
        # The hot loop of bulk updates: one read and one awaited frame write per chunk, no
        # intermediate coroutine calls (each costs measurably at thousands of chunks a second).
        upstream, send, chunk = self._upstream, self.browser.send, self.config.read_chunk
        assert upstream is not None
        while self.ending is None:
            try:
                data = await upstream.read_bytes(chunk, partial=True)
            except StreamClosedError:
                raise self._upstream_closed() from None
            self.bytes_down += len(data)
            await send(data)
            if len(data) == chunk:
                await self._pump_burst(upstream, chunk)

    async def _pump_burst(self, upstream: IOStream, chunk: int) -> None:
        """Relay a burst (a full chunk was waiting) without copying it in user space.

        Idle sessions wait in ``read_bytes`` above, which holds no buffer while nothing arrives;
        during a burst each chunk is received straight into a pooled buffer behind room for the
        frame header, and that same memory is written to the browser. The burst ends at the
        first short read, and the buffer goes back to the pool.
        """
        buffer = _BUFFERS.pop() if _BUFFERS and len(_BUFFERS[-1]) == FRAME_HEADROOM + chunk else \
            bytearray(FRAME_HEADROOM + chunk)
        payload = memoryview(buffer)[FRAME_HEADROOM:]
        send_framed = self.browser.send_framed
        try:
            while self.ending is None:
                try:
                    size = await upstream.read_into(payload, partial=True)  # type: ignore[arg-type]
                except StreamClosedError:
                    raise self._upstream_closed() from None
                self.bytes_down += size
                await send_framed(buffer, size)
                if size < chunk:
                    return
        finally:
            del payload
            if len(_BUFFERS) < _POOL_LIMIT and not upstream.closed():
                _BUFFERS.append(buffer)

    async def _to_browser(self, data: bytes) -> None:
        self.bytes_down += len(data)
        await self.browser.send(data)

    def from_browser(self, data: bytes) -> Awaitable[None] | None:
        """Bytes the browser sent: handshake replies first, then client messages.

        Returns an awaitable when the caller must wait before reading more from the browser
        (handshake steps; the hypervisor not taking input as fast as it comes), else None: the
        relaying path is synchronous so each input message costs no task and no loop turn.
        """
        if self._relaying:
            try:
                return self._forward_now(data)
            except SessionEnded as ended:
                self.finish(ended.ending)
                return None
        return self._from_browser_handshake(data)

    async def _from_browser_handshake(self, data: bytes) -> None:
        try:
            if self._relaying:
                await self._forward(data)
            elif not self._client_init.done():
                await self._downstream_handshake(data)
            else:
                self._hold_early(data)
        except SessionEnded as ended:
            self.finish(ended.ending)

    async def _downstream_handshake(self, data: bytes) -> None:
        for action in self._guard(self._down.feed, data):
            if isinstance(action, rfb.Send):
                await self.browser.send(action.data)
            elif isinstance(action, rfb.ClientInitReceived):
                self._client_init.set_result(action)

    def _hold_early(self, data: bytes) -> None:
        """Messages sent before ServerInit reached the browser: bounded, then forwarded."""
        if sum(map(len, self._early)) + len(data) > self.config.max_message_size:
            raise _end(4502, "the browser sent too much before the session was ready")
        self._early.append(data)

    async def _forward(self, data: bytes) -> None:
        """Whole client messages to the hypervisor; input dropped for view-only sessions."""
        pending = self._forward_now(data)
        if pending is not None:
            await pending

    def _forward_now(self, data: bytes) -> Awaitable[None] | None:
        """Start writing the whole client messages in ``data`` upstream; an awaitable only if
        the write did not complete at once (backpressure), None otherwise."""
        messages = self._guard(self._framer.feed, data)
        if any(kind in rfb.INPUT_MESSAGE_TYPES for kind, _ in messages):  # type: ignore[misc]
            # a person is there: update requests alone (noVNC sends them while the screen
            # changes) do not keep an abandoned console open
            self.last_input = time.monotonic()
        if self.claims.ro:
            out = b"".join(m for kind, m in messages if kind not in rfb.INPUT_MESSAGE_TYPES)  # type: ignore[misc]
        else:
            out = b"".join(m for _, m in messages)  # type: ignore[misc]
        if not out:
            return None
        assert self._upstream is not None
        self.bytes_up += len(out)
        try:
            written = self._upstream.write(out)
        except StreamClosedError:
            raise self._upstream_closed() from None
        if not written.done():
            return self._upstream_drained(written)
        if written.exception() is not None:
            raise self._upstream_closed()
        return None

    async def _upstream_drained(self, written: Awaitable[None]) -> None:
        try:
            await written
        except StreamClosedError:
            self.finish(self._upstream_closed().ending)

    def finish(self, ending: Ending) -> None:
        """End the session once: close both sides and report."""
        if self.ending is not None:
            return
        self.ending = ending
        if not self._client_init.done():
            self._client_init.cancel()
        if self._upstream is not None:
            self._upstream.close()
        self.browser.close(ending.code, ending.reason)
        self.on_end(self)

    def browser_closed(self, code: int | None) -> None:
        self.finish(Ending(code or 1005, "browser_closed", "the browser closed the websocket"))

