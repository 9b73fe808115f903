"""The browser's websocket on the wire: a real proxy process, a real Xvnc, a raw-socket client.

Why raw sockets: a websocket library will not send the hostile frames this file is about
(unmasked, RSV bits, oversized or fragmented control frames, a header without its payload), and
it hides what the proxy really writes: the 101's headers, the close code, and whether the TCP
connection is closed afterwards. Every wait is bounded by a socket timeout and ends at the
expected event, never at a sleep.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import struct
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass

import pytest
from proxyproc import ProxyProcess, free_port
from rawws import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RawClient,
    accept_value,
    client_frame,
    close_payload,
    get_request,
    new_key,
    open_socket,
    parse_server_frame,
    recv_head,
    upgrade_headers,
)
from xvnc import XvncServer

from console_proxy.wsconn import CLOSE_TIMEOUT

Mint = Callable[..., str]

#: Upper bound for any single wait on the wire (each ends as soon as its event arrives).
IO_TIMEOUT = 5.0
#: A close handshake ends the TCP connection within milliseconds on loopback, so within this
#: bound, well before the proxy gives up on a silent browser (CLOSE_TIMEOUT, 5 s): an end that
#: takes longer came from that timeout, not from the handshake.
PROMPT = 1.0
assert PROMPT < CLOSE_TIMEOUT / 2
#: RFC 6455 4.2.2's own example.
RFC_KEY, RFC_ACCEPT = "dGhlIHNhbXBsZSBub25jZQ==", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
REASONS = {1002: "protocol_error", 1003: "unsupported_data", 1009: "message_too_big", 4500: "target_unreachable"}
MAX_MESSAGE = 4096

RFB_VERSION = b"RFB 003.008\n"
RAW_ONLY = struct.pack("!BBHi", 2, 0, 1, 0)  # SetEncodings: Raw
REGION = 16  # a non-incremental request for a 16x16 corner: Xvnc must answer it, and fast


def update_request(size: int = REGION) -> bytes:
    return struct.pack("!BBHHHH", 3, 0, 0, 0, size, size)


# --- the raw client -----------------------------------------------------------------------------


@dataclass
class Response:
    """An HTTP response head (and body, for refusals) exactly as it came off the wire."""

    status: int
    headers: list[tuple[str, str]]
    raw: bytes
    body: bytes = b""

    def header(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


def read_head(sock: socket.socket) -> tuple[Response, bytes]:
    """The response head, and the bytes that came behind it (the first frames, or a body)."""
    head, rest = recv_head(sock)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = [(key.strip(), value.strip()) for key, _, value in (line.partition(":") for line in lines)]
    return Response(int(status_line.split()[1]), headers, head + b"\r\n\r\n"), rest


def http_exchange(port: int, request: bytes) -> Response:
    """One request on a fresh connection; the whole response, body by its Content-Length."""
    with open_socket(port, timeout=IO_TIMEOUT) as sock:
        sock.sendall(request)
        response, body = read_head(sock)
        (length,) = response.header("Content-Length")
        while len(body) < int(length):
            chunk = sock.recv(65536)
            assert chunk, "the proxy closed the connection inside the body"
            body += chunk
    response.raw += body
    response.body = body
    return response


class WsClient(RawClient):
    """The shared raw client, stricter: server frames are checked for RSV bits and one-byte
    Close payloads, and pings are answered as a browser does."""

    def _parse(self) -> tuple[int, bytes] | None:
        return parse_server_frame(self._raw, check_rsv=True)

    def _file(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_PING:
            self.send_raw(client_frame(OP_PONG, payload))
            return
        assert opcode != OP_CLOSE or len(payload) != 1, "a one-byte Close payload"
        super()._file(opcode, payload)

    def wait_pong(self) -> bytes:
        while not self.pongs:
            self._frame()
        return self.pongs.pop(0)

    def expect_eof(self, within: float, *, reset_ok: bool = False) -> None:
        """The proxy closes the TCP connection within ``within`` seconds, sending nothing more.

        ``reset_ok``: a reset counts as closed (after a failed connection, once its Close was
        read, an RST loses nothing).
        """
        assert not self._raw, f"bytes after the proxy's Close: {bytes(self._raw)!r}"
        self.sock.settimeout(within)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"the proxy kept the TCP connection open {within}s after the Close") from None
        except ConnectionResetError:
            if not reset_ok:
                raise AssertionError("the proxy reset the TCP connection instead of closing it") from None
            return
        finally:
            self.sock.settimeout(IO_TIMEOUT)
        assert chunk == b"", f"bytes after the proxy's Close: {chunk!r}"


def open_ws(
    port: int, token: str | None, *, protocols: str | None = None, key: str | None = None, early: bytes = b""
) -> tuple[WsClient, Response]:
    """Upgrade a fresh connection; ``early`` goes out in the same sendall as the request."""
    key = key or new_key()
    offer = f"binary, token.{token}" if protocols is None else protocols
    sock = open_socket(port, timeout=IO_TIMEOUT)
    try:
        sock.sendall(get_request(port, "/websockify", upgrade_headers(key, offer)) + early)
        response, rest = read_head(sock)
    except BaseException:
        sock.close()
        raise
    if response.status != 101:
        sock.close()
        raise AssertionError(f"no upgrade: {response.raw!r}")
    return WsClient(sock, rest), response


# --- RFB over the raw client ---------------------------------------------------------------------


def read_server_init(ws: WsClient) -> int:
    """ServerInit; the bytes per pixel (the framebuffer must be Xvnc's 800x600)."""
    width, height, pixel_format, name_length = struct.unpack("!HH16sI", ws.read(24))
    ws.read(name_length)
    assert (width, height) == (800, 600)
    return pixel_format[0] // 8


def rfb_until_security_result(ws: WsClient) -> None:
    """RFB 3.8 with the proxy up to its SecurityResult: version, type None (the only one), OK."""
    assert ws.read(12) == RFB_VERSION
    ws.send(RFB_VERSION)
    count = ws.read(1)[0]
    assert ws.read(count) == b"\x01", "the proxy offers the browser security type None only"
    ws.send(b"\x01")
    assert ws.read(4) == b"\0\0\0\0"


def rfb_handshake(ws: WsClient) -> int:
    """The browser's side of the whole handshake, ClientInit shared; the bytes per pixel."""
    rfb_until_security_result(ws)
    ws.send(b"\x01")
    return read_server_init(ws)


def read_update(ws: WsClient, bytes_per_pixel: int) -> int:
    """One whole FramebufferUpdate of Raw rectangles; the pixels it covers."""
    kind, _pad, count = struct.unpack("!BBH", ws.read(4))
    assert kind == 0, f"expected a FramebufferUpdate, got message type {kind}"
    pixels = 0
    for _ in range(count):
        _x, _y, w, h, encoding = struct.unpack("!HHHHi", ws.read(12))
        assert encoding == 0, f"asked for Raw only, got encoding {encoding}"
        ws.read(w * h * bytes_per_pixel)
        pixels += w * h
    return pixels


def assert_update_arrives(ws: WsClient, bytes_per_pixel: int) -> None:
    ws.send(RAW_ONLY + update_request())
    assert read_update(ws, bytes_per_pixel) >= REGION * REGION


def open_console(port: int, token: str) -> tuple[WsClient, int]:
    ws, _ = open_ws(port, token)
    try:
        return ws, rfb_handshake(ws)
    except BaseException:
        ws.close()
        raise


def assert_proxy_serves(proxy: ProxyProcess, token: str) -> None:
    """The process is alive and a new, normal console works end to end."""
    assert proxy.process.poll() is None, f"the proxy exited:\n{proxy.log_text()}"
    ws, bpp = open_console(proxy.port, token)
    with closing(ws):
        assert_update_arrives(ws, bpp)


@pytest.fixture
def console_token(mint: Mint, xvnc_vncauth: XvncServer) -> str:
    return mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password)


