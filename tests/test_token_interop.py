"""Interop with jwcrypto: any JOSE library given the keys reads our tokens, and we read theirs.

jwcrypto is a test dependency only; the codec itself uses cryptography (OpenSSL).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from jwcrypto import jwe, jwk, jws
from jwcrypto.common import JWException
from token_fixtures import NOW, full_claims, make_claims, new_ring

from console_proxy import b64url, keyring, token
from console_proxy.token import TokenRefused


@pytest.fixture()
def rings(tmp_path: Path) -> tuple[keyring.Keyring, dict[str, Any], dict[str, Any]]:
    """The broker keyring, and the broker and proxy files' JSON as written to disk."""
    ring = new_ring().rotate(NOW)  # two keys of each kind: kids must select the right one
    keyring.save(ring, tmp_path / "broker.json")
    keyring.save(ring, tmp_path / "proxy.json", public_only=True)
    broker = json.loads((tmp_path / "broker.json").read_text())
    proxy = json.loads((tmp_path / "proxy.json").read_text())
    return ring, broker, proxy


def _jwk(data: dict[str, Any], kid: str) -> jwk.JWK:
    (found,) = [k for k in data["keys"] if k["kid"] == kid]
    return jwk.JWK(**found)


def test_jwcrypto_reads_our_token_with_the_proxy_keyring(rings: tuple[keyring.Keyring, dict, dict]) -> None:
    ring, _, proxy = rings
    claims = full_claims()
    tok = token.mint(claims, ring)

    envelope = jwe.JWE()
    envelope.deserialize(tok, key=_jwk(proxy, ring.active_fleet or ""))
    assert envelope.jose_header == {"alg": "dir", "enc": "A256GCM", "kid": ring.active_fleet, "cty": "JWT"}

    signed = jws.JWS()
    signed.deserialize(envelope.payload.decode("ascii"))
    public = _jwk(proxy, ring.active_signing or "")
    assert not public.has_private
    signed.verify(public, alg="EdDSA")
    assert signed.jose_header == {"alg": "EdDSA", "kid": ring.active_signing}
    assert token.check_claims(json.loads(signed.payload), max_ttl=None) == claims
    assert json.loads(signed.payload) == claims.to_json_dict()


def test_jwcrypto_rejects_our_token_under_the_wrong_keys(rings: tuple[keyring.Keyring, dict, dict]) -> None:
    ring, _, proxy = rings
    tok = token.mint(make_claims(), ring)
    old_fleet = next(kid for kid in ring.fleet if kid != ring.active_fleet)
    with pytest.raises(JWException):
        jwe.JWE().deserialize(tok, key=_jwk(proxy, old_fleet))
    envelope = jwe.JWE()
    envelope.deserialize(tok, key=_jwk(proxy, ring.active_fleet or ""))
    signed = jws.JWS()
    signed.deserialize(envelope.payload.decode("ascii"))
    old_signing = next(kid for kid in ring.signing if kid != ring.active_signing)
    with pytest.raises(JWException):
        signed.verify(_jwk(proxy, old_signing), alg="EdDSA")


def _jwcrypto_token(broker: dict[str, Any], claims: dict[str, Any], sig_kid: str, fleet_kid: str) -> str:
    signed = jws.JWS(json.dumps(claims).encode("utf-8"))
    signed.add_signature(_jwk(broker, sig_kid), alg="EdDSA", protected=json.dumps({"alg": "EdDSA", "kid": sig_kid}))
    inner = signed.serialize(compact=True)
    envelope = jwe.JWE(
        inner.encode("ascii"), protected=json.dumps({"alg": "dir", "enc": "A256GCM", "kid": fleet_kid, "cty": "JWT"})
    )
    envelope.add_recipient(_jwk(broker, fleet_kid))
    return envelope.serialize(compact=True)


def test_we_accept_a_token_jwcrypto_built(rings: tuple[keyring.Keyring, dict, dict], tmp_path: Path) -> None:
    ring, broker, _ = rings
    private = _jwk(broker, ring.active_signing or "")
    assert private.has_private  # the exported broker JWK carries "d"
    claims = full_claims()
    tok = _jwcrypto_token(broker, claims.to_json_dict(), ring.active_signing or "", ring.active_fleet or "")
    header, key_part, iv, _, tag = tok.split(".")
    assert key_part == "" and len(b64url.decode(iv)) == 12 and len(b64url.decode(tag)) == 16
    assert set(json.loads(b64url.decode(header))) == {"alg", "enc", "kid", "cty"}

    proxy = keyring.load(tmp_path / "proxy.json")
    assert token.verify(tok, proxy, NOW, client_ip="192.0.2.44") == claims
    # the verify-only (rotated-out) keys are equally good for verification
    old_sig = next(kid for kid in ring.signing if kid != ring.active_signing)
    old_fleet = next(kid for kid in ring.fleet if kid != ring.active_fleet)
    assert (
        token.verify(
            _jwcrypto_token(broker, claims.to_json_dict(), old_sig, old_fleet), proxy, NOW, client_ip="192.0.2.44"
        )
        == claims
    )


def test_we_refuse_jwcrypto_tokens_that_break_our_rules(
    rings: tuple[keyring.Keyring, dict, dict], tmp_path: Path
) -> None:
    ring, broker, _ = rings
    proxy = keyring.load(tmp_path / "proxy.json")
    sig_kid, fleet_kid = ring.active_signing or "", ring.active_fleet or ""
    claims = make_claims().to_json_dict()

    # a JWS header with an extra member (typ) is not format v1
    signed = jws.JWS(json.dumps(claims).encode())
    signed.add_signature(
        _jwk(broker, sig_kid), alg="EdDSA", protected=json.dumps({"alg": "EdDSA", "kid": sig_kid, "typ": "JWT"})
    )
    envelope = jwe.JWE(
        signed.serialize(compact=True).encode(),
        protected=json.dumps({"alg": "dir", "enc": "A256GCM", "kid": fleet_kid, "cty": "JWT"}),
    )
    envelope.add_recipient(_jwk(broker, fleet_kid))
    with pytest.raises(TokenRefused) as info:
        token.verify(envelope.serialize(compact=True), proxy, NOW)
    assert info.value.reason == "malformed"

    # another audience
    other = _jwcrypto_token(broker, {**claims, "aud": "someone-else"}, sig_kid, fleet_kid)
    with pytest.raises(TokenRefused) as info:
        token.verify(other, proxy, NOW)
    assert info.value.reason == "wrong_audience"

    # A128GCM with a 128-bit key is not ours
    small = jwk.JWK.generate(kty="oct", size=128, kid=fleet_kid)
    envelope = jwe.JWE(b"x.y.z", protected=json.dumps({"alg": "dir", "enc": "A128GCM", "kid": fleet_kid, "cty": "JWT"}))
    envelope.add_recipient(small)
    with pytest.raises(TokenRefused) as info:
        token.verify(envelope.serialize(compact=True), proxy, NOW)
    assert info.value.reason == "malformed"
