"""A browser that abuses the websocket the proxy owns: floods, stalls, and ways out without a Close.

Regression tests for the review of the proxy's own websocket layer (console_proxy/wsconn.py):
each case is something a hostile or broken browser can do to one proxy process, and each bound
is one the proxy must keep for everyone else's sake — memory under a ping flood, the event loop
under many tiny early messages, sockets held by a browser that stops reading after Close or
after half-closing, and the close code logged when a browser leaves without a Close.

Why raw sockets: not calling recv() must really leave the proxy's writes stuck in the kernel
(a websocket library reads eagerly), and the hostile input (floods of control frames, EOF
without Close, a reset) is not something a library sends. The hypervisor is a real Xvnc except
where the case needs a server that answers on cue (the held ServerInit), which is the one thing
tests/hostile.py's stand-in is for.

Backlogs toward the browser are made of pongs: pings sent in the same byte stream *before* the
Close, the EOF or the ClientInit are processed before it, so the proxy is backlogged when it
gets there, without waiting on a timer. Every wait ends at its event; the few deadlines are upper
bounds, and the two things another process cannot signal (its fd table, its byte counters) are
polled.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import ssl
import struct
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import pytest
from hostile import BEHAVIOURS, PIXEL_FORMAT, VERSION_38, HostileServer, _Peer
from proxyproc import ProxyProcess
from rawws import OP_BINARY, OP_CLOSE, OP_PING, RawClient, client_frame, close_payload, new_key, open_socket, upgrade
from xvnc import TestPki, XvncServer

from console_proxy.wsconn import CLOSE_TIMEOUT

Mint = Callable[..., str]

#: Upper bound for any single wait on the wire (each ends as soon as its event arrives).
IO_TIMEOUT = 5.0
#: An end the proxy sees at once (EOF, Close) is logged within this, far below any timer.
PROMPT = 1.0
#: The same behind a backlog's worth of pings (which the proxy parses first): still well before
#: the close timer could have ended anything.
AFTER_PINGS = CLOSE_TIMEOUT / 2
#: A connection the browser will not let go of is released by the close timer, plus this slack.
RELEASE_WITHIN = CLOSE_TIMEOUT + 2.0
#: The browser's receive buffer when it "never reads": the proxy's writes stall at once.
SMALL_RCVBUF = 4096
#: The ping flood: 64 MiB of 125-byte pings, about half a million pongs if all were kept.
FLOOD = 64 << 20
RSS_BOUND = 16 << 20


def kernel_send_buffer_max() -> int:
    """The most the kernel buffers for one TCP sender (tcp_wmem's maximum; 4 MiB by default)."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        return 4 << 20


#: Pings that back up the proxy's writes: their pongs are several times what the kernel can
#: buffer between the proxy and a browser that does not read, so the rest waits in the proxy.
BACKLOG = max(16 << 20, 4 * kernel_send_buffer_max())
PING_PAYLOAD = b"p" * 125  # the largest control payload
#: Tiny messages sent before ServerInit (60,000 PointerEvent bytes: 10,000 whole events).
EARLY_MESSAGES = 60_000
#: CPU seconds the proxy may spend taking the early messages (about a tenth of a second when the
#: cost is per byte; re-summing what is held per message costs tens of seconds for these).
CPU_BOUND = 2.0

RFB_VERSION = b"RFB 003.008\n"
RAW_ONLY = struct.pack("!BBHi", 2, 0, 1, 0)  # SetEncodings: Raw
REGION = 16
STAND_IN_NAME = b"held"


def update_request(size: int = REGION) -> bytes:
    return struct.pack("!BBHHHH", 3, 0, 0, 0, size, size)


# --- the raw client (tests/rawws.py) -------------------------------------------------------------


def pings(total: int, payload: bytes = PING_PAYLOAD) -> Iterator[bytes]:
    """About ``total`` bytes of pings, in batches (one masked frame repeated: cheap to make)."""
    batch = client_frame(OP_PING, payload) * 1024
    for _ in range(max(1, total // len(batch))):
        yield batch


class WsClient(RawClient):
    """The shared raw client as is: it answers no ping, so every Pong it files is the proxy's."""

    def wait_pong(self, payload: bytes) -> None:
        """Read (filing everything else) until a Pong carrying ``payload`` has arrived."""
        while not self.pongs or self.pongs[-1] != payload:
            self._frame()

    def read_to_end(self, within: float) -> str:
        """Drain the connection raw until the proxy's end of it: "eof" or "reset"."""
        end = time.monotonic() + within
        while True:
            self.sock.settimeout(max(end - time.monotonic(), 0.01))
            try:
                if not self.sock.recv(1 << 20):
                    return "eof"
            except ConnectionResetError:
                return "reset"
            except TimeoutError:
                raise AssertionError(f"the connection was still open {within}s later") from None


def open_ws(port: int, token: str, *, rcvbuf: int | None = None, tls: ssl.SSLContext | None = None) -> WsClient:
    """Upgrade a fresh connection (over verified TLS with ``tls``, to a proxy serving it itself);
    the 101 is checked, the frames behind it kept."""
    sock = open_socket(port, timeout=IO_TIMEOUT, rcvbuf=rcvbuf)
    if tls is not None:
        sock = tls.wrap_socket(sock, server_hostname="127.0.0.1")
    try:
        _, rest = upgrade(sock, port, token, new_key())
    except BaseException:
        sock.close()
        raise
    return WsClient(sock, rest)


# --- RFB over the raw client ---------------------------------------------------------------------


def rfb_until_security_result(ws: WsClient) -> None:
    """RFB 3.8 with the proxy up to its SecurityResult: version, type None, OK."""
    assert ws.read(12) == RFB_VERSION
    ws.send(RFB_VERSION)
    count = ws.read(1)[0]
    assert ws.read(count) == b"\x01"
    ws.send(b"\x01")
    assert ws.read(4) == b"\0\0\0\0"


def read_server_init(ws: WsClient) -> int:
    """ServerInit (800x600, Xvnc's or the stand-in's); the bytes per pixel."""
    width, height, pixel_format, name_length = struct.unpack("!HH16sI", ws.read(24))
    ws.read(name_length)
    assert (width, height) == (800, 600)
    return pixel_format[0] // 8


def open_console(
    port: int, token: str, *, rcvbuf: int | None = None, tls: ssl.SSLContext | None = None
) -> tuple[WsClient, int]:
    ws = open_ws(port, token, rcvbuf=rcvbuf, tls=tls)
    try:
        rfb_until_security_result(ws)
        ws.send(b"\x01")  # ClientInit, shared
        return ws, read_server_init(ws)
    except BaseException:
        ws.close()
        raise


def assert_update_arrives(ws: WsClient, bytes_per_pixel: int) -> None:
    """The session is still a working console: an update request gets its pixels."""
    ws.send(RAW_ONLY + update_request())
    kind, _pad, count = struct.unpack("!BBH", ws.read(4))
    assert kind == 0, f"expected a FramebufferUpdate, got message type {kind}"
    pixels = 0
    for _ in range(count):
        _x, _y, w, h, encoding = struct.unpack("!HHHHi", ws.read(12))
        assert encoding == 0
        ws.read(w * h * bytes_per_pixel)
        pixels += w * h
    assert pixels >= REGION * REGION


# --- the proxy process, seen from outside --------------------------------------------------------


def rss(proxy: ProxyProcess) -> int:
    """The proxy's resident set size in bytes (VmRSS)."""
    for line in Path(f"/proc/{proxy.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc status")


def cpu_seconds(proxy: ProxyProcess) -> float:
    """User + system CPU time the proxy has used."""
    fields = Path(f"/proc/{proxy.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(proxy: ProxyProcess) -> int:
    return len(os.listdir(f"/proc/{proxy.process.pid}/fd"))


def up_bytes(proxy: ProxyProcess, tls: ssl.SSLContext | None = None) -> float:
    """``consolegate_proxy_bytes_total{direction="up"}``: client messages written to the server
    (over HTTPS, verified with ``tls``, from a proxy that serves TLS itself)."""
    base = proxy.base if tls is None else f"https://127.0.0.1:{proxy.port}"
    with urllib.request.urlopen(f"{base}/metrics", timeout=IO_TIMEOUT, context=tls) as response:
        text = response.read().decode()
    found = re.search(r'^consolegate_proxy_bytes_total\{direction="up"\} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def poll_until(condition: Callable[[], bool], within: float, failure: Callable[[], str]) -> float:
    """Seconds until ``condition`` holds, polled (another process cannot signal it); fails at
    ``within``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > within:
            raise AssertionError(failure())
        # Kept: the conditions are the proxy's /metrics counter and its /proc fd count, state in
        # another process that sends no event when it changes (a session's "closed" log line can come
        # before the browser connection's close timer releases its fd), so they are polled.
        time.sleep(0.02)
    return time.monotonic() - start


def closed_record(proxy: ProxyProcess, sid: str, timeout: float) -> dict[str, object]:
    """The session's JSON "closed" event, waiting for it."""
    line = proxy.wait_for_log('"event":"closed"', f'"session_id":"{sid}"', timeout=timeout)
    return json.loads(line[line.index("{") :])


@dataclass
class HealthProbe:
    """GET /healthz on fresh connections, one after another in a thread: does every one get an
    answer (within the suite's I/O timeout; a frozen event loop gives none)?"""

    proxy: ProxyProcess
    answers: list[bool] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _answered: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread = field(init=False)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(f"{self.proxy.base}/healthz", timeout=IO_TIMEOUT) as answer:
                    answer.read()
                self.answers.append(True)
            except OSError:  # no answer within the I/O timeout, or not a 200
                self.answers.append(False)
            self._answered.set()
            self._stop.wait(0.02)  # pacing, so the probe itself costs the proxy little CPU

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._answered.wait(IO_TIMEOUT), "no /healthz answer before the test began"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(IO_TIMEOUT)

    @property
    def all_answered(self) -> bool:
        return all(self.answers)

    def report(self) -> str:
        return f"/healthz: {self.answers.count(True)} answered, {self.answers.count(False)} not"


# --- a stand-in that holds its ServerInit --------------------------------------------------------


def until_client_init(peer: _Peer) -> None:
    """The stand-ins' side of RFB 3.8 with security None, up to the proxy's ClientInit."""
    peer.send(VERSION_38)
    peer.recv_exact(12)
    peer.send(b"\x01\x01")
    peer.recv_exact(1)
    peer.send(struct.pack(">I", 0))
    peer.recv_exact(1)  # ClientInit


@dataclass
class HeldServerInit:
    """Controls and observations of the ``hold_server_init`` stand-in (one connection)."""

    expect: int = 0  # client-message bytes to collect after ServerInit
    client_init: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    forwarded: threading.Event = field(default_factory=threading.Event)
    after_init: bytes = b""

    def behave(self, peer: _Peer) -> None:
        """RFB 3.8, security None; after ClientInit, ServerInit only once released (Xvnc answers
        ClientInit at once, so it cannot keep a session in the window before ServerInit)."""
        until_client_init(peer)
        self.client_init.set()
        if not self.release.wait(3 * IO_TIMEOUT):
            return
        peer.send(struct.pack(">HH16sI", 800, 600, PIXEL_FORMAT, len(STAND_IN_NAME)) + STAND_IN_NAME)
        self.after_init = peer.recv_exact(self.expect)
        self.forwarded.set()
        peer.hold()


@pytest.fixture
def held_server_init(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[HeldServerInit, HostileServer]]:
    """The stand-in, registered as a tests/hostile.py behaviour for this test only."""
    held = HeldServerInit()
    monkeypatch.setitem(BEHAVIOURS, "hold_server_init", held.behave)
    server = HostileServer("hold_server_init")
    try:
        yield held, server
    finally:
        held.release.set()
        server.stop()


@pytest.fixture
def console_token(mint: Mint, xvnc_vncauth: XvncServer, request: pytest.FixtureRequest) -> tuple[str, str]:
    """A token for the real Xvnc, and its session id (unique per test, to find its log lines)."""
    sid = f"abuse-{request.node.name}"
    return mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password, session_id=sid), sid


# --- 1. ping flood -------------------------------------------------------------------------------


def test_ping_flood_from_a_browser_that_never_reads_keeps_memory_flat(
    proxy_factory: Callable[..., ProxyProcess], console_token: tuple[str, str]
) -> None:
    """64 MiB of pings from a browser that never reads: pongs cannot leave, and a proxy that
    queued each one would hold as much again. While the browser is backlogged only the latest
    ping is answered (RFC 6455 5.5.3), so memory stays flat; once the browser reads, the latest
    ping still gets its Pong and the console works."""
    proxy = proxy_factory()
    token, _ = console_token
    ws, bpp = open_console(proxy.port, token, rcvbuf=SMALL_RCVBUF)
    with closing(ws):
        before, up = rss(proxy), up_bytes(proxy)
        for batch in pings(FLOOD):
            ws.send_raw(batch)
        ws.send_raw(client_frame(OP_PING, b"the last ping"))
        ws.send(RAW_ONLY)  # behind every ping: once it reaches Xvnc, the proxy has taken them all
        poll_until(
            lambda: up_bytes(proxy) >= up + len(RAW_ONLY),
            3 * IO_TIMEOUT,
            lambda: "the proxy did not get through the pings",
        )
        grown = rss(proxy) - before
        assert grown < RSS_BOUND, f"proxy RSS grew by {grown >> 20} MiB under a ping flood"

        ws.wait_pong(b"the last ping")  # the browser reads again: the latest ping is answered
        assert_update_arrives(ws, bpp)


# --- 2. many tiny early messages -----------------------------------------------------------------


def test_many_tiny_messages_before_server_init_leave_the_proxy_responsive(
    proxy_factory: Callable[..., ProxyProcess], mint: Mint, held_server_init: tuple[HeldServerInit, HostileServer]
) -> None:
    """60,000 one-byte messages after ClientInit, while the server has not sent ServerInit: the
    proxy holds them until the session is ready. Holding must cost per byte, not per message
    held so far (re-summing them was quadratic and froze the event loop for every session), so
    /healthz keeps answering, little CPU is spent, and every byte reaches the server after
    ServerInit, in order."""
    held, server = held_server_init
    held.expect = EARLY_MESSAGES
    proxy = proxy_factory()
    ws = open_ws(proxy.port, mint(host="127.0.0.1", port=server.port))
    with closing(ws):
        rfb_until_security_result(ws)
        ws.send(b"\x01")  # ClientInit: from here the proxy holds what the browser sends
        assert held.client_init.wait(IO_TIMEOUT), "the proxy never sent ClientInit upstream"
        early = client_frame(OP_BINARY, b"\x05") * EARLY_MESSAGES  # PointerEvents, a byte at a time
        with HealthProbe(proxy) as probe:
            cpu = cpu_seconds(proxy)
            ws.send_raw(early + client_frame(OP_PING, b"all held"))
            try:
                ws.wait_pong(b"all held")  # the Pong follows the last early message
            except TimeoutError:
                raise AssertionError(
                    f"the proxy did not take {EARLY_MESSAGES} early messages within {IO_TIMEOUT}s; {probe.report()}"
                ) from None
            cpu = cpu_seconds(proxy) - cpu
        assert probe.all_answered, f"while early messages were held, {probe.report()}"
        assert cpu < CPU_BOUND, f"the proxy spent {cpu:.2f}s of CPU on {EARLY_MESSAGES} early messages"

        held.release.set()
        read_server_init(ws)
        assert held.forwarded.wait(IO_TIMEOUT), "the held messages did not reach the server"
        assert held.after_init == b"\x05" * EARLY_MESSAGES


def test_backlog_during_the_handshake_does_not_stall_server_init(
    proxy_factory: Callable[..., ProxyProcess], mint: Mint, held_server_init: tuple[HeldServerInit, HostileServer]
) -> None:
    """A browser backlogged while the proxy waits for ServerInit (its pings' pongs pile up) makes
    the proxy stop reading the server; once the browser reads again the server must be read
    again too, handshake or not, or ServerInit never arrives and the console never opens."""
    held, server = held_server_init
    held.release.set()  # ServerInit right after ClientInit: the backlog must not hold it back
    proxy = proxy_factory()
    ws = open_ws(proxy.port, mint(host="127.0.0.1", port=server.port), rcvbuf=SMALL_RCVBUF)
    with closing(ws):
        rfb_until_security_result(ws)
        for batch in pings(BACKLOG):  # the browser stops reading: pongs back up
            ws.send_raw(batch)
        ws.send(b"\x01")  # ClientInit behind the pings: the server is asked once the backlog is there
        assert held.client_init.wait(IO_TIMEOUT), "the proxy never sent ClientInit upstream"
        try:
            read_server_init(ws)  # reading again: the pongs, then ServerInit
        except TimeoutError:
            raise AssertionError(
                "no ServerInit once the browser read again: the proxy left the server's "
                f"socket unread (after {len(ws.pongs)} pongs)"
            ) from None
        assert ws.pongs, "no Pong at all"


# --- 3. Close, then never read -------------------------------------------------------------------


def backlogged_console(proxy: ProxyProcess, token: str) -> WsClient:
    """A console whose browser has stopped reading, with the proxy's pongs backed up toward it."""
    ws, _ = open_console(proxy.port, token, rcvbuf=SMALL_RCVBUF)
    for batch in pings(BACKLOG):
        ws.send_raw(batch)
    return ws


def assert_let_go(proxy: ProxyProcess, baseline: int, ws: WsClient, after: str) -> None:
    """The proxy releases the connection (by its close timer) and the browser sees its end."""
    poll_until(
        lambda: open_fds(proxy) == baseline,
        RELEASE_WITHIN,
        lambda: (
            f"the proxy still holds {open_fds(proxy) - baseline} more fds {RELEASE_WITHIN}s "
            f"after {after} (close timeout {CLOSE_TIMEOUT}s)"
        ),
    )
    assert ws.read_to_end(IO_TIMEOUT) in ("eof", "reset")


def test_browser_that_sends_close_and_never_reads_is_let_go(
    proxy_factory: Callable[..., ProxyProcess], console_token: tuple[str, str]
) -> None:
    """A browser sends Close with writes still backlogged toward it, then never reads: the
    proxy's Close echo cannot leave, and a proxy waiting for it to would hold the socket for
    ever. The session ends at the Close; the connection is released by the close timer."""
    proxy = proxy_factory()
    token, sid = console_token
    baseline = open_fds(proxy)
    with closing(backlogged_console(proxy, token)) as ws:
        ws.send_raw(client_frame(OP_CLOSE, close_payload(1000, "bye")))
        assert closed_record(proxy, sid, AFTER_PINGS)["close_code"] == 1000  # the session ends at once
        assert_let_go(proxy, baseline, ws, "a browser's Close")


def test_a_drain_delivers_its_close_to_a_browser_that_was_behind(
    proxy_factory: Callable[..., ProxyProcess], console_token: tuple[str, str]
) -> None:
    """SIGTERM while the proxy's writes to a browser are queued (it stopped reading): the drain's
    Close 1001 waits behind them in the proxy's buffer. The process must not exit before that
    buffer is gone (or the close timeout passed): the browser, reading again, gets its Close,
    not a connection cut mid-stream."""
    proxy = proxy_factory("--drain-grace", "0.2")
    token, sid = console_token
    with closing(backlogged_console(proxy, token)) as ws:
        proxy.signal(signal.SIGTERM)
        assert closed_record(proxy, sid, AFTER_PINGS)["close_code"] == 1001
        assert ws.wait_close() == (1001, "going_away")
    assert proxy.process.wait(CLOSE_TIMEOUT + 2) == 0


# --- 4. half-close, then never read --------------------------------------------------------------


def test_half_close_without_close_frame_ends_the_session(
    proxy_factory: Callable[..., ProxyProcess], console_token: tuple[str, str]
) -> None:
    """A browser that shuts its sending side (no Close frame) and does not read: the session ends
    at the EOF with 1006 — even with no idle timeout to end it otherwise — and the connection,
    whose writes cannot leave, is released by the close timer."""
    proxy = proxy_factory("--idle-timeout", "0")
    token, sid = console_token
    baseline = open_fds(proxy)
    with closing(backlogged_console(proxy, token)) as ws:
        ws.sock.shutdown(socket.SHUT_WR)
        record = closed_record(proxy, sid, AFTER_PINGS)  # no timer ends it: --idle-timeout 0
        assert (record["close_code"], record["close_reason"]) == (1006, "browser_closed")
        assert_let_go(proxy, baseline, ws, "a browser's EOF")


# --- 5. close codes for the ways out -------------------------------------------------------------


def eof(ws: WsClient) -> None:
    ws.sock.shutdown(socket.SHUT_WR)


def reset(ws: WsClient) -> None:
    ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    ws.sock.close()  # linger 0: an RST, not a FIN


def close_without_code(ws: WsClient) -> None:
    ws.send_raw(client_frame(OP_CLOSE))


@pytest.mark.parametrize(
    ("leave", "code"),
    [
        pytest.param(eof, 1006, id="eof-without-close"),
        pytest.param(reset, 1006, id="reset-without-close"),
        pytest.param(close_without_code, 1005, id="close-without-code"),
    ],
)
def test_way_out_is_logged_with_its_close_code(
    proxy: ProxyProcess, console_token: tuple[str, str], leave: Callable[[WsClient], None], code: int
) -> None:
    """RFC 6455 7.1.5: a connection that ended without a Close is 1006 (abnormal), a Close
    without a status code is 1005. The closed event says which, promptly: operators tell
    browsers that vanished from browsers that closed."""
    token, sid = console_token
    ws, _ = open_console(proxy.port, token)
    with closing(ws):
        leave(ws)
        record = closed_record(proxy, sid, PROMPT)
        assert (record["close_code"], record["close_reason"]) == (code, "browser_closed")
        if leave is close_without_code:  # the echo carries no code either (RFC 6455 5.5.1)
            assert ws.wait_close() == (None, "")
        elif leave is eof:  # 1006 is never sent (RFC 6455 7.4.1): no Close for a browser gone quiet
            ws.sock.settimeout(IO_TIMEOUT)
            assert ws.sock.recv(1 << 20) == b"", "a frame after the browser's EOF"


# --- 6. the server speaks first, while the browser is still in its handshake ---------------------


@dataclass
class SpeaksFirst:
    """A stand-in that answers ClientInit with ServerInit and then, in a write of its own once
    told to, a Bell: RFB lets a server send Bell at any time; Xvnc cannot be made to at a chosen one."""

    sent_init: threading.Event = field(default_factory=threading.Event)
    go: threading.Event = field(default_factory=threading.Event)
    spoke: threading.Event = field(default_factory=threading.Event)

    def behave(self, peer: _Peer) -> None:
        peer.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the Bell leaves when sent
        until_client_init(peer)
        peer.send(struct.pack(">HH16sI", 800, 600, PIXEL_FORMAT, len(STAND_IN_NAME)) + STAND_IN_NAME)
        self.sent_init.set()
        if self.go.wait(IO_TIMEOUT):
            peer.send(b"\x02")  # Bell
            self.spoke.set()
        peer.hold()


def _proxy_turn(proxy: ProxyProcess) -> None:
    """One /healthz round trip: the proxy's loop has handled what was ready before it."""
    with urllib.request.urlopen(f"{proxy.base}/healthz", timeout=IO_TIMEOUT) as answer:
        answer.read()


def test_bytes_the_server_sends_before_the_browser_is_ready_are_relayed(
    proxy: ProxyProcess, mint: Mint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The proxy asks for ServerInit as soon as it is authenticated (the shared flag is forced),
    so the server's next messages can arrive while the browser has not sent ClientInit yet: they
    are held and relayed right behind ServerInit, not lost."""
    server_side = SpeaksFirst()
    monkeypatch.setitem(BEHAVIOURS, "speaks_first", server_side.behave)
    server = HostileServer("speaks_first")
    try:
        ws = open_ws(proxy.port, mint(host="127.0.0.1", port=server.port))
        with closing(ws):
            rfb_until_security_result(ws)
            assert server_side.sent_init.wait(IO_TIMEOUT), "the proxy did not ask for ServerInit before ClientInit"
            _proxy_turn(proxy)  # ServerInit read: the proxy now waits for the browser
            server_side.go.set()
            assert server_side.spoke.wait(IO_TIMEOUT)
            _proxy_turn(proxy)  # the Bell read, on its own
            ws.send(b"\x01")  # ClientInit, only now
            read_server_init(ws)
            assert ws.read(1) == b"\x02"
    finally:
        server_side.go.set()
        server.stop()


# --- 7. a hypervisor that stops reading must not hide a browser that left ------------------------


@dataclass
class StopsReading:
    """A console server that completes the handshake and then never reads again (a hung VM's
    VNC server), until the test lets it go."""

    release: threading.Event = field(default_factory=threading.Event)

    def behave(self, peer: _Peer) -> None:
        until_client_init(peer)
        peer.send(struct.pack(">HH16sI", 800, 600, PIXEL_FORMAT, len(STAND_IN_NAME)) + STAND_IN_NAME)
        self.release.wait(6 * IO_TIMEOUT)


#: Input written before the proxy must have stopped reading; far above every buffer on the way.
INPUT_LIMIT = 256 << 20
KEYS = struct.pack(">BBxxI", 4, 1, 0xFFC6) * 8192  # 64 KiB of KeyEvents, one frame
#: The proxy has stopped reading once our socket stays full and nothing more goes upstream this long.
STILL_FOR = 0.25


def fill_until_held(ws: WsClient, proxy: ProxyProcess, tls: ssl.SSLContext | None = None) -> None:
    """Send input until the proxy stops reading it: our socket stays unwritable and the proxy's
    up counter stays still for ``STILL_FOR`` (another process cannot signal that it paused)."""
    ws.sock.setblocking(False)
    frame, sent = client_frame(OP_BINARY, KEYS), 0
    while sent < INPUT_LIMIT:
        try:
            sent += ws.sock.send(frame[sent % len(frame) :])
            continue
        except (BlockingIOError, ssl.SSLWantWriteError):
            pass
        before = up_bytes(proxy, tls)
        _, writable, _ = select.select([], [ws.sock], [], STILL_FOR)
        if not writable and up_bytes(proxy, tls) == before:
            return
    raise AssertionError("the proxy kept reading input the hypervisor did not take")


def close_behind_input(ws: WsClient) -> None:
    """A plain close: with input the proxy never took still queued, its FIN cannot leave."""
    ws.sock.close()


@pytest.mark.parametrize("leave", [pytest.param(reset, id="reset"), pytest.param(close_behind_input, id="close")])
@pytest.mark.parametrize("over_tls", [pytest.param(False, id="ws"), pytest.param(True, id="wss")])
def test_a_browser_that_leaves_while_the_hypervisor_is_stuck_ends_its_session(
    proxy: ProxyProcess,
    proxy_factory: Callable[..., ProxyProcess],
    test_pki: TestPki,
    mint: Mint,
    monkeypatch: pytest.MonkeyPatch,
    over_tls: bool,
    leave: Callable[[WsClient], None],
) -> None:
    """The hypervisor stops reading, so the proxy stops reading the browser (backpressure), and
    the browser's input piles up. It then leaves. Nothing reads its socket any more, so only
    the proxy's sweep (once a second) can see it gone: a reset by the socket's TCP state; a
    plain close, whose FIN is stuck behind the untaken input, by the reset the browser's kernel
    answers the sweep's Ping with. The browser's leftovers are then read and dropped, and the
    session ends as 1006 the usual way — promptly, not at the idle timeout (or never, with the
    idle timeout off)."""
    stuck = StopsReading()
    monkeypatch.setitem(BEHAVIOURS, "stops_reading", stuck.behave)
    sid = f"abuse-stuck-hypervisor-{'wss' if over_tls else 'ws'}-{leave.__name__}"
    if over_tls:
        proxy = proxy_factory("--tls-cert", str(test_pki.cert_path), "--tls-key", str(test_pki.key_path))
    server = HostileServer("stops_reading")
    try:
        token = mint(host="127.0.0.1", port=server.port, session_id=sid)
        tls = ssl.create_default_context(cafile=str(test_pki.ca_path)) if over_tls else None
        ws, _ = open_console(proxy.port, token, tls=tls)
        with closing(ws):
            fill_until_held(ws, proxy, tls)
            leave(ws)
            record = closed_record(proxy, sid, IO_TIMEOUT)
    finally:
        stuck.release.set()
        server.stop()
    assert (record["close_code"], record["close_reason"]) == (1006, "browser_closed")
    assert record["bytes_up"] < INPUT_LIMIT  # what was dropped never went to the stuck server