# --- 1. hostile frames ---------------------------------------------------------------------------

HOSTILE = [
    pytest.param(lambda: client_frame(OP_BINARY, update_request(), masked=False), 1002, id="unmasked"),
    pytest.param(lambda: client_frame(OP_BINARY, update_request(), rsv=0b100), 1002, id="rsv1"),
    pytest.param(lambda: client_frame(OP_TEXT, b"hello"), 1003, id="text"),
    pytest.param(lambda: client_frame(OP_CONT, update_request()), 1002, id="continuation-without-message"),
    pytest.param(lambda: client_frame(OP_PING, bytes(126)), 1002, id="ping-126-bytes"),
    pytest.param(lambda: client_frame(OP_PING, b"half", fin=False), 1002, id="fragmented-ping"),
    pytest.param(lambda: client_frame(OP_CLOSE, b"\x03"), 1002, id="close-one-byte"),
]


def fail_and_close(proxy: ProxyProcess, token: str, hostile: bytes, code: int) -> None:
    """Open a console and send it the hostile bytes: the proxy's Close carries ``code``; the
    process serves a new console meanwhile; and once the browser answers the Close, as a browser
    does, the proxy ends the TCP connection promptly."""
    ws, _ = open_console(proxy.port, token)
    with closing(ws):
        ws.send_raw(hostile)
        assert ws.wait_close() == (code, REASONS[code])
        assert_proxy_serves(proxy, token)
        # the proxy already closed the connection: as good
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            ws.send_raw(client_frame(OP_CLOSE, close_payload(code)))
        ws.expect_eof(PROMPT, reset_ok=True)
    assert proxy.process.poll() is None, f"the proxy exited:\n{proxy.log_text()}"


