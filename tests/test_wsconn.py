"""The browser side's write path over a real socket pair: the shared read buffer is never pinned.

The relay receives every hypervisor read into one process-wide buffer and writes a view of it to
the browser. Behind a queue the view must be copied: Python 3.12+ transports keep what they are
given (3.11 copies), and a queued view would pin the whole 256 KiB buffer per small read.
"""

from __future__ import annotations

import asyncio
import socket
import struct

from console_proxy.relay import FRAME_HEADROOM
from console_proxy.wsconn import PlainBrowser

CHUNK = 64 * 1024


def _payloads(raw: bytes) -> list[bytes]:
    """The payloads of the unmasked binary frames in ``raw``."""
    out, at = [], 0
    while at < len(raw):
        size, at = raw[at + 1] & 0x7F, at + 2
        if size == 126:
            (size,), at = struct.unpack_from("!H", raw, at), at + 2
        elif size == 127:
            (size,), at = struct.unpack_from("!Q", raw, at), at + 8
        out.append(raw[at : at + size])
        at += size
    return out


async def _backlogged_browser() -> tuple[PlainBrowser, socket.socket]:
    ours, theirs = socket.socketpair()
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    browser = PlainBrowser(max_frame=1 << 20)
    await asyncio.get_running_loop().connect_accepted_socket(lambda: browser, ours)
    assert browser.transport is not None
    while not browser.transport.get_write_buffer_size():  # the peer does not read: fill the kernel
        browser.send(b"q" * CHUNK)
    return browser, theirs


def test_a_view_behind_a_queue_is_copied_and_the_buffer_reusable() -> None:
    async def scenario() -> list[bytes]:
        browser, theirs = await _backlogged_browser()
        buffer = bytearray(FRAME_HEADROOM + CHUNK)
        buffer[FRAME_HEADROOM:] = b"A" * CHUNK
        assert browser.send_framed(buffer, CHUNK) is False  # not held: the relay may reuse it
        buffer[FRAME_HEADROOM:] = b"B" * CHUNK  # ... and does, at once
        assert browser.send_framed(buffer, 100) is False
        browser.transport.close()  # type: ignore[union-attr]  # after what is queued
        theirs.setblocking(False)
        raw = bytearray()
        loop = asyncio.get_running_loop()
        while chunk := await asyncio.wait_for(loop.sock_recv(theirs, 1 << 20), 5):
            raw += chunk
        theirs.close()
        return _payloads(bytes(raw))

    frames = asyncio.run(scenario())
    assert frames[-2:] == [b"A" * CHUNK, b"B" * 100]
    assert all(frame == b"q" * CHUNK for frame in frames[:-2])


def test_a_view_with_nothing_queued_is_sent_from_the_buffer() -> None:
    """The fast path: nothing queued, the whole frame leaves at once, the buffer is not held."""

    async def scenario() -> tuple[bool, bytes]:
        ours, theirs = socket.socketpair()
        browser = PlainBrowser(max_frame=1 << 20)
        await asyncio.get_running_loop().connect_accepted_socket(lambda: browser, ours)
        buffer = bytearray(FRAME_HEADROOM + 16)
        buffer[FRAME_HEADROOM:] = b"k" * 16
        held = browser.send_framed(buffer, 16)
        theirs.settimeout(5)
        data = theirs.recv(64)
        browser.transport.close()  # type: ignore[union-attr]
        theirs.close()
        return held, data

    held, data = asyncio.run(scenario())
    assert (held, data) == (False, b"\x82\x10" + b"k" * 16)
