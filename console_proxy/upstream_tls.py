"""TLS towards the hypervisor (VeNCrypt): what a console demands, and the client contexts.

Two inputs decide how much TLS a console gets: the token's ``tls`` claim (what the broker knows
about this one target) and the proxy's flags (defaults for targets the broker said nothing
about). :func:`policy_for` is the one place they meet, so the rule is read in one function:

- a token that pins a CA (``tls.ca``) is served only over X.509 VeNCrypt whose chain verifies
  against that CA: never plain RFB, never anonymous TLS, whatever the proxy allows;
  ``tls.ca`` may be the word ``"broker"``: the broker's own CA, which the proxy holds in its
  state directory (:mod:`console_proxy.proxycerts`), and the proxy then presents its own
  certificate from there as the VeNCrypt client certificate (QEMU ``verify-peer=on``);
- a token with ``tls.require`` (no CA) is served only over TLS: X.509 verified against the
  proxy's ``--upstream-ca``, or anonymous TLS if the *token itself* says ``allow_anon``;
- a token that pins nothing is served as the server offers: plain RFB, X.509 verified against
  ``--upstream-ca``, or anonymous TLS with ``--allow-anonymous-tls`` (or the token's
  ``allow_anon``). ``--upstream-ca`` is a CA bundle, not a demand for TLS.

The rest of the module turns a policy into an ``ssl.SSLContext`` and recognises a server that
wants a client certificate the proxy did not present.
"""

from __future__ import annotations

import enum
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

from console_proxy.proxycerts import ProxyCertificates

if TYPE_CHECKING:  # token imports the RFB package, which imports this module
    from console_proxy.token import TlsClaim

__all__ = [
    "BROKER_CA",
    "CLIENT_CERTIFICATE_REQUIRED",
    "CertificateRequestWatch",
    "ClientCertificateError",
    "NoCaError",
    "Pin",
    "TlsPolicy",
    "client_context",
    "is_client_certificate_refusal",
    "policy_for",
]

CLIENT_CERTIFICATE_REQUIRED = "the console server requires a client certificate"
BROKER_CA = "broker"
"""``tls.ca`` naming the broker's own CA instead of carrying a PEM."""
NO_BROKER_CA = (
    "this console's token pins the broker's CA, and this proxy holds none (console-proxy enroll, "
    "then serve --state-dir)"
)


class Pin(enum.Enum):
    """What the token pins about the hypervisor's TLS."""

    NOTHING = "nothing"
    """No ``tls.ca``, no ``tls.require``: the proxy's defaults apply."""
    REQUIRE = "require"
    """``tls.require``: an encrypted hop, X.509 (or anonymous only if the token allows it)."""
    CA = "ca"
    """``tls.ca``: X.509 VeNCrypt with a chain that verifies against this CA, nothing else."""


@dataclass(frozen=True)
class TlsPolicy:
    """How much TLS the proxy demands from one target; built by :func:`policy_for`.

    ``ca_pem`` verifies X.509 VeNCrypt (the token's CA, else the proxy's ``--upstream-ca``);
    without one an X.509 server cannot be verified, so X.509 subtypes are not usable.
    ``allow_anonymous`` admits VeNCrypt TLSNone/TLSVnc, which have no certificate and can be
    intercepted; it is never true for a token that pins a CA.
    """

    pin: Pin = Pin.NOTHING
    ca_pem: str | None = None
    server_name: str | None = None
    allow_anonymous: bool = False
    client_certificate: tuple[str, str] | None = None
    """Certificate and key files presented to an X.509 server (the proxy's own, for ``"broker"``)."""
    no_ca: str | None = None
    """Why there is no CA when one is pinned but cannot be had (``"broker"`` on a proxy without
    the broker's CA): X.509 is then unverifiable, so the console is refused with this reason."""

    def __post_init__(self) -> None:
        if self.pin is Pin.CA and ((not self.ca_pem and not self.no_ca) or self.allow_anonymous):
            raise ValueError("a policy that pins a CA needs the CA and never allows anonymous TLS")

    def no_ca_refusal(self) -> str:
        """Why an X.509 server cannot be verified here (only when :attr:`can_verify` is False)."""
        return self.no_ca or "the console server offers X.509 TLS but no CA is configured to verify it"

    @property
    def tls_required(self) -> bool:
        """True when falling back to an unencrypted security type would break the policy."""
        return self.pin is not Pin.NOTHING

    @property
    def can_verify(self) -> bool:
        """True when an X.509 server certificate can be checked (a CA is known)."""
        return bool(self.ca_pem)

    def anonymous_refusal(self) -> str:
        """Why anonymous TLS is not acceptable here, for the log (only when it is not)."""
        if self.pin is Pin.CA:
            return "this console's token pins a CA: only X.509 VeNCrypt with a verified certificate"
        if self.pin is Pin.REQUIRE:
            return "this console's token requires TLS with a verified certificate"
        return "anonymous TLS is not allowed (proxy --allow-anonymous-tls, token tls.allow_anon)"


