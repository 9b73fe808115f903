"""Access token v1: a nested JWT (JWS EdDSA inside JWE dir + A256GCM), minted and verified.

Pure code: no I/O, and the time is always an argument (Fernet's ``*_at_time`` lesson), so tests
move it at will. Verification runs the cheap checks first and DESIGN's checks in DESIGN's order;
any failure is one exception type, :class:`TokenRefused`, carrying the precise internal reason
(for logs and audit) and the public code (for the browser), so callers cannot forget a case and
the browser learns nothing finer than the public code.

The signature covers one fixed serialization (the JWS signing input); the token never says which
fields were signed (oVirt's mistake).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Self, TypeGuard, TypeVar

from console_proxy import b64url, strictjson
from console_proxy.codes import Refused
from console_proxy.keyring import DEFAULT_SKEW, Keyring
from console_proxy.protocol.clipboard import CLIP_VALUES, ClipPolicy, parse_clip

AUDIENCE = "console-proxy"
MAX_TOKEN_LENGTH = 8192
"""Refused before any crypto. Room for a CA certificate in the ``tls`` claim (nested base64
inflates the claims about 1.8 times); a token with a password and no CA is about 900 bytes."""

_JWS_HEADER_KEYS = frozenset({"alg", "kid"})
_JWE_HEADER_KEYS = frozenset({"alg", "enc", "kid", "cty"})
_TLS_KEYS = {"ca": str, "sni": str, "allow_anon": bool, "require": bool}


class Reason(StrEnum):
    """Why a token was refused, precisely (logs, the audit, ``token inspect``), owning the
    public code the browser sees (:class:`~console_proxy.codes.Refused`, which owns the HTTP
    status and the message). Checked in DESIGN's order by :func:`verify`."""

    refused: Refused

    # As for Refused: the default only lets the type checker accept ``Reason("expired")``.
    def __new__(cls, reason: str, refused: Refused = Refused.TOKEN_INVALID) -> Self:
        member = str.__new__(cls, reason)
        member._value_ = reason
        member.refused = refused
        return member

    TOO_LONG = "too_long", Refused.TOKEN_INVALID
    MALFORMED = "malformed", Refused.TOKEN_INVALID
    UNKNOWN_FLEET_KEY = "unknown_fleet_key", Refused.TOKEN_INVALID
    DECRYPT_FAILED = "decrypt_failed", Refused.TOKEN_INVALID
    UNKNOWN_SIGNING_KEY = "unknown_signing_key", Refused.TOKEN_INVALID
    BAD_SIGNATURE = "bad_signature", Refused.TOKEN_INVALID
    WRONG_AUDIENCE = "wrong_audience", Refused.TOKEN_INVALID
    BAD_CLAIMS = "bad_claims", Refused.TOKEN_INVALID
    LIFETIME_TOO_LONG = "lifetime_too_long", Refused.TOKEN_INVALID
    EXPIRED = "expired", Refused.TOKEN_EXPIRED
    NOT_YET_VALID = "not_yet_valid", Refused.TOKEN_NOT_YET_VALID
    CLIENT_IP_MISMATCH = "client_ip_mismatch", Refused.CLIENT_IP_MISMATCH


PUBLIC_MESSAGES = {reason.refused.value: reason.refused.message for reason in Reason}


class TokenRefused(Exception):
    """The token must not be accepted. ``reason`` is precise, ``code`` is what the browser sees.

    ``claims`` is set only when the token was authentic (decrypted and signed by a known key) and
    was refused for its content (audience, time, client IP), so logs can name session and user.
    """

    def __init__(self, reason: Reason, detail: str = "", claims: Claims | None = None) -> None:
        self.reason = reason
        self.code, self.status = reason.refused, reason.refused.status
        self.detail = detail
        self.claims = claims
        super().__init__(f"{reason}: {detail}" if detail else reason)

    @property
    def public_message(self) -> str:
        return PUBLIC_MESSAGES[self.code]


@dataclass(frozen=True)
class TlsClaim:
    """The ``tls`` claim, typed: what the broker knows about the target's VeNCrypt TLS.

    ``ca`` is a PEM bundle to pin, or the word ``"broker"`` (the broker's own CA); ``sni`` the
    name to verify instead of the host; ``allow_anonymous`` admits anonymous TLS for this target;
    ``require`` refuses plain RFB. The wire spelling (``allow_anon``) stays in this module.
    """

    ca: str | None = None
    sni: str | None = None
    allow_anonymous: bool = False
    require: bool = False

    @classmethod
    def from_wire(cls, value: dict[str, Any] | None) -> TlsClaim | None:
        """The typed claim of a ``tls`` object already checked by the codec (None stays None)."""
        if value is None:
            return None
        return cls(value.get("ca"), value.get("sni"), value.get("allow_anon", False), value.get("require", False))


