"""The plain-HTTP front door on the wire: what it serves itself, and what it hands to Tornado.

Why: the front door now accepts every plain-HTTP connection. A well-formed ``GET /websockify``
is admitted and upgraded there; anything else must reach Tornado as if Tornado had accepted
the connection (same bytes, same answers, keep-alive intact). A request served by the wrong one
still "works", so each test says who answered: Tornado's responses carry its ``Server:
TornadoServer`` header; the front door's refusals carry exactly their own fields and no
Server header.

Real proxy processes over raw loopback sockets, as a browser's bytes arrive (one byte at a
time, pipelined, oversized); the head timeout, the linger after a refusal and the broker's wait
are tested in-process, where the timeouts can be short. Every wait is bounded and ends at its
event, never at a sleep.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import closing
from dataclasses import dataclass

import pytest
import tornado.httpserver
import tornado.netutil
from proxyproc import ProxyProcess, free_port
from rawws import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    RawClient,
    accept_value,
    client_frame,
    close_payload,
    get_request,
    new_key,
    open_socket,
    parse_server_frame,
    upgrade_headers,
)
from xvnc import XvncServer

from console_proxy import frontdoor, server, token, upgrade, wsconn
from console_proxy.admission import Refusal
from console_proxy.config import ProxyConfig
from console_proxy.events import Events
from console_proxy.frontdoor import MAX_HEAD, FrontDoor
from console_proxy.keyring import Keyring
from console_proxy.relay import ConsoleSession
from console_proxy.token import Claims

Mint = Callable[..., str]

#: Upper bound for any single wait on the wire (each ends as soon as its event arrives).
IO_TIMEOUT = 5.0
RFB_VERSION = b"RFB 003.008\n"
#: The front door's refusal fields, in order, before Content-Length and Connection.
REFUSAL_FIELDS = [
    ("Content-Type", "application/json"),
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
]


# --- the raw HTTP client ---------------------------------------------------------------------------


@dataclass
class Response:
    """One HTTP response exactly as it came off the wire."""

    status: int
    fields: list[tuple[str, str]]
    body: bytes
    raw: bytes

    def header(self, name: str) -> list[str]:
        return [value for key, value in self.fields if key.lower() == name.lower()]

    @property
    def by_tornado(self) -> bool:
        """Tornado's RequestHandler stamps every answer with its Server header; the front door never."""
        return any(value.startswith("TornadoServer/") for value in self.header("Server"))

    def json(self) -> dict[str, object]:
        return json.loads(self.body)


class Wire:
    """A loopback connection whose responses are read one at a time, pipelined ones included."""

    def __init__(self, port: int) -> None:
        self.sock = open_socket(port, timeout=IO_TIMEOUT)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _more(self, what: str) -> None:
        chunk = self.sock.recv(65536)
        assert chunk, f"the connection ended inside {what}: {self.buffer!r}"
        self.buffer += chunk

    def response(self) -> Response:
        """The next whole, well-formed response: a status line, fields, and exactly Content-Length bytes."""
        while b"\r\n\r\n" not in self.buffer:
            self._more("a response head")
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        version, status, _reason = status_line.split(" ", 2)
        assert version == "HTTP/1.1" and len(status) == 3 and status.isdigit(), status_line
        fields = []
        for line in lines:
            name, colon, value = line.partition(":")
            assert colon and name and name == name.strip(), f"malformed response field {line!r}"
            fields.append((name, value.strip()))
        lengths = [value for name, value in fields if name.lower() == "content-length"]
        assert len(lengths) == 1 and lengths[0].isdigit(), f"no single Content-Length: {head!r}"
        while len(self.buffer) < int(lengths[0]):
            self._more("a response body")
        body, self.buffer = self.buffer[: int(lengths[0])], self.buffer[int(lengths[0]) :]
        return Response(int(status), fields, body, head + b"\r\n\r\n" + body)

    def eof(self) -> bytes:
        """What comes before the end of the connection: an end, not a reset (which could lose
        the answer in front of it) nor the timeout."""
        rest = self.buffer
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                raise AssertionError(f"the connection was reset, not closed, after {rest!r}") from None
            if not chunk:
                return rest
            rest += chunk

    def close(self) -> None:
        self.sock.close()


def exchange(port: int, request: bytes) -> Response:
    with closing(Wire(port)) as wire:
        wire.send(request)
        return wire.response()


def request(path: str, *fields: str, method: str = "GET", version: str = "HTTP/1.1", eol: str = "\r\n") -> bytes:
    return eol.join([f"{method} {path} {version}", "Host: 127.0.0.1", *fields, "", ""]).encode("latin-1")


def upgrade_fields(**change: str | None) -> list[str]:
    """A browser's upgrade fields (no token), with some changed or (None) removed."""
    fields: dict[str, str | None] = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": new_key(),
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Protocol": "binary",
    }
    fields.update(change)
    return [f"{name.replace('_', '-')}: {value}" for name, value in fields.items() if value is not None]


def assert_healthy(response: Response) -> None:
    assert response.status == 200, response.raw
    assert response.json()["status"] == "ok"
    assert response.by_tornado, f"not Tornado's answer: {response.raw!r}"


# --- (a) Tornado still serves what the front door hands over ----------------------------------------


def test_healthz_is_tornados_and_the_connection_stays_alive(proxy: ProxyProcess) -> None:
    """The handed-over connection is Tornado's for good: a keep-alive second request on it is
    answered too (the socket, not only the first request, was handed over)."""
    with closing(Wire(proxy.port)) as wire:
        wire.send(request("/healthz"))
        first = wire.response()
        assert_healthy(first)
        assert first.header("Connection") != ["close"]
        wire.send(request("/metrics"))
        second = wire.response()
        assert second.status == 200 and second.by_tornado
        assert b"consolegate_proxy_active_sessions" in second.body


