"""Connecting to the hypervisor without waiting for the TCP handshake on the event loop.

An RFB server speaks first, so the proxy has nothing to send before the hypervisor's first
bytes arrive. For a numeric address the socket is therefore handed to asyncio while the TCP
handshake is still under way: the first bytes prove the connection, and a failed connect shows
up as the read error it causes. Profiles put asyncio's usual connect (a writer registered and
removed, a future, a coroutine chain) at about a twentieth of the proxy's CPU per console open.

Host names still go through ``loop.create_connection``, which resolves them off the loop.
"""

from __future__ import annotations

import errno
import ipaddress
import socket

#: Errors that mean the connection was never made (as opposed to made, then lost).
CONNECT_FAILURES = frozenset(
    {
        errno.ECONNREFUSED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ETIMEDOUT,
        errno.EHOSTDOWN,
        errno.ENETDOWN,
        errno.EADDRNOTAVAIL,
    }
)


def connecting_socket(host: str, port: int) -> socket.socket | None:
    """A non-blocking socket whose connect to ``host:port`` has begun, or None when ``host`` is
    not a plain numeric address (a name, or an IPv6 address with a zone): those take the usual
    path. OSError if the connect failed at once."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        return None
    sock = socket.socket(socket.AF_INET6 if address.version == 6 else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        failed = sock.connect_ex((host, port))
        if failed not in (0, errno.EINPROGRESS):
            raise OSError(failed, "connect failed")
    except BaseException:
        sock.close()
        raise
    return sock


def never_connected(exc: BaseException | None) -> bool:
    """Whether a transport's error means its connect failed (rather than a connection lost)."""
    return isinstance(exc, OSError) and exc.errno in CONNECT_FAILURES


def is_connected(sock: socket.socket | None) -> bool:
    """Whether the TCP handshake of ``sock`` has completed (and the socket is still open)."""
    if sock is None:
        return False
    try:
        sock.getpeername()
    except OSError:
        return False
    return True