@dataclass(frozen=True)
class Claims:
    """The verified content of a token. ``pw`` is never shown: see :meth:`masked`.

    The fields are the JWT's wire names, for the codec in this module only; everything else
    reads the typed accessors below (``view_only``, ``password``, ``target_tls``, ...), so the
    token format and the proxy's vocabulary can each change without the other (a test in
    tests/test_claims_names.py keeps wire names out of other modules). The accessors cost
    nothing at verify time.
    """

    iss: str
    iat: int
    nbf: int
    exp: int
    jti: str
    sid: str
    host: str
    port: int
    aud: str | list[str] = AUDIENCE
    pw: str | None = field(default=None, repr=False)
    tls: dict[str, Any] | None = None
    vm: str | None = None
    sub: str | None = None
    cip: str | None = None
    ro: bool = False
    once: bool = False
    dn: str | None = None
    clip: str | None = None
    """Which way cut text may flow (``none``, ``in``, ``out``, ``both``); absent means ``both``."""

    @classmethod
    def _checked(cls, fields: dict[str, Any]) -> Claims:
        """An instance from every field, already checked (:func:`check_claims`). The generated
        frozen ``__init__`` sets each of the 18 fields through ``object.__setattr__``: ~3 µs
        of a token verify for nothing, since the values are final. Equal to ``cls(**fields)``
        (the tests compare the two)."""
        claims = object.__new__(cls)
        claims.__dict__.update(fields)
        return claims

    @property
    def view_only(self) -> bool:
        """The browser may watch but not type, point or paste (``ro``)."""
        return self.ro

    @property
    def single_use(self) -> bool:
        """The token opens one console only: the proxy redeems it at the broker (``once``)."""
        return self.once

    @property
    def client_ip(self) -> str | None:
        """The canonical address the token is bound to, or None when unbound (``cip``)."""
        return self.cip

    @property
    def password(self) -> str | None:
        """The VNC password for the target (``pw``); never logged."""
        return self.pw

    @property
    def desktop_name(self) -> str | None:
        """The desktop name shown to the browser instead of the server's (``dn``)."""
        return self.dn

    @property
    def user(self) -> str | None:
        """Who the broker minted the token for (``sub``)."""
        return self.sub

    @property
    def target(self) -> str | None:
        """The broker's name for the VM behind ``host:port`` (``vm``)."""
        return self.vm

    @property
    def target_tls(self) -> TlsClaim | None:
        """What the token pins about the target's TLS (``tls``), typed. Built on each read
        (under a microsecond, once per console) rather than at verify time, which stays as fast
        as the codec alone."""
        return TlsClaim.from_wire(self.tls)

    @property
    def clip_policy(self) -> ClipPolicy:
        """Which way cut text may flow (``clip``; absent means both ways)."""
        return _CLIP_POLICIES[self.clip]

    def to_json_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def masked(self) -> dict[str, Any]:
        """The claims fit for display: the password replaced, the CA shortened."""
        shown = self.to_json_dict()
        if "pw" in shown:
            shown["pw"] = "********"
        if self.tls and "ca" in self.tls:
            shown["tls"] = {**self.tls, "ca": f"<{len(self.tls['ca'])} bytes of PEM>"}
        return shown


def new_claims(
    *,
    host: str,
    port: int,
    now: float,
    ttl: int,
    issuer: str = "consolegate",
    password: str | None = None,
    vm: str | None = None,
    user: str | None = None,
    client_ip: str | None = None,
    view_only: bool = False,
    single_use: bool = False,
    desktop_name: str | None = None,
    tls: dict[str, Any] | None = None,
    session_id: str | None = None,
    clip: str | None = None,
) -> Claims:
    """Claims for a new console: fresh ``jti`` (128+ random bits) and session id, window [now, now+ttl]."""
    issued = int(now)
    claims = Claims(
        iss=issuer,
        iat=issued,
        nbf=issued,
        exp=issued + int(ttl),
        jti=secrets.token_urlsafe(18),
        sid=session_id or secrets.token_urlsafe(12),
        host=host,
        port=port,
        pw=password,
        tls=tls,
        vm=vm,
        sub=user,
        cip=client_ip,
        ro=view_only,
        once=single_use,
        dn=desktop_name,
        clip=clip,
    )
    check_claims(claims.to_json_dict(), max_ttl=None)
    return claims