@pytest.mark.parametrize(("hostile", "code"), HOSTILE)
def test_hostile_frame_gets_its_close_code_and_the_proxy_keeps_serving(
    proxy: ProxyProcess, console_token: str, hostile: Callable[[], bytes], code: int
) -> None:
    """Each RFC 6455 violation mid-session fails the connection with its own code (a browser's
    console shows it), and ends only that connection: the process serves the next console."""
    fail_and_close(proxy, console_token, hostile(), code)


def test_oversized_frame_is_refused_from_its_header(
    proxy_factory: Callable[..., ProxyProcess], console_token: str
) -> None:
    """1009 as soon as a header announces more than --max-message-size: the payload is never
    sent, so a proxy that waited for (or buffered) it would never answer."""
    small = proxy_factory("--max-message-size", str(MAX_MESSAGE))
    fail_and_close(small, console_token, client_frame(OP_BINARY, length=MAX_MESSAGE + 1), 1009)


# --- 2, 3, 4. control frames and the close handshake --------------------------------------------


@pytest.mark.parametrize("payload", [b"", b"keepalive", bytes(range(125))], ids=["empty", "short", "125-bytes"])
def test_ping_gets_its_pong_and_the_session_goes_on(proxy: ProxyProcess, console_token: str, payload: bytes) -> None:
    """Browsers and intermediaries ping idle consoles: the Pong echoes the payload exactly, and
    the RFB stream is not disturbed by the control frame."""
    ws, bpp = open_console(proxy.port, console_token)
    with closing(ws):
        ws.send_raw(client_frame(OP_PING, payload))
        assert ws.wait_pong() == payload
        assert_update_arrives(ws, bpp)


def test_browser_close_is_echoed_and_tcp_closed(proxy: ProxyProcess, console_token: str) -> None:
    """The browser's Close(1000, "bye") gets a Close echoing 1000, then the proxy (the server
    closes TCP first, RFC 6455 7.1.1) ends the connection cleanly, not by reset or timeout."""
    ws, _ = open_console(proxy.port, console_token)
    with closing(ws):
        ws.send_raw(client_frame(OP_CLOSE, close_payload(1000, "bye")))
        code, _ = ws.wait_close()
        assert code == 1000
        ws.expect_eof(PROMPT)


def test_proxy_initiated_close_keeps_its_code(proxy: ProxyProcess, mint: Mint) -> None:
    """Nothing listens at the token's port: Close 4500 target_unreachable reaches the browser
    intact (not lost to a reset), and the browser's answering Close ends the connection at once."""
    ws, _ = open_ws(proxy.port, mint(host="127.0.0.1", port=free_port()))
    with closing(ws):
        assert ws.wait_close() == (4500, "target_unreachable")
        ws.send_raw(client_frame(OP_CLOSE, close_payload(4500)))
        ws.expect_eof(PROMPT)


# --- 5. pipelining ------------------------------------------------------------------------------


def test_bytes_pipelined_behind_the_upgrade_request_are_not_lost(proxy: ProxyProcess, console_token: str) -> None:
    """The RFB version frame sent in the same write as the HTTP request (the server reads both at
    once) still reaches the session: the proxy answers it with the security types."""
    ws, _ = open_ws(proxy.port, console_token, early=client_frame(OP_BINARY, RFB_VERSION))
    with closing(ws):
        assert ws.read(12) == RFB_VERSION
        assert ws.read(2) == b"\x01\x01", "the pipelined version line was lost"
        ws.send(b"\x01")
        assert ws.read(4) == b"\0\0\0\0"
        ws.send(b"\x01")
        assert_update_arrives(ws, read_server_init(ws))


# --- 6, 7. the upgrade itself -------------------------------------------------------------------

