"""The PROXY protocol ahead of TLS: a proxy that serves https itself behind a TCP balancer.

The header comes before the TLS handshake, and Tornado's TLS stream must get the socket with
the handshake's first byte still unread. So the header is read off the socket exactly: the
bytes waiting are looked at (``MSG_PEEK``); while the header is incomplete all of them are
header and are taken; once it is complete only its own bytes are. Every read takes at least one
byte, so a peer that stalls mid-header costs nothing until the head timeout closes it.
From peers not in ``--trusted-proxy`` nothing is read: a TLS ClientHello begins with 0x16, and
a first byte that could begin a PROXY header ("P", CR) closes the connection.
The plain listener reads the header in :mod:`console_proxy.frontdoor`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Any

import tornado.httpserver
import tornado.netutil
from tornado.iostream import SSLIOStream

from console_proxy import origin, proxyproto
from console_proxy.server import ProxyState

log = logging.getLogger("consolegate.proxy")

BACKLOG = 1024
#: First bytes of a PROXY header (v1 "PROXY ", v2's signature), never of a TLS record.
HEADER_STARTS = (proxyproto.V1_PREFIX[:1], proxyproto.V2_SIGNATURE[:1])


class TlsDoor:
    """Listening sockets whose connections begin with a PROXY header, then TLS (Tornado's)."""

    def __init__(
        self, state: ProxyState, http: tornado.httpserver.HTTPServer, ssl_options: ssl.SSLContext, head_timeout: float
    ) -> None:
        self.state, self.http, self.ssl_options, self.head_timeout = state, http, ssl_options, head_timeout
        self.sockets: list[socket.socket] = []
        self._stop_accepting: list[Any] = []

    def listen(self, host: str, port: int) -> None:
        self.listen_on(tornado.netutil.bind_sockets(port, host, backlog=BACKLOG))

    def listen_on(self, sockets: list[socket.socket]) -> None:
        """Accept on sockets already bound (console_proxy.listeners binds every --listen first)."""
        for sock in sockets:
            self.sockets.append(sock)
            self._stop_accepting.append(tornado.netutil.add_accept_handler(sock, self._accepted))

    def close(self) -> None:
        for stop in self._stop_accepting:
            stop()
        for sock in self.sockets:
            sock.close()

    def _accepted(self, sock: socket.socket, address: Any) -> None:
        _Preamble(self, sock, tuple(address[:2])).start()

    def refuse(self, peer: str, reason: str, detail: str) -> None:
        self.state.metrics.proxy_protocol_refused.inc(reason)
        log.warning("PROXY protocol: closed a connection from %s: %s", peer, detail)

    def to_tornado(self, sock: socket.socket, address: tuple[str, int]) -> None:
        """What Tornado's own TLS listener does with an accepted socket."""
        try:
            connection = tornado.netutil.ssl_wrap_socket(
                sock, self.ssl_options, server_side=True, do_handshake_on_connect=False
            )
        except (ssl.SSLError, OSError):
            sock.close()
            return
        stream = SSLIOStream(
            connection, max_buffer_size=self.http.max_buffer_size, read_chunk_size=self.http.read_chunk_size
        )
        self.http.handle_stream(stream, address)


class _Preamble:
    """One accepted connection until its PROXY header has been read (or it is refused)."""

    def __init__(self, door: TlsDoor, sock: socket.socket, address: tuple[str, int]) -> None:
        self.door, self.sock, self.address = door, sock, address
        self.trusted = origin.is_trusted(address[0], door.state.config.trusted_proxies)
        self.header = b""
        self.loop = asyncio.get_running_loop()
        self.timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.sock.setblocking(False)
        self.loop.add_reader(self.sock.fileno(), self._readable)
        self.timer = self.loop.call_later(self.door.head_timeout, self._end)

    def _readable(self) -> None:
        try:
            header = self._step()
        except (BlockingIOError, InterruptedError):
            return
        except proxyproto.ProxyProtocolError as error:
            self.door.refuse(self.address[0], error.reason, str(error))
            self._end()
            return
        except OSError:  # reset, or closed before the header was whole
            self._end()
            return
        if header is not None:
            self._stop_waiting()
            self.door.to_tornado(self.sock, header.source or self.address)

    def _step(self) -> proxyproto.ProxyHeader | None:
        """Read what can be read of the header; the header once it is whole. Raises OSError at
        the end of the stream, ProxyProtocolError for a header that is wrong or unwelcome."""
        waiting = self.sock.recv(proxyproto.V2_MAX - len(self.header), socket.MSG_PEEK)
        if not waiting:
            raise ConnectionResetError
        if not self.trusted:
            if waiting[:1] in HEADER_STARTS:
                raise proxyproto.ProxyProtocolError(
                    "untrusted", "a PROXY protocol header from a peer not in --trusted-proxy"
                )
            return proxyproto.ProxyHeader(None, 0)  # TLS straight from the browser
        header = proxyproto.parse(self.header + waiting)
        take = len(waiting) if header is None else header.length - len(self.header)
        self.header += self.sock.recv(take)
        return header if header is not None and len(self.header) == header.length else None

    def _stop_waiting(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        if self.timer is not None:
            self.timer.cancel()

    def _end(self) -> None:
        self._stop_waiting()
        self.sock.close()
