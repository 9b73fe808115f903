"""Consoles over wss:// — the proxy serving TLS itself (``--tls-cert``/``--tls-key``), end to end.

The TLS-served socket takes its own path through the proxy's websocket layer (an SSL stream in
place of a plain one), so the plain-ws tests prove nothing about it. Everything here is real:
a proxy process with a certificate from the ``test_pki`` CA, real Xvnc servers, and a tornado
websocket client that verifies the proxy's certificate (never ``CERT_NONE``: a test that skips
verification would pass against a proxy serving the wrong certificate).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import ssl
import struct
import subprocess
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from proxyproc import ProxyProcess, free_port
from rfbclient import Console
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect
from xvnc import TestPki, XvncServer

Mint = Callable[..., str]
Read = Callable[[int], Awaitable[bytes]]
T = TypeVar("T")

SCENARIO_TIMEOUT = 10.0  # a hung relay fails the test instead of the whole run
BPP = 4  # the pixel format every client here sets: 32 bits, true colour
#: SetPixelFormat: 32 bpp, depth 24, little-endian, true colour, 8 bits per channel (BGRX).
SET_PIXEL_FORMAT = struct.pack(">B3xBBBBHHHBBB3x", 0, 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
SET_ENCODINGS_RAW = struct.pack(">BxHi", 2, 1, 0)  # Raw only: the update's size is width*height*bpp
SHIFT_L = 0xFFE1  # a key event that changes nothing on the desktop


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, SCENARIO_TIMEOUT))


@pytest.fixture
def wss_proxy(proxy_factory: Callable[..., ProxyProcess], test_pki: TestPki) -> ProxyProcess:
    """A proxy serving HTTPS/WSS with a certificate for 127.0.0.1 signed by the test CA."""
    return proxy_factory("--tls-cert", str(test_pki.cert_path), "--tls-key", str(test_pki.key_path))


@pytest.fixture
def client_tls(test_pki: TestPki) -> ssl.SSLContext:
    """What a browser does: verify the chain and that the certificate names 127.0.0.1."""
    context = ssl.create_default_context(cafile=str(test_pki.ca_path))
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    return context


def wss_url(proxy: ProxyProcess) -> str:
    """proxyproc only knows ws:// and http://; the TLS proxy is the same port, other scheme."""
    return f"wss://127.0.0.1:{proxy.port}/websockify"


def https_base(proxy: ProxyProcess) -> str:
    return f"https://127.0.0.1:{proxy.port}"


async def open_wss(proxy: ProxyProcess, tok: str, tls: ssl.SSLContext, *, origin: str | None = None) -> Console:
    """Open /websockify the way noVNC does (token in the subprotocol list), over verified TLS."""
    headers = {"Sec-WebSocket-Protocol": f"binary, token.{tok}"}
    if origin is not None:
        headers["Origin"] = origin
    request = HTTPRequest(wss_url(proxy), headers=headers, ssl_options=tls, request_timeout=10)
    return Console(await websocket_connect(request))


async def raw_session(send: Callable[[bytes], Awaitable[None]]) -> None:
    """Ask for 32-bit pixels in Raw encoding, so an update's size is known in advance."""
    await send(SET_PIXEL_FORMAT + SET_ENCODINGS_RAW)


def full_request(width: int, height: int) -> bytes:
    return struct.pack(">BBHHHH", 3, 0, 0, 0, width, height)  # non-incremental: the whole screen


async def read_update(read: Read, width: int, height: int) -> tuple[bytearray, int]:
    """One FramebufferUpdate of Raw rectangles: the screen assembled from them and the pixel
    bytes received. Rectangles are placed by their x/y, so how the server splits the screen
    does not matter; bells and clipboard messages before it are skipped."""
    while (kind := (await read(1))[0]) != 0:
        if kind == 3:  # ServerCutText
            (length,) = struct.unpack(">3xI", await read(7))
            await read(length)
        else:
            assert kind == 2, f"unexpected server message type {kind}"  # Bell
    (count,) = struct.unpack(">xH", await read(3))
    screen, received = bytearray(width * height * BPP), 0
    for _ in range(count):
        x, y, w, h, encoding = struct.unpack(">HHHHi", await read(12))
        assert encoding == 0 and x + w <= width and y + h <= height, (x, y, w, h, encoding)
        pixels = await read(w * h * BPP)
        received += len(pixels)
        for row in range(h):
            start = ((y + row) * width + x) * BPP
            screen[start : start + w * BPP] = pixels[row * w * BPP : (row + 1) * w * BPP]
    return screen, received


