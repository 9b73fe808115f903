"""Sans-I/O RFB (VNC) handshakes and the client message framer.

The proxy speaks RFB twice: as a *client* towards the hypervisor (authenticating with the
password from the token, or over VeNCrypt TLS) and as a *server* towards the browser (offering
security type None only, because the browser never learns the password). Both handshakes live
here as plain objects in the style of h11/wsproto: the caller feeds received bytes and gets back
a list of actions (bytes to send, "start TLS now", "done"). Nothing here touches a socket, a
clock or Tornado, so every branch is testable with byte strings.

Everything a server or browser tells us is bounded: failure reasons are read up to 1 KiB,
desktop names above 64 KiB are refused, and bytes buffered while waiting are capped, so a
hostile peer cannot make the proxy allocate or wait for gigabytes.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from Crypto.Cipher import DES

from console_proxy.codes import Close
from console_proxy.upstream_tls import TlsPolicy

__all__ = [
    "INPUT_MESSAGE_TYPES",
    "Authenticated",
    "ClientInitReceived",
    "ClientMessageFramer",
    "DownstreamHandshake",
    "RfbError",
    "Send",
    "ServerInit",
    "ServerInitReady",
    "StartTls",
    "TlsPolicy",
    "UpstreamHandshake",
    "vnc_auth_response",
]

#: Longest failure reason or desktop name we keep; the rest is dropped unread or uncounted.
TEXT_KEEP = 1024
#: Desktop names longer than this are refused: no real server sends one, a hostile one might.
MAX_NAME_LENGTH = 64 * 1024
#: Bytes a handshake may hold while waiting for more; honest peers never come close.
MAX_PENDING = 64 * 1024

AUTH_FAILED = Close.TARGET_AUTH_FAILED.reason
PROTOCOL_ERROR = Close.TARGET_PROTOCOL_ERROR.reason
_CLOSE_CODES = {close.reason: close for close in (Close.TARGET_AUTH_FAILED, Close.TARGET_PROTOCOL_ERROR)}

SEC_NONE = 1
SEC_VNC = 2
SEC_VENCRYPT = 19
VENCRYPT_TLSNONE = 257
VENCRYPT_TLSVNC = 258
VENCRYPT_X509NONE = 260
VENCRYPT_X509VNC = 261

_SECURITY_NAMES = {
    SEC_NONE: "none",
    SEC_VNC: "vnc",
    SEC_VENCRYPT: "vencrypt",
    VENCRYPT_TLSNONE: "vencrypt-tlsnone",
    VENCRYPT_TLSVNC: "vencrypt-tlsvnc",
    VENCRYPT_X509NONE: "vencrypt-x509none",
    VENCRYPT_X509VNC: "vencrypt-x509vnc",
}
#: VeNCrypt subtypes that end in VNC Authentication inside the tunnel.
_VENCRYPT_WITH_VNC_AUTH = frozenset({VENCRYPT_TLSVNC, VENCRYPT_X509VNC})
#: Anonymous TLS (no certificate, interceptable) and X.509 (certificate verified) subtypes we speak.
_VENCRYPT_ANONYMOUS = frozenset({VENCRYPT_TLSNONE, VENCRYPT_TLSVNC})
_VENCRYPT_X509 = frozenset({VENCRYPT_X509NONE, VENCRYPT_X509VNC})

_U32 = struct.Struct(">I")
_S32 = struct.Struct(">i")
_SERVER_INIT_HEAD = struct.Struct(">HH16sI")

V3_3 = (3, 3)
V3_7 = (3, 7)
V3_8 = (3, 8)


class RfbError(Exception):
    """Why a handshake or message stream was abandoned, as a public code and close code.

    ``code`` is ``target_auth_failed`` (websocket close 4501: the target refused us, or we
    refused what it offered) or ``target_protocol_error`` (4502: the peer broke the protocol).
    ``str(e)`` is safe to log and to show: it never contains the VNC password, and any text the
    server supplied is cut to 1 KiB and reduced to printable characters.
    """

    def __init__(self, code: str, message: str) -> None:
        if code not in _CLOSE_CODES:
            raise ValueError(f"unknown RFB error code {code!r}")
        super().__init__(message)
        self.code = code
        self.close_code: Close = _CLOSE_CODES[code]

    @classmethod
    def auth_failed(cls, message: str) -> RfbError:
        """The target refused to let us in, or offered nothing our policy accepts."""
        return cls(AUTH_FAILED, message)

    @classmethod
    def protocol(cls, message: str) -> RfbError:
        """The peer sent something RFB does not allow (or that we refuse to parse)."""
        return cls(PROTOCOL_ERROR, message)


def printable(raw: bytes) -> str:
    """Peer-supplied text made safe for logs and close reasons: 1 KiB, printable only."""
    text = raw[:TEXT_KEEP].decode("utf-8", "replace")
    return "".join(ch if ch.isprintable() else "?" for ch in text)


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
        head = _SERVER_INIT_HEAD.pack(self.width, self.height, self.pixel_format, len(chosen))
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


UpstreamAction = Send | StartTls | Authenticated | ServerInitReady
DownstreamAction = Send | ClientInitReceived
ChallengeCipher = Callable[[str, bytes], bytes]


#: VNC's DES key quirk: each key byte is used with its bit order reversed.
_REVERSED_BITS = bytes(int(f"{byte:08b}"[::-1], 2) for byte in range(256))


def vnc_auth_response(password: str, challenge: bytes) -> bytes:
    """Answer a VNC Authentication challenge: DES-ECB under the mangled password key.

    The key is the first 8 bytes of the UTF-8 password (what QEMU, libvirt and vncpasswd in a
    UTF-8 locale store), zero padded, each byte bit-reversed. Longer passwords are silently
    truncated, as every VNC server does.
    """
    if len(challenge) != 16:
        raise ValueError("VNC challenge must be 16 bytes")
    return _vnc_auth_cipher(password).encrypt(challenge)


def _vnc_auth_cipher(password: str) -> Any:
    """The DES-ECB cipher of :func:`vnc_auth_response` (its key schedule built here)."""
    raw = password.encode("utf-8")[:8].ljust(8, b"\0")
    return DES.new(raw.translate(_REVERSED_BITS), DES.MODE_ECB)


class _Buffer:
    """Received bytes not yet consumed, with a cap on what may pile up between reads."""

    def __init__(self, limit: int) -> None:
        self._data = bytearray()
        self._limit = limit

    def __len__(self) -> int:
        return len(self._data)

    def append(self, data: bytes) -> None:
        self._data += data

    def check_limit(self) -> None:
        """Refuse a peer that keeps sending while we wait: no honest peer needs this much."""
        if len(self._data) > self._limit:
            raise RfbError.protocol("peer sent more data than the handshake allows")

    def peek(self, n: int) -> bytes | None:
        """The first n bytes without consuming them, or None if not all arrived yet."""
        return bytes(self._data[:n]) if len(self._data) >= n else None

    def take(self, n: int) -> bytes | None:
        """Consume and return n bytes, or None (consuming nothing) if not all arrived yet."""
        if len(self._data) < n:
            return None
        out = bytes(self._data[:n])
        del self._data[:n]
        return out

    def skip(self, n: int) -> int:
        """Drop up to n bytes without keeping them; returns how many were dropped."""
        dropped = min(n, len(self._data))
        del self._data[:dropped]
        return dropped

    def take_all(self) -> bytes:
        out = bytes(self._data)
        self._data.clear()
        return out


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


class _Up(enum.Enum):
    """States of the upstream (client-side) handshake, in the order they occur."""

    VERSION = enum.auto()
    SECURITY_33 = enum.auto()
    SECURITY_TYPES = enum.auto()
    FAILURE_REASON = enum.auto()
    VNC_CHALLENGE = enum.auto()
    SECURITY_RESULT = enum.auto()
    VENCRYPT_VERSION = enum.auto()
    VENCRYPT_ACK = enum.auto()
    VENCRYPT_SUBTYPES = enum.auto()
    VENCRYPT_ACCEPT = enum.auto()
    AWAIT_TLS = enum.auto()
    AWAIT_CLIENT_INIT = enum.auto()
    SERVER_INIT = enum.auto()
    SERVER_NAME_SKIP = enum.auto()
    DONE = enum.auto()


class UpstreamHandshake:
    """Client side of RFB towards the hypervisor, from version line to ServerInit.

    Versions: 3.3, 3.7 and 3.8 (see ``negotiate_version``). Security types: None (1), VNC
    Authentication (2) and VeNCrypt (19) with subtypes X509Vnc/X509None (certificate verified)
    and, only if the policy allows anonymous TLS, TLSVnc/TLSNone; Plain subtypes never (they
    would need a user name and send the password in the clear inside the tunnel).

    Choice among offered types. VeNCrypt's subtype list only arrives after committing to type
    19, and a connection cannot go back, so: when the policy requires TLS (the token pins a CA
    or says ``require``) VeNCrypt is chosen and plain types are never used; otherwise VNC
    Authentication (if we have a password), then None, and VeNCrypt only when neither is usable:
    a default TigerVNC offers VeNCrypt (anonymous TLSVnc only) next to VncAuth, which must keep
    working, and a CA configured on the proxy (``--upstream-ca``) only verifies X.509 servers,
    it does not demand TLS. Inside VeNCrypt: X509Vnc (with a password) > X509None, only with a
    CA to verify the certificate against, then TLSVnc > TLSNone, only when ``allow_anonymous``
    (never for a token that pins a CA); anything else refuses the handshake (4501) with the
    reason, never downgrades.

    ServerInit desktop names: the first 1 KiB is kept, the rest up to 64 KiB is counted off
    without being stored, and a longer announced name is a protocol error.

    Use: ``feed()`` every received chunk and perform the returned actions in order. On
    ``StartTls`` upgrade the connection and call ``tls_started()``; on ``Authenticated`` write
    ``send_client_init()``; ``ServerInitReady`` ends the handshake. Bytes that arrive
    before ClientInit was sent (a conforming server sends none) are kept; ``feed(b"")``
    processes them. Calls out of order raise RuntimeError (a bug in the caller, not the peer).

    Pipelining: given ``client_init`` (the shared flag), ClientInit leaves in the same write as
    the last security message the client sends in the clear or inside the VNC challenge (the
    None choice, the challenge response), a round trip sooner than after SecurityResult. RFB
    servers read the client's messages in order from one stream, so the byte simply waits in
    theirs; if authentication fails the server never reads it. ``client_init_sent`` then says
    not to call ``send_client_init``. (After a VeNCrypt subtype without a VNC challenge the
    client sends nothing before SecurityResult, so there it is sent the usual way.)
    """

    _LIMIT: ClassVar[int] = MAX_PENDING

    def __init__(
        self,
        *,
        password: str | None,
        tls: TlsPolicy,
        challenge_cipher: ChallengeCipher = vnc_auth_response,
        client_init: bool | None = None,
    ) -> None:
        self._pipelined = b"" if client_init is None else (b"\x01" if client_init else b"\x00")
        self.client_init_sent = False
        self._password = password
        self._policy = tls
        self._cipher = challenge_cipher
        # The default answer's DES key schedule is built now, while the hypervisor is still
        # on its way to the challenge, rather than on the step that answers it.
        self._prepared: Any = None
        if challenge_cipher is vnc_auth_response and password is not None:
            self._prepared = _vnc_auth_cipher(password)
        self._buf = _Buffer(self._LIMIT)
        self._state = _Up.VERSION
        self._version = V3_8
        self._security = 0
        self._failure = ""
        self._server_init: ServerInit | None = None
        self._name_skip = 0

    def __repr__(self) -> str:
        return f"<UpstreamHandshake state={self._state.name} security={self.security_type}>"

    @property
    def security_type(self) -> str:
        """Chosen security for logs and metrics: none, vnc, vencrypt-x509vnc, ... or pending.

        Reads "vencrypt" between choosing type 19 and choosing its subtype.
        """
        return _SECURITY_NAMES.get(self._security, "pending")

    @property
    def version(self) -> tuple[int, int]:
        """The RFB version in use (meaningful once the server's version line was read)."""
        return self._version

    def feed(self, data: bytes) -> list[UpstreamAction]:
        """Take bytes from the target; return what to do next. Raises RfbError."""
        if self._state is _Up.DONE:
            raise RuntimeError("upstream handshake already finished")
        if self._state is _Up.AWAIT_TLS and data:
            raise RfbError.protocol("target sent plaintext where TLS was due")
        self._buf.append(data)
        actions = self._run()
        self._buf.check_limit()
        return actions

    def tls_started(self) -> list[UpstreamAction]:
        """Call after the TLS upgrade asked for by StartTls; later bytes are the decrypted ones."""
        if self._state is not _Up.AWAIT_TLS:
            raise RuntimeError("tls_started() without a pending StartTls")
        with_vnc = self._security in _VENCRYPT_WITH_VNC_AUTH
        self._state = _Up.VNC_CHALLENGE if with_vnc else _Up.SECURITY_RESULT
        return self._run()

    def send_client_init(self, shared: bool) -> bytes:
        """ClientInit bytes to write after Authenticated; then feed() until ServerInitReady."""
        if self._state is not _Up.AWAIT_CLIENT_INIT or self.client_init_sent:
            raise RuntimeError("send_client_init() before Authenticated")
        self._state = _Up.SERVER_INIT
        return b"\x01" if shared else b"\x00"

    def _run(self) -> list[UpstreamAction]:
        """Step through states while enough bytes are buffered for the next one."""
        actions: list[UpstreamAction] = []
        while True:
            step = self._STEPS.get(self._state)
            if step is None:
                return actions
            produced = step(self)
            if produced is None:
                return actions
            actions.extend(produced)

    # --- version and security type ---------------------------------------------------------

    def _on_version(self) -> list[UpstreamAction] | None:
        line = self._buf.take(12)
        if line is None:
            return None
        self._version = negotiate_version(parse_version(line))
        self._state = _Up.SECURITY_33 if self._version == V3_3 else _Up.SECURITY_TYPES
        return [Send(version_line(self._version))]

    def _on_security_33(self) -> list[UpstreamAction] | None:
        """RFB 3.3: the server picks the type (u32); 0 means refused, with a reason."""
        raw = self._buf.take(4)
        if raw is None:
            return None
        chosen = _U32.unpack(raw)[0]
        if chosen == 0:
            return self._fail_with_reason("target refused the connection")
        if chosen not in (SEC_NONE, SEC_VNC):
            raise RfbError.protocol(f"RFB 3.3 server chose invalid security type {chosen}")
        self._check_plain_allowed(chosen)
        return self._begin_security(chosen)

    def _on_security_types(self) -> list[UpstreamAction] | None:
        """RFB 3.7+: u8 count and that many types; count 0 means refused, with a reason."""
        head = self._buf.peek(1)
        if head is None:
            return None
        count = head[0]
        if count == 0:
            self._buf.take(1)
            return self._fail_with_reason("target refused the connection")
        body = self._buf.take(1 + count)
        if body is None:
            return None
        chosen = self._choose_security(frozenset(body[1:]))
        choice = bytes([chosen]) + self._pipeline() if chosen == SEC_NONE else bytes([chosen])
        return [Send(choice), *self._begin_security(chosen)]

    def _pipeline(self) -> bytes:
        """ClientInit to send behind the client's last security message, if pipelining."""
        self.client_init_sent = bool(self._pipelined)
        return self._pipelined

    def _choose_security(self, offered: frozenset[int]) -> int:
        plain = self._plain_choice(offered)
        if SEC_VENCRYPT in offered and (self._policy.tls_required or plain is None):
            return SEC_VENCRYPT
        if plain is not None:
            return plain
        if self._policy.tls_required and offered & {SEC_NONE, SEC_VNC}:
            raise RfbError.auth_failed(
                f"the console server offers no TLS (server offers {sorted(offered)}); "
                f"this console's token requires TLS (tls.ca or tls.require)"
            )
        raise RfbError.auth_failed(
            f"no acceptable security type offered (server offers {sorted(offered)}, "
            f"tls required: {self._policy.tls_required}, "
            f"password: {'yes' if self._password is not None else 'no'})"
        )

    def _plain_choice(self, offered: frozenset[int]) -> int | None:
        """Best unencrypted type we may use: VncAuth (with a password) before None."""
        if self._policy.tls_required:
            return None
        if SEC_VNC in offered and self._password is not None:
            return SEC_VNC
        return SEC_NONE if SEC_NONE in offered else None

    def _check_plain_allowed(self, chosen: int) -> None:
        """RFB 3.3 leaves the choice to the server: refuse what our policy cannot accept."""
        if self._policy.tls_required:
            raise RfbError.auth_failed("target only offers unencrypted RFB 3.3; TLS required")
        if chosen == SEC_VNC and self._password is None:
            raise RfbError.auth_failed("target requires a VNC password and none was given")

    def _begin_security(self, chosen: int) -> list[UpstreamAction]:
        self._security = chosen
        if chosen == SEC_VNC:
            self._state = _Up.VNC_CHALLENGE
        elif chosen == SEC_VENCRYPT:
            self._state = _Up.VENCRYPT_VERSION
        elif self._version == V3_8:
            self._state = _Up.SECURITY_RESULT
        else:
            return self._authenticated()
        return []

    # --- VNC Authentication and SecurityResult ---------------------------------------------

    def _on_vnc_challenge(self) -> list[UpstreamAction] | None:
        challenge = self._buf.take(16)
        if challenge is None:
            return None
        assert self._password is not None  # guaranteed by the security choice
        self._state = _Up.SECURITY_RESULT
        response = (
            self._cipher(self._password, challenge) if self._prepared is None else self._prepared.encrypt(challenge)
        )
        return [Send(response + self._pipeline())]

    def _on_security_result(self) -> list[UpstreamAction] | None:
        raw = self._buf.take(4)
        if raw is None:
            return None
        if _U32.unpack(raw)[0] == 0:
            return self._authenticated()
        if self._version == V3_8:
            return self._fail_with_reason("target rejected authentication")
        raise RfbError.auth_failed("target rejected authentication")

    def _authenticated(self) -> list[UpstreamAction]:
        self._state = _Up.SERVER_INIT if self.client_init_sent else _Up.AWAIT_CLIENT_INIT
        return [Authenticated()]

    def _fail_with_reason(self, prefix: str) -> list[UpstreamAction] | None:
        self._failure = prefix
        self._state = _Up.FAILURE_REASON
        return self._on_failure_reason()

    def _on_failure_reason(self) -> list[UpstreamAction] | None:
        """u32 length + text. The refusal is certain already; the text is only for humans.

        A reason up to 1 KiB is waited for (honest servers send it with the length). A longer
        announced reason is suspicious: fail at once with whatever has arrived, so a server
        that announces 4 GiB and then stalls cannot hold the session until the timeout.
        """
        head = self._buf.peek(4)
        if head is None:
            return None
        announced = _U32.unpack(head)[0]
        if announced > TEXT_KEEP:
            raw = self._buf.take(min(4 + TEXT_KEEP, len(self._buf))) or b""
        else:
            raw = self._buf.take(4 + announced)
            if raw is None:
                return None
        reason = printable(raw[4:])
        raise RfbError.auth_failed(f"{self._failure}: {reason}" if reason else self._failure)

    # --- VeNCrypt ----------------------------------------------------------------------------

    def _on_vencrypt_version(self) -> list[UpstreamAction] | None:
        raw = self._buf.take(2)
        if raw is None:
            return None
        if raw[0] != 0 or raw[1] < 2:
            raise RfbError.protocol(f"unsupported VeNCrypt version {raw[0]}.{raw[1]}")
        self._state = _Up.VENCRYPT_ACK
        return [Send(b"\x00\x02")]

    def _on_vencrypt_ack(self) -> list[UpstreamAction] | None:
        raw = self._buf.take(1)
        if raw is None:
            return None
        if raw != b"\x00":
            raise RfbError.protocol("target refused VeNCrypt version 0.2")
        self._state = _Up.VENCRYPT_SUBTYPES
        return []

    def _on_vencrypt_subtypes(self) -> list[UpstreamAction] | None:
        head = self._buf.peek(1)
        if head is None:
            return None
        count = head[0]
        body = self._buf.take(1 + 4 * count)
        if body is None:
            return None
        offered = frozenset(_U32.unpack_from(body, 1 + 4 * i)[0] for i in range(count))
        chosen = self._choose_subtype(offered)
        self._security = chosen
        self._state = _Up.VENCRYPT_ACCEPT
        return [Send(_U32.pack(chosen))]

    def _choose_subtype(self, offered: frozenset[int]) -> int:
        for subtype in self._acceptable_subtypes():
            if subtype in offered:
                return subtype
        raise RfbError.auth_failed(self._subtype_refusal(offered))

    def _acceptable_subtypes(self) -> list[int]:
        """Subtypes the policy accepts, best first: X.509 only if verifiable, anonymous only if allowed."""
        with_password = [VENCRYPT_X509VNC, VENCRYPT_TLSVNC] if self._password is not None else []
        order: list[int] = []
        if self._policy.can_verify:
            order += [VENCRYPT_X509VNC, VENCRYPT_X509NONE]
        if self._policy.allow_anonymous:
            order += [VENCRYPT_TLSVNC, VENCRYPT_TLSNONE]
        return [subtype for subtype in order if subtype not in _VENCRYPT_WITH_VNC_AUTH or subtype in with_password]

    def _subtype_refusal(self, offered: frozenset[int]) -> str:
        """Why nothing offered will do, most specific first (for the log and the audit)."""
        listed = f"server offers VeNCrypt subtypes {sorted(offered)}"
        if offered & _VENCRYPT_ANONYMOUS and not offered & _VENCRYPT_X509 and not self._policy.allow_anonymous:
            return (
                f"the console server offers only anonymous TLS (no certificate); {self._policy.anonymous_refusal()} "
                f"({listed})"
            )
        if offered & _VENCRYPT_X509 and not self._policy.can_verify:
            return f"{self._policy.no_ca_refusal()} ({listed})"
        return (
            f"no acceptable VeNCrypt subtype offered ({listed}, "
            f"anonymous TLS allowed: {self._policy.allow_anonymous}, "
            f"password: {'yes' if self._password is not None else 'no'})"
        )

    def _on_vencrypt_accept(self) -> list[UpstreamAction] | None:
        raw = self._buf.take(1)
        if raw is None:
            return None
        if raw != b"\x01":
            raise RfbError.auth_failed("target refused the VeNCrypt subtype we chose")
        if len(self._buf):
            raise RfbError.protocol("target sent plaintext where TLS was due")
        self._state = _Up.AWAIT_TLS
        return [StartTls(verify=self._security in _VENCRYPT_X509)]

    # --- ServerInit ------------------------------------------------------------------------

    def _on_server_init(self) -> list[UpstreamAction] | None:
        head = self._buf.peek(_SERVER_INIT_HEAD.size)
        if head is None:
            return None
        width, height, pixel_format, name_len = _SERVER_INIT_HEAD.unpack(head)
        if name_len > MAX_NAME_LENGTH:
            raise RfbError.protocol(f"desktop name of {name_len} bytes is too long")
        if pixel_format[0] not in (8, 16, 32):
            raise RfbError.protocol(f"invalid bits-per-pixel {pixel_format[0]}")
        keep = min(name_len, TEXT_KEEP)
        raw = self._buf.take(_SERVER_INIT_HEAD.size + keep)
        if raw is None:
            return None
        name = raw[_SERVER_INIT_HEAD.size :]
        self._server_init = ServerInit(width, height, pixel_format, name)
        self._name_skip = name_len - keep
        self._state = _Up.SERVER_NAME_SKIP
        return []

    def _on_server_name_skip(self) -> list[UpstreamAction] | None:
        self._name_skip -= self._buf.skip(self._name_skip)
        if self._name_skip:
            return None
        assert self._server_init is not None
        self._state = _Up.DONE
        return [ServerInitReady(self._server_init, self._buf.take_all())]

    _STEPS: ClassVar[dict[_Up, Callable[[UpstreamHandshake], list[UpstreamAction] | None]]] = {
        _Up.VERSION: _on_version,
        _Up.SECURITY_33: _on_security_33,
        _Up.SECURITY_TYPES: _on_security_types,
        _Up.FAILURE_REASON: _on_failure_reason,
        _Up.VNC_CHALLENGE: _on_vnc_challenge,
        _Up.SECURITY_RESULT: _on_security_result,
        _Up.VENCRYPT_VERSION: _on_vencrypt_version,
        _Up.VENCRYPT_ACK: _on_vencrypt_ack,
        _Up.VENCRYPT_SUBTYPES: _on_vencrypt_subtypes,
        _Up.VENCRYPT_ACCEPT: _on_vencrypt_accept,
        _Up.SERVER_INIT: _on_server_init,
        _Up.SERVER_NAME_SKIP: _on_server_name_skip,
    }


class _Down(enum.Enum):
    """States of the downstream (server-side) handshake."""

    VERSION = enum.auto()
    SECURITY_CHOICE = enum.auto()
    CLIENT_INIT = enum.auto()
    DONE = enum.auto()


class DownstreamHandshake:
    """Server side of RFB towards the browser: RFB 3.8 offered, security type None only.

    The browser already proved itself with the token, and the target password must never reach
    it, so None is the only honest offer. A client may answer 3.8, 3.7 or 3.3 (3.5 counts as
    3.3, per the spec); each gets exactly its version's sequence: 3.8 a type list and a
    SecurityResult, 3.7 a type list and no SecurityResult for None, 3.3 the u32 type. Any other
    version, a choice other than None, or stray bytes before ClientInit are protocol errors.
    """

    def __init__(self) -> None:
        self._buf = _Buffer(MAX_PENDING)
        self._state = _Down.VERSION
        self._version = V3_8

    def __repr__(self) -> str:
        return f"<DownstreamHandshake state={self._state.name}>"

    @property
    def version(self) -> tuple[int, int]:
        """The RFB version the browser chose (meaningful after its version line)."""
        return self._version

    def initiate(self) -> bytes:
        """The server's opening line, to write as soon as the websocket is up."""
        return version_line(V3_8)

    def feed(self, data: bytes) -> list[DownstreamAction]:
        """Take bytes from the browser; return what to do next. Raises RfbError."""
        if self._state is _Down.DONE:
            raise RuntimeError("downstream handshake already finished")
        self._buf.append(data)
        actions: list[DownstreamAction] = []
        while self._state is not _Down.DONE:
            produced = self._step()
            if produced is None:
                break
            actions.extend(produced)
        self._buf.check_limit()
        return actions

    def _step(self) -> list[DownstreamAction] | None:
        if self._state is _Down.VERSION:
            return self._on_version()
        if self._state is _Down.SECURITY_CHOICE:
            return self._on_security_choice()
        return self._on_client_init()

    def _on_version(self) -> list[DownstreamAction] | None:
        line = self._buf.take(12)
        if line is None:
            return None
        version = parse_version(line)
        if version in (V3_3, (3, 5)):
            self._version = V3_3
            self._state = _Down.CLIENT_INIT
            return [Send(_U32.pack(SEC_NONE))]
        if version not in (V3_7, V3_8):
            raise RfbError.protocol(f"client asked for RFB {version[0]}.{version[1]}")
        self._version = version
        self._state = _Down.SECURITY_CHOICE
        return [Send(bytes([1, SEC_NONE]))]

    def _on_security_choice(self) -> list[DownstreamAction] | None:
        raw = self._buf.take(1)
        if raw is None:
            return None
        if raw[0] != SEC_NONE:
            raise RfbError.protocol(f"client chose security type {raw[0]}, only None offered")
        self._state = _Down.CLIENT_INIT
        return [Send(_U32.pack(0))] if self._version == V3_8 else []

    def _on_client_init(self) -> list[DownstreamAction] | None:
        raw = self._buf.take(1)
        if raw is None:
            return None
        self._state = _Down.DONE
        return [ClientInitReceived(shared=raw != b"\x00", rest=self._buf.take_all())]


# --- client -> server message framing ----------------------------------------------------

#: Client messages a view-only session drops: key, pointer, cut text, xvp (power actions),
#: SetDesktopSize (resizes everyone's desktop) and QEMU (extended key events).
INPUT_MESSAGE_TYPES: frozenset[int] = frozenset({4, 5, 6, 250, 251, 255})

#: Fixed-size client messages: type -> total length in bytes.
_FIXED_SIZES = {0: 20, 3: 10, 4: 8, 5: 6, 150: 10, 250: 4}


def _size_set_encodings(buf: bytearray) -> int | None:
    return 4 + 4 * int.from_bytes(buf[2:4], "big") if len(buf) >= 4 else None


def _size_client_cut_text(buf: bytearray) -> int | None:
    """8 + |length|: a negative length announces an extended-clipboard payload of |length|."""
    return 8 + abs(_S32.unpack_from(buf, 4)[0]) if len(buf) >= 8 else None


def _size_client_fence(buf: bytearray) -> int | None:
    return 9 + buf[8] if len(buf) >= 9 else None


def _size_set_desktop_size(buf: bytearray) -> int | None:
    return 8 + 16 * buf[6] if len(buf) >= 8 else None


def _size_qemu(buf: bytearray) -> int | None:
    """QEMU (255): subtype 0 extended key event (12); subtype 1 audio, 4 or 10 (set format)."""
    if len(buf) < 2:
        return None
    if buf[1] == 0:
        return 12
    if buf[1] != 1:
        raise RfbError.protocol(f"unknown QEMU client message subtype {buf[1]}")
    if len(buf) < 4:
        return None
    operation = int.from_bytes(buf[2:4], "big")
    if operation not in (0, 1, 2):
        raise RfbError.protocol(f"unknown QEMU audio operation {operation}")
    return 10 if operation == 2 else 4


_VARIABLE_SIZES: dict[int, Callable[[bytearray], int | None]] = {
    2: _size_set_encodings,
    6: _size_client_cut_text,
    248: _size_client_fence,
    251: _size_set_desktop_size,
    255: _size_qemu,
}


def client_message_size(buf: bytearray) -> int | None:
    """Total length of the client message at the start of ``buf``; None if not yet known."""
    if not buf:
        return None
    kind = buf[0]
    fixed = _FIXED_SIZES.get(kind)
    if fixed is not None:
        return fixed
    sizer = _VARIABLE_SIZES.get(kind)
    if sizer is None:
        raise RfbError.protocol(f"unknown client message type {kind}")
    return sizer(buf)


class ClientMessageFramer:
    """Splits the browser->target stream into whole RFB client messages.

    The relay needs message boundaries to drop input in view-only sessions without corrupting
    the stream. Known types and sizes follow the RFB community spec (rfbproto); an unknown type
    cannot be skipped safely, so it is a protocol error. A message announcing more than
    ``max_message`` bytes is refused before it is buffered, so memory stays bounded by one
    message.
    """

    def __init__(self, *, max_message: int = 1 << 20) -> None:
        self._max = max_message
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Add bytes; return every message now complete as (type, whole message), in order."""
        self._buf += data
        messages: list[tuple[int, bytes]] = []
        start = 0
        view = memoryview(self._buf)
        try:
            while True:
                size = client_message_size(self._buf[start : start + 12])
                if size is None:
                    break
                if size > self._max:
                    raise RfbError.protocol(f"client message of {size} bytes exceeds the {self._max} byte limit")
                if len(self._buf) - start < size:
                    break
                messages.append((self._buf[start], bytes(view[start : start + size])))
                start += size
        finally:
            view.release()
        del self._buf[:start]
        return messages
