"""Shared helpers for the token and keyring tests: keyrings, claims, and a forger for hostile tokens.

The forger builds nested tokens by hand (arbitrary JWS header, payload bytes and signer, wrapped in
an arbitrary JWE header under a real fleet key), so tests can reach every check behind decryption.
Imported as a plain module (``tests/`` is on ``sys.path`` under pytest's default import mode).
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from Crypto.Cipher import AES
from Crypto.Signature import eddsa

from console_proxy import b64url, token
from console_proxy.keyring import FleetKey, Keyring, SigningKey

NOW = 1_700_000_000
"""A fixed 'now' (2023-11-14T22:13:20Z) for the pure-core tests."""

PASSWORD = "s3cr3t-VNC-pw-\u00e9\u2603"
"""A password that must never show up anywhere it is not supposed to (non-ASCII on purpose)."""


def new_ring(now: float = NOW, *, max_ttl: int = 3600) -> Keyring:
    return Keyring.generate(now, max_ttl=max_ttl)


def make_claims(now: float = NOW, ttl: int = 60, **overrides: Any) -> token.Claims:
    """Claims as the broker makes them, with a password; keyword overrides go to new_claims."""
    options: dict[str, Any] = {"host": "10.1.2.3", "port": 5901, "password": PASSWORD}
    options.update(overrides)
    return token.new_claims(now=now, ttl=ttl, **options)


def full_claims(now: float = NOW, ttl: int = 60) -> token.Claims:
    """Claims with every member of DESIGN's list set to a non-default value."""
    return token.Claims(
        iss="broker-7",
        aud="console-proxy",
        iat=int(now) - 5,
        nbf=int(now) - 2,
        exp=int(now) + ttl,
        jti=secrets.token_urlsafe(18),
        sid="sess-0042",
        host="hv-3.example.net",
        port=5907,
        pw=PASSWORD,
        tls={
            "ca": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
            "sni": "hv-3",
            "allow_anon": False,
            "require": True,
        },
        vm="vm-9f2c",
        sub="alice@example.org",
        cip="192.0.2.44",
        ro=True,
        once=True,
        dn="Alice's desktop",
        clip="in",
    )


def claims_dict(now: float = NOW, ttl: int = 60, **overrides: Any) -> dict[str, Any]:
    """A valid claims object as JSON data; ``None`` overrides delete the member."""
    data = make_claims(now, ttl).to_json_dict()
    for name, value in overrides.items():
        if value is None:
            data.pop(name, None)
        else:
            data[name] = value
    return data


def signing_key(ring: Keyring) -> SigningKey:
    return ring.minting_keys()[0]


def fleet_key(ring: Keyring) -> FleetKey:
    return ring.minting_keys()[1]


def _json_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def build_jws(
    payload: Any,
    *,
    signer: SigningKey | bytes,
    kid: str | None = None,
    header: Any = None,
    signature: bytes | None = None,
) -> str:
    """A JWS compact string. ``signer`` is a SigningKey or a raw 32-byte Ed25519 seed.

    ``payload`` and ``header`` may be dicts (encoded compactly) or raw bytes.
    """
    if header is None:
        header = {"alg": "EdDSA", "kid": kid if kid is not None else getattr(signer, "kid", "sig-unknown")}
    signing_input = b64url.encode(_json_bytes(header)) + "." + b64url.encode(_json_bytes(payload))
    if signature is None:
        if isinstance(signer, SigningKey):
            signature = signer.sign(signing_input.encode("ascii"))
        else:
            signature = eddsa.new(eddsa.import_private_key(signer), "rfc8032").sign(signing_input.encode("ascii"))
    return signing_input + "." + b64url.encode(signature)


def encrypt(inner: str | bytes, *, key: bytes, kid: str, header: Any = None) -> str:
    """Wrap ``inner`` in a JWE dir/A256GCM compact token (AAD = encoded protected header)."""
    if header is None:
        header = {"alg": "dir", "enc": "A256GCM", "kid": kid, "cty": "JWT"}
    header_b64 = b64url.encode(_json_bytes(header))
    iv = secrets.token_bytes(12)
    cipher = AES.new(key, AES.MODE_GCM, nonce=iv)
    cipher.update(header_b64.encode("ascii"))
    plaintext = inner.encode("ascii") if isinstance(inner, str) else inner
    ciphertext, tag = cipher.encrypt_and_digest(plaintext)
    return ".".join((header_b64, "", b64url.encode(iv), b64url.encode(ciphertext), b64url.encode(tag)))


def forge(
    ring: Keyring,
    payload: Any,
    *,
    signer: SigningKey | bytes | None = None,
    kid: str | None = None,
    jws_header: Any = None,
    signature: bytes | None = None,
    jwe_header: Any = None,
) -> str:
    """A token with an arbitrary inner JWS, encrypted under the ring's active fleet key.

    By default the JWS is signed with the ring's own active signing key, so the token passes
    everything up to the claim checks and only what the test changed is wrong.
    """
    signer = signer if signer is not None else signing_key(ring)
    fleet = fleet_key(ring)
    jws = build_jws(payload, signer=signer, kid=kid, header=jws_header, signature=signature)
    return encrypt(jws, key=fleet.key, kid=fleet.kid, header=jwe_header)


def parts(tok: str) -> list[str]:
    return tok.split(".")


def decrypt_inner(tok: str, ring: Keyring) -> str:
    """The inner JWS of a (valid) token, for tests that tamper below the JWE."""
    header_b64, _, iv, ct, tag = tok.split(".")
    key = ring.fleet[json.loads(b64url.decode(header_b64))["kid"]].key
    cipher = AES.new(key, AES.MODE_GCM, nonce=b64url.decode(iv))
    cipher.update(header_b64.encode("ascii"))
    return cipher.decrypt_and_verify(b64url.decode(ct), b64url.decode(tag)).decode("ascii")
