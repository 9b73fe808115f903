"""Session rules that no real server can be made to break on cue, checked on the session itself."""

from __future__ import annotations

import asyncio
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator

import pytest

from console_proxy import token
from console_proxy.config import ProxyConfig
from console_proxy.protocol import rfb
from console_proxy.relay import ConsoleSession, Ending, SessionEnded


class QuietBrowser:
    """The browser side of a session that never gets that far."""

    def send(self, data: bytes) -> None:
        pass

    def send_framed(self, buffer: bytearray, size: int) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self, code: int, reason: str) -> None:
        pass

    def watch_held(self) -> None:
        pass

    def when_gone(self, callback: object) -> None:
        pass


def new_session(
    port: int,
    config: ProxyConfig,
    *,
    host: str = "127.0.0.1",
    view_only: bool = False,
    on_open: Callable[[ConsoleSession], object] = lambda _s: None,
    on_end: Callable[[ConsoleSession], object] = lambda _s: None,
) -> ConsoleSession:
    """A session (not started) for a fresh token to ``host:port``, its browser a QuietBrowser."""
    claims = token.new_claims(host=host, port=port, now=time.time(), ttl=60, view_only=view_only)
    return ConsoleSession(claims, config, QuietBrowser(), "127.0.0.1", on_open=on_open, on_end=on_end)


def test_plaintext_waiting_when_tls_starts_ends_the_session() -> None:
    """Bytes the server sent after agreeing to VeNCrypt TLS but before the TLS handshake began
    (held while the session went to start it) must never be fed to the handshake as if they had
    been decrypted: a man in the middle could inject a SecurityResult or a ServerInit that way."""

    async def scenario() -> SessionEnded:
        session = new_session(5900, ProxyConfig())
        session.handshake_bytes(memoryview(b"\0\0\0\0"))  # a forged SecurityResult OK, in clear
        with pytest.raises(SessionEnded) as ended:
            await session._start_tls(rfb.StartTls(verify=False))
        return ended.value

    ended = asyncio.run(scenario())
    assert (ended.ending.code, ended.ending.reason) == (4502, "target_protocol_error")
    assert "plaintext" in ended.ending.detail


# --- connecting to the hypervisor (console_proxy.dial: no wait for the TCP handshake) ----------------


async def session_to(host: str, port: int, config: ProxyConfig) -> ConsoleSession:
    """A started session to ``host:port``; it reports its end on the loop's ``ended`` future."""
    done: asyncio.Future[ConsoleSession] = asyncio.get_running_loop().create_future()
    session = new_session(port, config, host=host, on_end=done.set_result)
    session.start()
    await asyncio.wait_for(asyncio.shield(done), 10)
    return session


def ending_of(host: str, port: int, config: ProxyConfig) -> tuple[int, str, str, float]:
    async def scenario() -> tuple[int, str, str, float]:
        started = time.monotonic()
        session = await session_to(host, port, config)
        assert session.ending is not None
        return session.ending.code, session.ending.reason, session.ending.detail, time.monotonic() - started

    return asyncio.run(scenario())


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_nothing_listening_is_unreachable_at_once() -> None:
    """The connect fails after the session's transport exists (dial does not wait for it): the
    read error must still read as "cannot connect" (4500), not as a server that hung up (4502)."""
    code, reason, detail, seconds = ending_of("127.0.0.1", unused_port(), ProxyConfig(connect_timeout=5.0))
    assert (code, reason, detail) == (4500, "target_unreachable", "cannot connect to the console server")
    assert seconds < 2.0


@pytest.fixture
def full_listener() -> Iterator[int]:
    """A port whose accept queue is full (backlog 0, one connection never accepted): Linux drops
    further SYNs, so a connect there stays pending until someone gives up."""
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        filler.connect(("127.0.0.1", port))
        with socket.socket() as probe:
            probe.setblocking(False)
            probe.connect_ex(("127.0.0.1", port))
            _, writable, _ = select.select([], [probe], [], 0.3)
            assert not writable, "this kernel completed a connect to a full accept queue"
        yield port


@pytest.mark.parametrize(
    ("connect_timeout", "handshake_timeout"),
    [(0.5, 5.0), (5.0, 0.5)],
    ids=["connect-deadline-first", "handshake-deadline-first"],
)
def test_a_connect_that_never_completes_ends_as_unreachable(
    full_listener: int, connect_timeout: float, handshake_timeout: float
) -> None:
    """Whichever deadline comes first, a target that never answered the connect is unreachable
    (4500), not a protocol error."""
    config = ProxyConfig(connect_timeout=connect_timeout, handshake_timeout=handshake_timeout)
    code, reason, detail, seconds = ending_of("127.0.0.1", full_listener, config)
    assert (code, reason, detail) == (4500, "target_unreachable", "connecting to the console server timed out")
    assert 0.4 <= seconds < 2.0


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_server_that_accepts_and_stays_silent_is_the_handshake_timeouts(host: str) -> None:
    """Connected but silent past the connect timeout: the connect deadline sees the connection
    made and leaves the session to the handshake deadline (4502), by address (dial's path) and
    by name (asyncio's)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        code, reason, detail, seconds = ending_of(host, port, ProxyConfig(connect_timeout=0.3, handshake_timeout=1.2))
    assert (code, reason) == (4502, "target_protocol_error"), detail
    assert "did not finish in time" in detail
    assert 1.1 <= seconds < 3.0


# --- the end of the handshake, against a scripted console server (no real one can be timed so) -----

PIXEL_FORMAT = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)


class ScriptedServer:
    """A console server with security None that sends ServerInit once it has the ClientInit, then
    hangs up if told to; it records the ClientInit's shared flag."""

    def __init__(self, hang_up: bool) -> None:
        self.hang_up = hang_up
        self.shared: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"RFB 003.008\n")
        await reader.readexactly(12)
        writer.write(b"\x01\x01")  # one security type: None
        await reader.readexactly(1)
        writer.write(b"\x00\x00\x00\x00")
        self.shared.set_result((await reader.readexactly(1))[0])
        writer.write(struct.pack(">HH16sI", 800, 600, PIXEL_FORMAT, 0))
        if self.hang_up:
            writer.close()
            return
        await reader.read()  # hold it open until the proxy leaves

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def __aexit__(self, *_exc: object) -> None:
        self.server.close()


