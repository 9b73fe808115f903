"""One client for every path: raw asyncio sockets, a minimal RFC 6455 client framing, and RFB.

The same code talks to Xvnc directly (TCP), through websockify (websocket, the client does VNC
authentication itself: websockify relays bytes) and through consolegate (websocket, the proxy
authenticates upstream and offers the client security None). Which security type to answer is
decided by what the server offers, so there is no per-proxy branch in the RFB code.

Written for low client-side cost: bulk pixel data is counted and discarded as it arrives
(``skip``), never buffered or copied; frames are parsed in ``data_received`` with memoryviews.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import ssl
import struct
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from console_proxy.protocol.rfb import vnc_auth_response


@dataclass(frozen=True)
class Path:
    """How to reach a target: ``kind`` is "tcp" (direct) or "ws" (through a websocket proxy)."""

    name: str
    kind: str
    port: int
    ws_path: str = "/"
    token: str | None = None
    password: str | None = None  # only used if the server offers VNC Authentication
    tls: ssl.SSLContext | None = None  # wss: the client's TLS context (it trusts the proxy's certificate)


class ClosedError(ConnectionError):
    pass


class _Proto(asyncio.Protocol):
    def __init__(self, ws: bool) -> None:
        self.ws = ws
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.skip_left = 0
        self.received = 0  # RFB payload bytes (websocket framing excluded)
        self.waiter: asyncio.Future[None] | None = None
        self.on_data: Callable[[], None] | None = None  # instead of a waiter: run steps in the callback
        self.closed: str | None = None
        self.http_done = not ws
        self.http_raw = bytearray()
        self.http_future: asyncio.Future[bytes] | None = None
        self.hdr = bytearray()
        self.frame_left = 0
        self.frame_control: int | None = None
        self.control_payload = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _wake(self) -> None:
        if self.on_data is not None:
            self.on_data()
            return
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = self.closed or "connection lost"
        self._wake()
        if self.http_future is not None and not self.http_future.done():
            self.http_future.set_exception(ClosedError("closed during the websocket upgrade"))

    def data_received(self, data: bytes) -> None:
        if not self.http_done:
            self.http_raw += data
            end = self.http_raw.find(b"\r\n\r\n")
            if end < 0:
                if len(self.http_raw) > 65536:
                    self.transport.close()  # type: ignore[union-attr]
                return
            head, rest = bytes(self.http_raw[: end + 4]), bytes(self.http_raw[end + 4 :])
            self.http_raw = bytearray()
            self.http_done = True
            if self.http_future is not None and not self.http_future.done():
                self.http_future.set_result(head)
            if not rest:
                return
            data = rest
        if self.ws:
            self._frames(memoryview(data))
        else:
            self._payload(data)

    def _frames(self, mv: memoryview) -> None:
        i, n = 0, len(mv)
        while i < n:
            if self.frame_left == 0 and self.frame_control is None:
                need = 2 - len(self.hdr)
                if need > 0:
                    take = min(need, n - i)
                    self.hdr += mv[i : i + take]
                    i += take
                    if len(self.hdr) < 2:
                        return
                b1 = self.hdr[1]
                size = b1 & 0x7F
                total = 2 + (2 if size == 126 else 8 if size == 127 else 0) + (4 if b1 & 0x80 else 0)
                need = total - len(self.hdr)
                if need > 0:
                    take = min(need, n - i)
                    self.hdr += mv[i : i + take]
                    i += take
                    if len(self.hdr) < total:
                        return
                if size == 126:
                    size = int.from_bytes(self.hdr[2:4], "big")
                elif size == 127:
                    size = int.from_bytes(self.hdr[2:10], "big")
                opcode = self.hdr[0] & 0x0F
                self.hdr = bytearray()
                if opcode >= 8:
                    self.frame_control = opcode
                    self.control_payload = bytearray()
                self.frame_left = size
                if size == 0 and opcode >= 8:
                    self._control()
                continue
            take = min(self.frame_left, n - i)
            chunk = mv[i : i + take]
            i += take
            self.frame_left -= take
            if self.frame_control is not None:
                self.control_payload += chunk
                if self.frame_left == 0:
                    self._control()
            else:
                self._payload(chunk)

    def _control(self) -> None:
        opcode, payload = self.frame_control, bytes(self.control_payload)
        self.frame_control = None
        if opcode == 8:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.closed = f"websocket closed {code} {payload[2:].decode(errors='replace')}"
            self._wake()
            self.transport.close()  # type: ignore[union-attr]
        elif opcode == 9:
            self.transport.write(_frame(payload, 0xA))  # type: ignore[union-attr]

    def _payload(self, chunk: bytes | memoryview) -> None:
        size = len(chunk)
        self.received += size
        if self.skip_left:
            take = min(self.skip_left, size)
            self.skip_left -= take
            if take == size:
                if self.skip_left == 0:
                    self._wake()
                return
            chunk = chunk[take:]
        self.buf += chunk
        self._wake()


def _frame(payload: bytes, opcode: int = 0x2) -> bytes:
    """A masked client frame (RFC 6455 5.3: a client must mask; the key is random)."""
    n = len(payload)
    if n < 126:
        head = struct.pack(">BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack(">BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack(">BBQ", 0x80 | opcode, 0x80 | 127, n)
    key = os.urandom(4)
    if n:
        k = int.from_bytes((key * (n // 4 + 1))[:n], "big")
        masked = (int.from_bytes(payload, "big") ^ k).to_bytes(n, "big")
    else:
        masked = b""
    return head + key + masked


class Conn:
    """A byte stream to an RFB server over one of the paths."""

    def __init__(self, proto: _Proto) -> None:
        self.p = proto

    @classmethod
    async def open(cls, path: Path, timeout: float = 10.0) -> Conn:
        async with asyncio.timeout(timeout):  # no task per step, unlike wait_for
            return await cls._open(path)

    @classmethod
    async def _open(cls, path: Path) -> Conn:
        loop = asyncio.get_running_loop()
        proto = _Proto(path.kind == "ws")
        await loop.create_connection(
            lambda: proto, "127.0.0.1", path.port, ssl=path.tls, server_hostname="localhost" if path.tls else None
        )
        conn = cls(proto)
        if path.kind == "ws":
            proto.http_future = loop.create_future()
            protocols = "binary" + (f", token.{path.token}" if path.token else "")
            key = base64.b64encode(os.urandom(16)).decode()
            request = (
                f"GET {path.ws_path} HTTP/1.1\r\nHost: 127.0.0.1:{path.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Protocol: {protocols}\r\n\r\n"
            )
            proto.transport.write(request.encode())  # type: ignore[union-attr]
            try:
                head = await proto.http_future
            except BaseException:  # the timeout, or the server left
                conn.close()
                raise
            status = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b"?"
            if status != b"101":
                conn.close()
                raise ClosedError(f"websocket upgrade refused: HTTP {status.decode(errors='replace')}")
        return conn

    @property
    def received(self) -> int:
        return self.p.received

    async def _wait(self) -> None:
        if self.p.closed:
            raise ClosedError(self.p.closed)
        self.p.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.p.waiter
        finally:
            self.p.waiter = None

    async def read(self, n: int) -> bytes:
        buf = self.p.buf
        while len(buf) < n:
            await self._wait()
        out = bytes(buf[:n])
        del buf[:n]
        return out

    async def skip(self, n: int) -> None:
        """Discard n bytes without keeping them (bulk pixel data)."""
        buf = self.p.buf
        take = min(n, len(buf))
        del buf[:take]
        n -= take
        if n:
            self.p.skip_left = n
            while self.p.skip_left:
                await self._wait()

    def run(self, steps: Steps) -> asyncio.Future[Any]:
        """Run RFB steps inside the protocol's data callbacks; the future holds their result."""
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        p, buf = self.p, self.p.buf
        need = next(steps)

        def step() -> None:
            nonlocal need
            try:
                while not done.done():
                    if need < 0:  # skip: what is buffered now, the rest as it arrives
                        take = min(-need, len(buf))
                        del buf[:take]
                        if take < -need:
                            p.skip_left, need = -need - take, 0
                            return
                        need = steps.send(None)
                    elif need == 0:  # a skip just completed in the protocol
                        if p.skip_left:
                            return
                        need = steps.send(None)
                    elif len(buf) >= need:
                        data = bytes(buf[:need])
                        del buf[:need]
                        need = steps.send(data)
                    else:
                        if p.closed:
                            raise ClosedError(p.closed)
                        return
            except StopIteration as stop:
                p.on_data = None
                done.set_result(stop.value)
            except Exception as exc:
                p.on_data = None
                done.set_exception(exc)

        p.on_data = step
        step()
        return done

    def send(self, data: bytes) -> None:
        transport = self.p.transport
        assert transport is not None
        transport.write(_frame(data) if self.p.ws else data)

    def close(self) -> None:
        if self.p.transport is not None:
            self.p.transport.close()


