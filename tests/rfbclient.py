"""A browser stand-in for tests: opens /websockify like noVNC and speaks RFB 3.8 (security None).

It is the *client* role only; the proxy and the VNC server under test are real.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect


@dataclass
class Refused:
    status: int
    body: dict[str, str]


@dataclass
class ServerInitInfo:
    width: int
    height: int
    name: bytes


def _headers(token: str | None, origin: str | None, via: str, extra: dict[str, str] | None) -> dict[str, str]:
    headers = dict(extra or {})
    protocols = ["binary"]
    if token is not None and via == "subprotocol":
        protocols.append(f"token.{token}")
    headers["Sec-WebSocket-Protocol"] = ", ".join(protocols)
    if origin is not None:
        headers["Origin"] = origin
    return headers


def _url(ws_url: str, token: str | None, via: str) -> str:
    return f"{ws_url}?token={token}" if token is not None and via == "query" else ws_url


async def try_upgrade(
    ws_url: str,
    token: str | None,
    *,
    origin: str | None = None,
    via: str = "subprotocol",
    headers: dict[str, str] | None = None,
) -> Refused | None:
    """The refusal a plain HTTP upgrade request gets (status + JSON), or None if it would upgrade."""
    all_headers = _headers(token, origin, via, headers)
    all_headers.update(
        {
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        }
    )
    request = HTTPRequest(_url(ws_url, token, via).replace("ws://", "http://"), headers=all_headers, request_timeout=10)
    response = await AsyncHTTPClient().fetch(request, raise_error=False)
    if response.code == 101 or response.code == 599:
        return None
    return Refused(response.code, json.loads(response.body))


class Console:
    """An open console websocket plus enough RFB to get the desktop and send input."""

    def __init__(self, ws: WebSocketClientConnection) -> None:
        self.ws = ws
        self.buffer = bytearray()
        self.server_init: ServerInitInfo | None = None

    @classmethod
    async def open(
        cls,
        ws_url: str,
        token: str,
        *,
        origin: str | None = None,
        via: str = "subprotocol",
        headers: dict[str, str] | None = None,
    ) -> Console:
        request = HTTPRequest(
            _url(ws_url, token, via), headers=_headers(token, origin, via, headers), request_timeout=10
        )
        ws = await websocket_connect(request, subprotocols=None)
        return cls(ws)

    async def read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            message = await self.ws.read_message()
            if message is None:
                raise ConnectionError(f"closed: {self.ws.close_code} {self.ws.close_reason}")
            self.buffer += message if isinstance(message, bytes) else message.encode()
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    async def send(self, data: bytes) -> None:
        await self.ws.write_message(data, binary=True)

    async def handshake(self, shared: bool = True) -> ServerInitInfo:
        assert await self.read(12) == b"RFB 003.008\n"
        await self.send(b"RFB 003.008\n")
        count = (await self.read(1))[0]
        types = await self.read(count)
        assert types == b"\x01", types
        await self.send(b"\x01")
        assert await self.read(4) == b"\x00\x00\x00\x00"
        await self.send(b"\x01" if shared else b"\x00")
        width, height, _pf, name_len = struct.unpack(">HH16sI", await self.read(24))
        self.server_init = ServerInitInfo(width, height, await self.read(name_len))
        return self.server_init

    async def request_update(self, incremental: bool = False) -> None:
        width, height = (self.server_init.width, self.server_init.height) if self.server_init else (1, 1)
        await self.send(struct.pack(">BBHHHH", 3, int(incremental), 0, 0, width, height))

    async def pointer(self, x: int, y: int, buttons: int = 0) -> None:
        await self.send(struct.pack(">BBHH", 5, buttons, x, y))

    async def key(self, keysym: int, down: bool) -> None:
        await self.send(struct.pack(">BBxxI", 4, int(down), keysym))

    async def wait_closed(self) -> tuple[int | None, str | None]:
        """Read until the proxy closes; the close code and reason."""
        while await self.ws.read_message() is not None:
            pass
        return self.ws.close_code, self.ws.close_reason

    def close(self) -> None:
        self.ws.close()