def test_a_bare_lf_head_is_tornados(proxy: ProxyProcess) -> None:
    """LF-only line ends are not the front door's (only CRLF CRLF is); Tornado still accepts them."""
    assert_healthy(exchange(proxy.port, request("/healthz", eol="\n")))


def assert_declined(response: Response) -> None:
    """Tornado's /websockify route behind the front door: never an upgrade, always the pipeline's
    websocket_required (the front door would have said token_missing to these requests)."""
    assert_front_door_refusal(response, 400, "websocket_required")


@pytest.mark.parametrize("shape", ["bare-LF", "HTTP/1.0", "with a body", "behind /healthz"])
def test_tornados_route_never_upgrades_behind_the_front_door(proxy: ProxyProcess, mint: Mint, shape: str) -> None:
    """Every /websockify head the front door hands to Tornado, here with a token that would open
    a console: refused websocket_required through the upgrade pipeline, never a 101 (one set of
    upgrade rules: the front door's)."""
    tok = mint(host="127.0.0.1", port=free_port())
    fields = upgrade_fields(Sec_WebSocket_Protocol=f"binary, token.{tok}")
    heads = {
        "bare-LF": request("/websockify", *fields, eol="\n"),
        "HTTP/1.0": request("/websockify", *fields, version="HTTP/1.0"),
        "with a body": request("/websockify", *fields, "Content-Length: 0"),
        "behind /healthz": request("/healthz") + request("/websockify", *fields),
    }
    with closing(Wire(proxy.port)) as wire:
        wire.send(heads[shape])
        if shape == "behind /healthz":
            assert_healthy(wire.response())
        assert_declined(wire.response())


def test_a_bare_lf_upgrade_head_is_tornados_to_refuse(proxy: ProxyProcess) -> None:
    """Even for /websockify: a bare-LF upgrade head is handed over, and Tornado's route, which
    never upgrades behind the front door, refuses it through the upgrade pipeline."""
    assert_declined(exchange(proxy.port, request("/websockify", *upgrade_fields(), eol="\n")))


def test_a_head_over_the_front_doors_limit_is_tornados(proxy: ProxyProcess) -> None:
    """A head longer than MAX_HEAD, its first MAX_HEAD + 1 bytes written before the rest: the
    front door gives up on it and Tornado, with its larger limit, reads all of it from the bytes
    already read plus the socket."""
    big = "X-Big: " + "b" * (2 * MAX_HEAD)
    wire_bytes = request("/healthz", big)
    with closing(Wire(proxy.port)) as wire:
        wire.send(wire_bytes[: MAX_HEAD + 1])
        wire.send(wire_bytes[MAX_HEAD + 1 :])
        assert_healthy(wire.response())


def test_a_head_sent_one_byte_at_a_time_is_tornados(proxy: ProxyProcess) -> None:
    """Every byte its own write (TCP_NODELAY): the front door keeps reading until the head is
    whole, then hands it over with every byte read so far."""
    with closing(Wire(proxy.port)) as wire:
        for byte in request("/healthz", "Accept: */*"):
            wire.send(bytes((byte,)))
        assert_healthy(wire.response())


def test_an_upgrade_head_sent_one_byte_at_a_time_is_the_front_doors(proxy: ProxyProcess) -> None:
    """The same slow arrival for /websockify: the end of head is recognised however the CRLF CRLF
    is split, and the front door answers (its refusal, without Tornado's Server header)."""
    with closing(Wire(proxy.port)) as wire:
        for byte in request("/websockify", *upgrade_fields()):
            wire.send(bytes((byte,)))
        response = wire.response()
    assert not response.by_tornado, response.raw
    assert (response.status, response.json()["error"]) == (400, "token_missing")


def test_two_pipelined_requests_in_one_write_get_two_answers(proxy: ProxyProcess) -> None:
    """Keep-alive pipelining: the second request, read by the front door along with the first,
    is not lost in the hand-over."""
    with closing(Wire(proxy.port)) as wire:
        wire.send(request("/healthz") + request("/healthz", "Connection: close"))
        assert_healthy(wire.response())
        assert_healthy(wire.response())
        assert wire.eof() == b""


def test_a_request_pipelined_behind_a_handed_over_one_may_be_an_upgrade(proxy: ProxyProcess) -> None:
    """Once handed over, the connection is Tornado's: a /websockify behind /healthz is answered
    by Tornado's route (refused: it never upgrades behind the front door), not by the front door."""
    with closing(Wire(proxy.port)) as wire:
        wire.send(request("/healthz") + request("/websockify", *upgrade_fields()))
        assert_healthy(wire.response())
        second = wire.response()
        assert wire.eof() == b""
    assert_declined(second)


def test_post_to_websockify_is_tornados(proxy: ProxyProcess) -> None:
    """Another method on the console path: Tornado's handler has no POST, so 405, as before."""
    with closing(Wire(proxy.port)) as wire:
        wire.send(request("/websockify", "Content-Length: 0", method="POST"))
        response = wire.response()
    assert response.status == 405 and response.by_tornado, response.raw


def test_http_1_0_upgrade_is_tornados(proxy: ProxyProcess) -> None:
    """HTTP/1.0 is never the front door's (RFC 6455: an upgrade is HTTP/1.1): Tornado's route
    refuses it, the answer is whole and the connection then ends."""
    with closing(Wire(proxy.port)) as wire:
        wire.send(request("/websockify", *upgrade_fields(), version="HTTP/1.0"))
        response = wire.response()
        assert wire.eof() == b""
    assert_declined(response)


