"""Keyrings: the keys that mint and verify access tokens, as JWK Sets, with rotation.

Two purposes, two kinds of key, never one key for both (itsdangerous's lesson):

* **signing** keys, Ed25519 (JWK ``kty`` OKP): the broker holds the private part and signs the
  inner JWS; proxies hold only the public part, so a proxy can read tokens but not forge them.
* **fleet** keys, AES-256 (JWK ``kty`` oct): shared by broker and proxies; they encrypt the outer
  JWE so host, port and password are hidden from the browser and everything in between.

One key of each kind is *active* (mints). Rotation makes new active keys and marks the old
ones verify-only with a ``verify_until`` time (rotation time + the longest token lifetime +
clock skew); after that no token they minted can still be valid, so they are dropped.

The JSON form is a JWK Set with a few extra top-level members (``active``, ``max_ttl``,
``version``) and two extra key members (``iat``, ``verify_until``); JOSE libraries ignore them.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from console_proxy import b64url
from console_proxy.hostside import write_private_file

DEFAULT_MAX_TTL = 3600
"""Longest token lifetime a keyring mints and (by default) a proxy accepts, in seconds."""

DEFAULT_SKEW = 30
"""Clock-skew allowance in seconds, applied to ``nbf`` and ``exp``."""

MAX_SKEW = 600
"""The largest allowance a proxy may be configured with; the broker keeps redeemed single-use
tokens at least this long past their ``exp``, so no proxy can accept a replay after they go."""


class KeyringError(Exception):
    """A keyring file is missing, unreadable or not a valid keyring. Never carries key material."""


@dataclass(frozen=True, eq=False)
class SigningKey:
    """An Ed25519 key; ``seed`` is None on a proxy's (public-only) keyring."""

    kid: str
    public: bytes
    seed: bytes | None
    created: int
    verify_until: int | None = None
    # Not init fields: dataclasses.replace() must rebuild them from ``seed``, never carry a signer over.
    _verifier: Ed25519PublicKey = field(init=False, repr=False)
    _signer: Ed25519PrivateKey | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        # OpenSSL key objects built once per key (when a keyring is loaded), never per token.
        object.__setattr__(self, "_verifier", Ed25519PublicKey.from_public_bytes(self.public))
        if self.seed is not None:
            object.__setattr__(self, "_signer", Ed25519PrivateKey.from_private_bytes(self.seed))

    def sign(self, message: bytes) -> bytes:
        if self._signer is None:
            raise KeyringError("this keyring holds no private signing key (a proxy keyring cannot mint)")
        return self._signer.sign(message)

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            self._verifier.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def to_jwk(self, *, private: bool) -> dict[str, Any]:
        jwk: dict[str, Any] = {
            "kty": "OKP",
            "crv": "Ed25519",
            "kid": self.kid,
            "use": "sig",
            "alg": "EdDSA",
            "x": b64url.encode(self.public),
        }
        if private and self.seed is not None:
            jwk["d"] = b64url.encode(self.seed)
        return _with_times(jwk, self.created, self.verify_until)


