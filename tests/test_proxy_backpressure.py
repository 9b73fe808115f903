"""Backpressure end to end: a browser that stops reading stops the proxy reading the hypervisor.

The browser side is a raw-socket websocket client (on tests/rawws.py), because tornado's client
reads eagerly into memory: with this one, not calling recv() really leaves the bytes in the
kernel, so the proxy's writes stall as a slow browser's would. The hypervisor is a real Xvnc asked, with
Raw encoding only, for 40 full-screen updates (800x600x4 bytes each); the proxy's
``consolegate_proxy_bytes_total{direction="down"}`` counts what it read from Xvnc.
"""

from __future__ import annotations

import re
import socket
import struct
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from proxyproc import ProxyProcess
from rawws import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    accept_value,
    client_frame,
    new_key,
    open_socket,
    parse_server_frame,
    upgrade,
)
from xvnc import XvncServer

REQUESTS = 40
#: The client's receive buffer, fixed so the kernel's autotuning cannot hide a leak in it.
CLIENT_RCVBUF = 256 << 10
RSS_BOUND = 16 << 20
#: The down counter is "still" when it has not moved for this long (Xvnc renders in ms).
STILL_FOR = 0.25
#: Requests sent one at a time that must each find the counter still before the rest go at once.
STILL_REQUESTS = 3
IO_TIMEOUT = 10.0

Mint = Callable[..., str]


class RawWebSocket:
    """A minimal RFC 6455 client over a blocking socket: masked binary frames out, frames in.

    Nothing is read unless :meth:`read` is called, so a test decides exactly when the browser
    "stops reading".
    """

    def __init__(self, sock: socket.socket, leftover: bytes) -> None:
        self.sock = sock
        self._raw = bytearray(leftover)  # undecoded bytes off the wire
        self._data = bytearray()  # decoded binary payload not yet consumed
        self.close_code: int | None = None

    @classmethod
    def connect(cls, port: int, token: str, rcvbuf: int) -> RawWebSocket:
        key = new_key()
        sock = open_socket(port, timeout=IO_TIMEOUT, rcvbuf=rcvbuf)
        head, rest = upgrade(sock, port, token, key)
        accept = accept_value(key).encode()
        assert re.search(rb"(?im)^sec-websocket-accept: *" + re.escape(accept) + rb"\r?$", head), head
        return cls(sock, rest)

    def send(self, payload: bytes) -> None:
        self.sock.sendall(client_frame(OP_BINARY, payload))

    def _frame(self) -> bool:
        """Decode one whole frame from the raw buffer, if there is one; True if one was decoded."""
        parsed = parse_server_frame(self._raw)
        if parsed is None:
            return False
        opcode, payload = parsed
        if opcode in (OP_CONT, OP_BINARY):
            self._data += payload
        elif opcode == OP_CLOSE:
            self.close_code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005
        elif opcode == OP_PING:
            self.sock.sendall(client_frame(OP_PONG, payload))
        else:
            assert opcode == OP_PONG, f"unexpected websocket opcode {opcode}"
        return True

    def read(self, n: int) -> bytes:
        """Exactly n payload bytes; AssertionError if the proxy closes first."""
        while len(self._data) < n:
            if self._frame():
                continue
            assert self.close_code is None, f"closed with {self.close_code}"
            chunk = self.sock.recv(1 << 20)
            assert chunk, "the proxy closed the TCP connection"
            self._raw += chunk
        out = bytes(self._data[:n])
        del self._data[:n]
        return out

    def idle_for(self, seconds: float) -> bool:
        """True if no payload is buffered and nothing arrives within ``seconds``."""
        while self._frame():
            pass
        if self._data:
            return False
        self.sock.settimeout(seconds)
        try:
            chunk = self.sock.recv(1 << 20)
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(IO_TIMEOUT)
        assert chunk, "the proxy closed the TCP connection"
        self._raw += chunk
        return False

    def close(self) -> None:
        self.sock.close()


@dataclass
class Update:
    rects: list[tuple[int, int, int, int]]
    size: int  # bytes of the whole message


def read_update(ws: RawWebSocket, bytes_per_pixel: int) -> Update:
    """One FramebufferUpdate with Raw rectangles, read exactly to its last pixel."""
    kind, _pad, count = struct.unpack(">BBH", ws.read(4))
    assert kind == 0, f"expected a FramebufferUpdate, got message type {kind}"
    rects, size = [], 4
    for _ in range(count):
        x, y, w, h, encoding = struct.unpack(">HHHHi", ws.read(12))
        assert encoding == 0, f"asked for Raw only, got encoding {encoding}"
        ws.read(w * h * bytes_per_pixel)
        rects.append((x, y, w, h))
        size += 12 + w * h * bytes_per_pixel
    return Update(rects, size)


def covered(rects: list[tuple[int, int, int, int]]) -> int:
    return sum(w * h for _, _, w, h in rects)


def relayed(proxy: ProxyProcess) -> dict[str, float]:
    """``consolegate_proxy_bytes_total`` by direction, as the Prometheus text gives it."""
    with urllib.request.urlopen(f"{proxy.base}/metrics", timeout=5) as response:
        text = response.read().decode()
    pattern = r'^consolegate_proxy_bytes_total\{direction="(\w+)"\} (\S+)$'
    return {direction: float(value) for direction, value in re.findall(pattern, text, re.MULTILINE)}


def down_bytes(proxy: ProxyProcess) -> float:
    return relayed(proxy).get("down", 0.0)


