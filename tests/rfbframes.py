"""Reading a VNC server's framebuffer in tests: through the proxy (tests/rfbclient.Console) or
straight to the server over TCP (:class:`DirectConsole`), with the same code both ways.

The client asks for 32-bit true colour (little endian, red/green/blue at bits 16/8/0) and Raw
encoding only, so two clients of the same server receive the same bytes for the same picture and
frames can be compared byte for byte. It accepts DesktopSize (a guest changing video mode, or a
reset, resizes the desktop) and QEMU's extended key event pseudo-encoding (QEMU confirms it with
an empty rectangle; then the client may send raw key codes).
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from rfbclient import Console

RAW, DESKTOP_SIZE, QEMU_EXTENDED_KEY_EVENT = 0, -223, -258
FRAMEBUFFER_UPDATE, SET_COLOUR_MAP, BELL, SERVER_CUT_TEXT = 0, 1, 2, 3
QEMU_CLIENT_MESSAGE, QEMU_EXTENDED_KEY = 255, 0
PIXEL_FORMAT = struct.pack(">BBBBHHHBBBxxx", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
BYTES_PER_PIXEL = 4
WAIT_TIMEOUT = 30.0


class Transport(Protocol):
    async def read(self, n: int) -> bytes: ...

    async def send(self, data: bytes) -> None: ...


class DirectConsole(Console):
    """An RFB client straight to the VNC server over TCP (security None), for comparisons."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(None)  # type: ignore[arg-type]
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, host: str, port: int) -> DirectConsole:  # type: ignore[override]
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def read(self, n: int) -> bytes:
        return await self.reader.readexactly(n)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()


@dataclass
class Screen:
    """The client's copy of the framebuffer, in :data:`PIXEL_FORMAT`."""

    width: int
    height: int
    pixels: bytearray = field(default_factory=bytearray)
    extended_keys: bool = False  # QEMU confirmed the extended key event pseudo-encoding
    resized: bool = False

    def __post_init__(self) -> None:
        self.pixels = bytearray(self.width * self.height * BYTES_PER_PIXEL)

    def pixel(self, x: int, y: int) -> tuple[int, int, int]:
        offset = (y * self.width + x) * BYTES_PER_PIXEL
        blue, green, red = self.pixels[offset : offset + 3]
        return red, green, blue

    def colours(self, x0: int, y0: int, x1: int, y1: int) -> set[tuple[int, int, int]]:
        """Every colour in the rectangle [x0, x1) x [y0, y1)."""
        return {self.pixel(x, y) for y in range(y0, min(y1, self.height)) for x in range(x0, min(x1, self.width))}


async def start(console: Console, *, extended_keys: bool = False) -> Screen:
    """After the handshake: set the pixel format and encodings; an empty screen of the desktop's size."""
    assert console.server_init is not None
    encodings = [RAW, DESKTOP_SIZE] + ([QEMU_EXTENDED_KEY_EVENT] if extended_keys else [])
    await console.send(b"\x00\x00\x00\x00" + PIXEL_FORMAT)
    await console.send(struct.pack(">BxH", 2, len(encodings)) + b"".join(struct.pack(">i", e) for e in encodings))
    return Screen(console.server_init.width, console.server_init.height)


async def _read_rect(console: Transport, screen: Screen) -> None:
    x, y, width, height, encoding = struct.unpack(">HHHHi", await console.read(12))
    if encoding == DESKTOP_SIZE:
        screen.width, screen.height, screen.resized = width, height, True
        screen.pixels = bytearray(width * height * BYTES_PER_PIXEL)
    elif encoding == QEMU_EXTENDED_KEY_EVENT:
        screen.extended_keys = True
    elif encoding == RAW:
        data = await console.read(width * height * BYTES_PER_PIXEL)
        row_bytes = width * BYTES_PER_PIXEL
        for row in range(height):
            start_at = ((y + row) * screen.width + x) * BYTES_PER_PIXEL
            screen.pixels[start_at : start_at + row_bytes] = data[row * row_bytes : (row + 1) * row_bytes]
    else:
        raise AssertionError(f"unexpected encoding {encoding}")


async def read_update(console: Transport, screen: Screen) -> None:
    """Read server messages until one framebuffer update has been applied to ``screen``."""
    while True:
        kind = (await console.read(1))[0]
        if kind == FRAMEBUFFER_UPDATE:
            (count,) = struct.unpack(">xH", await console.read(3))
            for _ in range(count):
                await _read_rect(console, screen)
            return
        if kind == SERVER_CUT_TEXT:
            (length,) = struct.unpack(">3xI", await console.read(7))
            await console.read(length)
        elif kind != BELL:
            raise AssertionError(f"unexpected server message {kind}")


async def request(console: Transport, screen: Screen, incremental: bool) -> None:
    await console.send(struct.pack(">BBHHHH", 3, int(incremental), 0, 0, screen.width, screen.height))


async def wait_until(
    console: Transport, screen: Screen, ready: Callable[[Screen], bool], timeout: float = WAIT_TIMEOUT
) -> Screen:
    """Keep the screen current until ``ready(screen)``; an error naming the last state if never.

    The first request is a full one; later ones are incremental (the server answers when the
    picture changes), except right after a resize, when the whole new desktop is asked for."""
    deadline = time.monotonic() + timeout
    incremental = False
    while not (screen.width and ready(screen)):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"screen never became ready: {screen.width}x{screen.height}")
        await request(console, screen, incremental)
        await asyncio.wait_for(read_update(console, screen), remaining)
        incremental = not screen.resized
        screen.resized = False
    return screen


async def key(console: Transport, keysym: int) -> None:
    """A key press and release (RFB KeyEvent)."""
    await console.send(struct.pack(">BBxxI", 4, 1, keysym) + struct.pack(">BBxxI", 4, 0, keysym))


async def extended_key(console: Transport, keysym: int, keycode: int) -> None:
    """A press and release as QEMU's extended key event: the keysym plus the raw XT scan code."""
    for down in (1, 0):
        await console.send(struct.pack(">BBHII", QEMU_CLIENT_MESSAGE, QEMU_EXTENDED_KEY, down, keysym, keycode))