def browser_handshake(session: ConsoleSession, shared: int) -> None:
    session.from_browser(b"RFB 003.008\n")
    session.from_browser(b"\x01")  # security None
    session.from_browser(bytes([shared]))  # ClientInit


def test_a_server_that_hangs_up_before_the_browser_is_ready_never_opens_a_session() -> None:
    """Shared mode asks for ServerInit before the browser's ClientInit; a server that sends it
    and hangs up meanwhile must end the session with 4502 when the ClientInit comes, not open it
    (an "opened" event) and then end it as a normal 1000."""

    async def scenario() -> tuple[Ending | None, list[ConsoleSession]]:
        script = ScriptedServer(hang_up=True)
        async with script as port:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            opened: list[ConsoleSession] = []
            session = new_session(
                port, ProxyConfig(shared=True), on_open=opened.append, on_end=lambda _s: done.set_result(None)
            )
            lost = asyncio.Event()
            upstream_lost = session.upstream_lost
            session.upstream_lost = lambda error=None: (upstream_lost(error), lost.set())  # type: ignore[method-assign]
            session.start()
            await asyncio.wait_for(lost.wait(), 10)
            browser_handshake(session, shared=1)
            await asyncio.wait_for(done, 10)
            return session.ending, opened

    ending, opened = asyncio.run(scenario())
    assert ending is not None and (ending.code, ending.reason) == (4502, "target_protocol_error"), ending
    assert opened == []


@pytest.mark.parametrize(("view_only", "asked", "sent"), [(True, 0, 1), (False, 0, 0), (False, 1, 1)])
def test_without_forced_sharing_a_view_only_viewer_still_asks_for_a_shared_session(
    view_only: bool, asked: int, sent: int
) -> None:
    """--no-force-shared passes the browser's flag on, but shared=0 makes the VNC server drop
    every other viewer: a view-only session must never be able to do that."""

    async def scenario() -> int:
        script = ScriptedServer(hang_up=False)
        async with script as port:
            session = new_session(port, ProxyConfig(shared=False), view_only=view_only)
            session.start()
            browser_handshake(session, shared=asked)
            flag = await asyncio.wait_for(script.shared, 10)
            session.finish(Ending.of(1000, "test over"))
            return flag

    assert asyncio.run(scenario()) == sent


class RecordingBrowser(QuietBrowser):
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)


@pytest.mark.parametrize("browser_first", [True, False])
def test_the_session_opens_once_whichever_serverinit_or_clientinit_comes_last(browser_first: bool) -> None:
    """Opening happens in the read callback of whichever side finishes last (not a loop turn
    later in the handshake coroutine): once, with ServerInit sent to the browser once."""

    async def scenario() -> tuple[list[ConsoleSession], list[bytes], Ending | None]:
        script = ScriptedServer(hang_up=False)
        async with script as port:
            opened: list[ConsoleSession] = []
            seen = asyncio.Event()
            browser = RecordingBrowser()
            claims = token.new_claims(host="127.0.0.1", port=port, now=time.time(), ttl=60)
            session = ConsoleSession(
                claims,
                ProxyConfig(shared=True),
                browser,
                "127.0.0.1",
                on_open=lambda s: (opened.append(s), seen.set()),
                on_end=lambda _s: None,
            )
            server_init = asyncio.Event()
            fed = session.handshake_bytes

            def feed(data: memoryview) -> None:
                fed(data)
                if session._ready is not None:
                    server_init.set()

            session.handshake_bytes = feed  # type: ignore[method-assign]
            session.start()
            handshake = session._task
            assert handshake is not None
            if browser_first:
                browser_handshake(session, shared=0)
            else:
                await asyncio.wait_for(server_init.wait(), 10)  # the hypervisor's ServerInit is in
                assert not opened
                browser_handshake(session, shared=0)
                assert opened, "opened in the browser's ClientInit callback, synchronously"
            await asyncio.wait_for(seen.wait(), 10)
            await asyncio.wait_for(handshake, 10)  # the handshake coroutine wakes and ends
            ending = session.ending
            session.finish(Ending.of(1000, "test over"))
            return opened, browser.sent, ending

    opened, sent, ending = asyncio.run(scenario())
    assert len(opened) == 1 and ending is None
    server_inits = [m for m in sent if m.startswith(struct.pack(">HH", 800, 600))]
    assert len(server_inits) == 1


def test_a_bug_while_opening_in_a_callback_ends_the_session_4502() -> None:
    async def scenario() -> Ending | None:
        script = ScriptedServer(hang_up=False)
        async with script as port:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def broken(_session: ConsoleSession) -> None:
                raise RuntimeError("a bug in on_open")

            session = new_session(
                port, ProxyConfig(shared=True), on_open=broken, on_end=lambda _s: done.set_result(None)
            )
            session.start()
            browser_handshake(session, shared=1)
            await asyncio.wait_for(done, 10)
            return session.ending

    ending = asyncio.run(scenario())
    assert ending is not None and (ending.code, ending.detail) == (4502, "internal error")
