"""The receive buffer of the incremental parsers: bytes not yet consumed, with an optional cap.

One type for every parser that waits for more bytes (the RFB handshakes, the RFB client message
framer, the websocket frame reader), so "not all arrived yet" always reads the same: ``None``,
with nothing consumed.
Consuming from the front is cheap: CPython's ``bytearray`` drops a prefix by moving its start.
"""

from __future__ import annotations

__all__ = ["Buffer"]


class Buffer:
    """Received bytes not yet consumed, with a cap on what may pile up between reads.

    The cap is checked by the owner (:meth:`exceeds_limit`) after each feed, so the owner raises
    its own protocol's error; None means the owner bounds memory some other way.
    """

    __slots__ = ("_data", "_limit")

    def __init__(self, limit: int | None = None) -> None:
        self._data = bytearray()
        self._limit = limit

    def __len__(self) -> int:
        return len(self._data)

    def __bytes__(self) -> bytes:
        """A copy of what is held, nothing consumed (for tests and debugging)."""
        return bytes(self._data)

    def append(self, data: bytes) -> None:
        self._data += data

    def exceeds_limit(self) -> bool:
        """True when more is held than the cap allows: no honest peer needs that much."""
        return self._limit is not None and len(self._data) > self._limit

    def peek(self, n: int) -> bytes | None:
        """The first n bytes without consuming them, or None if not all arrived yet."""
        return bytes(self._data[:n]) if len(self._data) >= n else None

    def take(self, n: int) -> bytes | None:
        """Consume and return n bytes, or None (consuming nothing) if not all arrived yet."""
        if len(self._data) < n:
            return None
        out = bytes(self._data[:n])
        del self._data[:n]
        return out

    def skip(self, n: int) -> int:
        """Drop up to n bytes without keeping them; returns how many were dropped."""
        dropped = min(n, len(self._data))
        del self._data[:dropped]
        return dropped

    def take_all(self) -> bytes:
        """Everything held, consumed (what arrived behind the end of a handshake)."""
        out = bytes(self._data)
        self._data.clear()
        return out