@pytest.mark.parametrize("field", ["Content-Length: 0", "Transfer-Encoding: chunked"])
def test_an_upgrade_with_a_body_is_tornados(proxy: ProxyProcess, field: str) -> None:
    """A body announced on an upgrade would be read as websocket frames by the front door: it is
    Tornado's, which reads the body and refuses (its route never upgrades behind the front door)."""
    body = b"0\r\n\r\n" if "chunked" in field else b""
    assert_declined(exchange(proxy.port, request("/websockify", *upgrade_fields(), field) + body))


def test_tornados_own_head_limit_still_applies_after_the_hand_over(proxy: ProxyProcess) -> None:
    """A header that never ends: the front door hands it over past MAX_HEAD, and Tornado ends the
    connection at its own 64 KiB limit instead of buffering on. (While we keep writing, every
    write is a socket event, so this holds whatever chunks the proxy happened to read.) The
    process goes on serving."""
    cap = 4 << 20
    with closing(Wire(proxy.port)) as wire:
        wire.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        sent = 0
        try:
            while sent < cap:
                wire.send(b"b" * 8192)
                sent += 8192
        except (BrokenPipeError, ConnectionResetError):
            pass  # the proxy ended the connection: refused
        assert sent < cap, "the proxy took 4 MiB of one header line without ending the connection"
    assert_healthy(exchange(proxy.port, request("/healthz")))


# --- (b) the front door's own refusals --------------------------------------------------------------


def refusal(port: int, *fields: str, path: str = "/websockify") -> tuple[Response, bytes]:
    """The front door's answer and what came after it before the connection ended."""
    with closing(Wire(port)) as wire:
        wire.send(request(path, *fields))
        response = wire.response()
        return response, wire.eof()


def assert_front_door_refusal(response: Response, status: int, code: str) -> None:
    """Exactly the front door's fields, in order, and a JSON body of exactly error and message."""
    hint = [("Sec-WebSocket-Version", "13")] if status == 426 else []
    date = response.fields[0]
    assert date[0] == "Date" and abs(email.utils.parsedate_to_datetime(date[1]).timestamp() - time.time()) < 60
    assert response.fields[1:] == [
        *REFUSAL_FIELDS,
        *hint,
        ("Content-Length", str(len(response.body))),
        ("Connection", "close"),
    ], response.raw
    body = response.json()
    assert set(body) == {"error", "message"} and body["error"] == code and body["message"], body
    assert response.status == status


def test_missing_token_is_refused_by_the_front_door(proxy: ProxyProcess) -> None:
    """400 token_missing, no Server header, Connection: close, and then the connection ends
    cleanly (our side half-closed, not reset)."""
    response, after = refusal(proxy.port, *upgrade_fields())
    assert_front_door_refusal(response, 400, "token_missing")
    assert response.raw.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert after == b""


def test_a_plain_get_of_websockify_is_refused_as_not_a_websocket(proxy: ProxyProcess, mint: Mint) -> None:
    """No Upgrade fields: 400 websocket_required, whatever the token (it is never looked at)."""
    tok = mint(host="127.0.0.1", port=5900)
    response, after = refusal(proxy.port, path=f"/websockify?token={tok}")
    assert_front_door_refusal(response, 400, "websocket_required")
    assert tok.encode() not in response.raw and after == b""


def test_websocket_version_8_gets_426_with_the_version_spoken(proxy: ProxyProcess) -> None:
    response, after = refusal(proxy.port, *upgrade_fields(Sec_WebSocket_Version="8"))
    assert_front_door_refusal(response, 426, "websocket_version")
    assert response.raw.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    assert response.header("Sec-WebSocket-Version") == ["13"] and after == b""


@pytest.mark.parametrize("via", ["subprotocol", "query"])
def test_a_bad_token_is_refused_and_never_echoed(proxy: ProxyProcess, mint: Mint, via: str) -> None:
    """An expired token either way it may travel: 401 token_expired, and the token is nowhere in
    the answer."""
    tok = mint(host="127.0.0.1", port=5900, now=time.time() - 3600)
    if via == "query":
        response, _ = refusal(proxy.port, *upgrade_fields(), path=f"/websockify?token={tok}")
    else:
        response, _ = refusal(proxy.port, *upgrade_fields(Sec_WebSocket_Protocol=f"binary, token.{tok}"))
    assert_front_door_refusal(response, 401, "token_expired")
    assert tok.encode() not in response.raw


@pytest.mark.parametrize("junk", [b"\x88\x82abcdxx", bytes(300_000)], ids=["a-frame", "300KB"])
def test_a_refusal_followed_by_pipelined_junk_is_delivered_whole(proxy: ProxyProcess, junk: bytes) -> None:
    """A browser that wrote more behind its refused request (here in the same write, more than one
    read's worth): closing with those bytes unread would reset the connection and could destroy
    the answer in flight. The whole answer arrives, then an orderly end."""
    with closing(Wire(proxy.port)) as wire:
        wire.send(request("/websockify", *upgrade_fields()) + junk)
        response = wire.response()
        assert wire.eof() == b""
    assert_front_door_refusal(response, 400, "token_missing")


def test_refusals_still_count_in_metrics(proxy_factory: Callable[..., ProxyProcess]) -> None:
    """The front door's refusals are counted like Tornado's were."""
    fresh = proxy_factory()
    refusal(fresh.port, *upgrade_fields(Sec_WebSocket_Version="8"))
    metrics = exchange(fresh.port, request("/metrics")).body.decode()
    assert 'consolegate_proxy_refusals_total{code="websocket_version"} 1' in metrics.splitlines()


