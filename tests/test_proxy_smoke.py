"""The proxy end to end against a real Xvnc: the happy paths."""

from __future__ import annotations

import asyncio

from rfbclient import Console


def test_vncauth_console_through_proxy(proxy, mint, xvnc_vncauth) -> None:
    tok = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password, desktop_name="Web VM")

    async def scenario() -> tuple[int, int, bytes, int]:
        console = await Console.open(proxy.ws_url, tok)
        info = await console.handshake()
        await console.request_update()
        header = await console.read(4)
        console.close()
        return info.width, info.height, info.name, header[0]

    width, height, name, message_type = asyncio.run(scenario())
    assert (width, height, name) == (800, 600, b"Web VM")
    assert message_type == 0  # FramebufferUpdate
