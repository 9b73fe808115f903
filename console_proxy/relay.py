"""One console session: connect to the hypervisor, run both RFB handshakes, relay both ways.

The protocol decisions live in :mod:`console_proxy.protocol.rfb`; this module moves bytes between the
browser (a :class:`Browser`, the upgraded websocket in :mod:`console_proxy.wsconn`) and the
hypervisor's socket, and decides when a session ends and with which close code.

The handshake is one coroutine with a deadline. Once both sides are through it, relaying is
callbacks only — no task, no loop turn per message: bytes from the hypervisor are received
straight into a shared buffer behind room for the websocket frame header and written to the
browser from there; the browser's bytes are cut into whole RFB messages and written upstream.

Backpressure is flow control: when the browser's socket stops taking data, the proxy stops
reading the hypervisor, and the other way round, so per session the proxy holds at most what
the transports' write limits allow (plus one message being assembled).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from console_proxy import dial, upstream_tls
from console_proxy.codes import Close
from console_proxy.config import ProxyConfig
from console_proxy.offers import Offers
from console_proxy.protocol import clipboard, rfb
from console_proxy.token import Claims

log = logging.getLogger("consolegate.proxy.session")
#: What a guarded protocol step returns a list of (actions, messages).
_Item = TypeVar("_Item")

CANNOT_CONNECT = "cannot connect to the console server"
CONNECT_TIMED_OUT = "connecting to the console server timed out"
#: Bytes reserved before a relayed chunk for the websocket frame header (at most 10 bytes).
FRAME_HEADROOM = 10
#: Handshake bytes from the hypervisor held unread before its socket is paused.
HANDSHAKE_INBOX = rfb.MAX_PENDING


class Browser(Protocol):
    """The browser's side as the relay sees it: non-blocking writes, flow control, close."""

    def send(self, data: bytes) -> None:
        """One binary message."""

    def send_framed(self, buffer: bytearray, size: int) -> bool:
        """Send ``buffer[FRAME_HEADROOM:FRAME_HEADROOM + size]``, framing it in place: the
        header goes into the headroom. True if ``buffer`` may still be referenced afterwards
        (the transport queued part of it), so the caller must not reuse it."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self, code: int, reason: str) -> None: ...

    def keepalive(self) -> None:
        """Periodically: a Ping, for intermediaries that cut idle connections (not input)."""

    def watch_held(self) -> None:
        """Periodically: if the browser's input is held, find out whether it is still there."""

    def when_gone(self, callback: Callable[[], None]) -> None:
        """Call back once the connection is gone (its Close sent and the socket closed), at
        once if it is already; every way there is bounded by the close timeout."""


@dataclass
class Ending:
    """Why a session ended: websocket close code, public code, and a loggable detail."""

    code: int
    reason: str
    detail: str = ""

    @classmethod
    def of(cls, code: int, detail: str) -> Ending:
        """The ending for one of the proxy's own close codes, with its public reason
        (a :class:`Close`, or its number: a number the table lacks raises ``ValueError``)."""
        close = Close(code)
        return cls(close, close.reason, detail)


class SessionEnded(Exception):
    def __init__(self, ending: Ending) -> None:
        super().__init__(ending.detail or ending.reason)
        self.ending = ending


def _end(code: int, detail: str) -> SessionEnded:
    return SessionEnded(Ending.of(code, detail))


def tls_policy(claims: Claims, config: ProxyConfig) -> rfb.TlsPolicy:
    """The token's ``tls`` claim with the proxy's defaults (see :func:`upstream_tls.policy_for`)."""
    return upstream_tls.policy_for(
        claims.target_tls,
        claims.host,
        upstream_ca_pem=config.upstream_ca_pem,
        allow_anonymous_tls=config.allow_anonymous_tls,
        own=config.own_certificates,
    )


class _ReadBuffer:
    """The one buffer every hypervisor socket is received into, behind the frame headroom.

    asyncio asks for it right before a ``recv_into`` and hands it back in the same callback, so
    one buffer serves every session of the process (idle sessions hold none). When the browser's
    transport keeps a reference to it (its send did not complete), it is given up for a new one.
    """

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self.buffer = bytearray(FRAME_HEADROOM + chunk)
        self.view = memoryview(self.buffer)[FRAME_HEADROOM:]

    def renew(self) -> None:
        self.view.release()
        self.buffer = bytearray(FRAME_HEADROOM + self.chunk)
        self.view = memoryview(self.buffer)[FRAME_HEADROOM:]


