"""Clipboard policy at the proxy: the token's ``clip`` claim, enforced on the RFB streams.

``clip`` says which way cut text may flow: ``in`` (browser -> VM, ClientCutText), ``out``
(VM -> browser, ServerCutText), ``both`` (the default, and what a token without the claim
means) or ``none``. Enforcement is byte-exact on the wire, not advice to the viewer:

- Browser -> VM: the client framer already cuts whole messages; ClientCutText is dropped unless
  ``in`` is allowed, and a cut text above the size limit is dropped (never buffered) and counted.
- VM -> browser: when ``out`` is allowed the server's bytes are relayed unparsed (the fast path,
  unchanged). When it is not, the proxy must find ServerCutText in the stream, so it
  (1) rewrites the browser's SetEncodings to encodings whose length is cheap to know (Raw,
  CopyRect, Zlib, ZRLE and pseudo-encodings of known size), (2) tracks the pixel format for
  Raw and Cursor sizes, and (3) frames server messages with :class:`ServerMessageFramer`,
  which passes everything through except cut text, holding at most one small header.
- Extended clipboard (pseudo-encoding 0xC0A1E5CE) is stripped from SetEncodings whenever the
  policy is not ``both``, so only classic, directional cut text flows; extended client cut text
  (negative length) is dropped unless ``in`` is allowed.

Pure code: bytes in, bytes out; nothing here touches a socket.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Generator
from dataclasses import dataclass

from console_proxy.protocol.rfb import RfbError

__all__ = [
    "CLIENT_CUT_TEXT",
    "CLIP_VALUES",
    "ClipPolicy",
    "ClipboardGate",
    "ServerMessageFramer",
    "filter_set_encodings",
    "parse_clip",
]

#: The values the ``clip`` claim may take; absent means ``both``.
CLIP_VALUES = ("none", "in", "out", "both")

CLIENT_SET_PIXEL_FORMAT = 0
CLIENT_SET_ENCODINGS = 2
CLIENT_CUT_TEXT = 6

SERVER_FRAMEBUFFER_UPDATE = 0
SERVER_SET_COLOUR_MAP = 1
SERVER_BELL = 2
SERVER_CUT_TEXT = 3
SERVER_END_OF_CONTINUOUS_UPDATES = 150
SERVER_FENCE = 248
SERVER_XVP = 250


class Encoding(enum.IntEnum):
    """Encodings and pseudo-encodings the proxy can frame (signed 32-bit values, as on the wire)."""

    RAW = 0
    COPY_RECT = 1
    ZLIB = 6
    ZRLE = 16
    DESKTOP_SIZE = -223
    LAST_RECT = -224
    CURSOR = -239
    X_CURSOR = -240
    QEMU_POINTER_MOTION_CHANGE = -257
    QEMU_EXTENDED_KEY_EVENT = -258
    QEMU_LED_STATE = -261
    DESKTOP_NAME = -307
    EXTENDED_DESKTOP_SIZE = -308
    XVP = -309
    FENCE = -312
    CONTINUOUS_UPDATES = -313


#: The extended clipboard pseudo-encoding, 0xC0A1E5CE as a signed 32-bit value.
EXTENDED_CLIPBOARD = 0xC0A1E5CE - (1 << 32)
#: Quality (-32..-23) and compression (-256..-247) levels: hints only, no rectangle ever carries them.
_LEVELS = frozenset(range(-32, -22)) | frozenset(range(-256, -246))
#: What a client may ask for when the proxy frames the server's messages.
FRAMEABLE = frozenset(int(e) for e in Encoding) | _LEVELS
#: Longest desktop name the framer passes on (RFB servers send short ones; ServerInit caps at 64 KiB).
MAX_DESKTOP_NAME = 64 * 1024

_S32 = struct.Struct(">i")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_RECT = struct.Struct(">HHHHi")


@dataclass(frozen=True)
class ClipPolicy:
    """The ``clip`` claim as the relay uses it: which directions cut text may take."""

    allow_in: bool
    allow_out: bool

    @property
    def both(self) -> bool:
        return self.allow_in and self.allow_out

    @property
    def name(self) -> str:
        return _CLIP_NAMES[self.allow_in, self.allow_out]

    def encoding_allowed(self, encoding: int) -> bool:
        """Whether the browser may announce ``encoding`` to the VM under this policy."""
        if encoding == EXTENDED_CLIPBOARD:
            return self.both
        return self.allow_out or encoding in FRAMEABLE


#: The claim word of each (allow_in, allow_out).
_CLIP_NAMES = {(True, True): "both", (True, False): "in", (False, True): "out", (False, False): "none"}


def parse_clip(value: str | None) -> ClipPolicy:
    """The policy of a ``clip`` claim (None: absent, which means ``both``); ValueError if unknown."""
    if value is None or value == "both":
        return ClipPolicy(allow_in=True, allow_out=True)
    if value == "none":
        return ClipPolicy(allow_in=False, allow_out=False)
    if value == "in":
        return ClipPolicy(allow_in=True, allow_out=False)
    if value == "out":
        return ClipPolicy(allow_in=False, allow_out=True)
    raise ValueError(f"claim 'clip' must be one of {', '.join(CLIP_VALUES)}")


def filter_set_encodings(message: bytes, policy: ClipPolicy) -> bytes:
    """A whole SetEncodings message with the encodings ``policy`` forbids removed (order kept)."""
    count = _U16.unpack_from(message, 2)[0]
    kept = [
        raw
        for raw in (message[4 + 4 * i : 8 + 4 * i] for i in range(count))
        if policy.encoding_allowed(_S32.unpack(raw)[0])
    ]
    if len(kept) == count:
        return message
    return message[:2] + _U16.pack(len(kept)) + b"".join(kept)


def bits_per_pixel(set_pixel_format: bytes) -> int:
    """The bits per pixel a whole SetPixelFormat message asks for; RfbError if RFB forbids it."""
    bpp = set_pixel_format[4]
    if bpp not in (8, 16, 32):
        raise RfbError.protocol(f"the browser asked for {bpp} bits per pixel")
    return bpp


@dataclass(frozen=True)
class _Read:
    """Collect ``n`` header bytes and hand them to the parser (nothing is emitted by itself)."""

    n: int


@dataclass(frozen=True)
class _Emit:
    """Pass these (header) bytes on to the browser."""

    data: bytes


@dataclass(slots=True)
class _Pass:
    """Pass the next ``n`` bytes of the stream on, unbuffered (``n`` counts down as they go)."""

    n: int


@dataclass(slots=True)
class _Skip:
    """Drop the next ``n`` bytes of the stream, unbuffered (``n`` counts down as they go)."""

    n: int


_Op = _Read | _Emit | _Pass | _Skip
_Parser = Generator[_Op, bytes, None]


class ServerMessageFramer:
    """Finds the message boundaries of the server -> browser stream and drops ServerCutText.

    Used only when the policy forbids ``out`` (and the SetEncodings it saw were restricted by
    :func:`filter_set_encodings`). ``feed`` returns the bytes to relay, in order: everything
    but cut text. Payloads are passed or skipped as they stream by; only headers (at most 12
    bytes at a time) are held, so memory stays bounded whatever the server announces. An
    unknown message type or a rectangle in an encoding nobody asked for cannot be skipped
    safely: RfbError (the session ends with 4502, failing closed).

    ``bits_per_pixel`` starts as the ServerInit's and follows the browser's SetPixelFormat
    (:meth:`set_bits_per_pixel`), which RFB servers apply to the updates that follow it.
    ``dropped`` counts the cut texts removed.
    """

    def __init__(self, bits_per_pixel: int) -> None:
        self.bytes_per_pixel = bits_per_pixel // 8
        self.dropped = 0
        self._head = bytearray()
        self._parser = self._messages()
        self._op: _Op = next(self._parser)

    def set_bits_per_pixel(self, bits: int) -> None:
        self.bytes_per_pixel = bits // 8

    def feed(self, data: bytes | memoryview) -> bytes:
        """Take the server's bytes; return those to relay to the browser. Raises RfbError."""
        out = bytearray()
        view = memoryview(data)
        pos, end = 0, len(view)
        try:
            while True:
                op = self._op
                if isinstance(op, _Emit):
                    out += op.data
                    self._op = next(self._parser)
                elif isinstance(op, _Read):
                    take = min(op.n - len(self._head), end - pos)
                    self._head += view[pos : pos + take]
                    pos += take
                    if len(self._head) < op.n:
                        break
                    head = bytes(self._head)
                    self._head.clear()
                    self._op = self._parser.send(head)
                elif op.n == 0:
                    self._op = next(self._parser)
                elif pos == end:
                    break
                else:
                    take = min(op.n, end - pos)
                    if isinstance(op, _Pass):
                        out += view[pos : pos + take]
                    pos += take
                    op.n -= take  # each op is the parser's fresh one: counting it down is safe
        finally:
            view.release()
        return bytes(out)

    def _messages(self) -> _Parser:
        """The server's messages, one after the other, forever (a generator of framing steps)."""
        while True:
            kind = (yield _Read(1))[0]
            if kind == SERVER_CUT_TEXT:
                head = yield _Read(7)
                self.dropped += 1
                yield _Skip(abs(_S32.unpack_from(head, 3)[0]))
            elif kind == SERVER_FRAMEBUFFER_UPDATE:
                yield from self._framebuffer_update()
            elif kind in _FIXED:
                yield _Emit(bytes([kind]))
                yield _Pass(_FIXED[kind] - 1)
            elif kind == SERVER_SET_COLOUR_MAP:
                head = yield _Read(5)
                yield _Emit(bytes([kind]) + head)
                yield _Pass(6 * _U16.unpack_from(head, 3)[0])
            elif kind == SERVER_FENCE:
                head = yield _Read(8)
                yield _Emit(bytes([kind]) + head)
                yield _Pass(head[7])
            else:
                raise RfbError.protocol(f"the console server sent message type {kind}, which the proxy cannot frame")

    def _framebuffer_update(self) -> _Parser:
        head = yield _Read(3)
        yield _Emit(bytes([SERVER_FRAMEBUFFER_UPDATE]) + head)
        for _ in range(_U16.unpack_from(head, 1)[0]):
            rect = yield _Read(_RECT.size)
            yield _Emit(rect)
            _, _, width, height, encoding = _RECT.unpack(rect)
            if encoding == Encoding.LAST_RECT:
                return
            yield from self._rectangle(width, height, encoding)

    def _rectangle(self, width: int, height: int, encoding: int) -> _Parser:
        """One rectangle's payload, passed on; its length from the encoding and the pixel format."""
        if encoding == Encoding.RAW:
            yield _Pass(width * height * self.bytes_per_pixel)
        elif encoding == Encoding.COPY_RECT:
            yield _Pass(4)
        elif encoding in (Encoding.ZLIB, Encoding.ZRLE):
            yield from self._prefixed()
        elif encoding == Encoding.DESKTOP_NAME:
            yield from self._prefixed(limit=MAX_DESKTOP_NAME)
        elif encoding == Encoding.CURSOR:
            yield _Pass(width * height * self.bytes_per_pixel + (width + 7) // 8 * height)
        elif encoding == Encoding.X_CURSOR:
            yield _Pass(6 + 2 * ((width + 7) // 8) * height if width * height else 0)
        elif encoding == Encoding.EXTENDED_DESKTOP_SIZE:
            head = yield _Read(4)
            yield _Emit(head)
            yield _Pass(16 * head[0])
        elif encoding == Encoding.QEMU_LED_STATE:
            yield _Pass(1)
        elif encoding not in _EMPTY_RECTS:
            raise RfbError.protocol(
                f"the console server sent a rectangle in encoding {encoding}, which was not asked for"
            )

    def _prefixed(self, limit: int | None = None) -> _Parser:
        head = yield _Read(4)
        length = _U32.unpack(head)[0]
        if limit is not None and length > limit:
            raise RfbError.protocol(f"the console server sent a desktop name of {length} bytes")
        yield _Emit(head)
        yield _Pass(length)


#: Server messages of a fixed total length (type byte included).
_FIXED = {SERVER_BELL: 1, SERVER_END_OF_CONTINUOUS_UPDATES: 1, SERVER_XVP: 4}
#: Pseudo-encodings whose rectangles carry no payload.
_EMPTY_RECTS = frozenset(
    {
        Encoding.DESKTOP_SIZE,
        Encoding.QEMU_EXTENDED_KEY_EVENT,
        Encoding.QEMU_POINTER_MOTION_CHANGE,
        Encoding.FENCE,
        Encoding.CONTINUOUS_UPDATES,
    }
)


#: Why cut text was dropped, as the metric's ``reason`` label: the policy, or the size limit.
POLICY, TOO_LARGE = "policy", "too_large"


class ClipboardGate:
    """One session's clipboard enforcement, between the relay's framers and the sockets.

    ``dropped`` counts cut texts removed, by (direction, reason): ``in``/``out`` and
    ``policy``/``too_large``. The relay calls :meth:`from_browser` with the client framer's
    whole messages, :meth:`opened` once ServerInit is known, and, only when
    :attr:`frames_server` is set, :meth:`from_server` with the server's bytes.
    """

    def __init__(self, policy: ClipPolicy) -> None:
        self.policy = policy
        self.dropped: dict[tuple[str, str], int] = {}
        self._server: ServerMessageFramer | None = None

    @property
    def frames_server(self) -> bool:
        """True once opened under a policy without ``out``: the server's bytes need framing."""
        return self._server is not None

    def opened(self, bits_per_pixel: int) -> None:
        """The ServerInit's pixel format is known: start framing the server if ``out`` is forbidden."""
        if not self.policy.allow_out:
            self._server = ServerMessageFramer(bits_per_pixel)

    def from_browser(self, messages: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        """The browser's messages as the VM may see them: cut text by policy and size, encodings
        restricted, pixel format followed. Messages of other types pass as they are."""
        kept: list[tuple[int, bytes]] = []
        for kind, message in messages:
            if kind == CLIENT_CUT_TEXT:
                if not message:  # the framer's marker for a cut text above the size limit
                    self._count("in", TOO_LARGE)
                    continue
                if not self.policy.allow_in or (not self.policy.both and _S32.unpack_from(message, 4)[0] < 0):
                    self._count("in", POLICY)
                    continue
            elif kind == CLIENT_SET_ENCODINGS and not self.policy.both:
                message = filter_set_encodings(message, self.policy)
            elif kind == CLIENT_SET_PIXEL_FORMAT and self._server is not None:
                self._server.set_bits_per_pixel(bits_per_pixel(message))
            kept.append((kind, message))
        return kept

    def from_server(self, data: bytes | memoryview) -> bytes:
        """The server's bytes to relay, ServerCutText removed (only while :attr:`frames_server`)."""
        assert self._server is not None
        before = self._server.dropped
        out = self._server.feed(data)
        if self._server.dropped != before:
            self._count("out", POLICY, self._server.dropped - before)
        return out

    def _count(self, direction: str, reason: str, amount: int = 1) -> None:
        key = (direction, reason)
        self.dropped[key] = self.dropped.get(key, 0) + amount
