"""The browser's side of RFC 6455 over a raw blocking socket, shared by the proxy's wire tests.

Why raw: a websocket library reads eagerly (not calling recv() must really leave bytes in the
kernel), hides what the proxy writes (the 101's head, the Close, the TCP end), and will not send
the wrong frames some tests are about. What differs between the tests (which frames a client
answers, what it files, when it reads) stays in each test file; this is only what they share.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct

#: RFC 6455 1.3, spelled out here rather than taken from the code under test.
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def client_frame(
    opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, masked: bool = True, length: int | None = None
) -> bytes:
    """One frame as a browser writes it, with every field open to being wrong on purpose.

    ``length`` announces a size other than the payload's (a header sent without its payload).
    """
    size = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | rsv << 4 | opcode
    bit = 0x80 if masked else 0
    if size < 126:
        head = bytes((b0, bit | size))
    elif size < 65536:
        head = struct.pack("!BBH", b0, bit | 126, size)
    else:
        head = struct.pack("!BBQ", b0, bit | 127, size)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode()


def parse_server_frame(raw: bytearray, *, check_rsv: bool = False) -> tuple[int, bytes] | None:
    """Take one whole server frame off the front of ``raw``: (opcode, payload), or None (and
    ``raw`` untouched) while the frame is incomplete, so callers decide when to read more.

    ``check_rsv``: fail on RSV bits too (no extension is negotiated, so the proxy sets none).
    """
    if len(raw) < 2:
        return None
    assert not (check_rsv and raw[0] & 0x70), "RSV bits in a server frame"
    assert not raw[1] & 0x80, "a masked server frame"
    opcode, size, at = raw[0] & 0x0F, raw[1] & 0x7F, 2
    if size == 126:
        if len(raw) < 4:
            return None
        size, at = struct.unpack_from("!H", raw, 2)[0], 4
    elif size == 127:
        if len(raw) < 10:
            return None
        size, at = struct.unpack_from("!Q", raw, 2)[0], 10
    if len(raw) < at + size:
        return None
    payload = bytes(raw[at : at + size])
    del raw[: at + size]
    return opcode, payload


def new_key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


def accept_value(key: str) -> str:
    """The Sec-WebSocket-Accept a server owes ``key``: base64(SHA-1(key + GUID))."""
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def get_request(port: int, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def upgrade_headers(key: str, protocols: str | None) -> dict[str, str]:
    headers = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": "13"}
    if protocols is not None:
        headers["Sec-WebSocket-Protocol"] = protocols
    return headers


def open_socket(port: int, *, timeout: float, rcvbuf: int | None = None) -> socket.socket:
    """A loopback connection to the proxy; every recv on it is bounded by ``timeout``.

    ``rcvbuf`` is set before connecting, where it sets the TCP window: a browser that stops
    reading then stalls the proxy's writes after that much.
    """
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    return sock


def recv_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """An HTTP response head (without its blank line), and the bytes that came behind it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the proxy closed the connection inside the response head: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def upgrade(sock: socket.socket, port: int, token: str, key: str) -> tuple[bytes, bytes]:
    """The browser's usual upgrade (binary and the token subprotocol offered), answered by a 101:
    its head and the frames already behind it."""
    sock.sendall(get_request(port, "/websockify", upgrade_headers(key, f"binary, token.{token}")))
    head, rest = recv_head(sock)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return head, rest


class RawClient:
    """The browser's end: masked frames out; server frames in, filed as they come, and read only
    when a method asks (so a test decides when the browser stops reading)."""

    def __init__(self, sock: socket.socket, leftover: bytes) -> None:
        self.sock = sock
        self._raw = bytearray(leftover)  # undecoded bytes off the wire
        self._data = bytearray()  # binary payload not yet consumed
        self.pongs: list[bytes] = []
        self.closed: tuple[int | None, str] | None = None  # the proxy's Close, once read

    def send(self, payload: bytes) -> None:
        self.sock.sendall(client_frame(OP_BINARY, payload))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _parse(self) -> tuple[int, bytes] | None:
        return parse_server_frame(self._raw)

    def _frame(self) -> None:
        """Read one whole server frame and file it."""
        while True:
            parsed = self._parse()
            if parsed is not None:
                break
            chunk = self.sock.recv(1 << 20)
            assert chunk, "the proxy closed the TCP connection without a Close frame"
            self._raw += chunk
        opcode, payload = parsed
        assert self.closed is None, f"a frame (opcode {opcode}) after the proxy's Close"
        self._file(opcode, payload)

    def _file(self, opcode: int, payload: bytes) -> None:
        """Sort one frame; a subclass files more kinds (or checks them harder) first."""
        if opcode in (OP_BINARY, OP_CONT):
            self._data += payload
        elif opcode == OP_PONG:
            self.pongs.append(payload)
        elif opcode == OP_CLOSE:
            code = struct.unpack_from("!H", payload)[0] if payload else None
            self.closed = code, payload[2:].decode("utf-8")
        else:
            raise AssertionError(f"unexpected server opcode {opcode}")

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes of binary payload, across frames."""
        while len(self._data) < n:
            assert self.closed is None, f"the proxy closed the websocket: {self.closed}"
            self._frame()
        out = bytes(self._data[:n])
        del self._data[:n]
        return out

    def wait_close(self) -> tuple[int | None, str]:
        """The proxy's Close (code, reason); binary data before it is dropped."""
        while self.closed is None:
            self._frame()
        return self.closed

    def close(self) -> None:
        self.sock.close()