def test_two_host_lines_are_refused_as_tornado_would(proxy: ProxyProcess, mint: Mint) -> None:
    """Tornado answers a request with two Host lines 400 before any handler runs; the front door
    must not upgrade it (as Host "a,b") but leave it to Tornado."""
    tok = mint(host="127.0.0.1", port=free_port())
    head = request("/websockify", "Host: 127.0.0.2", *upgrade_fields(Sec_WebSocket_Protocol=f"binary, token.{tok}"))
    with closing(Wire(proxy.port)) as wire:
        wire.send(head)
        while b"\r\n" not in wire.buffer:
            wire._more("a status line")
    assert wire.buffer.startswith(b"HTTP/1.1 400 "), wire.buffer


# --- (c) an upgrade through the front door to a real Xvnc ------------------------------------------


@pytest.fixture
def console_token(mint: Mint, xvnc_vncauth: XvncServer) -> str:
    return mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password)


def upgrade_head(port: int, tok: str, key: str, *, via: str = "subprotocol") -> bytes:
    if via == "query":
        return get_request(port, f"/websockify?token={tok}", upgrade_headers(key, "binary"))
    return get_request(port, "/websockify", upgrade_headers(key, f"binary, token.{tok}"))


def open_with_early(port: int, head: bytes, early: bytes) -> tuple[RawClient, Response]:
    """Write the upgrade request and ``early`` in one sendall; the 101 and a client for what follows."""
    wire = Wire(port)
    try:
        wire.send(head + early)
        while b"\r\n\r\n" not in wire.buffer:
            wire._more("the 101")
        raw_head, _, rest = wire.buffer.partition(b"\r\n\r\n")
        status_line, *lines = raw_head.decode("latin-1").split("\r\n")
        fields = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines)]
        response = Response(int(status_line.split()[1]), fields, b"", raw_head)
        assert response.status == 101, raw_head
    except BaseException:
        wire.close()
        raise
    return RawClient(wire.sock, rest), response


def read_server_init(ws: RawClient) -> tuple[int, int, bytes]:
    width, height, _pixel_format, name_length = struct.unpack("!HH16sI", ws.read(24))
    return width, height, ws.read(name_length)


@pytest.mark.parametrize("via", ["subprotocol", "query"])
def test_upgrade_with_the_rfb_version_pipelined_reaches_server_init(
    proxy: ProxyProcess, console_token: str, via: str
) -> None:
    """The browser's first frame (its RFB version) in the same write as the request: the front
    door reads both at once and must hand the frame to the session, which then goes all the
    way to the desktop's ServerInit. The 101 is the front door's (accept value for our key, no
    Server header)."""
    key = new_key()
    ws, response = open_with_early(
        proxy.port, upgrade_head(proxy.port, console_token, key, via=via), client_frame(OP_BINARY, RFB_VERSION)
    )
    with closing(ws):
        assert response.header("Sec-WebSocket-Accept") == [accept_value(key)]
        assert response.header("Sec-WebSocket-Protocol") == ["binary"]
        assert response.header("Server") == []
        assert ws.read(12) == RFB_VERSION
        assert ws.read(2) == b"\x01\x01", "the pipelined version line was lost"
        ws.send(b"\x01")
        assert ws.read(4) == b"\0\0\0\0"
        ws.send(b"\x01")  # ClientInit, shared
        assert read_server_init(ws)[:2] == (800, 600)


def test_the_whole_client_handshake_pipelined_behind_the_request(proxy: ProxyProcess, console_token: str) -> None:
    """More than one frame behind the head (version, security choice, ClientInit as three frames):
    all of them reach the session in order, which answers each in turn up to ServerInit."""
    early = b"".join(client_frame(OP_BINARY, payload) for payload in (RFB_VERSION, b"\x01", b"\x01"))
    ws, _ = open_with_early(proxy.port, upgrade_head(proxy.port, console_token, new_key()), early)
    with closing(ws):
        assert ws.read(12) == RFB_VERSION
        assert ws.read(2) == b"\x01\x01"
        assert ws.read(4) == b"\0\0\0\0"
        assert read_server_init(ws)[:2] == (800, 600)


# --- (d) the access log ------------------------------------------------------------------------------


def test_the_101_is_logged_by_path_only(proxy_factory: Callable[..., ProxyProcess], mint: Mint) -> None:
    """An upgrade served by the front door gets its access line like Tornado's ("101 GET
    /websockify (client)"), and a token given as ``?token=`` never reaches the log, neither on
    the 101 nor on a refusal of the same URL."""
    fresh = proxy_factory()
    tok = mint(host="127.0.0.1", port=free_port(), password="n0tInTheLog")
    ws, _ = open_with_early(fresh.port, upgrade_head(fresh.port, tok, new_key(), via="query"), b"")
    ws.close()
    line = fresh.wait_for_log("101 GET /websockify")
    assert "101 GET /websockify (127.0.0.1)" in line and "tornado.access" in line
    expired = mint(host="127.0.0.1", port=5900, now=time.time() - 3600)
    refusal(fresh.port, *upgrade_fields(), path=f"/websockify?token={expired}")
    fresh.wait_for_log("401 GET /websockify (127.0.0.1)")
    fresh.wait_for_log('"event":"closed"')
    log = fresh.log_text()
    assert log.count("101 GET /websockify") == 1
    for secret in (tok, expired, "token=", "n0tInTheLog", *tok.split("."), *expired.split(".")):
        assert len(secret) < 16 or secret not in log, f"{secret[:12]}... reached the log"


# --- (e) in process: the head timeout, the linger, the broker's wait -----------------------------------

RING = Keyring.generate(time.time())


