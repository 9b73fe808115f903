"""Stand-in broken and hostile RFB servers, for the proxy's robustness tests.

This is the one place a stand-in is allowed: no real VNC server announces a 4 GiB failure
reason or stalls after its version line on purpose, yet a compromised hypervisor could. Each
:class:`HostileServer` listens on 127.0.0.1 (port 0, so the kernel picks a free one), serves
every connection with one behaviour chosen per instance, records what the proxy sent, and then
*holds* the connection open (reading and discarding) until the proxy hangs up or the server is
stopped, so a proxy that waits for more data waits for real.

Behaviours (``BEHAVIOURS``):

- ``bad_version``: ``RFB 003.00x\\n`` instead of a version line.
- ``http``: an HTTP response line, as a web server on the wrong port would send.
- ``garbage``: bytes that are no protocol at all.
- ``close_at_once``: accept, then close without a byte.
- ``stall_after_version``: a valid ``RFB 003.008\\n``, then silence.
- ``refuse_huge_reason``: RFB 3.8, zero security types, a reason of 0xFFFFFFFF bytes of which
  only a few are sent.
- ``refuse_endless_reason``: the same, but reason bytes keep coming (up to 64 MiB) until the
  proxy hangs up.
- ``auth_fail_huge_reason``: VNC Authentication (challenge, response), then SecurityResult
  "failed" with a reason of 0xFFFFFFFF bytes, a few sent.
- ``auth_fail``: the same refusal told honestly (a 14-byte reason, sent whole), as Xvnc does.
- ``huge_name``: a complete None handshake, then a ServerInit whose name is 0xFFFFFFFF bytes.
- ``lock_step``: RFB 3.8 with security None that reads the client's version line with one
  recv() and drops what came behind it (a pipelined choice), then waits for the choice.
- ``cut_text_then_tight``: a complete None handshake, then unasked: cut text (classic and
  extended, "leaked secret"), each followed by a Bell, then a Tight rectangle nobody asked for.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Self

VERSION_38 = b"RFB 003.008\n"
HUGE = 0xFFFFFFFF
#: 32 bpp, depth 24, little endian, true colour, 255/255/255, shifts 16/8/0: what Xvnc sends.
PIXEL_FORMAT = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
ENDLESS_LIMIT = 64 << 20


class _Peer:
    """One accepted connection, as the behaviours use it; records every byte received."""

    def __init__(self, conn: socket.socket, record: Callable[[bytes], None]) -> None:
        self.conn = conn
        self._record = record

    def send(self, data: bytes) -> None:
        self.conn.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        """n bytes from the proxy; ConnectionError if it hangs up first."""
        data = b""
        while len(data) < n:
            chunk = self.conn.recv(n - len(data))
            if not chunk:
                raise ConnectionError("the proxy closed the connection")
            self._record(chunk)
            data += chunk
        return data

    def recv_once(self) -> bytes:
        """One recv(), whatever it brings (a server that assumes lock-step reads this way)."""
        data = self.conn.recv(65536)
        if not data:
            raise ConnectionError("the proxy closed the connection")
        self._record(data)
        return data

    def hold(self) -> None:
        """Keep the connection open, discarding input, until the proxy closes it (or stop())."""
        while chunk := self.conn.recv(65536):
            self._record(chunk)


def _to_security_result(peer: _Peer) -> None:
    """RFB 3.8 with VNC Authentication, up to where the SecurityResult is due (any response taken)."""
    peer.send(VERSION_38)
    peer.recv_exact(12)
    peer.send(b"\x01\x02")  # one type: VNC Authentication
    peer.recv_exact(1)
    peer.send(bytes(range(16)))  # the challenge
    peer.recv_exact(16)  # the DES response


def _to_client_init(peer: _Peer) -> None:
    """RFB 3.8 with security None and SecurityResult OK, up to the ClientInit read: ServerInit is due."""
    peer.send(VERSION_38)
    peer.recv_exact(12)
    peer.send(b"\x01\x01")  # one type: None
    peer.recv_exact(1)
    peer.send(struct.pack(">I", 0))  # SecurityResult OK
    peer.recv_exact(1)  # ClientInit


def _bad_version(peer: _Peer) -> None:
    peer.send(b"RFB 003.00x\n")
    peer.hold()


def _http(peer: _Peer) -> None:
    peer.send(b"HTTP/1.1 200 OK\r\n")
    peer.hold()


def _garbage(peer: _Peer) -> None:
    peer.send(bytes(range(256)) * 4)
    peer.hold()


def _close_at_once(peer: _Peer) -> None:
    peer.conn.close()


def _stall_after_version(peer: _Peer) -> None:
    peer.send(VERSION_38)
    peer.hold()


def _refuse_huge_reason(peer: _Peer) -> None:
    peer.send(VERSION_38)
    peer.recv_exact(12)
    peer.send(b"\x00" + struct.pack(">I", HUGE) + b"go away, ")
    peer.hold()


def _refuse_endless_reason(peer: _Peer) -> None:
    peer.send(VERSION_38)
    peer.recv_exact(12)
    peer.send(b"\x00" + struct.pack(">I", HUGE))
    chunk = b"no " * 21845 + b"!"  # 64 KiB of printable reason
    sent = 0
    try:
        while sent < ENDLESS_LIMIT:
            peer.send(chunk)
            sent += len(chunk)
    except OSError:
        return  # the proxy hung up: what it should do
    peer.hold()


def _auth_fail_huge_reason(peer: _Peer) -> None:
    _to_security_result(peer)
    peer.send(struct.pack(">II", 1, HUGE) + b"wrong password, ")
    peer.hold()


def _auth_fail(peer: _Peer) -> None:
    """An honest refusal, like Xvnc after a wrong password: the whole reason in one piece."""
    _to_security_result(peer)
    reason = b"wrong password"
    peer.send(struct.pack(">II", 1, len(reason)) + reason)
    peer.hold()


def _huge_name(peer: _Peer) -> None:
    _to_client_init(peer)
    peer.send(struct.pack(">HH16sI", 800, 600, PIXEL_FORMAT, HUGE) + b"a name that never ends")
    peer.hold()


LEAKED = b"leaked secret"


def _cut_text_then_tight(peer: _Peer) -> None:
    _to_client_init(peer)
    peer.send(struct.pack(">HH16sI", 800, 600, PIXEL_FORMAT, 4) + b"leak")
    classic = struct.pack(">Bxxxi", 3, len(LEAKED)) + LEAKED
    extended = struct.pack(">Bxxxi", 3, -(4 + len(LEAKED))) + b"\x10\x00\x00\x01" + LEAKED
    tight = struct.pack(">BxHHHHHi", 0, 1, 0, 0, 8, 8, 7) + b"\x80\x00"
    peer.send(classic + b"\x02" + extended + b"\x02" + tight)
    peer.hold()


def _lock_step(peer: _Peer) -> None:
    """RFB 3.8 with security None, taking the client's version line with one recv() and
    dropping whatever came behind it: a pipelined security choice is lost, and the server
    waits for it."""
    peer.send(VERSION_38)
    peer.recv_once()
    peer.send(b"\x01\x01")  # one type: None
    peer.recv_exact(1)
    peer.send(struct.pack(">I", 0))  # SecurityResult OK
    peer.recv_exact(1)  # ClientInit
    peer.send(struct.pack(">HH16sI", 800, 600, PIXEL_FORMAT, 4) + b"lock")
    peer.hold()


BEHAVIOURS: dict[str, Callable[[_Peer], None]] = {
    "lock_step": _lock_step,
    "bad_version": _bad_version,
    "http": _http,
    "garbage": _garbage,
    "close_at_once": _close_at_once,
    "stall_after_version": _stall_after_version,
    "refuse_huge_reason": _refuse_huge_reason,
    "refuse_endless_reason": _refuse_endless_reason,
    "auth_fail_huge_reason": _auth_fail_huge_reason,
    "auth_fail": _auth_fail,
    "huge_name": _huge_name,
    "cut_text_then_tight": _cut_text_then_tight,
}


class HostileServer:
    """A threaded TCP server on 127.0.0.1 that serves every connection with one behaviour.

    ``connections`` counts accepted connections, ``received`` holds every byte the proxy sent
    (all connections), ``accepted`` is set at the first accept. Use as a context manager.
    """

    host = "127.0.0.1"

    def __init__(self, behaviour: str) -> None:
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {behaviour!r}; known: {sorted(BEHAVIOURS)}")
        self.behaviour = behaviour
        self.accepted = threading.Event()
        self.connections = 0
        self.received = bytearray()
        self._lock = threading.Lock()
        self._listener = socket.create_server((self.host, 0))
        self.port: int = self._listener.getsockname()[1]
        self._open: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"hostile-{behaviour}", daemon=True)
        self._acceptor.start()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def _record(self, data: bytes) -> None:
        with self._lock:
            self.received += data

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # listener closed by stop()
            with self._lock:
                if self._stopping:
                    conn.close()
                    return
                self.connections += 1
                self._open.append(conn)
            self.accepted.set()
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        # the proxy hung up mid-behaviour (ConnectionError is an OSError)
        with contextlib.closing(conn), contextlib.suppress(OSError):
            BEHAVIOURS[self.behaviour](_Peer(conn, self._record))

    def stop(self) -> None:
        """Close the listener and every held connection, and wait for the threads."""
        with self._lock:
            self._stopping = True
            held = list(self._open)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for conn in held:
            # wakes a recv() blocked in hold()
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._acceptor.join(5)
        for thread in self._threads:
            thread.join(5)
