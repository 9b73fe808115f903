"""The pipelined opening through a real proxy process (console_proxy/offers.py).

Against real Xvnc: the first console to a hypervisor teaches the proxy its offer, later ones
send the version line and security choice at once and open as ever; a hypervisor that changed
on the same port costs a new connection, not the console. Against the one stand-in a real part
cannot play (a server that drops input that came early): it is found and left alone.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING

from hostile import HostileServer
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