class RecordingDoorway(frontdoor.Doorway):
    """A Doorway that reports when its connection ends (the test's event, instead of a sleep)."""

    lost: asyncio.Queue[RecordingDoorway]

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        RecordingDoorway.lost.put_nowait(self)


class RecordingEvents(Events):
    """Session events as asyncio queues."""

    def __init__(self) -> None:
        super().__init__()
        self.closed_sessions: asyncio.Queue[ConsoleSession] = asyncio.Queue()

    def closed(self, session: ConsoleSession) -> None:
        super().closed(session)
        self.closed_sessions.put_nowait(session)


class HeldBroker:
    """A broker whose redemption waits until the test says how it ends."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()
        self.verdict: asyncio.Future[Refusal | None] = asyncio.get_running_loop().create_future()

    async def redeem(self, claims: Claims) -> None:
        self.asked.set()
        refusal = await self.verdict
        if refusal is not None:
            raise refusal

    def nudge(self) -> None:
        pass


@dataclass
class Door:
    door: FrontDoor
    state: server.ProxyState
    events: RecordingEvents
    port: int

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., object]]:
    """start(head_timeout, broker=None) -> Door, inside the test's own event loop; closed after."""
    monkeypatch.setattr(frontdoor, "Doorway", RecordingDoorway)
    monkeypatch.setattr(frontdoor, "SWEEP", 0.05)  # look for overdue heads often: short timeouts here
    doors: list[FrontDoor] = []

    async def start(head_timeout: float, broker: HeldBroker | None = None) -> Door:
        RecordingDoorway.lost = asyncio.Queue()
        events = RecordingEvents()
        state = server.ProxyState(ProxyConfig(handshake_timeout=60.0), RING.for_proxy(), broker=broker, events=events)
        http = tornado.httpserver.HTTPServer(server.make_app(state))
        door = FrontDoor(state, http, head_timeout)
        await door.listen("127.0.0.1", 0)
        doors.append(door)
        return Door(door, state, events, door.servers[0].sockets[0].getsockname()[1])

    yield start
    for door in doors:
        door.close()


async def ended(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it ends the connection (a reset counts as an end)."""
    received = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), IO_TIMEOUT):
            received += chunk
    except ConnectionResetError:
        pass
    return received


async def one_response(reader: asyncio.StreamReader) -> bytes:
    """One whole response off a keep-alive connection: its head, then Content-Length bytes."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT)
    length = next(
        int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
    )
    return head + await asyncio.wait_for(reader.readexactly(length), IO_TIMEOUT)


def test_a_connection_without_a_whole_head_is_cut_at_the_head_timeout(in_process) -> None:
    """Half a head and then silence: the server ends the connection at the head timeout, without
    a word, and the Doorway is gone (a slow-loris connection holds nothing for long). That a
    head may come in many writes is shown on the wire (one byte at a time, above)."""

    async def scenario() -> tuple[bytes, bool]:
        door = await in_process(0.2)
        reader, writer = await door.connect()
        writer.write(b"GET /websockify HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: webs")
        received = await ended(reader)
        doorway = await asyncio.wait_for(RecordingDoorway.lost.get(), IO_TIMEOUT)
        writer.close()
        return received, doorway.open

    assert asyncio.run(scenario()) == (b"", False)


def test_a_head_handed_over_unfinished_gets_no_second_window(in_process) -> None:
    """A head still unfinished past the front door's 8 KiB goes to Tornado, whose own header
    timeout (an hour in this fixture's server) would start afresh; the first head must still be
    complete within the front door's window, so a slow sender holds a connection once, not
    twice."""

    async def scenario() -> bytes:
        door = await in_process(0.3)
        reader, writer = await door.connect()
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"s" * 9000)
        received = await ended(reader)
        writer.close()
        return received

    assert asyncio.run(scenario()) == b""


class ShortReadPrefilled(frontdoor._Prefilled):
    """The hand-over's stream, reporting the moment Tornado's first head read came up short:
    the rest of the head is not in the socket yet (the test's event, instead of a sleep)."""

    short: asyncio.Event

    def read_until_regex(self, regex: bytes, max_bytes: int | None = None) -> Awaitable[bytes]:
        future = super().read_until_regex(regex, max_bytes)
        if isinstance(future, asyncio.Future) and not future.done():
            ShortReadPrefilled.short.set()
        return future


def test_a_head_whose_rest_comes_after_tornados_first_read_is_served(in_process, monkeypatch) -> None:
    """An overlong head in two writes, the second sent only once Tornado's first read of the
    handed-over connection has found no whole head (on a loaded machine the rest of a head
    sometimes comes that late): Tornado waits for it within the front door's window and
    answers. The window's timer once fired at Tornado's next loop turn (a monotonic deadline
    set on Tornado's wall clock), cutting such a connection without a word."""
    monkeypatch.setattr(frontdoor, "_Prefilled", ShortReadPrefilled)
    wire_bytes = request("/healthz", "X-Big: " + "b" * (2 * MAX_HEAD), "Connection: close")

    async def scenario() -> bytes:
        ShortReadPrefilled.short = asyncio.Event()
        door = await in_process(60.0)
        reader, writer = await door.connect()
        writer.write(wire_bytes[: MAX_HEAD + 1])
        await asyncio.wait_for(ShortReadPrefilled.short.wait(), IO_TIMEOUT)
        writer.write(wire_bytes[MAX_HEAD + 1 :])
        received = await ended(reader)
        writer.close()
        return received

    assert asyncio.run(scenario()).startswith(b"HTTP/1.1 200 OK\r\n")


