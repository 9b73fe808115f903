"""The proxy's listening sockets: all bound before anything else starts, or none.

``--listen`` repeats; ``[::]:PORT`` is one dual-stack socket (IPv6 and IPv4-mapped clients), the
other addresses are bound as Tornado binds them (``localhost``: one socket per family). A bind
that fails closes the sockets already bound and is one line: the process then exits before it
has told the broker it is up or started any task, so nothing is left half-started.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

import tornado.netutil

from console_proxy.command import CommandError

DUAL_STACK_HOSTS = frozenset({"::"})
BACKLOG = 128


def show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_all(addresses: Sequence[tuple[str, int]]) -> list[socket.socket]:
    """Every address bound and listening, or CommandError (one line) with none left open."""
    bound: list[socket.socket] = []
    for host, port in addresses:
        try:
            bound += _dual_stack(port) if host in DUAL_STACK_HOSTS else tornado.netutil.bind_sockets(port, host)
        except (OSError, ValueError) as exc:
            for sock in bound:
                sock.close()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise CommandError(f"cannot listen on {show(host, port)}: {reason}") from None
    return bound


def _dual_stack(port: int) -> list[socket.socket]:
    """One IPv6 socket that also takes IPv4 (``IPV6_V6ONLY`` off; Tornado always turns it on)."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
        sock.setblocking(False)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return [sock]


def addresses_of(sockets: Sequence[socket.socket]) -> str:
    """``127.0.0.1:6080, [::]:6080``: what the "listening" log line names."""
    return ", ".join(show(*sock.getsockname()[:2]) for sock in sockets)
