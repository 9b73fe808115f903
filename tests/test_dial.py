"""Connecting without waiting for the TCP handshake: which hosts take that path, and how a
failed or pending connect is told apart from a connection made."""

from __future__ import annotations

import errno
import socket
from contextlib import closing

import pytest

from console_proxy import dial


@pytest.mark.parametrize("host", ["localhost", "console.example.org", "fe80::1%lo", "10.0.0.1 "])
def test_names_and_zoned_addresses_take_the_usual_path(host: str) -> None:
    assert dial.connecting_socket(host, 5900) is None


def test_a_numeric_address_gives_a_socket_that_connects() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        with closing(dial.connecting_socket("127.0.0.1", listener.getsockname()[1])) as sock:
            assert sock is not None and not sock.getblocking()
            accepted, _ = listener.accept()  # the connect was under way without us
            accepted.close()
            assert dial.is_connected(sock)


def test_an_ipv6_address_gets_an_ipv6_socket() -> None:
    try:
        sock = dial.connecting_socket("::1", 9)
    except OSError:  # no IPv6 on this host: the failure must come as OSError, at once
        return
    with closing(sock):
        assert sock is not None and sock.family == socket.AF_INET6


def test_a_connect_that_fails_at_once_raises() -> None:
    """Broadcast without SO_BROADCAST: the kernel refuses the connect before any packet."""
    with pytest.raises(OSError):
        dial.connecting_socket("255.255.255.255", 5900)


@pytest.mark.parametrize(
    ("exc", "never"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), True),
        (OSError(errno.EHOSTUNREACH, "no route"), True),
        (OSError(errno.ETIMEDOUT, "timed out"), True),
        (ConnectionResetError(errno.ECONNRESET, "reset"), False),
        (BrokenPipeError(errno.EPIPE, "pipe"), False),
        (None, False),
        (ValueError("not an OSError"), False),
    ],
)
def test_only_connect_errors_mean_never_connected(exc: BaseException | None, never: bool) -> None:
    assert dial.never_connected(exc) is never


def test_a_pending_or_missing_socket_is_not_connected() -> None:
    assert not dial.is_connected(None)
    with socket.socket() as sock:
        assert not dial.is_connected(sock)