def _json(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def mint(claims: Claims, keyring: Keyring) -> str:
    """Sign the claims with the active signing key, then encrypt with the active fleet key."""
    if claims.exp - claims.iat > keyring.max_ttl:
        raise ValueError(f"token lifetime {claims.exp - claims.iat}s exceeds the keyring's max_ttl {keyring.max_ttl}s")
    signer, fleet = keyring.minting_keys()
    signing_input = (
        b64url.encode(_json({"alg": "EdDSA", "kid": signer.kid})) + "." + b64url.encode(_json(claims.to_json_dict()))
    )
    jws = signing_input + "." + b64url.encode(signer.sign(signing_input.encode("ascii")))
    header = b64url.encode(_json({"alg": "dir", "enc": "A256GCM", "kid": fleet.kid, "cty": "JWT"}))
    iv = secrets.token_bytes(12)
    ciphertext, tag = fleet.seal(iv, jws.encode("ascii"), header.encode("ascii"))
    token = ".".join((header, "", b64url.encode(iv), b64url.encode(ciphertext), b64url.encode(tag)))
    if len(token) > MAX_TOKEN_LENGTH:  # every proxy would refuse it as too_long
        raise ValueError(f"the token would be {len(token)} characters, above the limit of {MAX_TOKEN_LENGTH}")
    return token


def verify(
    token: str,
    keyring: Keyring,
    now: float,
    *,
    skew: int = DEFAULT_SKEW,
    max_ttl: int | None = None,
    client_ip: str | None = None,
) -> Claims:
    """The claims of a token the proxy may accept at ``now``, or TokenRefused.

    ``max_ttl`` defaults to the keyring's. ``client_ip`` is the peer as the proxy sees it; a
    token bound to an address (``cip``) is refused when it differs or is unknown.
    """
    jws = _decrypt(token, keyring, now)
    claims_data = _verify_signature(jws, keyring, now)
    if not _audience_ok(claims_data.get("aud")):
        raise TokenRefused(Reason.WRONG_AUDIENCE, "the token is not meant for a console proxy")
    try:
        claims = check_claims(claims_data, max_ttl=keyring.max_ttl if max_ttl is None else max_ttl)
    except _LifetimeTooLong as exc:
        raise TokenRefused(Reason.LIFETIME_TOO_LONG, str(exc)) from None
    except ValueError as exc:
        raise TokenRefused(Reason.BAD_CLAIMS, str(exc)) from None
    _check_time(claims, now, skew)
    _check_client_ip(claims, client_ip)
    return claims


def _decrypt(token: Any, keyring: Keyring, now: float) -> bytes:
    if not isinstance(token, str):
        raise TokenRefused(Reason.MALFORMED, "the token is not text")
    if len(token) > MAX_TOKEN_LENGTH:
        raise TokenRefused(Reason.TOO_LONG, f"the token is longer than {MAX_TOKEN_LENGTH} characters")
    parts = token.split(".")
    if len(parts) != 5 or parts[1] != "":
        raise TokenRefused(Reason.MALFORMED, "not a JWE compact serialization with an empty key part")
    header_b64, _, iv_b64, ct_b64, tag_b64 = parts
    kid = _header_kid(header_b64, _JWE_KIDS, _jwe_kid)
    try:
        iv, ciphertext, tag = b64url.decode(iv_b64), b64url.decode(ct_b64), b64url.decode(tag_b64)
    except ValueError as exc:
        raise TokenRefused(Reason.MALFORMED, str(exc)) from None
    if len(iv) != 12 or len(tag) != 16 or not ciphertext:
        raise TokenRefused(Reason.MALFORMED, "wrong IV, tag or ciphertext length")
    fleet = keyring.fleet_key(kid, now)
    if fleet is None:
        raise TokenRefused(Reason.UNKNOWN_FLEET_KEY, "the token's fleet key is unknown or retired")
    plaintext = fleet.open(iv, ciphertext, tag, header_b64.encode("ascii"))
    if plaintext is None:
        raise TokenRefused(Reason.DECRYPT_FAILED, "the token does not authenticate under its fleet key")
    if not plaintext.isascii():
        raise TokenRefused(Reason.MALFORMED, "the inner token is not ASCII")
    return plaintext


def _verify_signature(jws: bytes, keyring: Keyring, now: float) -> dict[str, Any]:
    # the inner token stays bytes (ASCII, checked): b64url decodes bytes, no copies to str and back
    signing_input, _, signature_b64 = jws.rpartition(b".")
    header_b64, dot, payload_b64 = signing_input.partition(b".")
    if not dot or b"." in payload_b64:
        raise TokenRefused(Reason.MALFORMED, "the inner token is not a JWS compact serialization")
    kid = _header_kid(header_b64, _JWS_KIDS, _jws_kid)
    try:
        signature = b64url.decode(signature_b64)
    except ValueError as exc:
        raise TokenRefused(Reason.MALFORMED, str(exc)) from None
    key = keyring.signing_key(kid, now)
    if key is None:
        raise TokenRefused(Reason.UNKNOWN_SIGNING_KEY, "the token's signing key is unknown or retired")
    if len(signature) != 64 or not key.verify(signing_input, signature):
        raise TokenRefused(Reason.BAD_SIGNATURE, "the signature does not verify")
    try:
        return _parse_json_object(b64url.decode(payload_b64))
    except ValueError as exc:
        raise TokenRefused(Reason.BAD_CLAIMS, str(exc)) from None


_Encoded = TypeVar("_Encoded", str, bytes)
_JWE_KIDS: dict[str, str] = {}
_JWS_KIDS: dict[bytes, str] = {}
"""The kid of each protected header already seen valid, by its exact encoding: one per kind."""
_HEADER_CACHE_SIZE = 256


def _header_kid(encoded: _Encoded, cache: dict[_Encoded, str], check: Callable[[dict[str, Any]], str]) -> str:
    """The kid of a protected header that passed ``check``; valid headers are remembered.

    A fleet has a handful of distinct headers (one per key), so after the first token each is a
    dictionary hit instead of base64 + JSON + checks. Only exact, already validated spellings are
    cached, and the cache is bounded, so hostile tokens can neither poison nor grow it.
    """
    kid = cache.get(encoded)
    if kid is not None:
        return kid
    try:
        kid = check(_parse_json_object(b64url.decode(encoded)))
    except ValueError as exc:
        raise TokenRefused(Reason.MALFORMED, str(exc)) from None
    if len(cache) >= _HEADER_CACHE_SIZE:
        cache.clear()
    cache[encoded] = kid
    return kid


def _jwe_kid(header: dict[str, Any]) -> str:
    if (
        set(header) != _JWE_HEADER_KEYS
        or header["alg"] != "dir"
        or header["enc"] != "A256GCM"
        or header["cty"] != "JWT"
        or not isinstance(header["kid"], str)
    ):
        raise ValueError("unexpected JWE header")
    return header["kid"]


def _jws_kid(header: dict[str, Any]) -> str:
    if set(header) != _JWS_HEADER_KEYS or header["alg"] != "EdDSA" or not isinstance(header["kid"], str):
        raise ValueError("unexpected JWS header")
    return header["kid"]


def _parse_json_object(raw: bytes) -> dict[str, Any]:
    data = strictjson.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _audience_ok(aud: Any) -> bool:
    return aud == AUDIENCE or (isinstance(aud, list) and AUDIENCE in aud)


class _LifetimeTooLong(ValueError):
    pass


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_tls(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not value.keys() <= _TLS_KEYS.keys():
        raise ValueError(f"claim 'tls' must be an object with members among {sorted(_TLS_KEYS)}")
    for name, kind in _TLS_KEYS.items():
        if name in value and not isinstance(value[name], kind):
            raise ValueError(f"claim 'tls.{name}' has the wrong type")
    return value


def _check_host(host: str) -> None:
    # whitespace other than " " is never printable: one C-level scan instead of one per character
    if not host.isprintable() or " " in host or "/" in host or "@" in host:
        raise ValueError("claim 'host' must be a host name or address")


def _check_cip(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return _canonical_ip(value)
    except ValueError:
        raise ValueError("claim 'cip' must be an IP address") from None


@functools.lru_cache(maxsize=1024)
def _canonical_ip(value: str) -> str:
    """The canonical text of an IP address (an IPv4-mapped IPv6 address as the IPv4 one);
    ValueError if ``value`` is not an address.

    A pure function of its text, so its answers are cached (bounded; a refusal raises and is
    never cached): a bound token costs two of these, 3 µs for IPv4 and 8 µs for IPv6 through
    :mod:`ipaddress`, more than the rest of the claim checks, while a proxy sees the same few
    addresses again and again."""
    address = ipaddress.ip_address(value)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


_CLIP_VALUES = frozenset(CLIP_VALUES)
#: The policy of each valid ``clip`` claim (None: absent), built once: policies are immutable.
_CLIP_POLICIES: dict[str | None, ClipPolicy] = {value: parse_clip(value) for value in (None, *_CLIP_VALUES)}


def _check_clip(value: Any) -> str | None:
    """The ``clip`` claim: absent (None, meaning ``both``) or one of four words; else bad claims."""
    if value is None or (isinstance(value, str) and value in _CLIP_VALUES):
        return value
    raise ValueError("claim 'clip' must be one of 'none', 'in', 'out', 'both'")


def check_claims(data: dict[str, Any], *, max_ttl: int | None) -> Claims:
    """Schema-check decoded claims (types, ranges, lifetime) into :class:`Claims`; ValueError if not.

    Written for the per-open path: plain locals and one loop over the text claims (a verify
    is the signature plus this, and this should stay a small fraction of it)."""
    iat, nbf, exp = data.get("iat"), data.get("nbf"), data.get("exp")
    if not (_is_int(iat) and _is_int(nbf) and _is_int(exp) and iat >= 0 and nbf >= 0 and exp >= 0):
        raise ValueError("claims 'iat', 'nbf' and 'exp' must be non-negative integers")
    if not iat <= nbf < exp:
        raise ValueError("claims must satisfy iat <= nbf < exp")
    if max_ttl is not None and exp - iat > max_ttl:
        raise _LifetimeTooLong(f"token lifetime {exp - iat}s is above the maximum {max_ttl}s")
    port, jti = data.get("port"), data.get("jti")
    if not _is_int(port) or not 1 <= port <= 65535:
        raise ValueError("claim 'port' must be an integer from 1 to 65535")
    if not isinstance(jti, str) or not 22 <= len(jti) <= 128:
        raise ValueError("claim 'jti' must be a string of at least 128 bits")
    fields = {"iat": iat, "nbf": nbf, "exp": exp, "jti": jti, "port": port, "aud": data.get("aud", AUDIENCE)}
    for name, required, limit in _TEXT_CLAIMS:
        value = data.get(name)
        if value is None and not required:
            fields[name] = None
        elif not isinstance(value, str) or not value or len(value) > limit:
            raise ValueError(f"claim {name!r} must be a non-empty string of at most {limit} characters")
        else:
            fields[name] = value
    ro, once = data.get("ro", False), data.get("once", False)
    if type(ro) is not bool or type(once) is not bool:
        raise ValueError(f"claim {'ro' if type(ro) is not bool else 'once'!r} must be a boolean")
    fields["ro"], fields["once"] = ro, once
    _check_host(fields["host"])
    fields["tls"] = _check_tls(data.get("tls"))
    fields["cip"] = _check_cip(fields["cip"])
    fields["clip"] = _check_clip(data.get("clip"))
    return Claims._checked(fields)


#: Text claims: name, required, longest length.
_TEXT_CLAIMS = (
    ("iss", True, 256),
    ("sid", True, 128),
    ("host", True, 253),
    ("pw", False, 256),
    ("vm", False, 256),
    ("sub", False, 256),
    ("cip", False, 64),
    ("dn", False, 1024),
)


def _check_time(claims: Claims, now: float, skew: int) -> None:
    if now < claims.nbf - skew:
        raise TokenRefused(Reason.NOT_YET_VALID, f"valid from {claims.nbf}", claims)
    if now >= claims.exp + skew:
        raise TokenRefused(Reason.EXPIRED, f"expired at {claims.exp}", claims)


def _check_client_ip(claims: Claims, client_ip: str | None) -> None:
    if claims.cip is None:
        return
    try:
        # claims.cip is already canonical (check_claims): parse only the peer's address
        matches = client_ip is not None and _canonical_ip(client_ip) == claims.cip
    except ValueError:
        matches = False
    if not matches:
        raise TokenRefused(Reason.CLIENT_IP_MISMATCH, "the client address differs from the bound one", claims)