def closed_event(proxy: ProxyProcess, vm: str) -> dict[str, Any]:
    """The proxy's JSON "closed" record for the session tagged ``vm`` (waits for it)."""
    line = proxy.wait_for_log('"event":"closed"', f'"vm":"{vm}"')
    return json.loads(line.split(" consolegate.proxy.session ", 1)[1])


def test_vncauth_console_over_wss(
    wss_proxy: ProxyProcess, client_tls: ssl.SSLContext, mint: Mint, xvnc_vncauth: XvncServer
) -> None:
    """A whole console life over wss: handshake, a screen, input, a normal close.

    The Origin is the proxy's own https origin, as noVNC on the proxy's viewer page sends it:
    the proxy must work out that its own scheme is https when it serves TLS.
    """
    tok = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password, vm="wss-console")
    width, height = xvnc_vncauth.geometry

    async def scenario() -> tuple[tuple[int, int, bytes], int, int, int | None]:
        console = await open_wss(wss_proxy, tok, client_tls, origin=https_base(wss_proxy))
        assert console.ws.selected_subprotocol == "binary"
        info = await console.handshake()
        await raw_session(console.send)
        await console.send(full_request(info.width, info.height))
        _, first = await read_update(console.read, info.width, info.height)
        await console.key(SHIFT_L, True)
        await console.key(SHIFT_L, False)
        # answered only after Xvnc has read the key events before it: input went through in order
        await console.send(full_request(info.width, info.height))
        _, second = await read_update(console.read, info.width, info.height)
        console.ws.close(1000)
        assert await console.ws.read_message() is None  # the proxy completes the close handshake
        return (info.width, info.height, info.name), first, second, console.ws.close_code

    desktop, first, second, echoed = run(scenario())
    assert desktop == (width, height, xvnc_vncauth.desktop_name.encode())
    assert first == second == width * height * BPP
    assert echoed in (1000, None)  # RFC 6455 5.5.1: the reply typically echoes the code, if any
    closed = closed_event(wss_proxy, "wss-console")
    assert closed["close_code"] == 1000, closed
    assert closed["bytes_down"] >= 2 * width * height * BPP and closed["bytes_up"] >= 2 * 8 + 2 * 10, closed


