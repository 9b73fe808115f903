"""Session rules that no real server can be made to break on cue, checked on the session itself."""

from __future__ import annotations

import asyncio
import time

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