def test_the_head_timeout_ends_with_the_hand_over(in_process) -> None:
    """The head timeout is the front door's only: a connection handed to Tornado is not cut by
    it. A second connection, opened later, is cut at its head timeout; the first's would have
    come before it, yet the first still serves a keep-alive request."""

    async def scenario() -> tuple[bytes, bytes]:
        door = await in_process(0.2)
        kept_reader, kept_writer = await door.connect()
        kept_writer.write(request("/healthz"))
        first = await one_response(kept_reader)
        slow_reader, slow_writer = await door.connect()
        slow_writer.write(b"GET /healthz HTTP/1.1\r\n")
        assert await ended(slow_reader) == b""
        kept_writer.write(request("/healthz", "Connection: close"))
        second = await ended(kept_reader)
        slow_writer.close()
        kept_writer.close()
        return first, second

    first, second = asyncio.run(scenario())
    assert first.startswith(b"HTTP/1.1 200 OK\r\n") and second.startswith(b"HTTP/1.1 200 OK\r\n")


def test_a_refused_browser_that_never_closes_is_cut_after_the_linger(in_process, monkeypatch) -> None:
    """After a refusal our side is half-closed; a browser that reads the answer but never closes
    its side is cut after LINGER, so it cannot hold the connection."""
    monkeypatch.setattr(upgrade, "LINGER", 0.2)

    async def scenario() -> tuple[bytes, bool]:
        door = await in_process(60.0)
        reader, writer = await door.connect()
        writer.write(request("/websockify", *upgrade_fields()))
        answer = await ended(reader)  # our end of stream arrives at once, the browser keeps its side
        doorway = await asyncio.wait_for(RecordingDoorway.lost.get(), IO_TIMEOUT)
        writer.close()
        return answer, doorway.open

    answer, still_open = asyncio.run(scenario())
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b'"token_missing"' in answer
    assert not still_open


def once_token(port: int) -> str:
    claims = token.new_claims(host="127.0.0.1", port=port, now=time.time(), ttl=60, single_use=True)
    return token.mint(claims, RING)


async def silent_upstream() -> tuple[asyncio.Server, int]:
    """A console server that accepts and never speaks: a session to it lives until something else
    ends it (its handshake timeout is 60 s here)."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    upstream = await asyncio.start_server(hold, "127.0.0.1", 0)
    return upstream, upstream.sockets[0].getsockname()[1]


async def asked_with_single_use(
    door: Door, broker: HeldBroker, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An upgrade with a single-use token for a console server on ``port``, once the broker has
    been asked to redeem it (and holds its answer)."""
    reader, writer = await door.connect()
    writer.write(get_request(door.port, "/websockify", upgrade_headers(new_key(), f"binary, token.{once_token(port)}")))
    await asyncio.wait_for(broker.asked.wait(), IO_TIMEOUT)
    return reader, writer


def test_a_single_use_token_waits_for_the_broker_then_upgrades(in_process) -> None:
    """The front door answers only once the broker has redeemed the token: nothing before, the
    101 after; the session is registered and the upgrade's slot given back."""

    async def scenario() -> bytes:
        broker = HeldBroker()
        door = await in_process(60.0, broker)
        upstream, port = await silent_upstream()
        reader, writer = await asked_with_single_use(door, broker, port)
        assert door.state.pending == 1 and not door.state.sessions
        broker.verdict.set_result(None)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT)
        assert door.state.pending == 0 and len(door.state.sessions) == 1
        writer.close()
        await asyncio.wait_for(door.events.closed_sessions.get(), IO_TIMEOUT)
        upstream.close()
        return head

    assert asyncio.run(scenario()).startswith(b"HTTP/1.1 101 Switching Protocols\r\n")


def test_a_token_the_broker_refuses_is_refused_by_the_front_door(in_process) -> None:
    async def scenario() -> bytes:
        broker = HeldBroker()
        door = await in_process(60.0, broker)
        reader, writer = await asked_with_single_use(door, broker, free_port())
        broker.verdict.set_result(Refusal("token_used"))
        answer = await ended(reader)
        writer.close()
        assert door.state.pending == 0 and not door.state.sessions
        return answer

    answer = asyncio.run(scenario())
    assert answer.startswith(b"HTTP/1.1 409 Conflict\r\n") and b'"error": "token_used"' in answer


def test_a_browser_that_leaves_while_the_broker_answers_holds_no_session(in_process) -> None:
    """The browser closes while its single-use token is being redeemed; the broker then says yes.
    The session must end at once (the browser is gone), not wait for the upstream's 60 s
    handshake timeout with a silent server holding a slot."""

    async def scenario() -> tuple[str, int]:
        broker = HeldBroker()
        door = await in_process(60.0, broker)
        upstream, port = await silent_upstream()
        _reader, writer = await asked_with_single_use(door, broker, port)
        writer.close()
        await writer.wait_closed()
        broker.verdict.set_result(None)
        session = await asyncio.wait_for(door.events.closed_sessions.get(), IO_TIMEOUT)
        upstream.close()
        assert session.ending is not None
        return session.ending.reason, len(door.state.sessions) + door.state.pending

    assert asyncio.run(scenario()) == ("browser_closed", 0)


def test_the_front_door_listens_with_its_own_listener_only(in_process) -> None:
    """One loopback listener, serving through the front door's protocol: a connection there is a
    Doorway (so the tests above exercise the front door, not Tornado's own accept)."""

    async def scenario() -> bool:
        door = await in_process(60.0)
        assert len(door.door.servers) == 1
        reader, writer = await door.connect()
        writer.write(request("/healthz", "Connection: close"))
        answer = await ended(reader)
        doorway = await asyncio.wait_for(RecordingDoorway.lost.get(), IO_TIMEOUT)  # handed over: our transport ends
        writer.close()
        return answer.startswith(b"HTTP/1.1 200 OK\r\n") and not doorway.open

    assert asyncio.run(scenario())


