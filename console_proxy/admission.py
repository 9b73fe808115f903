"""Whether a websocket may open: every refusal decided before the upgrade, as plain code.

The order is DESIGN's: draining first (a draining proxy should not even spend crypto), then the
Origin and the pinned Host (both ``origin_denied``), capacity, the token (its own ordered checks,
client-IP binding included). Single-use redemption needs the broker and happens in
the shell after :func:`admit` succeeds.
/token-status runs the same function, so its verdict and the websocket's never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from console_proxy import token
from console_proxy.codes import Refused
from console_proxy.config import ProxyConfig
from console_proxy.keyring import Keyring
from console_proxy.token import Claims, TokenRefused

SUBPROTOCOL_PREFIX = "token."

#: A view of :class:`console_proxy.codes.Refused`, the one table: code -> message.
MESSAGES = {code.value: code.message for code in Refused}


class Refusal(Exception):
    """A refusal with its stable public code, HTTP status and a human message.

    ``reason`` is the precise internal reason (for logs, metrics and the broker's audit), never
    shown to the browser; ``claims`` is known when the token itself was authentic.
    """

    def __init__(
        self, code: str, *, reason: str | None = None, claims: Claims | None = None, status: int | None = None
    ) -> None:
        refused = Refused(code)
        self.code: str = refused
        self.status = status or refused.status
        self.reason = reason or refused.value
        self.claims = claims
        self.message = refused.message
        super().__init__(self.reason)

    @classmethod
    def from_token(cls, refused: TokenRefused) -> Refusal:
        return cls(refused.code, reason=refused.reason, claims=refused.claims, status=refused.status)

    def body(self) -> dict[str, str]:
        return {"error": self.code, "message": self.message}


@dataclass(frozen=True)
class Request:
    """What admission needs to know of an HTTP request, already read off it by the shell."""

    token: str | None
    origin: str | None
    own_origin: str | None
    client_ip: str
    host: str | None = None
    """The Host the browser addressed (X-Forwarded-Host from a trusted proxy); see ``host_allowed``."""


def token_from(subprotocols: list[str], query_token: str | None) -> str | None:
    """The token from a ``token.<token>`` subprotocol (preferred: never in a URL), or ``?token=``."""
    for proto in subprotocols:
        if proto.startswith(SUBPROTOCOL_PREFIX) and len(proto) > len(SUBPROTOCOL_PREFIX):
            return proto[len(SUBPROTOCOL_PREFIX) :]
    return query_token or None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


def admit(
    request: Request, *, keyring: Keyring, config: ProxyConfig, now: float, draining: bool, sessions: int
) -> Claims:
    """The verified claims, or Refusal."""
    if draining:
        raise Refusal(Refused.DRAINING)
    if not config.origin_policy.allows(request.origin, request.own_origin):
        raise Refusal(Refused.ORIGIN_DENIED)
    if not config.origin_policy.host_allowed(request.host):
        raise Refusal(
            Refused.ORIGIN_DENIED,
            reason="host_not_pinned: the Host names neither the public URL nor an allowed origin (DNS rebinding?)",
        )
    if sessions >= config.max_sessions:
        raise Refusal(Refused.OVER_CAPACITY)
    if not request.token:
        raise Refusal(Refused.TOKEN_MISSING)
    try:
        return token.verify(
            request.token, keyring, now, skew=config.skew, max_ttl=config.max_ttl, client_ip=request.client_ip
        )
    except TokenRefused as refused:
        raise Refusal.from_token(refused) from None


class SpentTokens:
    """Single-use tokens this proxy has seen redeemed (by itself or, per the broker, elsewhere).

    The broker is the authority; this bounded memory only lets /token-status say "already used"
    after a browser's websocket was refused with 409 (the browser itself sees just a 1006), and
    spares the broker a call for a token known to be spent. Entries leave after their ``exp``.
    """

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self._expiry: dict[str, int] = {}

    def add(self, claims: Claims, now: float) -> None:
        if len(self._expiry) >= self.limit:
            self._expiry = {jti: exp for jti, exp in self._expiry.items() if exp > now}
            if len(self._expiry) >= self.limit:  # all still live: forget the oldest half
                self._expiry = dict(list(self._expiry.items())[self.limit // 2 :])
        self._expiry[claims.jti] = claims.exp

    def check(self, claims: Claims) -> None:
        """Refuse with token_used if this single-use token is known to be spent."""
        if claims.single_use and claims.jti in self._expiry:
            raise Refusal(Refused.TOKEN_USED, reason="single-use token already redeemed", claims=claims)
