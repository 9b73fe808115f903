"""The RFB vocabulary both handshakes share: versions, security type numbers, limits, and the
actions a handshake hands its caller (bytes to send, "start TLS now", "done").

Numbers and layouts follow the RFB community specification (rfbproto) and VeNCrypt's.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from console_proxy.protocol.rfb.errors import TEXT_KEEP, RfbError, printable

__all__ = [
    "MAX_NAME_LENGTH",
    "MAX_PENDING",
    "Authenticated",
    "ClientInitReceived",
    "DownstreamAction",
    "Send",
    "ServerInit",
    "ServerInitReady",
    "StartTls",
    "UpstreamAction",
    "negotiate_version",
    "parse_version",
    "version_line",
]

#: Desktop names longer than this are refused: no real server sends one, a hostile one might.
MAX_NAME_LENGTH = 64 * 1024
#: Bytes a handshake may hold while waiting for more; honest peers never come close.
MAX_PENDING = 64 * 1024

SEC_NONE = 1
SEC_VNC = 2
SEC_VENCRYPT = 19
VENCRYPT_TLSNONE = 257
VENCRYPT_TLSVNC = 258
VENCRYPT_X509NONE = 260
VENCRYPT_X509VNC = 261

SECURITY_NAMES = {
    SEC_NONE: "none",
    SEC_VNC: "vnc",
    SEC_VENCRYPT: "vencrypt",
    VENCRYPT_TLSNONE: "vencrypt-tlsnone",
    VENCRYPT_TLSVNC: "vencrypt-tlsvnc",
    VENCRYPT_X509NONE: "vencrypt-x509none",
    VENCRYPT_X509VNC: "vencrypt-x509vnc",
}
#: VeNCrypt subtypes that end in VNC Authentication inside the tunnel.
VENCRYPT_WITH_VNC_AUTH = frozenset({VENCRYPT_TLSVNC, VENCRYPT_X509VNC})
#: Anonymous TLS (no certificate, interceptable) and X.509 (certificate verified) subtypes we speak.
VENCRYPT_ANONYMOUS = frozenset({VENCRYPT_TLSNONE, VENCRYPT_TLSVNC})
VENCRYPT_X509 = frozenset({VENCRYPT_X509NONE, VENCRYPT_X509VNC})

U32 = struct.Struct(">I")
S32 = struct.Struct(">i")
SERVER_INIT_HEAD = struct.Struct(">HH16sI")

V3_3 = (3, 3)
V3_7 = (3, 7)
V3_8 = (3, 8)


@dataclass(frozen=True)
class Send:
    """Bytes the caller must write to the peer, in order, before anything else."""

    data: bytes


@dataclass(frozen=True)
class StartTls:
    """Upgrade the upstream connection to TLS now, then call ``tls_started()``.

    ``verify`` is True for X509* subtypes: check the certificate against ``TlsPolicy.ca_pem``
    and ``server_name``. False means anonymous TLS, which the policy allows.
    """

    verify: bool


@dataclass(frozen=True)
class Authenticated:
    """The target accepted us (SecurityResult OK); next the caller sends ClientInit (unless it
    was pipelined: ``UpstreamHandshake(client_init=...)``)."""


@dataclass(frozen=True)
class ServerInit:
    """The target's ServerInit: framebuffer size, pixel format and (bounded) desktop name."""

    width: int
    height: int
    pixel_format: bytes
    name: bytes

    def encode(self, name: bytes | None = None) -> bytes:
        """Serialize for the browser, optionally with another name (the token's ``dn``).

        Names are cut to 1 KiB like the server's own, even mid UTF-8 sequence (viewers decode
        leniently), so a long ``dn`` cannot make the ServerInit unbounded.
        """
        chosen = (self.name if name is None else name)[:TEXT_KEEP]
        head = SERVER_INIT_HEAD.pack(self.width, self.height, self.pixel_format, len(chosen))
        return head + chosen


@dataclass(frozen=True)
class ServerInitReady:
    """Handshake done. ``rest`` holds target bytes already received after ServerInit."""

    server_init: ServerInit
    rest: bytes


@dataclass(frozen=True)
class ClientInitReceived:
    """Browser handshake done. ``rest`` holds browser messages already received after it."""

    shared: bool
    rest: bytes


@dataclass(frozen=True)
class Redial:
    """A pipelined opening (:meth:`UpstreamHandshake.opening`) guessed wrong: the server's
    version or its security types call for another choice than the one already sent. This
    connection cannot be used; begin again on a new one, without the guess."""


@dataclass(frozen=True, slots=True)
class Offer:
    """What a server offered at a handshake: its version (as negotiated) and security types.
    Remembered so that the next handshake with it can pipeline the client's first words."""

    version: tuple[int, int]
    types: frozenset[int]


UpstreamAction = Send | StartTls | Authenticated | ServerInitReady | Redial
DownstreamAction = Send | ClientInitReceived


def parse_version(line: bytes) -> tuple[int, int]:
    """Parse a 12-byte ``RFB xxx.yyy\\n`` line exactly; anything else is a protocol error."""
    ok = (
        len(line) == 12
        and line[:4] == b"RFB "
        and line[7:8] == b"."
        and line[11:] == b"\n"
        and line[4:7].isdigit()
        and line[8:11].isdigit()
    )
    if not ok:
        raise RfbError.protocol(f"not an RFB version line: {printable(line)!r}")
    return int(line[4:7]), int(line[8:11])


def negotiate_version(offered: tuple[int, int]) -> tuple[int, int]:
    """The version a client should use against a server offering ``offered``.

    3.3 to 3.6 mean 3.3 (3.5 was misreported by old clients, per the spec), 3.7 is 3.7, and
    anything from 3.8 up (Apple's 3.889, RealVNC's 4.x) speaks 3.8 to a 3.8 client. Below 3.3,
    or a major of 0, is not RFB we know.
    """
    if offered >= V3_8:
        return V3_8
    if offered == V3_7:
        return V3_7
    if offered >= V3_3:
        return V3_3
    raise RfbError.protocol(f"unsupported RFB version {offered[0]}.{offered[1]}")


def version_line(version: tuple[int, int]) -> bytes:
    return b"RFB %03d.%03d\n" % version
