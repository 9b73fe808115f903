"""RFC 6455 for the proxy's server side, sans I/O: the upgrade's checks and the frame codec.

Why our own and not Tornado's ``WebSocketHandler``: a console is a byte stream, and Tornado's
frame reader costs several futures and loop turns per message plus an epoll re-registration
per read — measured as most of the proxy's latency for a keystroke. Here a received chunk is
parsed in one call (the shell owns the socket); the codec never touches a socket or a clock,
in the style of wsproto, so every branch is a plain test over byte strings.

What the proxy needs of the protocol, and no more: binary messages are a stream (fragments are
passed on as they come, never reassembled), text is refused (RFB is binary), pings are answered,
the close handshake is honoured, and every violation is a :class:`WsError` carrying its close
code. No extension is ever negotiated, so any RSV bit is an error. Buffering is bounded by one
frame, and a frame longer than ``max_frame`` is refused from its header (1009).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from console_proxy import codes
from console_proxy.protocol.buffer import Buffer

try:
    from tornado.speedups import websocket_mask as _mask  # C, installed with tornado
except ImportError:  # pragma: no cover - tornado built without its extension

    def _mask(mask: bytes, data: bytes) -> bytes:
        n = len(data)
        key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
        return (int.from_bytes(data, "big") ^ key).to_bytes(n, "big")


__all__ = [
    "Close",
    "FrameReader",
    "Ping",
    "Pong",
    "UpgradeError",
    "WsError",
    "accept_value",
    "binary_header",
    "check_upgrade",
    "close_frame",
    "frame",
]

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
PROTOCOL_ERROR, UNSUPPORTED_DATA, NO_STATUS, INVALID_DATA, TOO_BIG = (
    codes.Close.PROTOCOL_ERROR,
    codes.Close.UNSUPPORTED_DATA,
    codes.Close.NO_STATUS,
    codes.Close.INVALID_DATA,
    codes.Close.MESSAGE_TOO_BIG,
)
MAX_CONTROL = 125
#: Close codes a peer may send (RFC 6455 7.4): 1000-1003, 1007-1011, 3000-4999.
_SENDABLE = frozenset((1000, 1001, 1002, 1003, *range(1007, 1012)))


class WsError(Exception):
    """A protocol violation by the browser; ``code`` is the close code to answer with."""

    def __init__(self, code: codes.Close, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class UpgradeError(Exception):
    """An HTTP request that cannot become this websocket: answered with ``status``."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code


@dataclass(frozen=True, slots=True)
class Ping:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Close:
    code: int | None
    reason: str


Event = bytes | Ping | Pong | Close


def _tokens(value: str) -> set[str]:
    return {part.strip().lower() for part in value.split(",")}


def check_upgrade(headers: Mapping[str, str]) -> str:
    """The ``Sec-WebSocket-Key`` of a valid version-13 upgrade request, else UpgradeError."""
    if headers.get("Upgrade", "").strip().lower() != "websocket" or "upgrade" not in _tokens(
        headers.get("Connection", "")
    ):
        raise UpgradeError(400, "websocket_required", "not a websocket upgrade request")
    if headers.get("Sec-WebSocket-Version", "").strip() != "13":
        raise UpgradeError(426, "websocket_version", "only websocket version 13 is spoken")
    key = headers.get("Sec-WebSocket-Key", "").strip()
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 16:
        raise UpgradeError(400, "websocket_required", "Sec-WebSocket-Key is not 16 bytes of base64")
    return key


def accept_value(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's key (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + GUID).digest()).decode("ascii")


def _header(opcode: int, size: int) -> bytes:
    """The header of one unmasked, final frame of ``size`` bytes (2, 4 or 10 bytes)."""
    if size < 126:
        return bytes((0x80 | opcode, size))
    if size < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, size)
    return struct.pack("!BBQ", 0x80 | opcode, 127, size)


_SMALL_BINARY = tuple(_header(OP_BINARY, size) for size in range(126))


def binary_header(size: int) -> bytes:
    """The header of one final binary frame; precomputed for small sizes (keystrokes, handshakes)."""
    return _SMALL_BINARY[size] if size < 126 else _header(OP_BINARY, size)


def frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked, final server frame."""
    return _header(opcode, len(payload)) + payload


def close_frame(code: int | None, reason: str = "") -> bytes:
    """A Close frame; the reason is cut to fit a control frame, on a character boundary."""
    if code is None:
        return frame(OP_CLOSE, b"")
    data = reason.encode("utf-8")
    while len(data) > MAX_CONTROL - 2:
        reason = reason[:-1]
        data = reason.encode("utf-8")
    return frame(OP_CLOSE, struct.pack("!H", code) + data)


def _close_event(payload: bytes) -> Close:
    if not payload:
        return Close(None, "")
    if len(payload) == 1:
        raise WsError(PROTOCOL_ERROR, "a close frame with a one-byte payload")
    (code,) = struct.unpack_from("!H", payload)
    if code not in _SENDABLE and not 3000 <= code <= 4999:
        raise WsError(PROTOCOL_ERROR, f"close code {code} may not be sent")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise WsError(INVALID_DATA, "a close reason that is not UTF-8") from None
    return Close(code, reason)


class FrameReader:
    """Masked client frames in; binary payload bytes and control events out, in order.

    ``feed`` returns whatever is complete: ``bytes`` for binary data (first frame or
    continuation of a binary message), :class:`Ping`, :class:`Pong`, :class:`Close`. After a
    Close, or after a :class:`WsError`, the reader takes nothing more.
    """

    def __init__(self, max_frame: int) -> None:
        self._max = max_frame
        self._buf = Buffer()  # an incomplete frame, appended to (amortised, never re-copied)
        self._need = 0  # bytes ``_buf`` must hold before parsing is worth trying again
        self._fragmented = False  # inside a binary message whose final frame has not come
        self._done = False

    def feed(self, data: bytes) -> list[Event]:
        if self._done:
            return []
        if len(self._buf):
            self._buf.append(data)
            if len(self._buf) < self._need:
                return []
            buf = self._buf.take_all()
        else:
            buf = data
        events: list[Event] = []
        start, end = 0, len(buf)
        try:
            while start < end:
                parsed = self._frame(buf, start, end)
                if parsed is None:
                    self._buf.append(buf[start:])
                    break
                start, event = parsed
                if event is not None:
                    events.append(event)
                if self._done:
                    break
        except WsError:
            self._done = True
            self._buf.take_all()  # dropped: nothing more is read
            raise
        return events

    def _frame(self, buf: bytes, start: int, end: int) -> tuple[int, Event | None] | None:
        """One frame at ``start``: (where the next begins, its event), or None if incomplete
        (then ``_need`` says how many bytes from ``start`` it takes, as far as known)."""
        if end - start < 2:
            self._need = 2
            return None
        b0, b1 = buf[start], buf[start + 1]
        if b0 & 0x70:
            raise WsError(PROTOCOL_ERROR, "reserved bits set: no extension was negotiated")
        if not b1 & 0x80:
            raise WsError(PROTOCOL_ERROR, "an unmasked client frame")
        opcode, size, at = b0 & 0x0F, b1 & 0x7F, start + 2
        if size == 126:
            if end - at < 2:
                self._need = 4
                return None
            (size,) = struct.unpack_from("!H", buf, at)
            at += 2
        elif size == 127:
            if end - at < 8:
                self._need = 10
                return None
            (size,) = struct.unpack_from("!Q", buf, at)
            at += 8
        self._check_header(opcode, bool(b0 & 0x80), size)
        if end - at < 4 + size:
            self._need = at - start + 4 + size
            return None
        payload = _mask(buf[at : at + 4], buf[at + 4 : at + 4 + size]) if size else b""
        return at + 4 + size, self._event(opcode, bool(b0 & 0x80), payload)

    def _check_header(self, opcode: int, final: bool, size: int) -> None:
        if opcode >= 0x8:
            if opcode not in (OP_CLOSE, OP_PING, OP_PONG):
                raise WsError(PROTOCOL_ERROR, f"unknown control opcode {opcode}")
            if not final or size > MAX_CONTROL:
                raise WsError(PROTOCOL_ERROR, "a fragmented or oversized control frame")
            return
        if opcode == OP_TEXT:
            raise WsError(UNSUPPORTED_DATA, "text frames are not RFB")
        if opcode == OP_CONTINUATION and not self._fragmented:
            raise WsError(PROTOCOL_ERROR, "a continuation frame outside a message")
        if opcode == OP_BINARY and self._fragmented:
            raise WsError(PROTOCOL_ERROR, "a new message before the last one ended")
        if opcode not in (OP_CONTINUATION, OP_BINARY):
            raise WsError(PROTOCOL_ERROR, f"unknown data opcode {opcode}")
        if size > self._max:
            raise WsError(TOO_BIG, f"a frame of {size} bytes exceeds the {self._max} byte limit")

    def _event(self, opcode: int, final: bool, payload: bytes) -> Event | None:
        if opcode <= OP_BINARY:
            self._fragmented = not final
            return payload or None
        if opcode == OP_PING:
            return Ping(payload)
        if opcode == OP_PONG:
            return Pong(payload)
        self._done = True
        return _close_event(payload)