_READ_BUFFERS: dict[int, _ReadBuffer] = {}


def _read_buffer(chunk: int) -> _ReadBuffer:
    found = _READ_BUFFERS.get(chunk)
    if found is None:
        found = _READ_BUFFERS[chunk] = _ReadBuffer(chunk)
    return found


class _Upstream(asyncio.BufferedProtocol):
    """The hypervisor's socket: handshake bytes into an inbox, then straight to the browser."""

    def __init__(self, session: ConsoleSession) -> None:
        self.session = session
        self.reads = _read_buffer(session.config.read_chunk)
        self.transport: asyncio.Transport | None = None
        self.connecting: asyncio.TimerHandle | None = None  # the connect deadline, until first bytes
        self.retired = False  # left for a new connection (a redial): its end is nobody's business

    def retire(self) -> None:
        """Close this connection; its end no longer concerns the session."""
        self.retired = True
        self._connected()
        if self.transport is not None:
            self.transport.abort()  # the reader goes now: no more bytes reach the session

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.session.ending is not None:  # ended while connecting: never keep the socket
            transport.abort()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reads.view

    def buffer_updated(self, nbytes: int) -> None:
        session = self.session
        if session.relaying:
            if session.clip.frames_server:  # clip forbids out: cut text is found and dropped
                session.relay_framed(self.reads.view[:nbytes])
                return
            session.bytes_down += nbytes
            if session.browser.send_framed(self.reads.buffer, nbytes):
                self.reads.renew()
        else:
            self._connected()
            session.handshake_bytes(self.reads.view[:nbytes])

    def _connected(self) -> None:
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None

    def eof_received(self) -> bool:
        self._connected()
        if not self.retired:
            self.session.upstream_lost(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.retired:
            return
        if self.connecting is not None:
            self._connected()
            if dial.never_connected(exc):  # the connect itself failed (dial: no wait for it)
                self.session.finish(Ending.of(Close.TARGET_UNREACHABLE, CANNOT_CONNECT))
                return
        self.session.upstream_lost(exc)

    def pause_writing(self) -> None:
        self.session.browser.pause_reading()

    def resume_writing(self) -> None:
        self.session.browser.resume_reading()


class _Redial(Exception):
    """The handshake's pipelined opening guessed wrong (:class:`rfb.Redial`)."""


def _dial(claims: Claims) -> socket.socket | OSError | None:
    """Begin the TCP connect to the hypervisor (:func:`dial.connecting_socket`); an immediate
    failure is kept for :meth:`ConsoleSession._connect` to report under the handshake's rules."""
    try:
        return dial.connecting_socket(claims.host, claims.port)
    except OSError as error:
        return error


def _milestone_passed(action: object, handshake: rfb.UpstreamHandshake) -> bool:
    """Authenticated with ClientInit already sent: nothing for the handshake coroutine to do."""
    return type(action) is rfb.Authenticated and handshake.client_init_sent


class ConsoleSession:
    """The life of one console, from websocket open to close. Ends exactly once."""

    def __init__(
        self,
        claims: Claims,
        config: ProxyConfig,
        browser: Browser,
        client_ip: str,
        *,
        on_open: Callable[[ConsoleSession], None],
        on_end: Callable[[ConsoleSession], None],
        offers: Offers | None = None,
    ) -> None:
        # The TCP connect is begun first, before anything else is built: the hypervisor is then
        # already answering while the session, the 101 and the greeting are made and travel.
        self._dialled = _dial(claims)  # the connect begun here, taken by _connect
        self.claims, self.config, self.browser, self.client_ip = claims, config, browser, client_ip
        self.on_open, self.on_end = on_open, on_end
        self.started = time.monotonic()
        self.last_input = self.started
        self.bytes_up = self.bytes_down = 0
        self.handshake_seconds: float | None = None
        self.security_type = ""
        self.ending: Ending | None = None
        self.relaying = False
        self._up = _Upstream(self)
        self._tls = tls_policy(claims, config)
        self._down = rfb.DownstreamHandshake()
        self._client_init: asyncio.Future[rfb.ClientInitReceived] = asyncio.get_running_loop().create_future()
        self.clip = clipboard.ClipboardGate(claims.clip_policy)
        self._framer = rfb.ClientMessageFramer(max_message=config.max_message_size, max_cut_text=config.max_cut_text)
        self._early = bytearray()
        self._inbox = bytearray()
        self._feeding: rfb.UpstreamHandshake | None = None  # parked in _drive: fed by the read callback
        self._actions: asyncio.Future[list[rfb.UpstreamAction]] | None = None
        self._upstream_gone = False
        self._lost_error: BaseException | None = None
        self._certificate_request: upstream_tls.CertificateRequestWatch | None = None
        self._tls_quiet = False  # TLS is up and the hypervisor has sent nothing through it yet
        self._inbox_full = False  # reasons to leave the hypervisor's socket unread
        self._backlogged = False
        self._task: asyncio.Task[None] | None = None
        self._ready: tuple[rfb.ServerInitReady, str] | None = None  # the hypervisor's ServerInit, waiting
        self._offers = offers  # what hypervisors offered before: for a pipelined opening
        self._upstream: rfb.UpstreamHandshake | None = None  # the handshake under way
        self._unsent = b""  # of a pipelined opening, what the connecting socket did not take
        self._browser_at_fault = False  # the session ends for what the browser sent

    @property
    def sid(self) -> str:
        return self.claims.sid

    def start(self) -> None:
        """Greet the browser and begin the handshake (the connect began when the session was
        made); everything after it runs in callbacks."""
        if self.ending is not None:  # ended before the browser's connection was ours
            return
        offers, claims = self._offers, self.claims
        self._upstream = self._upstream_handshake(None if offers is None else offers.expected(claims.host, claims.port))
        self.browser.send(self._down.initiate())
        self._task = asyncio.get_running_loop().create_task(self._run())

    def _upstream_handshake(self, expected: rfb.Offer | None) -> rfb.UpstreamHandshake:
        """A handshake with the hypervisor, whose pipelined opening (when its offer is
        ``expected``) is sent at once, on the socket still connecting where possible."""
        shared = self.config.shared  # the browser's flag does not matter: ClientInit is pipelined
        upstream = rfb.UpstreamHandshake(
            password=self.claims.password, tls=self._tls, client_init=True if shared else None, expected=expected
        )
        opening = upstream.opening()
        if opening:
            assert self._offers is not None
            self._offers.outcomes["guessed"] += 1
            self._unsent = self._send_early(opening)
        return upstream

    def _send_early(self, data: bytes) -> bytes:
        """Write ``data`` on the dialled socket before asyncio takes it (the loop would take
        two turns to make a transport first); what it did not take is left for the transport."""
        sock = self._dialled
        if not isinstance(sock, socket.socket):  # a host name (asyncio connects), or failed already
            return data
        try:
            return data[sock.send(data) :]
        except BlockingIOError:  # the TCP handshake is still under way
            return data
        except OSError as error:  # the connect failed: _connect reports it as such (4500)
            sock.close()
            self._dialled = error
            return b""

    async def _run(self) -> None:
        """The handshake under two deadlines (connect, whole handshake): timers that end the
        session, which cancels this task; no wait_for, whose cancel 3.11 can swallow."""
        loop = asyncio.get_running_loop()
        deadline = loop.call_later(self.config.handshake_timeout, self._handshake_overdue)
        try:
            await self._handshake()
        except SessionEnded as ended:
            self.finish(ended.ending)
        except asyncio.CancelledError:  # the session ended (timeout, browser, drain)
            self.finish(Ending.of(Close.GOING_AWAY, "the session was cancelled"))
        except Exception:  # a bug must still end the session: close both sides, free the slot
            log.exception("session %s failed unexpectedly", self.sid)
            self.finish(Ending.of(Close.TARGET_PROTOCOL_ERROR, "internal error"))
        finally:
            deadline.cancel()
            self._task = None
            if self.ending is not None and self._up.transport is not None:
                self._up.transport.abort()

    # --- the handshake (a coroutine, bounded by the handshake timeout) -------------------------

    async def _handshake(self) -> None:
        """Up to ServerInit on both sides. The session usually opens in a read callback, the
        moment the later of the hypervisor's ServerInit and the browser's ClientInit arrives
        (:meth:`_open_now`), not a loop turn later when this coroutine wakes."""
        claims, offers = self.claims, self._offers
        upstream = self._upstream
        assert upstream is not None  # made by start()
        upstream.prepare()  # the 101 and any pipelined opening have left by now
        await self._connect()
        try:
            ready, client_init = await self._negotiate(upstream)
        except _Redial:  # the pipelined opening guessed wrong: once more, on a new connection
            assert offers is not None
            offers.forget(claims.host, claims.port)
            offers.outcomes["redialled"] += 1
            self._redial()
            upstream = self._upstream = self._upstream_handshake(None)
            upstream.prepare()
            await self._connect()
            ready, client_init = await self._negotiate(upstream)
        if not self.relaying:  # not opened in a read callback meanwhile
            self._open(ready, upstream.security_type, client_init)
        if offers is not None:
            offers.learn(claims.host, claims.port, upstream.offer)

    async def _negotiate(self, upstream: rfb.UpstreamHandshake) -> tuple[rfb.ServerInitReady, rfb.ClientInitReceived]:
        """One connection's handshake, up to ServerInit on both sides."""
        if self._unsent:  # the rest of a pipelined opening the connecting socket did not take
            unsent, self._unsent = self._unsent, b""
            self._write_upstream(unsent)
        if self.config.shared:
            ready = await self._drive(upstream, rfb.ServerInitReady)
            assert isinstance(ready, rfb.ServerInitReady)
            if not self.relaying:
                self._ready = (ready, upstream.security_type)
            client_init = await self._client_init
            if self._upstream_gone and not self.relaying:  # it hung up while the browser was on its way
                raise self._hung_up()
        else:
            await self._drive(upstream, rfb.Authenticated)
            client_init = await self._client_init
            # a view-only viewer must not disconnect the VM's other viewers (shared=0 would)
            self._write_upstream(upstream.send_client_init(client_init.shared or self.claims.view_only))
            ready = await self._drive(upstream, rfb.ServerInitReady)
            assert isinstance(ready, rfb.ServerInitReady)
        return ready, client_init

    def _redial(self) -> None:
        """Leave the hypervisor's connection (it heard a wrong guess) for a new one."""
        old, self._up = self._up, _Upstream(self)
        old.retire()
        self._inbox.clear()
        self._inbox_full = self._upstream_gone = self._tls_quiet = False
        self._lost_error = None
        self._dialled = _dial(self.claims)

    def _open(self, ready: rfb.ServerInitReady, security_type: str, client_init: rfb.ClientInitReceived) -> None:
        """ServerInit to the browser, then relaying: what either side sent meanwhile goes on."""
        self._ready = None
        self.security_type = security_type
        name = self.claims.desktop_name.encode("utf-8") if self.claims.desktop_name else None
        self.browser.send(ready.server_init.encode(name=name))
        self.handshake_seconds = time.monotonic() - self.started
        self.on_open(self)
        self.relaying = True  # from here the hypervisor's bytes go straight to the browser
        self.clip.opened(ready.server_init.pixel_format[0])
        after = ready.rest + bytes(self._inbox)  # sent behind ServerInit, before relaying began
        self._inbox.clear()
        if self._inbox_full:
            self._inbox_full = False
            self._steer_upstream()
        if after and self.clip.frames_server:
            self.relay_framed(memoryview(after))
        elif after:
            self.bytes_down += len(after)
            self.browser.send(after)
        early = client_init.rest + bytes(self._early)
        self._early = bytearray()
        if early:
            self._forward(early)

    def _open_now(self, ready: rfb.ServerInitReady, security_type: str) -> bool:
        """Open from a read callback if the browser's ClientInit is in; True if opened. A
        failure ends the session here (the coroutine then finds it ended)."""
        client_init = self._client_init
        if self.relaying or self.ending is not None or not client_init.done() or client_init.cancelled():
            return False
        try:
            self._open(ready, security_type, client_init.result())
        except SessionEnded as ended:
            self.finish(ended.ending)
        except Exception:  # a bug: as in _run, end the session and free the slot
            log.exception("session %s failed unexpectedly", self.sid)
            self.finish(Ending.of(Close.TARGET_PROTOCOL_ERROR, "internal error"))
        return True

    async def _connect(self) -> None:
        """Connect to the hypervisor; for a numeric address, without waiting for the TCP
        handshake (see :mod:`console_proxy.dial`): the deadline then runs on until its first bytes."""
        loop = asyncio.get_running_loop()
        deadline: asyncio.TimerHandle | None = loop.call_later(self.config.connect_timeout, self._connect_overdue)
        try:
            sock, self._dialled = self._dialled, None
            if isinstance(sock, OSError):
                raise sock
            if sock is None:
                await loop.create_connection(lambda: self._up, self.claims.host, self.claims.port)
            else:
                await loop.create_connection(lambda: self._up, sock=sock)
                self._up.connecting, deadline = deadline, None
        except OSError:
            raise _end(Close.TARGET_UNREACHABLE, CANNOT_CONNECT) from None
        finally:
            if deadline is not None:
                deadline.cancel()

    def _connect_overdue(self) -> None:
        """The connect deadline: a connection made but silent is the handshake deadline's."""
        if not self._upstream_connected():
            self.finish(Ending.of(Close.TARGET_UNREACHABLE, CONNECT_TIMED_OUT))

    def _handshake_overdue(self) -> None:
        """The whole handshake's deadline, which may come first: unreachable is still 4500."""
        if self.relaying:  # opened in a callback, the coroutine not yet woken to cancel this
            return
        self._connect_overdue()
        # if not ended just now:
        self.finish(Ending.of(Close.TARGET_PROTOCOL_ERROR, "the RFB handshake did not finish in time"))

    def _upstream_connected(self) -> bool:
        transport = self._up.transport
        return transport is not None and dial.is_connected(transport.get_extra_info("socket"))

    async def _drive(self, handshake: rfb.UpstreamHandshake, until: type) -> object:
        """Carry out the handshake's actions until ``until``, reading from the hypervisor as needed.

        While this waits, the hypervisor's bytes are fed to the handshake in the read callback
        (:meth:`handshake_bytes`), which also sends the plain replies: only the other actions —
        the milestone, STARTTLS, an error — come back here, so a step costs no loop turn.
        """
        actions = self._guard(handshake.feed, self._take_inbox())
        while True:
            for action in actions:
                done = await self._act(handshake, action, until)
                if done is not None:
                    return done
            actions = await self._next_actions(handshake)

    async def _next_actions(self, handshake: rfb.UpstreamHandshake) -> list[rfb.UpstreamAction]:
        """The handshake's next actions that are not only replies (those are sent meanwhile)."""
        while self._inbox:  # arrived while this coroutine was busy
            actions = self._guard(handshake.feed, self._take_inbox())
            if actions:
                return actions
        if self._upstream_gone:
            raise self._hung_up()
        self._feeding, self._actions = handshake, asyncio.get_running_loop().create_future()
        try:
            return await self._actions
        finally:
            self._feeding = self._actions = None

    async def _act(self, handshake: rfb.UpstreamHandshake, action: object, until: type) -> object | None:
        if isinstance(action, rfb.Send):
            self._write_upstream(action.data)
        elif isinstance(action, rfb.Authenticated) and until is rfb.ServerInitReady and not handshake.client_init_sent:
            self._write_upstream(handshake.send_client_init(True))  # shared, where it could not be pipelined
        elif isinstance(action, rfb.Redial):
            raise _Redial
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
    def _guard(step: Callable[..., list[_Item]], *args: bytes) -> list[_Item]:
        try:
            return step(*args)
        except rfb.RfbError as error:
            raise SessionEnded(Ending(error.close_code, error.code, str(error))) from None

    async def _start_tls(self, action: rfb.StartTls) -> None:
        if self._inbox:  # plaintext after the server agreed to TLS: it must never pass for decrypted
            raise _end(Close.TARGET_PROTOCOL_ERROR, "the console server sent plaintext where TLS was due")
        policy = self._tls
        try:
            context = upstream_tls.client_context(policy, action.verify)
        except (upstream_tls.NoCaError, upstream_tls.ClientCertificateError) as error:
            raise _end(Close.TARGET_AUTH_FAILED, str(error)) from None
        except (ssl.SSLError, ValueError):
            raise _end(Close.TARGET_AUTH_FAILED, "the CA certificate for this console server is not usable") from None
        watch = self._certificate_request = upstream_tls.CertificateRequestWatch(context)
        plain = self._up.transport
        assert plain is not None
        try:
            secure = await asyncio.get_running_loop().start_tls(
                plain, self._up, context, server_hostname=policy.server_name if action.verify else None
            )
        except ssl.SSLCertVerificationError:
            raise _end(Close.TARGET_AUTH_FAILED, "the console server's certificate did not verify") from None
        except (ssl.SSLError, OSError, ConnectionError) as error:
            raise self._tls_failure(error, "the TLS handshake with the console server failed", quiet=True) from None
        finally:
            watch.stop()
        if secure is None:
            raise self._tls_failure(None, "the console server closed the connection during TLS", quiet=True)
        self._up.transport = secure
        self._tls_quiet = True  # until the first decrypted byte: a hang-up now may be about our certificate

    def _tls_failure(self, error: BaseException | None, otherwise: str, *, quiet: bool) -> SessionEnded:
        """The hypervisor's connection ended during the handshake: a refusal (4501) when it
        wanted a client certificate (see :func:`upstream_tls.is_client_certificate_refusal`;
        ``quiet``: no byte from it since TLS began), else ``otherwise`` (4502)."""
        watch = self._certificate_request
        requested = watch is not None and watch.requested
        if upstream_tls.is_client_certificate_refusal(error, requested=requested, quiet=quiet):
            return _end(Close.TARGET_AUTH_FAILED, upstream_tls.CLIENT_CERTIFICATE_REQUIRED)
        return _end(Close.TARGET_PROTOCOL_ERROR, otherwise)

    def _hung_up(self) -> SessionEnded:
        """How the hypervisor hanging up before ServerInit ends the session."""
        return self._tls_failure(
            self._lost_error, "the console server closed the connection during the handshake", quiet=self._tls_quiet
        )

    def handshake_bytes(self, data: memoryview) -> None:
        """The hypervisor's bytes before relaying: fed to the waiting handshake at once, else
        held for it (bounded by pausing)."""
        self._tls_quiet = False
        handshake, waiter = self._feeding, self._actions
        if handshake is None or waiter is None or waiter.done():
            self._inbox += data
            if len(self._inbox) >= HANDSHAKE_INBOX:
                self._inbox_full = True
                self._steer_upstream()
            return
        try:
            actions = self._guard(handshake.feed, bytes(data))
            last = actions[-1] if actions else None
            if all(
                type(action) is rfb.Send
                or _milestone_passed(action, handshake)
                or (action is last and type(last) is rfb.ServerInitReady)
                for action in actions
            ):
                for action in actions:
                    if type(action) is rfb.Send:
                        self._write_upstream(action.data)
                if type(last) is not rfb.ServerInitReady:
                    return
                if not self._open_now(last, handshake.security_type):
                    self._ready = (last, handshake.security_type)
                actions = [last]  # the replies are sent: only the milestone is the coroutine's
        except Exception as error:
            if not waiter.done():
                waiter.set_exception(error)
            return
        if not waiter.done():  # ended while opening: finish() cancelled the coroutine and its wait
            waiter.set_result(actions)

    def _steer_upstream(self) -> None:
        """Read the hypervisor unless the inbox is full or the browser is not keeping up."""
        transport = self._up.transport
        if transport is None or transport.is_closing():
            return
        if self._inbox_full or self._backlogged:
            if transport.is_reading():
                transport.pause_reading()
        elif not transport.is_reading():
            transport.resume_reading()

    def _take_inbox(self) -> bytes:
        data = bytes(self._inbox)
        self._inbox.clear()
        if self._inbox_full:
            self._inbox_full = False
            self._steer_upstream()
        return data

    def _write_upstream(self, data: bytes) -> None:
        transport = self._up.transport
        if transport is None or transport.is_closing():
            raise self._upstream_closed()
        transport.write(data)

    def _upstream_closed(self) -> SessionEnded:
        """The hypervisor hung up: a protocol error mid-handshake, a normal end while relaying."""
        code = Close.NORMAL if self.relaying else Close.TARGET_PROTOCOL_ERROR
        return _end(code, "the console server closed the connection")

    def upstream_lost(self, error: BaseException | None = None) -> None:
        """The hypervisor's stream ended (``error`` None: end of stream)."""
        if self.relaying:
            self.finish(self._upstream_closed().ending)
        else:
            self._upstream_gone = True
            self._lost_error = self._lost_error or error
            waiter = self._actions
            if waiter is not None and not waiter.done():
                waiter.set_exception(self._hung_up())

    # --- the browser's side (called by the websocket) -----------------------------------------

    def from_browser(self, data: bytes) -> None:
        """Bytes the browser sent: handshake replies first, then client messages."""
        if self.ending is not None:
            return
        try:
            if self.relaying:
                self._forward(data)
            elif not self._client_init.done():
                self._downstream_handshake(data)
            else:
                self._hold_early(data)
        except SessionEnded as ended:
            self._browser_at_fault = True
            self.finish(ended.ending)

    def _downstream_handshake(self, data: bytes) -> None:
        for action in self._guard(self._down.feed, data):
            if isinstance(action, rfb.Send):
                self.browser.send(action.data)
            elif isinstance(action, rfb.ClientInitReceived):
                self._client_init.set_result(action)
                if self._ready is not None and not self._upstream_gone:  # the hypervisor's came first
                    self._open_now(*self._ready)

    def _hold_early(self, data: bytes) -> None:
        """Messages sent before ServerInit reached the browser: bounded, then forwarded."""
        if len(self._early) + len(data) > self.config.max_message_size:
            raise _end(Close.TARGET_PROTOCOL_ERROR, "the browser sent too much before the session was ready")
        self._early += data

    def relay_framed(self, data: memoryview) -> None:
        """The hypervisor's bytes through the clipboard gate's framer (``clip`` forbids out)."""
        try:
            out = self.clip.from_server(data)
        except rfb.RfbError as error:
            self.finish(Ending(error.close_code, error.code, str(error)))
            return
        if out:
            self.bytes_down += len(out)
            self.browser.send(out)

    def _forward(self, data: bytes) -> None:
        """Whole client messages to the hypervisor; input dropped for view-only sessions,
        cut text, encodings and pixel format through the clipboard gate."""
        messages = self.clip.from_browser(self._guard(self._framer.feed, data))
        view_only, inputs = self.claims.view_only, rfb.INPUT_MESSAGE_TYPES
        kept: list[bytes] = []  # one pass over the messages: this runs for every browser chunk
        typed = False
        for kind, message in messages:
            if kind in inputs:
                typed = True
                if view_only:
                    continue
            kept.append(message)
        if typed:
            # a person is there: update requests alone (noVNC sends them while the screen
            # changes) do not keep an abandoned console open
            self.last_input = time.monotonic()
        out = kept[0] if len(kept) == 1 else b"".join(kept)
        if out:
            self.bytes_up += len(out)
            self._write_upstream(out)

    def finish(self, ending: Ending) -> None:
        """End the session once: close both sides and report."""
        if self.ending is not None:
            return
        self.ending = ending
        if not self._client_init.done():
            self._client_init.cancel()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
        if isinstance(self._dialled, socket.socket):  # ended before the handshake took it
            self._dialled.close()
        self._judge_guess(ending)
        if self._up.transport is not None:
            self._up.transport.abort()  # never wait on a hypervisor that stopped reading
        self.browser.close(ending.code, ending.reason)
        self.on_end(self)

    def _judge_guess(self, ending: Ending) -> None:
        """A hypervisor that broke a handshake before answering a pipelined opening may not
        take early input (it may read in lock-step): it is never pipelined again. Refusals
        (4501), an unreachable host (4500), the browser leaving and the browser's own protocol
        errors (4502 too) say nothing about that."""
        upstream, offers = self._upstream, self._offers
        if self.relaying or upstream is None or offers is None or not upstream.guess_unheard:
            return
        if self._browser_at_fault:
            return
        if ending.code == Close.TARGET_PROTOCOL_ERROR:
            offers.never(self.claims.host, self.claims.port)
            offers.outcomes["refused"] += 1

    def browser_backlogged(self, backlogged: bool) -> None:
        """The browser's socket stopped (or resumed) taking data: so does reading the hypervisor."""
        self._backlogged = backlogged
        self._steer_upstream()

    def browser_closed(self, code: int) -> None:
        """1000-4999 from the browser's Close, 1005 for a Close without a code, 1006 for none."""
        self.finish(Ending(code, "browser_closed", "the browser closed the websocket"))
