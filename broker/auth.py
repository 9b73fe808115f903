"""Credentials: API keys (admins, issuers) and proxy credentials, stored only as keyed hashes.

An API key reads ``cgk.<key id>.<secret>``; a proxy authenticates with
``Authorization: Bearer <proxy_id>.<secret>`` from its credential file ``{proxy_id, secret}``.
The id finds the row, the secret is checked by comparing HMAC-SHA256 digests (under a key
derived for this purpose only) with :func:`hmac.compare_digest`, so neither the database nor a
timing measurement gives the secret away. An unknown id costs the same HMAC as a known one.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

API_KEY_PREFIX = "cgk"
ROLES = ("admin", "issuer")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_DUMMY_HASH = b"\x00" * 32


@dataclass(frozen=True)
class Principal:
    """Who is calling: an API key (role admin or issuer) or a proxy (role proxy)."""

    id: str
    name: str
    role: str
    certificate: str | None = None
    """The serial (hex) of the client certificate that authenticated a proxy; None for a bearer."""

    @property
    def actor(self) -> str:
        """How the audit log names the caller."""
        return f"proxy:{self.id}" if self.role == "proxy" else f"apikey:{self.name}"


class Hasher:
    """Keyed hashing of secrets; the key comes from the vault's ``credential-hash`` purpose."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def digest(self, kind: str, ident: str, secret: str) -> bytes:
        message = f"{kind}\x00{ident}\x00{secret}".encode()
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def matches(self, stored: bytes | None, kind: str, ident: str, secret: str) -> bool:
        expected = self.digest(kind, ident, secret)
        return hmac.compare_digest(stored if stored is not None else _DUMMY_HASH, expected) and stored is not None


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def new_api_key() -> tuple[str, str, str]:
    """(key id, secret, the whole key to show once)."""
    key_id, secret = secrets.token_hex(8), new_secret()
    return key_id, secret, f"{API_KEY_PREFIX}.{key_id}.{secret}"


def bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


def split_api_key(value: str) -> tuple[str, str] | None:
    prefix, _, rest = value.partition(".")
    key_id, _, secret = rest.partition(".")
    if prefix != API_KEY_PREFIX or not key_id or not secret:
        return None
    return key_id, secret


def split_proxy_credential(value: str) -> tuple[str, str] | None:
    proxy_id, _, secret = value.partition(".")
    if not NAME_PATTERN.match(proxy_id) or not secret:
        return None
    return proxy_id, secret