def test_closing_the_front_door_stops_accepting(in_process) -> None:
    async def scenario() -> None:
        door = await in_process(60.0)
        door.door.close()
        await door.door.servers[0].wait_closed()
        with pytest.raises(OSError):
            await door.connect()

    asyncio.run(scenario())


# --- (f) in process: bytes the front door read, carried over to Tornado ----------------------------------


def sent_before_the_loop_runs(port: int, data: bytes) -> socket.socket:
    """Connect and write ``data`` without yielding to the event loop: the kernel holds it all, so
    the front door's first read gets all of it at once (asyncio reads up to 256 KiB)."""
    sock = socket.socket()
    sock.connect(("127.0.0.1", port))  # completes in the kernel's backlog, no accept needed
    sock.setblocking(False)
    sent = sock.send(data)
    if sent != len(data):
        sock.close()
        pytest.fail(f"the kernel took {sent} of {len(data)} bytes in one send; the test needs all")
    return sock


async def server_frames(reader: asyncio.StreamReader, until_opcode: int) -> tuple[bytes, list[tuple[int, bytes]]]:
    """The response head and the server frames after it, up to one with ``until_opcode``."""
    raw = bytearray(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT))
    head, frames, rest = bytes(raw), [], bytearray()
    while not frames or frames[-1][0] != until_opcode:
        parsed = parse_server_frame(rest)
        if parsed is None:
            chunk = await asyncio.wait_for(reader.read(65536), IO_TIMEOUT)
            assert chunk, f"the connection ended after {len(frames)} frames, before opcode {until_opcode}"
            rest += chunk
            continue
        frames.append(parsed)
    return head, frames


PINGS = 800  # 800 masked pings of 104 bytes: about 88 KB behind the head, more than 64 KiB


async def tornado_route() -> tuple[int, tornado.httpserver.HTTPServer, server.ProxyState, RecordingEvents]:
    """Tornado's listener with its /websockify route upgrading, as a proxy serving TLS has it
    (here on plain sockets: the route's code is the same)."""
    events = RecordingEvents()
    state = server.ProxyState(ProxyConfig(handshake_timeout=60.0), RING.for_proxy(), events=events)
    http = tornado.httpserver.HTTPServer(server.make_app(state, upgrades=True))
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    http.add_sockets(sockets)
    return sockets[0].getsockname()[1], http, state, events


@pytest.mark.parametrize("listener", ["front-door", "tornado-route"])
def test_every_frame_pipelined_behind_the_head_reaches_the_websocket(in_process, listener: str) -> None:
    """A browser that wrote its head and then ~88 KB of frames (pings, then a Close) before the
    proxy read anything: whichever listener upgrades it, every frame must be seen, in order: the
    last pong answers the last ping, and the Close is echoed. On Tornado's route (a proxy
    serving TLS), the bytes past Tornado's first 64 KiB read must survive the detach too."""
    version = "HTTP/1.1"

    async def scenario() -> tuple[bytes, list[tuple[int, bytes]]]:
        http = None
        if listener == "front-door":
            listening = (await in_process(60.0)).port
        else:
            listening, http, _, _ = await tornado_route()
        upstream, port = await silent_upstream()
        tok = token.mint(token.new_claims(host="127.0.0.1", port=port, now=time.time(), ttl=60), RING)
        fields = upgrade_headers(new_key(), f"binary, token.{tok}")
        head = "\r\n".join(
            [f"GET /websockify {version}", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in fields.items()), "", ""]
        ).encode()
        frames = b"".join(client_frame(OP_PING, struct.pack("!I", i) + bytes(100)) for i in range(PINGS))
        sock = sent_before_the_loop_runs(listening, head + frames + client_frame(OP_CLOSE, close_payload(1000)))
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            return await server_frames(reader, OP_CLOSE)
        finally:
            writer.close()
            upstream.close()
            if http is not None:
                http.stop()

    head, frames = asyncio.run(scenario())
    assert head.startswith(b"HTTP/1.1 101 ")
    pongs = [payload for opcode, payload in frames if opcode == OP_PONG]
    assert pongs and pongs[-1] == struct.pack("!I", PINGS - 1) + bytes(100), "the last ping was not answered"
    assert frames[-1] == (OP_CLOSE, close_payload(1000))


def test_a_whole_head_over_tornados_limit_handed_over_at_once_is_refused(in_process) -> None:
    """A complete 100 KB bare-LF head in the front door's first read is handed over (bare LF is
    Tornado's); Tornado must refuse it (over its 64 KiB max_header_size) and end the connection
    at once — not read one chunk, find no end and wait for a socket that has nothing more."""

    async def scenario() -> bytes:
        door = await in_process(60.0)
        big = "\n".join(["GET /healthz HTTP/1.1", "Host: 127.0.0.1", "X-Big: " + "b" * 100_000, "", ""]).encode()
        reader, writer = await asyncio.open_connection(sock=sent_before_the_loop_runs(door.port, big))
        try:
            return await ended(reader)
        finally:
            writer.close()

    assert not asyncio.run(scenario()).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("token_given", [False, True], ids=["no-token", "valid-token"])
