"""Session rules that no real server can be made to break on cue, checked on the session itself."""

from __future__ import annotations

import asyncio
import select
import socket
import time
from collections.abc import Iterator

import pytest

from console_proxy import rfb, token
from console_proxy.config import ProxyConfig
from console_proxy.relay import ConsoleSession, SessionEnded


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


def test_plaintext_waiting_when_tls_starts_ends_the_session() -> None:
    """Bytes the server sent after agreeing to VeNCrypt TLS but before the TLS handshake began
    (held while the session went to start it) must never be fed to the handshake as if they had
    been decrypted: a man in the middle could inject a SecurityResult or a ServerInit that way."""
    async def scenario() -> SessionEnded:
        claims = token.new_claims(host="127.0.0.1", port=5900, now=time.time(), ttl=60)
        session = ConsoleSession(claims, ProxyConfig(), QuietBrowser(), "127.0.0.1",
                                 on_open=lambda _s: None, on_end=lambda _s: None)
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
    claims = token.new_claims(host=host, port=port, now=time.time(), ttl=60)
    session = ConsoleSession(claims, config, QuietBrowser(), "127.0.0.1",
                             on_open=lambda _s: None, on_end=done.set_result)
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


def test_a_connect_that_never_completes_ends_at_the_connect_timeout(full_listener: int) -> None:
    code, reason, detail, seconds = ending_of("127.0.0.1", full_listener,
                                              ProxyConfig(connect_timeout=0.5, handshake_timeout=5.0))
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
