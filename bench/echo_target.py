"""A stand-in RFB server for latency and concurrency: RFB 3.8, security None, then echo.

After ServerInit every byte the client sends is written straight back (same bytes, same count),
so a client can time a round trip through any path. TCP_NODELAY is set: the target must not be
where a Nagle stall comes from. Run as ``python -m bench.echo_target PORT``.
"""

from __future__ import annotations

import asyncio
import resource
import socket
import struct
import sys

SERVER_INIT = struct.pack(">HHBBBBHHHBBBxxx", 1024, 768, 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
NAME = b"echo"


class Echo(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.stage = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(b"RFB 003.008\n")

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.stage == 3:
            self.transport.write(data)
            return
        self.buf += data
        while True:
            if self.stage == 0 and len(self.buf) >= 12:
                del self.buf[:12]
                self.transport.write(b"\x01\x01")
                self.stage = 1
            elif self.stage == 1 and len(self.buf) >= 1:
                del self.buf[:1]
                self.transport.write(b"\x00\x00\x00\x00")
                self.stage = 2
            elif self.stage == 2 and len(self.buf) >= 1:
                del self.buf[:1]
                self.transport.write(SERVER_INIT + struct.pack(">I", len(NAME)) + NAME)
                self.stage = 3
                rest, self.buf = bytes(self.buf), bytearray()
                if rest:
                    self.transport.write(rest)
                return
            else:
                return


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(main(int(sys.argv[1])))