def test_an_upgrade_head_over_max_head_is_the_front_doors(in_process, token_given: bool) -> None:
    """A browser with many cookies for the console's site: a 16 KiB upgrade head, all in one
    read, is still the front door's (up to Tornado's own 64 KiB, MAX_UPGRADE_HEAD), since
    Tornado's route never upgrades behind it: refused without a token, upgraded with one."""

    async def scenario() -> bytes:
        door = await in_process(60.0)
        upstream, port = await silent_upstream()
        tok = token.mint(token.new_claims(host="127.0.0.1", port=port, now=time.time(), ttl=60), RING)
        protocols = f"binary, token.{tok}" if token_given else "binary"
        head = request(
            "/websockify", *upgrade_fields(Sec_WebSocket_Protocol=protocols), "X-Big: " + "b" * (2 * MAX_HEAD)
        )
        reader, writer = await asyncio.open_connection(sock=sent_before_the_loop_runs(door.port, head))
        try:
            return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT)
        finally:
            writer.close()
            upstream.close()

    answer = asyncio.run(scenario())
    assert answer.startswith(b"HTTP/1.1 101 " if token_given else b"HTTP/1.1 400 "), answer
    assert b"\r\nServer: " not in answer, f"Tornado answered a 16 KiB upgrade head: {answer!r}"


def test_an_upgrade_head_over_tornados_limit_is_not_upgraded(in_process) -> None:
    """The same for a 100 KB head, beyond Tornado's own 64 KiB max_header_size, with a valid
    token: Tornado would never upgrade it; the front door does."""

    async def scenario() -> bytes:
        door = await in_process(60.0)
        tok = token.mint(token.new_claims(host="127.0.0.1", port=free_port(), now=time.time(), ttl=60), RING)
        head = request(
            "/websockify", *upgrade_fields(Sec_WebSocket_Protocol=f"binary, token.{tok}"), "X-Big: " + "b" * 100_000
        )
        reader, writer = await asyncio.open_connection(sock=sent_before_the_loop_runs(door.port, head))
        try:
            return await asyncio.wait_for(reader.read(12), IO_TIMEOUT)
        except (TimeoutError, ConnectionResetError):
            return b""  # refused by Tornado (or left unanswered): not upgraded either way
        finally:
            writer.close()

    answer = asyncio.run(scenario())
    assert not answer.startswith(b"HTTP/1.1 101"), answer


def reusable_token(port: int) -> str:
    claims = token.new_claims(host="127.0.0.1", port=port, now=time.time(), ttl=60)
    return token.mint(claims, RING)


async def listening(in_process, listener: str) -> tuple[int, server.ProxyState, RecordingEvents, Callable[[], None]]:
    """The front door (in process) or Tornado's upgrading route: port, state, events, and a stop."""
    if listener == "front-door":
        door = await in_process(60.0)
        return door.port, door.state, door.events, lambda: None
    port, http, state, events = await tornado_route()
    return port, state, events, http.stop


@pytest.mark.parametrize("listener", ["front-door", "tornado-route"])
def test_a_bug_while_upgrading_answers_500_and_holds_nothing(in_process, monkeypatch, listener: str) -> None:
    """An unexpected error between admission and the 101 (a bug: here the 101 cannot be built,
    after the session was registered) is answered with a bare 500 and the connection ends; the
    registered session is ended, so it holds no slot. The same on either listener."""

    def broken(*_args: object) -> bytes:
        raise RuntimeError("a bug")

    monkeypatch.setattr(upgrade, "switching", broken)

    async def scenario() -> tuple[bytes, int, tuple[int, str]]:
        port, state, events, stop = await listening(in_process, listener)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = request("/websockify?token=" + reusable_token(free_port()), *upgrade_fields())
        writer.write(head)
        answer = await one_response(reader)
        writer.close()
        closed = await asyncio.wait_for(events.closed_sessions.get(), IO_TIMEOUT)
        stop()
        assert closed.ending is not None
        return answer, len(state.sessions), (closed.ending.code, closed.ending.reason)

    answer, sessions, ending = asyncio.run(scenario())
    assert answer.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    assert b"Server:" not in answer
    assert sessions == 0
    assert ending == (1006, "browser_closed")


@pytest.mark.parametrize("listener", ["front-door", "tornado-route"])
def test_a_failed_hand_over_ends_the_session_alike_on_every_listener(in_process, monkeypatch, listener: str) -> None:
    """The connection cannot become the websocket (here the browser object raises as it takes
    it): the registered session ends with upgrade.UPGRADE_FAILED whichever listener read the
    head (once 4502 on the front door and 1006 on Tornado's route), and the connection is cut
    without an answer, since it was already handed over."""

    def broken(*_args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(wsconn.PlainBrowser, "take_over", broken)
    monkeypatch.setattr(wsconn.TlsBrowser, "opened", broken)

    async def scenario() -> tuple[bytes, int, tuple[int, str, str]]:
        port, state, events, stop = await listening(in_process, listener)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request("/websockify?token=" + reusable_token(free_port()), *upgrade_fields()))
        closed = await asyncio.wait_for(events.closed_sessions.get(), IO_TIMEOUT)
        answer = await ended(reader)
        writer.close()
        stop()
        assert closed.ending is not None
        return answer, len(state.sessions), (closed.ending.code, closed.ending.reason, closed.ending.detail)

    answer, sessions, ending = asyncio.run(scenario())
    assert (answer, sessions) == (b"", 0)
    assert ending == (upgrade.UPGRADE_FAILED.code, upgrade.UPGRADE_FAILED.reason, upgrade.UPGRADE_FAILED.detail)
    assert ending[:2] == (1006, "browser_closed")


def test_tornado_refuses_a_non_upgrade_before_reading_the_query_token(proxy: ProxyProcess) -> None:
    """On Tornado's path too, a request that is not an upgrade is refused as such (400
    websocket_required, JSON) before the query's token is read — even one that is not UTF-8,
    which Tornado's argument decoding would turn into a generic 400."""
    assert_declined(exchange(proxy.port, request("/websockify?token=%C0%AF", version="HTTP/1.0")))