@dataclass(frozen=True)
class FleetKey:
    """An AES-256 key for the outer JWE (``dir`` + ``A256GCM``)."""

    kid: str
    key: bytes = field(repr=False)
    created: int
    verify_until: int | None = None
    # Not an init field: dataclasses.replace() rebuilds it from ``key``.
    _aead: AESGCM = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # One OpenSSL AES-GCM object per key: its key schedule is reused by every token.
        object.__setattr__(self, "_aead", AESGCM(self.key))

    def seal(self, iv: bytes, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
        """AES-256-GCM encryption: (ciphertext, 16-byte tag)."""
        sealed = self._aead.encrypt(iv, plaintext, aad)
        return sealed[:-16], sealed[-16:]

    def open(self, iv: bytes, ciphertext: bytes, tag: bytes, aad: bytes) -> bytes | None:
        """The plaintext, or None when the ciphertext, tag or AAD does not authenticate."""
        try:
            return self._aead.decrypt(iv, ciphertext + tag, aad)
        except InvalidTag:
            return None

    def to_jwk(self) -> dict[str, Any]:
        jwk = {"kty": "oct", "kid": self.kid, "use": "enc", "alg": "dir", "k": b64url.encode(self.key)}
        return _with_times(jwk, self.created, self.verify_until)


def _with_times(jwk: dict[str, Any], created: int, verify_until: int | None) -> dict[str, Any]:
    jwk["iat"] = created
    if verify_until is not None:
        jwk["verify_until"] = verify_until
    return jwk


def _new_kid(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


def new_signing_key(now: float) -> SigningKey:
    private = Ed25519PrivateKey.generate()
    seed, public = private.private_bytes_raw(), private.public_key().public_bytes_raw()
    return SigningKey(kid=_new_kid("sig"), public=public, seed=seed, created=int(now))


def new_fleet_key(now: float) -> FleetKey:
    return FleetKey(kid=_new_kid("fleet"), key=secrets.token_bytes(32), created=int(now))


@dataclass(frozen=True)
class Keyring:
    """Signing and fleet keys by kid, which of them mint, and the lifetime bound."""

    signing: dict[str, SigningKey]
    fleet: dict[str, FleetKey]
    active_signing: str | None
    active_fleet: str | None
    max_ttl: int = DEFAULT_MAX_TTL
    version: int = 1

    @classmethod
    def generate(cls, now: float, *, max_ttl: int = DEFAULT_MAX_TTL) -> Keyring:
        """A new broker keyring: one active key of each kind."""
        sig, enc = new_signing_key(now), new_fleet_key(now)
        return cls({sig.kid: sig}, {enc.kid: enc}, sig.kid, enc.kid, max_ttl=max_ttl)

    @property
    def can_mint(self) -> bool:
        key = self.signing.get(self.active_signing or "")
        return key is not None and key.seed is not None and self.active_fleet in self.fleet

    def minting_keys(self) -> tuple[SigningKey, FleetKey]:
        if not self.can_mint:
            raise KeyringError("this keyring cannot mint: it has no active private signing key")
        return self.signing[self.active_signing or ""], self.fleet[self.active_fleet or ""]

    def previous_generation(self, until: float) -> Keyring | None:
        """This keyring minting with the keys active before the last rotation (the newest
        others), if they still verify at ``until``; None if there are none. For a proxy that
        has not yet heard of a rotation: its keyring has those keys and not the new ones."""
        signing = max(
            (
                k
                for kid, k in self.signing.items()
                if kid != self.active_signing and k.seed is not None and _usable(k.verify_until, until)
            ),
            key=lambda k: k.created,
            default=None,
        )
        fleet = max(
            (k for kid, k in self.fleet.items() if kid != self.active_fleet and _usable(k.verify_until, until)),
            key=lambda k: k.created,
            default=None,
        )
        if signing is None or fleet is None:
            return None
        return replace(self, active_signing=signing.kid, active_fleet=fleet.kid)

    def signing_key(self, kid: str, now: float) -> SigningKey | None:
        """The key for ``kid`` if it may still verify at ``now`` (retired keys fail closed)."""
        key = self.signing.get(kid)
        return key if key is not None and _usable(key.verify_until, now) else None

    def fleet_key(self, kid: str, now: float) -> FleetKey | None:
        key = self.fleet.get(kid)
        return key if key is not None and _usable(key.verify_until, now) else None

    def rotate(self, now: float, *, skew: int = DEFAULT_SKEW) -> Keyring:
        """New active keys; old active ones verify until their last token expired; stale ones go."""
        until = int(now) + self.max_ttl + skew
        signing = {k: _retire(v, until) for k, v in self.signing.items()}
        fleet = {k: _retire(v, until) for k, v in self.fleet.items()}
        sig, enc = new_signing_key(now), new_fleet_key(now)
        signing[sig.kid], fleet[enc.kid] = sig, enc
        rotated = replace(
            self, signing=signing, fleet=fleet, active_signing=sig.kid, active_fleet=enc.kid, version=self.version + 1
        )
        return rotated.pruned(now)

    def pruned(self, now: float) -> Keyring:
        """Without the keys whose verification window has passed."""
        return replace(
            self,
            signing={k: v for k, v in self.signing.items() if _usable(v.verify_until, now)},
            fleet={k: v for k, v in self.fleet.items() if _usable(v.verify_until, now)},
        )

    def for_proxy(self) -> Keyring:
        """The proxy's keyring: public signing keys and fleet keys, no private signing key."""
        public = {k: replace(v, seed=None) for k, v in self.signing.items()}
        return replace(self, signing=public, active_signing=None)

    def to_jwks(self) -> dict[str, Any]:
        keys = [k.to_jwk(private=True) for k in self.signing.values()]
        keys += [k.to_jwk() for k in self.fleet.values()]
        active = {"enc": self.active_fleet}
        if self.active_signing is not None:
            active["sig"] = self.active_signing
        return {"keys": keys, "active": active, "max_ttl": self.max_ttl, "version": self.version}

    @classmethod
    def from_jwks(cls, data: Any) -> Keyring:
        """Parse a JWK Set; raises KeyringError (naming the problem, never a key) when invalid."""
        try:
            return _parse_keyring(data)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise KeyringError(f"not a valid consolegate keyring ({_describe(exc)})") from None

    def kids(self) -> list[dict[str, Any]]:
        """Key ids with their status, for listing: never key material."""
        rows = [_kid_row(k, "signing", self.active_signing) for k in self.signing.values()]
        return rows + [_kid_row(k, "fleet", self.active_fleet) for k in self.fleet.values()]


def _usable(verify_until: int | None, now: float) -> bool:
    return verify_until is None or now < verify_until


def _retire(key: Any, until: int) -> Any:
    return key if key.verify_until is not None else replace(key, verify_until=until)


def _kid_row(key: SigningKey | FleetKey, kind: str, active: str | None) -> dict[str, Any]:
    status = "active" if key.kid == active else "verify-only"
    return {"kid": key.kid, "kind": kind, "status": status, "created": key.created, "verify_until": key.verify_until}


def _describe(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"missing member {exc}"
    return type(exc).__name__ if not str(exc) else str(exc).splitlines()[0][:200]


def _parse_keyring(data: Any) -> Keyring:
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("expected a JWK Set object with a 'keys' list")
    signing: dict[str, SigningKey] = {}
    fleet: dict[str, FleetKey] = {}
    for jwk in data["keys"]:
        key = _parse_jwk(jwk)
        target: dict[str, Any] = signing if isinstance(key, SigningKey) else fleet
        if key.kid in signing or key.kid in fleet:
            raise ValueError(f"duplicate kid {key.kid!r}")
        target[key.kid] = key
    active = data.get("active", {})
    ring = Keyring(
        signing,
        fleet,
        active.get("sig"),
        active.get("enc"),
        max_ttl=_positive_int(data.get("max_ttl", DEFAULT_MAX_TTL), "max_ttl"),
        version=_positive_int(data.get("version", 1), "version"),
    )
    if ring.active_signing is not None and ring.active_signing not in signing:
        raise ValueError("active signing kid is not in the set")
    if ring.active_fleet is not None and ring.active_fleet not in fleet:
        raise ValueError("active fleet kid is not in the set")
    return ring


def _positive_int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer")
    return value


def _parse_jwk(jwk: Any) -> SigningKey | FleetKey:
    kid = jwk["kid"]
    if not isinstance(kid, str) or not kid:
        raise ValueError("kid must be a non-empty string")
    created = int(jwk.get("iat", 0))
    until = jwk.get("verify_until")
    until = None if until is None else int(until)
    if jwk["kty"] == "OKP" and jwk.get("crv") == "Ed25519":
        public, seed = b64url.decode(jwk["x"]), jwk.get("d")
        seed = None if seed is None else b64url.decode(seed)
        if len(public) != 32 or (seed is not None and len(seed) != 32):
            raise ValueError(f"key {kid!r} has the wrong Ed25519 length")
        key = SigningKey(kid=kid, public=public, seed=seed, created=created, verify_until=until)
        if seed is not None and Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw() != public:
            raise ValueError(f"key {kid!r}: private and public parts do not match")
        return key
    if jwk["kty"] == "oct":
        secret = b64url.decode(jwk["k"])
        if len(secret) != 32:
            raise ValueError(f"fleet key {kid!r} must be 256 bits")
        return FleetKey(kid=kid, key=secret, created=created, verify_until=until)
    raise ValueError(f"key {kid!r} has an unsupported type")


def load(path: str | os.PathLike[str]) -> Keyring:
    """Read a keyring file; every failure is a one-line KeyringError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise KeyringError(f"cannot read keyring {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise KeyringError(f"keyring {str(path)!r} is not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise KeyringError(f"keyring {str(path)!r} is not JSON (line {exc.lineno})") from None
    except (ValueError, RecursionError):  # over-long integers, absurd nesting
        raise KeyringError(f"keyring {str(path)!r} is not usable JSON") from None
    return Keyring.from_jwks(data)


def save(ring: Keyring, path: str | os.PathLike[str], *, public_only: bool = False) -> None:
    """Write atomically (temp file + fsync + rename) with mode 0600."""
    data = (ring.for_proxy() if public_only else ring).to_jwks()
    write_private_file(path, json.dumps(data, indent=2).encode("utf-8") + b"\n")
