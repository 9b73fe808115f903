"""Client -> server RFB messages: their sizes, which ones are input, and the framer.

The relay needs message boundaries to drop input in view-only sessions without corrupting the
stream; an unknown type cannot be skipped safely, so it is a protocol error.
"""

from __future__ import annotations

from collections.abc import Callable

from console_proxy.protocol.buffer import Buffer
from console_proxy.protocol.rfb.errors import RfbError
from console_proxy.protocol.rfb.wire import S32

__all__ = ["DROPPED_CUT_TEXT", "INPUT_MESSAGE_TYPES", "ClientMessageFramer", "client_message_size"]

#: Bytes of a message's start that always suffice to learn its size.
_SIZE_PREFIX = 12

#: Client messages a view-only session drops: key, pointer, cut text, xvp (power actions),
#: SetDesktopSize (resizes everyone's desktop) and QEMU (extended key events).
INPUT_MESSAGE_TYPES: frozenset[int] = frozenset({4, 5, 6, 250, 251, 255})

#: Fixed-size client messages: type -> total length in bytes.
_FIXED_SIZES = {0: 20, 3: 10, 4: 8, 5: 6, 150: 10, 250: 4}


def _size_set_encodings(buf: bytes) -> int | None:
    return 4 + 4 * int.from_bytes(buf[2:4], "big") if len(buf) >= 4 else None


def _size_client_cut_text(buf: bytes) -> int | None:
    """8 + |length|: a negative length announces an extended-clipboard payload of |length|."""
    return 8 + abs(S32.unpack_from(buf, 4)[0]) if len(buf) >= 8 else None


def _size_client_fence(buf: bytes) -> int | None:
    return 9 + buf[8] if len(buf) >= 9 else None


def _size_set_desktop_size(buf: bytes) -> int | None:
    return 8 + 16 * buf[6] if len(buf) >= 8 else None


def _size_qemu(buf: bytes) -> int | None:
    """QEMU (255): subtype 0 extended key event (12); subtype 1 audio, 4 or 10 (set format)."""
    if len(buf) < 2:
        return None
    if buf[1] == 0:
        return 12
    if buf[1] != 1:
        raise RfbError.protocol(f"unknown QEMU client message subtype {buf[1]}")
    if len(buf) < 4:
        return None
    operation = int.from_bytes(buf[2:4], "big")
    if operation not in (0, 1, 2):
        raise RfbError.protocol(f"unknown QEMU audio operation {operation}")
    return 10 if operation == 2 else 4


_VARIABLE_SIZES: dict[int, Callable[[bytes], int | None]] = {
    2: _size_set_encodings,
    6: _size_client_cut_text,
    248: _size_client_fence,
    251: _size_set_desktop_size,
    255: _size_qemu,
}


def client_message_size(buf: bytes) -> int | None:
    """Total length of the client message at the start of ``buf``; None if not yet known."""
    if not buf:
        return None
    kind = buf[0]
    fixed = _FIXED_SIZES.get(kind)
    if fixed is not None:
        return fixed
    sizer = _VARIABLE_SIZES.get(kind)
    if sizer is None:
        raise RfbError.protocol(f"unknown client message type {kind}")
    return sizer(buf)


#: What :class:`ClientMessageFramer` reports for a ClientCutText above its size limit, dropped unread.
DROPPED_CUT_TEXT: tuple[int, bytes] = (6, b"")


class ClientMessageFramer:
    """Splits the browser->target stream into whole RFB client messages.

    The relay needs message boundaries to drop input in view-only sessions without corrupting
    the stream. Known types and sizes follow the RFB community spec (rfbproto); an unknown type
    cannot be skipped safely, so it is a protocol error. A message announcing more than
    ``max_message`` bytes is refused before it is buffered, so memory stays bounded by one
    message.
    """

    def __init__(self, *, max_message: int = 1 << 20, max_cut_text: int | None = None) -> None:
        self._max = max_message
        self._max_cut = max_cut_text
        self._skip = 0  # bytes of a dropped cut text still to come
        self._buf = Buffer()  # bounded by one message: sizes are checked before waiting for bodies
        self._need = 0  # bytes the buffer must hold before parsing is worth trying again

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Add bytes; return every message now complete as (type, whole message), in order.

        Hot path (every browser message): a chunk is parsed in one pass over one bytes object,
        and the bytes of a message still incomplete wait in the buffer without being re-parsed.

        With ``max_cut_text``, a ClientCutText whose text is above it (or whose whole message is
        above ``max_message``) is not buffered and not refused: it is counted off as it streams
        by and reported once, as ``(6, b"")`` (:data:`DROPPED_CUT_TEXT`).
        """
        if self._skip:
            skipped = min(self._skip, len(data))
            self._skip -= skipped
            data = data[skipped:]
            if not data:
                return []
        if len(self._buf):
            self._buf.append(data)
            if len(self._buf) < self._need:
                return []
            data = self._buf.take_all()
        messages: list[tuple[int, bytes]] = []
        start, end = 0, len(data)
        while start < end:
            size = client_message_size(data[start : start + _SIZE_PREFIX])
            if size is None:
                self._need = 0
                break
            if self._max_cut is not None and data[start] == 6 and (size - 8 > self._max_cut or size > self._max):
                messages.append(DROPPED_CUT_TEXT)
                skipped = min(size, end - start)
                self._skip = size - skipped
                start += skipped
                continue
            if size > self._max:
                raise RfbError.protocol(f"client message of {size} bytes exceeds the {self._max} byte limit")
            if end - start < size:
                self._need = size
                break
            messages.append((data[start], data[start : start + size]))
            start += size
        if start < end:
            self._buf.append(data[start:])
        return messages