def policy_for(
    tls: TlsClaim | None,
    host: str,
    *,
    upstream_ca_pem: str | None,
    allow_anonymous_tls: bool,
    own: ProxyCertificates | None = None,
) -> TlsPolicy:
    """The policy for a token's ``tls`` claim (already type-checked) on a proxy with these flags.

    The proxy's flags only fill in what the token leaves open: ``--upstream-ca`` verifies
    X.509 servers of tokens without a CA, ``--allow-anonymous-tls`` admits anonymous TLS for
    tokens that pin nothing. A token that pins is never loosened by the proxy. ``own`` is where
    the proxy's certificates are (``--state-dir``), for ``tls.ca == "broker"``.
    """
    if tls is None:
        return TlsPolicy(Pin.NOTHING, upstream_ca_pem, host, allow_anonymous=allow_anonymous_tls)
    server_name = tls.sni or host
    token_allows_anonymous = tls.allow_anonymous
    if tls.ca == BROKER_CA:
        ca_pem = own.ca_pem() if own is not None else None
        client = own.client_certificate() if own is not None else None
        return TlsPolicy(Pin.CA, ca_pem, server_name, client_certificate=client, no_ca=None if ca_pem else NO_BROKER_CA)
    if tls.ca:
        return TlsPolicy(Pin.CA, tls.ca, server_name, allow_anonymous=False)
    if tls.require:
        return TlsPolicy(Pin.REQUIRE, upstream_ca_pem, server_name, allow_anonymous=token_allows_anonymous)
    return TlsPolicy(
        Pin.NOTHING, upstream_ca_pem, server_name, allow_anonymous=token_allows_anonymous or allow_anonymous_tls
    )


class NoCaError(ValueError):
    """An X.509 context was asked for without a CA to verify the server against."""


class ClientCertificateError(ValueError):
    """The client certificate the policy names could not be loaded (missing, garbage, key
    not matching, encrypted); the message names the files, never their contents."""


def client_context(policy: TlsPolicy, verify: bool) -> ssl.SSLContext:
    """A fresh client context: X.509 verified against the policy's CA and server name, or
    anonymous (aNULL ciphers, TLS 1.2: TLS 1.3 has no anonymous suites) when ``verify`` is
    False. Raises :class:`NoCaError`, or ``ssl.SSLError``/``ValueError`` for an unusable CA."""
    if verify:
        if not policy.ca_pem:
            raise NoCaError(policy.no_ca_refusal())
        context = ssl.create_default_context(cadata=policy.ca_pem)
        context.check_hostname = True
        if policy.client_certificate is not None:
            _present(context, *policy.client_certificate)
        return context
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("aNULL:@SECLEVEL=0")
    return context


def _present(context: ssl.SSLContext, cert: str, key: str) -> None:
    """Load the client certificate; an encrypted key fails instead of prompting on a terminal.
    A renewal replaces the two files one after the other: a load that falls between the two
    renames pairs a new key with the old certificate, so a failed load is tried once more."""
    for attempt in range(2):
        try:
            context.load_cert_chain(cert, key, password=_no_password)
            return
        except (ssl.SSLError, OSError) as error:
            if attempt:
                reason = getattr(error, "reason", None) or getattr(error, "strerror", None) or type(error).__name__
                raise ClientCertificateError(
                    f"the proxy's client certificate {cert} is not usable ({reason})"
                ) from None


def _no_password() -> bytes:
    return b""


#: TLS record content type "handshake" and its message type CertificateRequest (RFC 8446).
_HANDSHAKE = 22
_CERTIFICATE_REQUEST = 13
#: OpenSSL's names for the alerts a server sends when it wanted a client certificate. The first
#: says so exactly (TLS 1.3); the others only count after the server asked for a certificate.
_CERTIFICATE_REQUIRED_ALERT = "TLSV13_ALERT_CERTIFICATE_REQUIRED"
_CERTIFICATE_ALERTS = frozenset(
    {"SSLV3_ALERT_HANDSHAKE_FAILURE", "SSLV3_ALERT_BAD_CERTIFICATE", "TLSV1_ALERT_ACCESS_DENIED"}
)


class CertificateRequestWatch:
    """Notes whether the server sent a CertificateRequest during the TLS handshake.

    Python's ssl module has no public way to see it, so this uses the context's
    ``_msg_callback`` (CPython's TLS message tracing hook, there since 3.8). Without the hook
    (another Python) nothing is noted and only an explicit alert is recognised. The hook is
    cleared by :meth:`stop` once the handshake is over: the session's records then cost no
    Python call. One watch per context, one context per session.
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        self.requested = False
        self._context = context
        if hasattr(context, "_msg_callback"):
            context._msg_callback = self._message

    def _message(
        self, conn: object, direction: str, version: object, content_type: object, msg_type: object, data: bytes
    ) -> None:
        if direction == "read" and content_type == _HANDSHAKE and msg_type == _CERTIFICATE_REQUEST:
            self.requested = True

    def stop(self) -> None:
        if hasattr(self._context, "_msg_callback"):
            self._context._msg_callback = None


def is_client_certificate_refusal(error: BaseException | None, *, requested: bool, quiet: bool) -> bool:
    """Did the server end the connection because the proxy showed no client certificate?

    ``error`` is what ended the TLS connection (None for a plain end of stream), ``requested``
    whether the server sent a CertificateRequest, ``quiet`` whether it has sent nothing since
    the handshake. An explicit ``certificate_required`` alert says so outright. QEMU
    (``verify-peer=on``) sends no alert: it completes the handshake and hangs up before the
    first RFB byte, so a server that asked for a certificate and then ended the connection
    silently, or with a handshake/bad-certificate alert, counts too.
    """
    reason = getattr(error, "reason", None) if isinstance(error, ssl.SSLError) else None
    if reason == _CERTIFICATE_REQUIRED_ALERT:
        return True
    if not (requested and quiet):
        return False
    hung_up = not isinstance(error, ssl.SSLError) or isinstance(error, ssl.SSLEOFError | ssl.SSLZeroReturnError)
    return hung_up or reason in _CERTIFICATE_ALERTS
