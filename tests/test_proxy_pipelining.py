"""The pipelined opening through a real proxy process (console_proxy/offers.py).

Against real Xvnc: the first console to a hypervisor teaches the proxy its offer, later ones
send the version line and security choice at once and open as ever; a hypervisor that changed
on the same port costs a new connection, not the console. Against the one stand-in a real part
cannot play (a server that drops input that came early): it is found and left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest
from hostile import PIXEL_FORMAT, VERSION_38, HostileServer
from rfbclient import Console
from test_proxy_hostile import assert_closed, close_of

if TYPE_CHECKING:
    from proxyproc import ProxyProcess
    from xvnc import XvncServer

    Mint = Callable[..., str]

PASSWORD = "pipe-pw1"
METRIC = "consolegate_proxy_upstream_pipelined_total"


def outcomes(proxy: ProxyProcess) -> dict[str, int]:
    """The proxy's pipelining counters, by outcome, from its /metrics."""
    with urllib.request.urlopen(f"{proxy.base}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith(METRIC + "{"):
            label, value = line.split(" ")
            found[label.split('"')[1]] = int(float(value))
    return found


async def first_update(ws_url: str, token: str) -> tuple[bytes, int]:
    """Open a console, read ServerInit's name and the first update's message type."""
    console = await Console.open(ws_url, token)
    try:
        info = await console.handshake()
        await console.request_update()
        header = await console.read(4)
    finally:
        console.close()
    return info.name, header[0]


async def server_name(ws_url: str, token: str) -> bytes:
    """Open a console as far as ServerInit (the stand-in sends no updates): its desktop name."""
    console = await Console.open(ws_url, token)
    try:
        return (await console.handshake()).name
    finally:
        console.close()


def opens(proxy: ProxyProcess, token: str) -> tuple[bytes, int]:
    return asyncio.run(first_update(proxy.ws_url, token))


def test_later_consoles_to_a_hypervisor_are_pipelined(
    proxy_factory: Callable[..., ProxyProcess], mint: Mint, xvnc_vncauth: XvncServer
) -> None:
    proxy = proxy_factory()
    token = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password)
    assert opens(proxy, token)[1] == 0  # a FramebufferUpdate: the console works
    assert outcomes(proxy) == {"guessed": 0, "redialled": 0, "refused": 0}  # the first one teaches
    for _ in range(3):
        assert opens(proxy, token)[1] == 0
    assert outcomes(proxy) == {"guessed": 3, "redialled": 0, "refused": 0}


def test_pipelining_can_be_turned_off(
    proxy_factory: Callable[..., ProxyProcess], mint: Mint, xvnc_vncauth: XvncServer
) -> None:
    proxy = proxy_factory("--no-upstream-pipelining")
    token = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password)
    for _ in range(2):
        assert opens(proxy, token)[1] == 0
    assert outcomes(proxy) == {"guessed": 0, "redialled": 0, "refused": 0}


def test_a_hypervisor_that_changed_costs_a_connection_not_the_console(
    proxy_factory: Callable[..., ProxyProcess], mint: Mint, xvnc_factory: Callable[..., XvncServer]
) -> None:
    """VNC Authentication is learned; then another Xvnc on the same port offers only None. The
    guess (2) is wrong: the proxy starts again on a new connection and the console opens."""
    proxy = proxy_factory()
    before = xvnc_factory(security="VncAuth", password=PASSWORD)
    token = mint(host="127.0.0.1", port=before.port, password=PASSWORD)
    assert opens(proxy, token)[1] == 0
    before.stop()
    xvnc_factory(security="None", port=before.port)
    assert opens(proxy, token)[1] == 0
    assert outcomes(proxy) == {"guessed": 1, "redialled": 1, "refused": 0}
    assert opens(proxy, token)[1] == 0  # None is learned now, and guessed right
    assert outcomes(proxy) == {"guessed": 2, "redialled": 1, "refused": 0}


def test_a_server_that_drops_early_input_is_found_and_left_alone(
    proxy_factory: Callable[..., ProxyProcess], mint: Mint
) -> None:
    """The pipelined handshake stalls (the server lost the choice) and ends 4502 at the
    handshake timeout; the proxy never pipelines to that server again, so the next console opens."""
    proxy = proxy_factory("--handshake-timeout", "2")
    with HostileServer("lock_step") as server:
        token = mint(host="127.0.0.1", port=server.port)
        assert asyncio.run(server_name(proxy.ws_url, token)) == b"lock"
        assert_closed(asyncio.run(close_of(proxy.ws_url, token)), 4502)
        assert outcomes(proxy) == {"guessed": 1, "redialled": 0, "refused": 1}
        assert asyncio.run(server_name(proxy.ws_url, token)) == b"lock"
        assert outcomes(proxy) == {"guessed": 1, "redialled": 0, "refused": 1}


