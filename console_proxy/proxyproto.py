"""The PROXY protocol (HAProxy's, versions 1 and 2) ahead of a connection, sans I/O.

A balancer in TCP mode (HAProxy ``send-proxy``/``send-proxy-v2``, AWS NLB, …) connects to us
itself, so the peer address is the balancer's. It says who its client was in a header before the
client's own bytes; the proxy reads it (``--proxy-protocol``) from ``--trusted-proxy`` peers only,
since anyone else could claim any address. Reads are bounded: a version-1 line is at most
``V1_MAX`` bytes, a version-2 block at most ``V2_MAX``, and every length inside it is checked.

:func:`parse` takes the bytes received so far and answers None (more needed), a
:class:`ProxyHeader`, or raises :class:`ProxyProtocolError` with a stable reason code.
Spec: https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

#: Longest version-1 header, CRLF included (the spec's figure for "TCP6" with the longest addresses).
V1_MAX = 107
V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version/command, family/protocol, length
#: Longest version-2 header we read: the addresses plus TLVs (balancers send a few short ones).
V2_MAX = V2_FIXED + 2048
V2_VERSION = 0x2
CMD_LOCAL, CMD_PROXY = 0x0, 0x1
AF_UNSPEC, AF_INET, AF_INET6, AF_UNIX = 0x0, 0x1, 0x2, 0x3
#: Bytes of the address block for each family: source and destination addresses, then ports.
ADDRESS_BLOCK = {AF_INET: 12, AF_INET6: 36, AF_UNIX: 216}

Address = tuple[str, int]


class ProxyProtocolError(Exception):
    """A connection that cannot go on; ``reason`` is a stable code (a metrics label)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class ProxyHeader:
    """What the header said: the client's address (None: LOCAL, UNKNOWN or a non-IP family,
    where the connection's own peer stands) and how many bytes the header took."""

    source: Address | None
    length: int


def announces(data: bytes) -> bool | None:
    """Whether ``data`` begins with a PROXY header's signature: None while too short to tell."""
    for signature in (V1_PREFIX, V2_SIGNATURE):
        size = min(len(data), len(signature))
        if data[:size] == signature[:size]:
            return True if size == len(signature) else None
    return False


def parse(data: bytes) -> ProxyHeader | None:
    """The header at the start of ``data``, None if it is not complete yet."""
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    start = announces(data)
    if start is None:
        return None
    if not start:
        raise ProxyProtocolError("missing", "the connection did not begin with a PROXY protocol header")
    return _parse_v1(data)


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyProtocolError("malformed", f"PROXY v1 line longer than {V1_MAX} bytes")
        return None
    try:
        fields = data[:end].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyProtocolError("malformed", "PROXY v1 line is not ASCII") from None
    length = end + 2
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        return ProxyHeader(None, length)  # the rest of the line is to be ignored (spec 2.1)
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError("malformed", "PROXY v1 line is not 'PROXY TCP4|TCP6 src dst sport dport'")
    version = 4 if fields[1] == "TCP4" else 6
    source = _v1_address(fields[2], version)
    _v1_address(fields[3], version)
    port = _v1_port(fields[4])
    _v1_port(fields[5])
    return ProxyHeader((source, port), length)


def _v1_address(text: str, version: int) -> str:
    if "%" in text:  # a scope id is not a client's address
        raise ProxyProtocolError("malformed", "PROXY v1 address is not an IP address")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyProtocolError("malformed", "PROXY v1 address is not an IP address") from None
    if address.version != version:
        raise ProxyProtocolError("malformed", "PROXY v1 address does not match its family")
    return str(address)


def _v1_port(text: str) -> int:
    if not text.isdigit() or not text.isascii() or len(text) > 5 or (len(text) > 1 and text[0] == "0"):
        raise ProxyProtocolError("malformed", "PROXY v1 port is not a decimal port number")
    port = int(text)
    if port > 65535:
        raise ProxyProtocolError("malformed", "PROXY v1 port is out of range")
    return port


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < V2_FIXED:
        return None
    version_command, family_protocol, size = struct.unpack_from("!BBH", data, 12)
    if version_command >> 4 != V2_VERSION:
        raise ProxyProtocolError("malformed", "PROXY v2 header of an unknown version")
    command, family = version_command & 0x0F, family_protocol >> 4
    if command not in (CMD_LOCAL, CMD_PROXY):
        raise ProxyProtocolError("malformed", "PROXY v2 header with an unknown command")
    length = V2_FIXED + size
    if length > V2_MAX:
        raise ProxyProtocolError("malformed", f"PROXY v2 header longer than {V2_MAX} bytes")
    if len(data) < length:
        return None
    if command == CMD_LOCAL or family in (AF_UNSPEC, AF_UNIX):
        if family in ADDRESS_BLOCK and command == CMD_PROXY and size < ADDRESS_BLOCK[family]:
            raise ProxyProtocolError("malformed", "PROXY v2 address block shorter than its family's")
        return ProxyHeader(None, length)
    if family not in ADDRESS_BLOCK:
        raise ProxyProtocolError("malformed", "PROXY v2 header with an unknown address family")
    if size < ADDRESS_BLOCK[family]:
        raise ProxyProtocolError("malformed", "PROXY v2 address block shorter than its family's")
    if family == AF_INET:
        source = socket.inet_ntop(socket.AF_INET, data[16:20])
        (port,) = struct.unpack_from("!H", data, 24)
    else:
        source = str(ipaddress.IPv6Address(data[16:32]))
        (port,) = struct.unpack_from("!H", data, 48)
    return ProxyHeader((source, port), length)
