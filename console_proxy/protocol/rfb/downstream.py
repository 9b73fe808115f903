"""Server side of RFB towards the browser: RFB 3.8 offered, security type None only.

Same style as the upstream handshake (h11-like): states are an enum, each state has one step
method in a table, and ``feed`` runs steps while enough bytes are buffered.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import ClassVar

from console_proxy.protocol.buffer import Buffer
from console_proxy.protocol.rfb.errors import RfbError
from console_proxy.protocol.rfb.stepping import feed_bounded, run_steps
from console_proxy.protocol.rfb.wire import (
    MAX_PENDING,
    SEC_NONE,
    U32,
    V3_3,
    V3_7,
    V3_8,
    ClientInitReceived,
    DownstreamAction,
    Send,
    parse_version,
    version_line,
)

__all__ = ["DownstreamHandshake"]


class _Down(enum.Enum):
    """States of the downstream (server-side) handshake, in the order they occur."""

    VERSION = enum.auto()
    SECURITY_CHOICE = enum.auto()
    CLIENT_INIT = enum.auto()
    DONE = enum.auto()


class DownstreamHandshake:
    """Server side of RFB towards the browser: RFB 3.8 offered, security type None only.

    The browser already proved itself with the token, and the target password must never reach
    it, so None is the only honest offer. A client may answer 3.8, 3.7 or 3.3 (3.5 counts as
    3.3, per the spec); each gets exactly its version's sequence: 3.8 a type list and a
    SecurityResult, 3.7 a type list and no SecurityResult for None, 3.3 the u32 type. Any other
    version, a choice other than None, or stray bytes before ClientInit are protocol errors.

    Under 3.8 the SecurityResult (OK) leaves with the type list, before the browser's choice:
    with None the only type offered there is nothing to decide, and a browser reads its stream
    in order, so it finds the result waiting and sends ClientInit a round trip sooner. A choice
    other than None still ends the handshake (the result said OK, the connection then closes).
    """

    def __init__(self) -> None:
        self._buf = Buffer(MAX_PENDING)
        self._state = _Down.VERSION
        self._version = V3_8

    def __repr__(self) -> str:
        return f"<DownstreamHandshake state={self._state.name}>"

    @property
    def version(self) -> tuple[int, int]:
        """The RFB version the browser chose (meaningful after its version line)."""
        return self._version

    def initiate(self) -> bytes:
        """The server's opening line, to write as soon as the websocket is up."""
        return version_line(V3_8)

    def feed(self, data: bytes) -> list[DownstreamAction]:
        """Take bytes from the browser; return what to do next. Raises RfbError."""
        if self._state is _Down.DONE:
            raise RuntimeError("downstream handshake already finished")
        return feed_bounded(self._buf, data, self._run)

    def _run(self) -> list[DownstreamAction]:
        """Step through states while enough bytes are buffered for the next one."""
        return run_steps(self, lambda: self._STEPS.get(self._state))

    def _on_version(self) -> list[DownstreamAction] | None:
        line = self._buf.take(12)
        if line is None:
            return None
        version = parse_version(line)
        if version in (V3_3, (3, 5)):
            self._version = V3_3
            self._state = _Down.CLIENT_INIT
            return [Send(U32.pack(SEC_NONE))]
        if version not in (V3_7, V3_8):
            raise RfbError.protocol(f"client asked for RFB {version[0]}.{version[1]}")
        self._version = version
        self._state = _Down.SECURITY_CHOICE
        return [Send(bytes([1, SEC_NONE]) + (U32.pack(0) if version == V3_8 else b""))]

    def _on_security_choice(self) -> list[DownstreamAction] | None:
        raw = self._buf.take(1)
        if raw is None:
            return None
        if raw[0] != SEC_NONE:
            raise RfbError.protocol(f"client chose security type {raw[0]}, only None offered")
        self._state = _Down.CLIENT_INIT
        return []  # a 3.8 SecurityResult left with the type list

    def _on_client_init(self) -> list[DownstreamAction] | None:
        raw = self._buf.take(1)
        if raw is None:
            return None
        self._state = _Down.DONE
        return [ClientInitReceived(shared=raw != b"\x00", rest=self._buf.take_all())]

    _STEPS: ClassVar[dict[_Down, Callable[[DownstreamHandshake], list[DownstreamAction] | None]]] = {
        _Down.VERSION: _on_version,
        _Down.SECURITY_CHOICE: _on_security_choice,
        _Down.CLIENT_INIT: _on_client_init,
    }