BAD_UPGRADES = [
    pytest.param({"Upgrade": None, "Connection": None}, 400, "websocket_required", id="no-upgrade-headers"),
    pytest.param({"Connection": "keep-alive"}, 400, "websocket_required", id="connection-without-upgrade"),
    pytest.param({"Sec-WebSocket-Version": "8"}, 426, "websocket_version", id="version-8"),
    pytest.param(
        {"Sec-WebSocket-Key": base64.b64encode(bytes(15)).decode()}, 400, "websocket_required", id="key-15-bytes"
    ),
    pytest.param({"Sec-WebSocket-Key": "not*base64*at*all*here=="}, 400, "websocket_required", id="key-not-base64"),
    pytest.param({"Sec-WebSocket-Key": None}, 400, "websocket_required", id="no-key"),
]


@pytest.mark.parametrize(("change", "status", "error"), BAD_UPGRADES)
def test_bad_upgrade_is_refused_before_any_token_work(
    proxy: ProxyProcess, console_token: str, change: dict[str, str | None], status: int, error: str
) -> None:
    """A request that cannot become a websocket is refused as such, as JSON, whatever its token:
    valid, garbage or missing all get the same answer (the token is not even looked at), and the
    query string's token is never echoed back."""
    headers = upgrade_headers(new_key(), "binary")
    for name, value in change.items():
        if value is None:
            del headers[name]
        else:
            headers[name] = value
    for query in (f"?token={console_token}", "?token=not.a.token", ""):
        response = http_exchange(proxy.port, get_request(proxy.port, f"/websockify{query}", headers))
        assert response.status == status, response.raw
        assert response.header("Content-Type")[0].startswith("application/json")
        assert json.loads(response.body)["error"] == error
        assert response.header("Sec-WebSocket-Version") == (["13"] if status == 426 else [])
        assert console_token.encode() not in response.raw
        assert b"not.a.token" not in response.raw


@pytest.mark.parametrize(
    ("offer", "selected"),
    [
        pytest.param("binary, token.{t}", ["binary"], id="binary-first"),
        pytest.param("token.{t}, binary", ["binary"], id="binary-last"),
        pytest.param("token.{t}", [], id="token-only"),
    ],
)
def test_switching_protocols_headers(proxy: ProxyProcess, console_token: str, offer: str, selected: list[str]) -> None:
    """The 101 per RFC 6455 4.2.2 (the RFC's own example key and accept value): "binary" when
    offered, never the token subprotocol, and no subprotocol header when only the token was
    offered (a browser fails a connection whose server picks a protocol it did not offer)."""
    ws, response = open_ws(proxy.port, console_token, protocols=offer.format(t=console_token), key=RFC_KEY)
    with closing(ws):
        assert response.raw.startswith(b"HTTP/1.1 101 ")
        assert response.header("Sec-WebSocket-Accept") == [RFC_ACCEPT]
        assert [v.lower() for v in response.header("Upgrade")] == ["websocket"]
        assert [v.lower() for v in response.header("Connection")] == ["upgrade"]
        assert response.header("Sec-WebSocket-Protocol") == selected
        assert console_token.encode() not in response.raw
        assert ws.read(12) == RFB_VERSION  # and the websocket behind it is live


def test_accept_value_for_a_random_key(proxy: ProxyProcess, console_token: str) -> None:
    """Not just the RFC's example: the accept value is SHA-1(key + GUID), base64, for any key."""
    key = new_key()
    ws, response = open_ws(proxy.port, console_token, key=key)
    with closing(ws):
        assert response.header("Sec-WebSocket-Accept") == [accept_value(key)]


# --- 8. fragmented messages ---------------------------------------------------------------------


def test_fragmented_messages_are_relayed_as_a_stream(proxy: ProxyProcess, console_token: str) -> None:
    """A binary message split over continuation frames, with a ping and an empty fragment in
    between, is the same RFB byte stream: ClientInit, SetEncodings and an update request cut at
    arbitrary points still open the console and get the update."""
    ws, _ = open_ws(proxy.port, console_token)
    with closing(ws):
        rfb_until_security_result(ws)
        stream = b"\x01" + RAW_ONLY + update_request()  # ClientInit | SetEncodings | FBUpdateRequest
        for frame in (
            client_frame(OP_BINARY, stream[:3], fin=False),
            client_frame(OP_PING, b"between fragments"),
            client_frame(OP_CONT, stream[3:11], fin=False),
            client_frame(OP_CONT, b"", fin=False),
            client_frame(OP_CONT, stream[11:]),
        ):
            ws.send_raw(frame)
        assert ws.wait_pong() == b"between fragments"
        bpp = read_server_init(ws)
        assert read_update(ws, bpp) >= REGION * REGION
        assert_update_arrives(ws, bpp)  # and the message boundary left the stream in step