class SlowToAccept:
    """An RFB 3.8 server (security None) that accepts only when told, on a listener whose accept
    queue holds one connection: with a filler queued, a connect to it stays in SYN_SENT (the
    kernel drops the SYN; the client sends it again a second later), as a connect across a
    network waits for its round trip. It records how many bytes its first read after the version
    line brought: 14 when the client pipelined version, choice and ClientInit, else 12."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=0)  # a queue of one
        self.port: int = self.listener.getsockname()[1]
        self.first_reads: list[int] = []
        self._open: list[socket.socket] = []

    def serve_next(self) -> threading.Thread:
        """Accept the next queued (or coming) connection and serve it, in a thread."""
        thread = threading.Thread(target=self._serve_one, daemon=True)
        thread.start()
        return thread

    def fill(self) -> socket.socket:
        """Queue a connection nobody accepts yet: the queue is full from here."""
        filler = socket.create_connection(("127.0.0.1", self.port))
        self._open.append(filler)
        return filler

    def drop_filler(self) -> None:
        """Accept the filler (first in the queue) and close it: room for one again."""
        conn, _ = self.listener.accept()
        conn.close()

    def _serve_one(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.listener.accept()
            self._open.append(conn)
            conn.sendall(VERSION_38)
            received = conn.recv(64)
            self.first_reads.append(len(received))
            conn.sendall(b"\x01\x01" + struct.pack(">I", 0))  # None, and SecurityResult OK
            while len(received) < 14:  # the version, the choice and ClientInit
                received += conn.recv(14 - len(received))
            conn.sendall(struct.pack(">HH16sI", 800, 600, PIXEL_FORMAT, 4) + b"slow")

    def stop(self) -> None:
        for sock in [self.listener, *self._open]:
            with contextlib.suppress(OSError):
                sock.close()


@pytest.fixture
def taught_then_full(
    proxy_factory: Callable[..., ProxyProcess], mint: Mint
) -> Iterator[tuple[ProxyProcess, SlowToAccept, str]]:
    """A proxy that learned a :class:`SlowToAccept` server's offer (one ordinary console), the
    server's accept queue then held full; and the token."""
    proxy, server = proxy_factory(), SlowToAccept()
    try:
        token = mint(host="127.0.0.1", port=server.port)
        server.serve_next()
        assert asyncio.run(server_name(proxy.ws_url, token)) == b"slow"  # teaches the offer
        server.fill()
        yield proxy, server, token
    finally:
        server.stop()


def test_a_connect_still_under_way_takes_the_opening_through_the_transport(
    taught_then_full: tuple[ProxyProcess, SlowToAccept, str],
) -> None:
    """Across a network the TCP handshake is not done when the opening is ready: the early
    write on the dialled socket finds it still connecting (EAGAIN), and the opening goes through
    the transport once connected, whole and still ahead of the server's questions."""
    proxy, server, token = taught_then_full

    async def while_connecting() -> bytes:
        opening = asyncio.ensure_future(server_name(proxy.ws_url, token))
        deadline = time.monotonic() + 10
        while outcomes(proxy)["guessed"] < 1:  # the proxy has dialled and tried the early write
            assert time.monotonic() < deadline and not opening.done()
            await asyncio.sleep(0.01)  # polling another process's counter, not a synchronisation
        server.drop_filler()
        server.serve_next()  # accepts the proxy's connection when its SYN comes again
        return await asyncio.wait_for(opening, 15)

    assert asyncio.run(while_connecting()) == b"slow"
    assert server.first_reads == [12, 14]  # ordinary, then pipelined
    assert outcomes(proxy) == {"guessed": 1, "redialled": 0, "refused": 0}


def test_a_browser_s_protocol_error_does_not_mark_the_hypervisor(
    taught_then_full: tuple[ProxyProcess, SlowToAccept, str],
) -> None:
    """A browser that breaks its own handshake ends 4502 like a hypervisor that broke the
    pipelined one; only the latter marks the hypervisor. The hypervisor here has not answered
    yet (its accept queue is full), so the guess is unheard when the browser errs."""
    proxy, server, token = taught_then_full

    async def bad_browser() -> tuple[int | None, str | None]:
        console = await Console.open(proxy.ws_url, token)
        assert await console.read(12) == VERSION_38
        await console.send(b"RFB 009.000\n")
        return await console.wait_closed()

    assert asyncio.run(bad_browser()) == (4502, "target_protocol_error")
    assert outcomes(proxy) == {"guessed": 1, "redialled": 0, "refused": 0}
    server.drop_filler()
    server.serve_next()
    assert asyncio.run(server_name(proxy.ws_url, token)) == b"slow"
    assert outcomes(proxy) == {"guessed": 2, "redialled": 0, "refused": 0}  # still pipelined
