"""The ``clip`` policy on the wire: a real proxy process, a real Xvnc, and ``xclip`` in the VM's
session to set and read the VM's clipboard.

VM -> browser: a witness connected straight to Xvnc (no proxy) sees the VM's cut text; Xvnc
writes it to every client in the same step, so once the witness has it, the proxied client's
stream holds it before anything Xvnc writes later. The proxied client then asks for a full
update: cut text before that update arrives, or none, is the answer. Browser -> VM: Xvnc
handles a client's messages in order, so once the update asked for *after* the ClientCutText
arrives, the VM's clipboard shows whether the text got there.
"""

from __future__ import annotations

import asyncio
import secrets
import struct
import urllib.request

import pytest
from hostile import LEAKED, HostileServer
from rfbclient import Console
from rfbframes import BELL, FRAMEBUFFER_UPDATE, PIXEL_FORMAT, RAW, SERVER_CUT_TEXT, DirectConsole, Transport
from vmclipboard import needs_xclip, set_vm_clipboard, vm_clipboard

from console_proxy.codes import Close

pytestmark = needs_xclip

IO_TIMEOUT = 20.0
EXT_CLIP = 0xC0A1E5CE - (1 << 32)
TIGHT = 7


async def start(console: Transport, *encodings: int) -> None:
    await console.send(b"\x00\x00\x00\x00" + PIXEL_FORMAT)
    await console.send(struct.pack(">BxH", 2, len(encodings)) + b"".join(struct.pack(">i", e) for e in encodings))


async def next_message(console: Transport) -> tuple[str, bytes]:
    """One server message of the kinds a Raw-only client gets: ('update', b''), ('cut', text), ('bell', b'')."""
    kind = (await console.read(1))[0]
    if kind == FRAMEBUFFER_UPDATE:
        (count,) = struct.unpack(">xH", await console.read(3))
        for _ in range(count):
            _, _, width, height, encoding = struct.unpack(">HHHHi", await console.read(12))
            assert encoding == RAW, encoding
            await console.read(width * height * 4)
        return "update", b""
    if kind == SERVER_CUT_TEXT:
        (length,) = struct.unpack(">3xi", await console.read(7))
        assert length >= 0, "extended clipboard was never asked for"
        return "cut", await console.read(length)
    assert kind == BELL, kind
    return "bell", b""


async def cut_text_until(console: Transport, wanted: bytes) -> None:
    while await next_message(console) != ("cut", wanted):
        pass


async def cut_texts_before_next_update(console: Console) -> list[bytes]:
    await console.request_update()
    seen: list[bytes] = []
    while True:
        kind, data = await next_message(console)
        if kind == "update":
            return seen
        if kind == "cut":
            seen.append(data)


async def copy_out(proxy_url: str, token: str, xvnc, encodings: tuple[int, ...] = (RAW,)) -> list[bytes]:
    """Set the VM's clipboard; the cut texts the proxied client got for it (witnessed directly)."""
    witness = await DirectConsole.connect("127.0.0.1", xvnc.port)
    console = await Console.open(proxy_url, token)
    try:
        await witness.handshake()
        await console.handshake()
        await start(witness, RAW)
        await start(console, *encodings)
        await console.request_update()  # a first update: the proxy has passed SetEncodings on
        while (await next_message(console))[0] != "update":
            pass
        text = "out-" + secrets.token_hex(6)
        set_vm_clipboard(xvnc.display, text)
        await asyncio.wait_for(cut_text_until(witness, text.encode()), IO_TIMEOUT)
        return await asyncio.wait_for(cut_texts_before_next_update(console), IO_TIMEOUT)
    finally:
        console.close()
        witness.close()


async def paste_in(proxy_url: str, token: str, message: bytes, display: int) -> str:
    """Send ``message`` (a ClientCutText), wait until Xvnc has handled what followed it, and
    read the VM's clipboard while the client is still there (Xvnc forgets a client's clipboard
    when it leaves)."""
    console = await Console.open(proxy_url, token)
    try:
        await console.handshake()
        await start(console, RAW)
        await console.send(message)
        await asyncio.wait_for(cut_texts_before_next_update(console), IO_TIMEOUT)
        return await asyncio.to_thread(vm_clipboard, display)
    finally:
        console.close()


def client_cut(text: bytes, *, extended: bool = False) -> bytes:
    return struct.pack(">Bxxxi", 6, -len(text) if extended else len(text)) + text


@pytest.mark.parametrize(
    ("clip", "allowed"), [(None, True), ("both", True), ("out", True), ("in", False), ("none", False)]
)
def test_copy_out_reaches_the_browser_only_when_the_policy_allows(proxy, mint, xvnc_none, clip, allowed) -> None:
    token = mint(host="127.0.0.1", port=xvnc_none.port, clip=clip)
    seen = asyncio.run(copy_out(proxy.ws_url, token, xvnc_none))
    assert (len(seen) == 1) is allowed, seen
    assert all(text.startswith(b"out-") for text in seen)


