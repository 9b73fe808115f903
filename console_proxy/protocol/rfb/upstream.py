"""Client side of RFB towards the hypervisor, from the version line to ServerInit, sans I/O.

The proxy authenticates with the password from the token, or over VeNCrypt TLS, as plain
objects in the style of h11/wsproto: the caller feeds received bytes and gets back a list of
actions (bytes to send, "start TLS now", "done"). Nothing here touches a socket, a clock or
Tornado, so every branch is testable with byte strings.

Everything the server tells us is bounded: failure reasons are read up to 1 KiB, desktop names
above 64 KiB are refused, and bytes buffered while waiting are capped, so a hostile server
cannot make the proxy allocate or wait for gigabytes.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import ClassVar

from console_proxy.protocol.buffer import Buffer
from console_proxy.protocol.rfb.errors import TEXT_KEEP, RfbError, printable
from console_proxy.protocol.rfb.stepping import feed_bounded, run_steps
from console_proxy.protocol.rfb.vncauth import ChallengeCipher, EcbMode, vnc_auth_cipher, vnc_auth_response
from console_proxy.protocol.rfb.wire import (
    MAX_NAME_LENGTH,
    MAX_PENDING,
    SEC_NONE,
    SEC_VENCRYPT,
    SEC_VNC,
    SECURITY_NAMES,
    SERVER_INIT_HEAD,
    U32,
    V3_3,
    V3_8,
    VENCRYPT_ANONYMOUS,
    VENCRYPT_TLSNONE,
    VENCRYPT_TLSVNC,
    VENCRYPT_WITH_VNC_AUTH,
    VENCRYPT_X509,
    VENCRYPT_X509NONE,
    VENCRYPT_X509VNC,
    Authenticated,
    Offer,
    Redial,
    Send,
    ServerInit,
    ServerInitReady,
    StartTls,
    UpstreamAction,
    negotiate_version,
    parse_version,
    version_line,
)
from console_proxy.upstream_tls import TlsPolicy

__all__ = ["UpstreamHandshake"]


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

    A pipelined opening: given ``expected`` (what this server offered last time, :class:`Offer`),
    :meth:`opening` gives the client's version line and security choice to write as soon as the
    connection is made, before the server's own version line is read: two round trips fewer.
    The choice is the one this handshake's policy makes from the expected types, so nothing is
    chosen that would not have been. When the server's version or types then call for another
    choice, ``feed`` returns :class:`Redial`: the guess already left on this connection, so the
    caller starts again on a new one without ``expected``. Only RFB 3.8 servers are guessed.
    """

    _LIMIT: ClassVar[int] = MAX_PENDING

    def __init__(
        self,
        *,
        password: str | None,
        tls: TlsPolicy,
        challenge_cipher: ChallengeCipher = vnc_auth_response,
        client_init: bool | None = None,
        expected: Offer | None = None,
    ) -> None:
        self._pipelined = b"" if client_init is None else (b"\x01" if client_init else b"\x00")
        self._expected = expected
        self._guess: int | None = None  # the security type sent in the opening
        self._offered: frozenset[int] | None = None
        self._heard = False  # the server answered the security choice
        self.client_init_sent = False
        self._password = password
        self._policy = tls
        self._cipher = challenge_cipher
        self._prepared: EcbMode | None = None  # see prepare()
        self._buf = Buffer(self._LIMIT)
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
        return SECURITY_NAMES.get(self._security, "pending")

    @property
    def version(self) -> tuple[int, int]:
        """The RFB version in use (meaningful once the server's version line was read)."""
        return self._version

    @property
    def offer(self) -> Offer | None:
        """What the server offered, once its security types are read (None for RFB 3.3)."""
        return None if self._offered is None else Offer(self._version, self._offered)

    @property
    def guessed(self) -> bool:
        """Whether :meth:`opening` sent a version and a security choice ahead of the server."""
        return self._guess is not None

    @property
    def guess_unheard(self) -> bool:
        """A guess was sent and the server has not yet answered past it (its answer to our
        choice proves it read what came early)."""
        return self._guess is not None and not self._heard

    def prepare(self) -> None:
        """Build the VNC Authentication answer's DES key schedule now, while the hypervisor is
        still on its way to the challenge, rather than on the step that answers it. Optional;
        the caller picks a moment off the critical path (after its first bytes left)."""
        if self._prepared is None and self._cipher is vnc_auth_response and self._password is not None:
            self._prepared = vnc_auth_cipher(self._password)

    def opening(self) -> bytes:
        """What to write as soon as the connection is made: with an RFB 3.8 ``expected`` offer
        the version line and the security choice (and a pipelined ClientInit behind None), else
        nothing. Call once, before the first ``feed``."""
        if self._state is not _Up.VERSION or self._buf or self._guess is not None:
            raise RuntimeError("opening() after the handshake began")
        expected = self._expected
        if expected is None or expected.version != V3_8:
            return b""
        try:
            chosen = self._choose_security(expected.types)
        except RfbError:
            return b""  # nothing acceptable last time: the server's answer will say so again
        self._guess = chosen
        return version_line(V3_8) + bytes([chosen]) + (self._pipeline() if chosen == SEC_NONE else b"")

    def feed(self, data: bytes) -> list[UpstreamAction]:
        """Take bytes from the target; return what to do next. Raises RfbError."""
        if self._state is _Up.DONE:
            raise RuntimeError("upstream handshake already finished")
        if self._state is _Up.AWAIT_TLS and data:
            raise RfbError.protocol("target sent plaintext where TLS was due")
        return feed_bounded(self._buf, data, self._run)

    def tls_started(self) -> list[UpstreamAction]:
        """Call after the TLS upgrade asked for by StartTls; later bytes are the decrypted ones."""
        if self._state is not _Up.AWAIT_TLS:
            raise RuntimeError("tls_started() without a pending StartTls")
        with_vnc = self._security in VENCRYPT_WITH_VNC_AUTH
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
        return run_steps(self, lambda: self._STEPS.get(self._state))

    # --- version and security type ---------------------------------------------------------

    def _on_version(self) -> list[UpstreamAction] | None:
        line = self._buf.take(12)
        if line is None:
            return None
        self._version = negotiate_version(parse_version(line))
        self._state = _Up.SECURITY_33 if self._version == V3_3 else _Up.SECURITY_TYPES
        if self._guess is not None:  # our version line left in the opening
            return [] if self._version == V3_8 else [Redial()]
        return [Send(version_line(self._version))]

    def _on_security_33(self) -> list[UpstreamAction] | None:
        """RFB 3.3: the server picks the type (u32); 0 means refused, with a reason."""
        raw = self._buf.take(4)
        if raw is None:
            return None
        chosen = U32.unpack(raw)[0]
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
        self._offered = frozenset(body[1:])
        chosen = self._choose_security(self._offered)
        if self._guess is not None:  # the choice left in the opening: it must be this one
            return [Redial()] if chosen != self._guess else self._begin_security(chosen)
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
        self._heard = True
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
        self._heard = True
        if U32.unpack(raw)[0] == 0:
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
        announced = U32.unpack(head)[0]
        if announced > TEXT_KEEP:
            raw = self._buf.take(min(4 + TEXT_KEEP, len(self._buf))) or b""
        else:
            whole = self._buf.take(4 + announced)
            if whole is None:
                return None
            raw = whole
        reason = printable(raw[4:])
        raise RfbError.auth_failed(f"{self._failure}: {reason}" if reason else self._failure)

    # --- VeNCrypt ----------------------------------------------------------------------------

    def _on_vencrypt_version(self) -> list[UpstreamAction] | None:
        raw = self._buf.take(2)
        if raw is None:
            return None
        self._heard = True
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
        offered = frozenset(U32.unpack_from(body, 1 + 4 * i)[0] for i in range(count))
        chosen = self._choose_subtype(offered)
        self._security = chosen
        self._state = _Up.VENCRYPT_ACCEPT
        return [Send(U32.pack(chosen))]

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
        return [subtype for subtype in order if subtype not in VENCRYPT_WITH_VNC_AUTH or subtype in with_password]

    def _subtype_refusal(self, offered: frozenset[int]) -> str:
        """Why nothing offered will do, most specific first (for the log and the audit)."""
        listed = f"server offers VeNCrypt subtypes {sorted(offered)}"
        if offered & VENCRYPT_ANONYMOUS and not offered & VENCRYPT_X509 and not self._policy.allow_anonymous:
            return (
                f"the console server offers only anonymous TLS (no certificate); {self._policy.anonymous_refusal()} "
                f"({listed})"
            )
        if offered & VENCRYPT_X509 and not self._policy.can_verify:
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
        return [StartTls(verify=self._security in VENCRYPT_X509)]

    # --- ServerInit ------------------------------------------------------------------------

    def _on_server_init(self) -> list[UpstreamAction] | None:
        head = self._buf.peek(SERVER_INIT_HEAD.size)
        if head is None:
            return None
        width, height, pixel_format, name_len = SERVER_INIT_HEAD.unpack(head)
        if name_len > MAX_NAME_LENGTH:
            raise RfbError.protocol(f"desktop name of {name_len} bytes is too long")
        if pixel_format[0] not in (8, 16, 32):
            raise RfbError.protocol(f"invalid bits-per-pixel {pixel_format[0]}")
        keep = min(name_len, TEXT_KEEP)
        raw = self._buf.take(SERVER_INIT_HEAD.size + keep)
        if raw is None:
            return None
        name = raw[SERVER_INIT_HEAD.size :]
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