def _noise_desktop(server: XvncServer, directory: Path, width: int, height: int) -> None:
    """Resize the Xvnc desktop and cover it with random bits (xsetroot -bitmap), so that no
    chunk of the screen looks like another: on Xvnc's default all-black root a chunk lost,
    repeated, reordered or overwritten in a reused buffer would go unnoticed."""
    rng = random.Random(20240617)
    tile_width, tile_height = 797, 599  # odd sizes: the tiling does not line up with relay chunks
    data = bytes(rng.getrandbits(8) for _ in range((tile_width + 7) // 8 * tile_height))
    rows = (",".join(f"0x{b:02x}" for b in data[i : i + 16]) for i in range(0, len(data), 16))
    bitmap = directory / "noise.xbm"  # Xlib reads XBM lines into a 255-byte buffer: short lines
    bitmap.write_text(
        f"#define n_width {tile_width}\n#define n_height {tile_height}\n"
        f"static unsigned char n_bits[] = {{\n" + ",\n".join(rows) + "};\n"
    )
    env = {**os.environ, "DISPLAY": f":{server.display}"}
    subprocess.run(["xrandr", "--fb", f"{width}x{height}"], check=True, timeout=10, env=env, capture_output=True)
    subprocess.run(
        ["xsetroot", "-bitmap", str(bitmap), "-fg", "#d02070", "-bg", "#10e0a0"],
        check=True,
        timeout=10,
        env=env,
        capture_output=True,
    )


async def _direct_screen(server: XvncServer) -> bytearray:
    """The screen read straight from Xvnc (security None), bypassing the proxy: the reference."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        assert (await reader.readexactly(12)).startswith(b"RFB 003.")
        writer.write(b"RFB 003.008\n")
        types = await reader.readexactly((await reader.readexactly(1))[0])
        assert 1 in types, types
        writer.write(b"\x01")
        assert await reader.readexactly(4) == b"\x00\x00\x00\x00"
        writer.write(b"\x01")  # shared: the proxied viewer is on the same desktop
        width, height, _pf, name_length = struct.unpack(">HH16sI", await reader.readexactly(24))
        await reader.readexactly(name_length)
        writer.write(SET_PIXEL_FORMAT + SET_ENCODINGS_RAW + full_request(width, height))
        screen, _ = await read_update(reader.readexactly, width, height)
        return screen
    finally:
        writer.close()
        await writer.wait_closed()


def test_a_full_screen_raw_update_arrives_whole_over_wss(
    wss_proxy: ProxyProcess,
    client_tls: ssl.SSLContext,
    mint: Mint,
    xvnc_factory: Callable[..., XvncServer],
    tmp_path: Path,
) -> None:
    """Bulk data over TLS: one full-screen Raw update of a 3840x2160 desktop (33 MB: hundreds
    of relay chunks and TLS records) arrives to the byte, pixel for pixel what Xvnc serves.

    33 MB is more than the kernel buffers between proxy and browser hold while the browser
    is not reading (tornado's client stops after one queued message; the reference read runs
    first), so the proxy's TLS writes back up: the path where a relay buffer must not be
    reused while the SSL stream still holds it, and where the hypervisor must be paused.
    """
    width, height = 3840, 2160
    server = xvnc_factory(security="None")
    _noise_desktop(server, tmp_path, width, height)
    tok = mint(host="127.0.0.1", port=server.port, vm="wss-bulk")

    async def scenario() -> tuple[bytearray, bytearray, int]:
        console = await open_wss(wss_proxy, tok, client_tls)
        info = await console.handshake()
        assert (info.width, info.height) == (width, height)
        await raw_session(console.send)
        await console.send(full_request(width, height))
        reference = await _direct_screen(server)  # meanwhile the update piles up behind the browser
        screen, received = await read_update(console.read, width, height)
        console.close()
        await console.wait_closed()
        return reference, screen, received

    reference, screen, received = run(scenario())
    assert len({bytes(reference[i : i + BPP]) for i in range(0, 64 * BPP, BPP)}) == 2  # the noise is on screen
    assert received == width * height * BPP
    assert screen == reference, "the screen through wss differs from the one Xvnc serves"
    assert closed_event(wss_proxy, "wss-bulk")["bytes_down"] >= width * height * BPP


def test_session_ending_close_code_over_wss(wss_proxy: ProxyProcess, client_tls: ssl.SSLContext, mint: Mint) -> None:
    """The proxy's own close codes reach a wss browser too (noVNC shows their reason)."""
    tok = mint(host="127.0.0.1", port=free_port())  # nothing listens there

    async def scenario() -> tuple[int | None, str | None]:
        return await (await open_wss(wss_proxy, tok, client_tls)).wait_closed()

    assert run(scenario()) == (4500, "target_unreachable")


def test_healthz_over_https(wss_proxy: ProxyProcess, client_tls: ssl.SSLContext) -> None:
    """Load balancers probe the TLS port itself; cleartext HTTP is not served on it."""

    async def scenario() -> tuple[int, dict[str, Any], int]:
        client = AsyncHTTPClient()
        response = await client.fetch(
            HTTPRequest(f"{https_base(wss_proxy)}/healthz", ssl_options=client_tls, request_timeout=10)
        )
        try:
            await client.fetch(f"http://127.0.0.1:{wss_proxy.port}/healthz", request_timeout=10)
        except HTTPClientError as error:
            cleartext = error.code
        except OSError:
            cleartext = 599
        else:
            cleartext = 200
        return response.code, json.loads(response.body), cleartext

    status, body, cleartext = run(scenario())
    assert status == 200 and body["status"] == "ok"
    assert cleartext != 200
    assert "(https)" in wss_proxy.wait_for_log("console-proxy listening")


def test_an_http_origin_is_not_the_wss_proxys_own(
    wss_proxy: ProxyProcess, client_tls: ssl.SSLContext, mint: Mint, xvnc_vncauth: XvncServer
) -> None:
    """Same host and port but http://: another origin once the proxy serves https, so refused."""
    tok = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password)
    headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Protocol": f"binary, token.{tok}",
        "Origin": f"http://127.0.0.1:{wss_proxy.port}",
    }

    async def scenario() -> tuple[int, dict[str, Any]]:
        request = HTTPRequest(
            f"{https_base(wss_proxy)}/websockify", headers=headers, ssl_options=client_tls, request_timeout=10
        )
        response = await AsyncHTTPClient().fetch(request, raise_error=False)
        return response.code, json.loads(response.body)

    status, body = run(scenario())
    assert (status, body["error"]) == (403, "origin_denied")