@pytest.mark.parametrize(
    ("clip", "allowed"), [(None, True), ("both", True), ("in", True), ("out", False), ("none", False)]
)
def test_paste_in_reaches_the_vm_only_when_the_policy_allows(proxy, mint, xvnc_none, clip, allowed) -> None:
    before = "before-" + secrets.token_hex(6)
    set_vm_clipboard(xvnc_none.display, before)
    text = "in-" + secrets.token_hex(6)
    token = mint(host="127.0.0.1", port=xvnc_none.port, clip=clip)
    got = asyncio.run(paste_in(proxy.ws_url, token, client_cut(text.encode()), xvnc_none.display))
    assert got == (text if allowed else before)


def test_without_out_the_browser_cannot_ask_for_unframeable_encodings_or_extended_clipboard(
    proxy, mint, xvnc_none
) -> None:
    """noVNC asks for the extended clipboard and Tight first; under clip=in Xvnc must answer in
    what the proxy can frame (Raw here: next_message refuses anything else), without cut text."""
    token = mint(host="127.0.0.1", port=xvnc_none.port, clip="in")
    assert asyncio.run(copy_out(proxy.ws_url, token, xvnc_none, encodings=(EXT_CLIP, TIGHT, RAW))) == []


def test_a_cut_text_above_the_limit_is_dropped_counted_and_the_session_goes_on(proxy_factory, mint, xvnc_none) -> None:
    proxy = proxy_factory("--max-cut-text", "64")
    before = "before-" + secrets.token_hex(6)
    set_vm_clipboard(xvnc_none.display, before)
    token = mint(host="127.0.0.1", port=xvnc_none.port)

    async def scenario() -> None:
        console = await Console.open(proxy.ws_url, token)
        try:
            await console.handshake()
            await start(console, RAW)
            await console.send(client_cut(b"x" * 65))
            await asyncio.wait_for(cut_texts_before_next_update(console), IO_TIMEOUT)
            assert await asyncio.to_thread(vm_clipboard, xvnc_none.display) == before
            await console.send(client_cut(b"small enough"))
            await asyncio.wait_for(cut_texts_before_next_update(console), IO_TIMEOUT)
            assert await asyncio.to_thread(vm_clipboard, xvnc_none.display) == "small enough"
        finally:
            console.close()

    asyncio.run(scenario())
    with urllib.request.urlopen(f"{proxy.base}/metrics") as response:
        metrics = response.read().decode()
    assert 'consolegate_proxy_cut_text_dropped_total{direction="in",reason="too_large"} 1' in metrics


def test_policy_drops_are_counted_by_direction(proxy, mint, xvnc_none) -> None:
    token = mint(host="127.0.0.1", port=xvnc_none.port, clip="none")
    asyncio.run(paste_in(proxy.ws_url, token, client_cut(b"no"), xvnc_none.display))
    with urllib.request.urlopen(f"{proxy.base}/metrics") as response:
        metrics = response.read().decode()
    assert 'consolegate_proxy_cut_text_dropped_total{direction="in",reason="policy"}' in metrics


async def everything_until_closed(proxy_url: str, token: str) -> tuple[bytes, int | None]:
    console = await Console.open(proxy_url, token)
    await console.handshake()
    received = bytes(console.buffer)
    while (message := await console.ws.read_message()) is not None:
        received += message if isinstance(message, bytes) else message.encode()
    return received, console.ws.close_code


def test_a_server_sending_unasked_cut_text_and_encodings_leaks_nothing_under_clip_none(proxy, mint) -> None:
    """A stand-in server (tests/hostile.py) pushes cut text no one asked for and then a Tight
    rectangle, which the proxy cannot frame: the cut text never reaches the browser, and the
    session ends 4502 rather than relaying what it cannot check (what was framed in the same
    read is dropped with it: failing closed)."""
    with HostileServer("cut_text_then_tight") as server:
        token = mint(host="127.0.0.1", port=server.port, clip="none")
        received, code = asyncio.run(asyncio.wait_for(everything_until_closed(proxy.ws_url, token), IO_TIMEOUT))
    assert LEAKED not in received and b"\x03" not in received
    assert code == Close.TARGET_PROTOCOL_ERROR


def test_with_out_allowed_the_server_stream_is_relayed_unparsed(proxy, mint) -> None:
    with HostileServer("cut_text_then_tight") as server:
        token = mint(host="127.0.0.1", port=server.port, clip="out")

        async def first_bytes() -> bytes:
            console = await Console.open(proxy.ws_url, token)
            try:
                await console.handshake()
                return await console.read(8 + len(LEAKED))
            finally:
                console.close()

        received = asyncio.run(asyncio.wait_for(first_bytes(), IO_TIMEOUT))
    assert received == struct.pack(">Bxxxi", 3, len(LEAKED)) + LEAKED