def settled_down_bytes(proxy: ProxyProcess, deadline: float = 5.0) -> float:
    """The down counter once it has stopped moving for STILL_FOR (a poll: a counter in another
    process cannot be awaited), failing if it is still moving at the deadline."""
    end = time.monotonic() + deadline
    value, since = down_bytes(proxy), time.monotonic()
    while time.monotonic() - since < STILL_FOR:
        assert time.monotonic() < end, f"the proxy kept reading from the server (at {value} bytes)"
        # Kept: letting time pass is the test here, proving the counter does not move for
        # STILL_FOR; no event marks "the proxy stopped reading".
        time.sleep(0.02)
        now = down_bytes(proxy)
        if now != value:
            value, since = now, time.monotonic()
    return value


def rss(proxy: ProxyProcess) -> int:
    for line in Path(f"/proc/{proxy.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc status")


def rfb_handshake(ws: RawWebSocket) -> tuple[int, int, int]:
    """Browser side of the proxy's RFB 3.8/None handshake; width, height, bytes per pixel."""
    assert ws.read(12) == b"RFB 003.008\n"
    ws.send(b"RFB 003.008\n")
    assert ws.read(2) == b"\x01\x01"
    ws.send(b"\x01")
    assert ws.read(4) == b"\0\0\0\0"
    ws.send(b"\x01")
    width, height, pixel_format, name_length = struct.unpack(">HH16sI", ws.read(24))
    ws.read(name_length)
    return width, height, pixel_format[0] // 8


def full_request(width: int, height: int) -> bytes:
    return struct.pack(">BBHHHH", 3, 0, 0, 0, width, height)


def test_a_browser_that_stops_reading_stops_the_proxy_and_loses_nothing(
    proxy_factory: Callable[..., ProxyProcess], mint: Mint, xvnc_vncauth: XvncServer
) -> None:
    """40 full-screen Raw requests (77 MB) to a browser that stops reading: the proxy stops near
    what the kernel buffers hold, its memory stays flat, and once the browser reads again every
    byte the proxy took from Xvnc arrives as whole, well-formed updates.

    Not 40 updates: RFB lets a server merge pending requests, and Xvnc does while its output is
    congested, so "nothing lost" is proven by the byte count (the proxy's down counter equals
    what the browser parsed) and a final full-screen update, not by counting replies.
    """
    proxy = proxy_factory()
    rss_before = rss(proxy)
    token = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password)
    ws = RawWebSocket.connect(proxy.port, token, CLIENT_RCVBUF)
    try:
        width, height, bpp = rfb_handshake(ws)
        frame = width * height * bpp  # at least, per full-screen Raw update
        ws.send(struct.pack(">BBHi", 2, 0, 1, 0))  # SetEncodings: Raw only
        # Requests go one at a time while the proxy keeps reading, so that a proxy without
        # backpressure would drain Xvnc and get a separate frame for each (Xvnc merges
        # requests only while its own output is congested); once the counter stays still for
        # a few requests in a row, the proxy has stopped reading and the rest go at once.
        sent, still, last = 0, 0, 0
        while sent < REQUESTS and still < STILL_REQUESTS:
            ws.send(full_request(width, height))
            sent += 1
            now = settled_down_bytes(proxy)
            still = still + 1 if now == last else 0
            last = now
        if sent < REQUESTS:
            ws.send(full_request(width, height) * (REQUESTS - sent))
        stalled = settled_down_bytes(proxy)
        rss_stalled = rss(proxy)

        assert stalled < REQUESTS * frame // 4, (
            f"the proxy read {stalled} bytes of {REQUESTS * frame} requested from a browser that stopped reading"
        )
        assert rss_stalled - rss_before < RSS_BOUND, f"proxy RSS grew by {(rss_stalled - rss_before) >> 10} KiB"

        updates, received = [], 0
        while True:  # resume reading: everything the proxy read from Xvnc must arrive, whole
            update = read_update(ws, bpp)
            updates.append(update)
            received += update.size
            if ws.idle_for(STILL_FOR):  # Xvnc answers in milliseconds once it can write
                break
        assert received == settled_down_bytes(proxy), "bytes lost or invented between Xvnc and the browser"
        assert len(updates) >= 2
        assert covered(updates[-1].rects) == width * height  # the merged requests: the whole screen

        ws.send(full_request(width, height))  # and the session is still a working console
        assert covered(read_update(ws, bpp).rects) == width * height
    finally:
        ws.close()


def test_byte_counters_are_exact(
    proxy_factory: Callable[..., ProxyProcess], mint: Mint, xvnc_vncauth: XvncServer
) -> None:
    """The relayed-byte counters are exact integers past a million: the backpressure test above
    proves "nothing lost" by comparing them with what the browser received."""
    proxy = proxy_factory()
    token = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password)
    ws = RawWebSocket.connect(proxy.port, token, CLIENT_RCVBUF)
    try:
        width, height, bpp = rfb_handshake(ws)
        many_raw = struct.pack(">BBH", 2, 0, 65535) + bytes(4 * 65535)  # SetEncodings, 65535 x Raw
        for _ in range(4):
            ws.send(many_raw)
        ws.send(full_request(width, height))
        update = read_update(ws, bpp)
        assert ws.idle_for(STILL_FOR)
        sent = 4 * len(many_raw) + 10
        assert sent > 1_000_000 and sent % 10  # seven significant digits
        assert relayed(proxy) == {"up": sent, "down": update.size}
    finally:
        ws.close()