# --- RFB client -----------------------------------------------------------------------------


@dataclass
class Desktop:
    width: int
    height: int
    bpp: int


#: What RFB steps yield: n > 0 asks for the next n bytes (sent back in), n < 0 skips -n bytes.
Steps = Generator[int, bytes | None, Any]


def handshake_steps(send: Callable[[bytes], None], password: str | None) -> Generator[int, Any, Desktop]:
    """RFB 3.8 client: None if offered, else VNC Authentication with ``password``; shared."""
    version = yield 12
    if not version.startswith(b"RFB "):
        raise ClosedError(f"not RFB: {version!r}")
    send(b"RFB 003.008\n")
    count = (yield 1)[0]
    if count == 0:
        (size,) = struct.unpack(">I", (yield 4))
        raise ClosedError("server refused: " + (yield size).decode())
    types = yield count
    if 1 in types:
        send(b"\x01")
    elif 2 in types and password is not None:
        send(b"\x02")
        send(vnc_auth_response(password, (yield 16)))
    else:
        raise ClosedError(f"no usable security type in {list(types)}")
    if (yield 4) != b"\0\0\0\0":
        raise ClosedError("security handshake failed")
    send(b"\x01")
    width, height, bpp, name_len = struct.unpack(">HHB15xI", (yield 24))
    if name_len:
        yield name_len
    return Desktop(width, height, bpp // 8)


def set_encodings_raw() -> bytes:
    return struct.pack(">BxHi", 2, 1, 0)


def update_request(incremental: bool, x: int, y: int, w: int, h: int) -> bytes:
    return struct.pack(">BBHHHH", 3, int(incremental), x, y, w, h)


def key_events_16() -> bytes:
    """16 bytes of valid client messages: two KeyEvents (down, up) of an unassigned keysym."""
    return struct.pack(">BBxxIBBxxI", 4, 1, 0xFFC6, 4, 0, 0xFFC6)


def update_steps(desktop: Desktop, on_header: Callable[[], None] | None = None) -> Generator[int, Any, int]:
    """Server messages until one FramebufferUpdate (Raw rects only) has been consumed."""
    while True:
        kind = (yield 1)[0]
        if kind == 0:
            (nrects,) = struct.unpack(">xH", (yield 3))
            if on_header is not None:
                on_header()
            total = 0
            for _ in range(nrects):
                _x, _y, w, h, enc = struct.unpack(">HHHHi", (yield 12))
                if enc != 0:
                    raise ClosedError(f"unexpected encoding {enc}")
                size = w * h * desktop.bpp
                if size:
                    yield -size
                total += size
            return total
        if kind == 2:  # Bell
            continue
        if kind == 3:  # ServerCutText
            (length,) = struct.unpack(">3xI", (yield 7))
            if length:
                yield -length
            continue
        if kind == 1:  # SetColourMapEntries
            (_first, count) = struct.unpack(">xHH", (yield 5))
            if count:
                yield -6 * count
            continue
        raise ClosedError(f"unexpected server message {kind}")


def open_steps(send: Callable[[bytes], None], password: str | None, region: tuple[int, int]) -> Steps:
    """One console open after the transport: handshake, SetEncodings, a Raw update read to its end."""
    desktop = yield from handshake_steps(send, password)
    send(set_encodings_raw() + update_request(False, 0, 0, *region))
    yield from update_steps(desktop)
    return desktop


async def drive(conn: Conn, steps: Generator[int, Any, Any]) -> Any:
    """Run RFB steps by awaiting each read (simple; a future per read)."""
    need = next(steps)
    while True:
        data = await conn.read(need) if need > 0 else await conn.skip(-need)
        try:
            need = steps.send(data)
        except StopIteration as stop:
            return stop.value


async def handshake(conn: Conn, password: str | None) -> Desktop:
    return await drive(conn, handshake_steps(conn.send, password))


async def read_update(conn: Conn, desktop: Desktop, on_header: Callable[[], None] | None = None) -> int:
    return await drive(conn, update_steps(desktop, on_header))


async def open_console(path: Path, region: tuple[int, int] = (64, 64)) -> tuple[Conn, Desktop, float]:
    """Connect, authenticate, ask for a small Raw update and read it: (conn, desktop, seconds).

    The steps run inside the data callbacks, with one future for the whole open: the load
    generator's own CPU per open is what bounds the measured rate on a small machine.
    """
    start = time.perf_counter()
    conn = await Conn.open(path)
    try:
        desktop = await conn.run(open_steps(conn.send, path.password, region))
    except BaseException:
        conn.close()
        raise
    return conn, desktop, time.perf_counter() - start
