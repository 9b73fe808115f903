"""The token codec: roundtrip, the exact time edges, and every refusal in DESIGN's order."""

from __future__ import annotations

import ipaddress
import json
import secrets
from dataclasses import replace
from typing import Any

import pytest
from Crypto.Cipher import AES
from Crypto.PublicKey import ECC
from freezegun import freeze_time
from hypothesis import given, settings
from hypothesis import strategies as st
from token_fixtures import (
    NOW,
    PASSWORD,
    claims_dict,
    decrypt_inner,
    encrypt,
    fleet_key,
    forge,
    full_claims,
    make_claims,
    new_ring,
    signing_key,
)

from console_proxy import b64url, clock, token
from console_proxy.keyring import FleetKey, Keyring, KeyringError
from console_proxy.token import MAX_TOKEN_LENGTH, TokenRefused

DESIGN_CLAIMS = (
    "iss",
    "aud",
    "iat",
    "nbf",
    "exp",
    "jti",
    "sid",
    "host",
    "port",
    "pw",
    "tls",
    "vm",
    "sub",
    "cip",
    "ro",
    "once",
    "dn",
    "clip",
)


@pytest.fixture(scope="module")
def ring() -> Keyring:
    return new_ring()


def refused(tok: Any, ring: Keyring, now: float = NOW, **kwargs: Any) -> TokenRefused:
    with pytest.raises(TokenRefused) as info:
        token.verify(tok, ring, now, **kwargs)
    return info.value


def _header(segment: str) -> dict[str, Any]:
    return json.loads(b64url.decode(segment))


# --- format and roundtrip -------------------------------------------------------------------------------------------


def test_every_design_claim_roundtrips(ring: Keyring) -> None:
    claims = full_claims()
    tok = token.mint(claims, ring)
    got = token.verify(tok, ring, NOW, client_ip="192.0.2.44")
    assert got == claims
    assert set(got.to_json_dict()) == set(DESIGN_CLAIMS)
    for name in DESIGN_CLAIMS:
        assert getattr(got, name) == getattr(claims, name), name


def test_minimal_claims_roundtrip_with_defaults(ring: Keyring) -> None:
    claims = make_claims(password=None)
    got = token.verify(token.mint(claims, ring), ring, NOW)
    assert got == claims
    assert (got.pw, got.tls, got.vm, got.sub, got.cip, got.dn, got.ro, got.once) == (None,) * 6 + (False, False)
    assert got.clip is None  # absent: both ways, as before the claim existed
    assert "clip" not in got.to_json_dict()
    assert got.aud == "console-proxy"


def test_token_layout_is_the_design_nested_jwt(ring: Keyring) -> None:
    claims = make_claims()
    tok = token.mint(claims, ring)
    header, key_part, iv, ciphertext, tag = tok.split(".")
    assert _header(header) == {"alg": "dir", "enc": "A256GCM", "kid": fleet_key(ring).kid, "cty": "JWT"}
    assert key_part == ""
    assert len(b64url.decode(iv)) == 12 and len(b64url.decode(tag)) == 16 and ciphertext
    jws = decrypt_inner(tok, ring)
    jws_header, payload, signature = jws.split(".")
    assert _header(jws_header) == {"alg": "EdDSA", "kid": signing_key(ring).kid}
    assert json.loads(b64url.decode(payload)) == claims.to_json_dict()
    assert signing_key(ring).verify(f"{jws_header}.{payload}".encode(), b64url.decode(signature))
    assert PASSWORD not in tok and "10.1.2.3" not in tok


def test_each_mint_is_fresh(ring: Keyring) -> None:
    first, second = make_claims(), make_claims()
    assert first.jti != second.jti and first.sid != second.sid
    assert len(b64url.decode(first.jti)) * 8 >= 128
    one, two = token.mint(first, ring), token.mint(first, ring)
    assert one != two and one.split(".")[2] != two.split(".")[2]  # fresh IV per token
    assert token.verify(one, ring, NOW) == token.verify(two, ring, NOW)


def test_audience_list_containing_ours_is_accepted(ring: Keyring) -> None:
    tok = forge(ring, claims_dict(aud=["billing", "console-proxy"]))
    assert token.verify(tok, ring, NOW).aud == ["billing", "console-proxy"]


def test_new_claims_window_and_validation() -> None:
    claims = make_claims(now=NOW + 0.9, ttl=90)
    assert (claims.iat, claims.nbf, claims.exp) == (NOW, NOW, NOW + 90)
    with pytest.raises(ValueError):
        make_claims(port=0)
    with pytest.raises(ValueError):
        make_claims(ttl=0)
    with pytest.raises(ValueError):
        make_claims(client_ip="not-an-address")


# --- minting refusals -----------------------------------------------------------------------------------------------


def test_mint_refuses_a_lifetime_above_the_keyrings_max(ring: Keyring) -> None:
    with pytest.raises(ValueError, match="max_ttl"):
        token.mint(make_claims(ttl=3601), ring)
    assert token.mint(make_claims(ttl=3600), ring)


def test_a_proxy_keyring_cannot_mint(ring: Keyring) -> None:
    with pytest.raises(KeyringError):
        token.mint(make_claims(), ring.for_proxy())


def test_mint_refuses_a_token_every_proxy_would_refuse_as_too_long(ring: Keyring) -> None:
    with pytest.raises(ValueError, match="limit"):
        token.mint(make_claims(tls={"ca": "A" * 6000, "require": True}), ring)
    ok = token.mint(make_claims(tls={"ca": "A" * 3000, "require": True}), ring)
    assert len(ok) <= MAX_TOKEN_LENGTH
    assert token.verify(ok, ring, NOW).tls == {"ca": "A" * 3000, "require": True}


# --- time edges (the core takes `now`) ------------------------------------------------------------------------------


@pytest.mark.parametrize("skew", [0, 30, 120])
def test_expiry_edge(ring: Keyring, skew: int) -> None:
    claims = make_claims(ttl=60)
    tok = token.mint(claims, ring)
    edge = claims.exp + skew
    assert token.verify(tok, ring, edge - 1, skew=skew) == claims
    assert token.verify(tok, ring, edge - 0.001, skew=skew) == claims
    for late in (edge, edge + 0.001, edge + 1):
        exc = refused(tok, ring, late, skew=skew)
        assert (exc.reason, exc.code, exc.status) == ("expired", "token_expired", 401)
        assert exc.claims == claims


@pytest.mark.parametrize("skew", [0, 30, 120])
def test_not_before_edge(ring: Keyring, skew: int) -> None:
    claims = make_claims(ttl=60)
    tok = token.mint(claims, ring)
    edge = claims.nbf - skew
    assert token.verify(tok, ring, edge, skew=skew) == claims
    assert token.verify(tok, ring, edge + 0.001, skew=skew) == claims
    for early in (edge - 0.001, edge - 1):
        exc = refused(tok, ring, early, skew=skew)
        assert (exc.reason, exc.code, exc.status) == ("not_yet_valid", "token_not_yet_valid", 401)
        assert exc.claims == claims


def test_default_skew_is_30_seconds(ring: Keyring) -> None:
    claims = make_claims(ttl=60)
    tok = token.mint(claims, ring)
    assert token.verify(tok, ring, claims.exp + 29.999)
    assert refused(tok, ring, claims.exp + 30).reason == "expired"
    assert token.verify(tok, ring, claims.nbf - 30)
    assert refused(tok, ring, claims.nbf - 30.001).reason == "not_yet_valid"


def test_clock_now_follows_freezegun(ring: Keyring) -> None:
    claims = make_claims(ttl=60)
    tok = token.mint(claims, ring)
    with freeze_time("2023-11-14 22:14:49.999") as frozen:  # NOW + 60 + 30 - 0.001
        assert clock.now() == pytest.approx(claims.exp + 30 - 0.001)
        assert token.verify(tok, ring, clock.now()) == claims
        frozen.tick(0.001)
        assert clock.now() == claims.exp + 30
        assert refused(tok, ring, clock.now()).reason == "expired"


# --- refusals in DESIGN order ---------------------------------------------------------------------------------------


REASONS = {reason.value: (reason.refused, reason.refused.status) for reason in token.Reason}


def test_reason_table_in_design_order() -> None:
    """Each precise reason owns its public code, and through it the status and the message."""
    assert list(REASONS) == [
        "too_long",
        "malformed",
        "unknown_fleet_key",
        "decrypt_failed",
        "unknown_signing_key",
        "bad_signature",
        "wrong_audience",
        "bad_claims",
        "lifetime_too_long",
        "expired",
        "not_yet_valid",
        "client_ip_mismatch",
    ]
    assert {r: REASONS[r] for r in ("expired", "not_yet_valid", "client_ip_mismatch")} == {
        "expired": ("token_expired", 401),
        "not_yet_valid": ("token_not_yet_valid", 401),
        "client_ip_mismatch": ("client_ip_mismatch", 403),
    }
    for reason, (code, status) in REASONS.items():
        exc = TokenRefused(token.Reason(reason))
        assert (exc.code, exc.status) == (code, status)
        assert exc.public_message == token.PUBLIC_MESSAGES[code]
    assert all(REASONS[r] == ("token_invalid", 401) for r in list(REASONS)[:9])


class _NoCrypto:
    @staticmethod
    def new(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("crypto ran")

    @staticmethod
    def open(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("crypto ran")


def test_too_long_is_refused_before_any_crypto(ring: Keyring, monkeypatch: pytest.MonkeyPatch) -> None:
    valid = token.mint(make_claims(), ring)
    long_token = valid + "A" * (MAX_TOKEN_LENGTH + 1 - len(valid))
    assert len(long_token) == MAX_TOKEN_LENGTH + 1
    monkeypatch.setattr(FleetKey, "open", _NoCrypto.open)
    monkeypatch.setattr(token.b64url, "decode", _NoCrypto.new)
    exc = refused(long_token, ring)
    assert (exc.reason, exc.code, exc.status) == ("too_long", "token_invalid", 401)
    assert refused("x" * 100_000, ring).reason == "too_long"
    assert str(exc).startswith("too_long") and long_token not in str(exc)


def test_exactly_max_length_passes_the_length_check(ring: Keyring) -> None:
    valid = token.mint(make_claims(), ring)
    padded = valid + "A" * (MAX_TOKEN_LENGTH - len(valid))
    assert len(padded) == MAX_TOKEN_LENGTH
    assert refused(padded, ring).reason != "too_long"


def _replace_segment(tok: str, index: int, value: str) -> str:
    pieces = tok.split(".")
    pieces[index] = value
    return ".".join(pieces)


def _outer_malformations(ring: Keyring) -> list[Any]:
    valid = token.mint(make_claims(), ring)
    fleet = fleet_key(ring)
    jws = decrypt_inner(valid, ring)

    def header(**changes: Any) -> str:
        data: dict[str, Any] = {"alg": "dir", "enc": "A256GCM", "kid": fleet.kid, "cty": "JWT"}
        data.update(changes)
        return encrypt(jws, key=fleet.key, kid=fleet.kid, header={k: v for k, v in data.items() if v is not None})

    return [
        None,
        b"bytes." + valid.encode(),
        42,
        "",
        ".",
        "....",
        "a.b.c",
        valid + ".",
        "." + valid,
        valid.replace(".", "..", 1),  # empty key part moved: six parts
        _replace_segment(valid, 1, "AAAA"),  # a non-empty encrypted key
        _replace_segment(valid, 0, valid.split(".")[0] + "="),  # padding
        _replace_segment(valid, 0, "not base64!"),
        _replace_segment(valid, 0, b64url.encode(b"not json")),
        _replace_segment(valid, 0, b64url.encode(b"[1,2]")),
        _replace_segment(valid, 0, b64url.encode(b"\xff\xfe")),
        _replace_segment(valid, 2, b64url.encode(b"\x00" * 8)),  # 64-bit IV
        _replace_segment(valid, 2, b64url.encode(b"\x00" * 16)),
        _replace_segment(valid, 4, b64url.encode(b"\x00" * 12)),  # short tag
        _replace_segment(valid, 3, ""),  # empty ciphertext
        header(alg="A256KW"),
        header(alg="none"),
        header(enc="A128GCM"),
        header(enc="A256CBC-HS512"),
        header(cty=None),
        header(cty="jwt"),
        header(kid=None),
        header(kid=7),
        header(kid=[fleet.kid]),
        header(zip="DEF"),
        header(typ="JWT"),
        header(crit=["exp"]),
        encrypt(
            jws,
            key=fleet.key,
            kid=fleet.kid,  # duplicate member: which kid counts?
            header=b'{"alg":"dir","enc":"A256GCM","kid":"x","kid":"%s","cty":"JWT"}' % fleet.kid.encode(),
        ),
    ]


def test_malformed_outer_tokens(ring: Keyring) -> None:
    for bad in _outer_malformations(ring):
        exc = refused(bad, ring)
        assert (exc.reason, exc.code, exc.status) == ("malformed", "token_invalid", 401), bad
        assert exc.claims is None


def test_malformed_outer_tokens_never_reach_aes(ring: Keyring, monkeypatch: pytest.MonkeyPatch) -> None:
    cases = _outer_malformations(ring)
    monkeypatch.setattr(FleetKey, "open", _NoCrypto.open)
    for bad in cases:
        assert refused(bad, ring).reason == "malformed"


@pytest.mark.parametrize(
    "inner",
    [
        "only.two",
        "a.b.c.d",
        "\u00e9.b.c".encode(),  # not ASCII
        b"\xff\xff",  # not even UTF-8
        "!!!.e30.AAAA",  # header not base64url
        b64url.encode(b"{") + ".e30.AAAA",  # header not JSON
        b64url.encode(b'{"alg":"EdDSA","kid":"k"}') + ".e30.AA=A",  # signature not canonical
    ],
)
def test_malformed_inner_tokens(ring: Keyring, inner: str | bytes) -> None:
    fleet = fleet_key(ring)
    exc = refused(encrypt(inner, key=fleet.key, kid=fleet.kid), ring)
    assert exc.reason == "malformed"


@pytest.mark.parametrize(
    "jws_header",
    [
        {"alg": "none", "kid": "SIGNER"},
        {"alg": "HS256", "kid": "SIGNER"},
        {"alg": "ES256", "kid": "SIGNER"},
        {"alg": "eddsa", "kid": "SIGNER"},
        {"alg": "EdDSA"},
        {"alg": "EdDSA", "kid": 1},
        {"alg": "EdDSA", "kid": "SIGNER", "typ": "JWT"},
        {"alg": "EdDSA", "kid": "SIGNER", "jwk": {"kty": "OKP"}},
        {"kid": "SIGNER"},
        ["EdDSA", "SIGNER"],
    ],
)
def test_unexpected_jws_headers_are_malformed(ring: Keyring, jws_header: Any) -> None:
    kid = signing_key(ring).kid
    jws_header = json.loads(json.dumps(jws_header).replace("SIGNER", kid))
    exc = refused(forge(ring, claims_dict(), jws_header=jws_header), ring)
    assert exc.reason == "malformed"


def test_alg_none_with_empty_signature_is_refused(ring: Keyring) -> None:
    kid = signing_key(ring).kid
    unsigned = (
        b64url.encode(json.dumps({"alg": "none", "kid": kid}).encode())
        + "."
        + b64url.encode(json.dumps(claims_dict()).encode())
        + "."
    )
    fleet = fleet_key(ring)
    assert refused(encrypt(unsigned, key=fleet.key, kid=fleet.kid), ring).reason == "malformed"


def test_hs256_signed_with_the_public_key_is_refused(ring: Keyring) -> None:
    import hashlib
    import hmac

    kid = signing_key(ring).kid
    signing_input = (
        b64url.encode(json.dumps({"alg": "HS256", "kid": kid}).encode())
        + "."
        + b64url.encode(json.dumps(claims_dict()).encode())
    )
    mac = hmac.new(signing_key(ring).public, signing_input.encode(), hashlib.sha256).digest()
    fleet = fleet_key(ring)
    tok = encrypt(signing_input + "." + b64url.encode(mac), key=fleet.key, kid=fleet.kid)
    assert refused(tok, ring).reason == "malformed"


def test_unknown_fleet_key(ring: Keyring) -> None:
    other = new_ring()
    exc = refused(token.mint(make_claims(), other), ring)
    assert (exc.reason, exc.code, exc.status) == ("unknown_fleet_key", "token_invalid", 401)
    fleet = fleet_key(ring)
    jws = decrypt_inner(token.mint(make_claims(), ring), ring)
    assert refused(encrypt(jws, key=fleet.key, kid=""), ring).reason == "unknown_fleet_key"
    assert refused(encrypt(jws, key=fleet.key, kid=signing_key(ring).kid), ring).reason == "unknown_fleet_key"


def test_decrypt_failed_with_another_key_under_the_same_kid(ring: Keyring) -> None:
    fleet = fleet_key(ring)
    impostor = Keyring(
        ring.signing, {fleet.kid: FleetKey(fleet.kid, secrets.token_bytes(32), NOW)}, ring.active_signing, fleet.kid
    )
    exc = refused(token.mint(make_claims(), impostor), ring)
    assert (exc.reason, exc.code, exc.status) == ("decrypt_failed", "token_invalid", 401)
    assert token.verify(token.mint(make_claims(), impostor), impostor, NOW)


def _flip(segment: str, index: int) -> str:
    raw = bytearray(b64url.decode(segment))
    raw[index] ^= 0x01
    return b64url.encode(bytes(raw))


@pytest.mark.parametrize("target", ["iv", "ciphertext_first", "ciphertext_last", "tag", "header_order"])
def test_decrypt_failed_on_tampering(ring: Keyring, target: str) -> None:
    valid = token.mint(make_claims(), ring)
    header, _, iv, ciphertext, tag = valid.split(".")
    if target == "iv":
        iv = _flip(iv, 0)
    elif target == "ciphertext_first":
        ciphertext = _flip(ciphertext, 0)
    elif target == "ciphertext_last":
        ciphertext = _flip(ciphertext, -1)
    elif target == "tag":
        tag = _flip(tag, 15)
    else:  # same members, same kid, another order: the AAD changed
        data = _header(header)
        header = b64url.encode(json.dumps(dict(reversed(list(data.items())))).encode())
    exc = refused(f"{header}..{iv}.{ciphertext}.{tag}", ring)
    assert exc.reason == "decrypt_failed"


def test_unknown_signing_key(ring: Keyring) -> None:
    stranger = ECC.generate(curve="ed25519").seed
    exc = refused(forge(ring, claims_dict(), signer=stranger, kid="sig-stranger"), ring)
    assert (exc.reason, exc.code, exc.status) == ("unknown_signing_key", "token_invalid", 401)
    # a fleet kid is not a signing kid
    assert refused(forge(ring, claims_dict(), kid=fleet_key(ring).kid), ring).reason == "unknown_signing_key"


def test_bad_signature_from_another_key_claiming_a_known_kid(ring: Keyring) -> None:
    stranger = ECC.generate(curve="ed25519").seed
    tok = forge(ring, claims_dict(), signer=stranger, kid=signing_key(ring).kid)
    exc = refused(tok, ring)
    assert (exc.reason, exc.code, exc.status) == ("bad_signature", "token_invalid", 401)
    assert exc.claims is None


@pytest.mark.parametrize("signature", [b"", b"\x00" * 64, b"\xff" * 64, b"\x01" * 63, b"\x01" * 65])
def test_bad_signature_values(ring: Keyring, signature: bytes) -> None:
    assert refused(forge(ring, claims_dict(), signature=signature), ring).reason == "bad_signature"


def test_bad_signature_when_the_payload_changed_after_signing(ring: Keyring) -> None:
    jws = decrypt_inner(token.mint(make_claims(), ring), ring)
    header, _, signature = jws.split(".")
    evil = b64url.encode(json.dumps(claims_dict(host="evil.example")).encode())
    fleet = fleet_key(ring)
    tok = encrypt(f"{header}.{evil}.{signature}", key=fleet.key, kid=fleet.kid)
    assert refused(tok, ring).reason == "bad_signature"


@pytest.mark.parametrize(
    "aud", [None, "console-proxy ", "Console-Proxy", "broker", ["broker"], [], 1, {"console-proxy": 1}]
)
def test_wrong_audience(ring: Keyring, aud: Any) -> None:
    exc = refused(forge(ring, claims_dict(aud=aud)), ring)
    assert (exc.reason, exc.code, exc.status) == ("wrong_audience", "token_invalid", 401)


BAD_CLAIMS: list[tuple[str, dict[str, Any]]] = [
    ("port 0", {"port": 0}),
    ("port 65536", {"port": 65536}),
    ("port -1", {"port": -1}),
    ("bool port", {"port": True}),
    ("string port", {"port": "5900"}),
    ("float port", {"port": 5900.0}),
    ("no port", {"port": None}),
    ("empty host", {"host": ""}),
    ("no host", {"host": None}),
    ("host with space", {"host": "a b"}),
    ("host with slash", {"host": "a/b"}),
    ("host with at", {"host": "u@h"}),
    ("host control", {"host": "h\x00"}),
    ("host int", {"host": 1}),
    ("long host", {"host": "h" * 254}),
    ("missing jti", {"jti": None}),
    ("short jti", {"jti": "A" * 21}),
    ("long jti", {"jti": "A" * 129}),
    ("int jti", {"jti": 12345678901234567890123}),
    ("missing iss", {"iss": None}),
    ("empty iss", {"iss": ""}),
    ("missing sid", {"sid": None}),
    ("string iat", {"iat": str(NOW)}),
    ("float exp", {"exp": NOW + 60.0}),
    ("bool nbf", {"nbf": True}),
    ("missing exp", {"exp": None}),
    ("negative iat", {"iat": -1}),
    ("nbf == exp", {"nbf": NOW + 60}),
    ("nbf > exp", {"nbf": NOW + 61}),
    ("nbf < iat", {"nbf": NOW - 1}),
    ("empty pw", {"pw": ""}),
    ("int pw", {"pw": 1234}),
    ("long pw", {"pw": "p" * 257}),
    ("string ro", {"ro": "yes"}),
    ("int once", {"once": 1}),
    ("null-like ro", {"ro": 0}),
    ("tls list", {"tls": ["ca"]}),
    ("tls extra member", {"tls": {"require": True, "verify": False}}),
    ("tls ca int", {"tls": {"ca": 1}}),
    ("tls require string", {"tls": {"require": "yes"}}),
    ("cip not an address", {"cip": "10.0.0.300"}),
    ("cip cidr", {"cip": "10.0.0.0/8"}),
    ("cip int", {"cip": 10}),
    ("vm int", {"vm": 1}),
    ("sub empty", {"sub": ""}),
    ("dn list", {"dn": ["x"]}),
    ("long dn", {"dn": "d" * 1025}),
    ("clip unknown word", {"clip": "all"}),
    ("clip upper case", {"clip": "BOTH"}),
    ("clip empty", {"clip": ""}),
    ("clip bool", {"clip": True}),
    ("clip list", {"clip": ["in", "out"]}),
]


@pytest.mark.parametrize(("name", "overrides"), BAD_CLAIMS, ids=[name for name, _ in BAD_CLAIMS])
def test_bad_claims(ring: Keyring, name: str, overrides: dict[str, Any]) -> None:
    data = claims_dict()
    for key, value in overrides.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    exc = refused(forge(ring, data), ring)
    assert (exc.reason, exc.code, exc.status) == ("bad_claims", "token_invalid", 401), name
    assert PASSWORD not in str(exc)


@pytest.mark.parametrize(
    "payload", [b"not json", b"[1,2,3]", b'"string"', b"\xff\xfe", b"", b'{"port":5901,"port":5902}', b"[" * 3000]
)
def test_bad_claims_payloads(ring: Keyring, payload: bytes) -> None:
    assert refused(forge(ring, payload), ring).reason == "bad_claims"


def test_duplicate_claim_members_are_refused_even_if_both_valid(ring: Keyring) -> None:
    data = claims_dict()
    text = json.dumps(data)[:-1] + ', "host": "evil.example"}'
    assert refused(forge(ring, text.encode()), ring).reason == "bad_claims"


def test_boundary_claims_are_accepted(ring: Keyring) -> None:
    for overrides in (
        {"port": 1},
        {"port": 65535},
        {"jti": "A" * 22},
        {"jti": "A" * 128},
        {"host": "h" * 253},
        {"nbf": NOW + 59},
        {"host": "2001:db8::1"},
        {"unknown_member": 1},
    ):
        data = claims_dict(**overrides)
        assert token.verify(forge(ring, data), ring, NOW + 59)


def test_lifetime_too_long_against_the_keyrings_max_ttl(ring: Keyring) -> None:
    assert ring.max_ttl == 3600
    assert token.verify(forge(ring, claims_dict(exp=NOW + 3600)), ring, NOW)
    exc = refused(forge(ring, claims_dict(exp=NOW + 3601)), ring)
    assert (exc.reason, exc.code, exc.status) == ("lifetime_too_long", "token_invalid", 401)
    # iat is what counts, not nbf
    assert refused(forge(ring, claims_dict(iat=NOW - 3001, nbf=NOW, exp=NOW + 600)), ring).reason == (
        "lifetime_too_long"
    )


def test_lifetime_too_long_against_an_explicit_max_ttl(ring: Keyring) -> None:
    tok = token.mint(make_claims(ttl=120), ring)
    assert token.verify(tok, ring, NOW, max_ttl=120)
    assert refused(tok, ring, max_ttl=119).reason == "lifetime_too_long"
    longer = forge(ring, claims_dict(exp=NOW + 7200))
    assert refused(longer, ring).reason == "lifetime_too_long"
    assert token.verify(longer, ring, NOW, max_ttl=7200).exp == NOW + 7200


def test_client_ip_binding(ring: Keyring) -> None:
    tok = token.mint(make_claims(client_ip="10.0.0.1"), ring)
    assert token.verify(tok, ring, NOW, client_ip="10.0.0.1").cip == "10.0.0.1"
    assert token.verify(tok, ring, NOW, client_ip="::ffff:10.0.0.1")
    for other in ("10.0.0.2", None, "", "garbage", "::1", "10.0.0.1 ", "10.0.0.1/32"):
        exc = refused(tok, ring, client_ip=other)
        assert (exc.reason, exc.code, exc.status) == ("client_ip_mismatch", "client_ip_mismatch", 403), other
        assert exc.claims is not None and exc.claims.cip == "10.0.0.1"


def test_client_ip_mapped_in_the_token_and_ipv6_spellings(ring: Keyring) -> None:
    mapped = forge(ring, claims_dict(cip="::ffff:10.0.0.1"))
    assert token.verify(mapped, ring, NOW, client_ip="10.0.0.1").cip == "10.0.0.1"
    v6 = forge(ring, claims_dict(cip="2001:DB8:0:0::1"))
    assert token.verify(v6, ring, NOW, client_ip="2001:db8::1")
    assert refused(v6, ring, client_ip="2001:db8::2").reason == "client_ip_mismatch"


def test_canonical_addresses_are_cached_and_refusals_never(ring: Keyring) -> None:
    # _canonical_ip is cached (a bound token parses two addresses): a hit answers as a miss did
    token._canonical_ip.cache_clear()
    spellings = {"10.0.0.1": "10.0.0.1", "::ffff:10.0.0.1": "10.0.0.1", "2001:DB8:0:0::1": "2001:db8::1", "::1": "::1"}
    for _ in range(2):
        assert {text: token._canonical_ip(text) for text in spellings} == spellings
    for bad in ("10.0.0.300", "garbage", "10.0.0.1/32", "", " 10.0.0.1"):
        for _ in range(2):
            with pytest.raises(ValueError):
                token._canonical_ip(bad)
    assert token._canonical_ip.cache_info().currsize == len(spellings)
    bad_cip = forge(ring, claims_dict(cip="10.0.0.300"))
    for _ in range(2):
        assert refused(bad_cip, ring, client_ip="10.0.0.300").reason == "bad_claims"
    bound = forge(ring, claims_dict(cip="::ffff:10.0.0.1"))
    for _ in range(2):
        assert token.verify(bound, ring, NOW, client_ip="10.0.0.1").cip == "10.0.0.1"
        assert refused(bound, ring, client_ip="10.0.0.2").reason == "client_ip_mismatch"


@settings(max_examples=200, deadline=None)
@given(st.ip_addresses())
def test_canonical_addresses_match_ipaddress(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    mapped = getattr(address, "ipv4_mapped", None)
    expected = str(mapped if mapped is not None else address)
    for spelling in (str(address), getattr(address, "exploded", str(address))):
        assert token._canonical_ip(spelling) == expected
        assert token._canonical_ip(spelling) == expected


def test_unbound_token_accepts_any_client(ring: Keyring) -> None:
    tok = token.mint(make_claims(), ring)
    for peer in (None, "10.9.9.9", "garbage"):
        assert token.verify(tok, ring, NOW, client_ip=peer)


# --- the order of the checks ----------------------------------------------------------------------------------------


def test_checks_run_in_design_order(ring: Keyring) -> None:
    stranger = ECC.generate(curve="ed25519").seed
    known_kid = signing_key(ring).kid
    late = NOW + 10_000
    # signature before audience and claims
    assert refused(forge(ring, claims_dict(aud="x", port=0), signer=stranger, kid=known_kid), ring).reason == (
        "bad_signature"
    )
    # audience before claim schema
    assert refused(forge(ring, claims_dict(aud="x", port=0)), ring).reason == "wrong_audience"
    # claim schema before time; the time members' schema also before lifetime
    assert refused(forge(ring, claims_dict(port=0)), ring, late).reason == "bad_claims"
    assert refused(forge(ring, claims_dict(iat=float(NOW), exp=NOW + 9999)), ring, late).reason == "bad_claims"
    # lifetime before time
    assert refused(forge(ring, claims_dict(exp=NOW + 9999)), ring, late + 9999).reason == "lifetime_too_long"
    # time before client IP
    bound = token.mint(make_claims(client_ip="10.0.0.1"), ring)
    assert refused(bound, ring, late, client_ip="10.0.0.2").reason == "expired"
    assert refused(bound, ring, NOW - 1000, client_ip="10.0.0.2").reason == "not_yet_valid"


# --- secrets never leak ---------------------------------------------------------------------------------------------


def test_masked_and_repr_hide_the_password(ring: Keyring) -> None:
    claims = full_claims()
    shown = claims.masked()
    assert shown["pw"] == "********"
    assert PASSWORD not in json.dumps(shown, ensure_ascii=False) and PASSWORD not in repr(shown)
    assert shown["tls"]["ca"].startswith("<") and shown["tls"]["require"] is True
    assert claims.tls is not None and "BEGIN" in claims.tls["ca"]  # masking did not change the claims
    assert PASSWORD not in repr(claims) and PASSWORD not in str(claims)
    assert "pw" not in make_claims(password=None).masked()
    assert set(shown) == set(DESIGN_CLAIMS)


def test_refusals_never_carry_the_password_or_the_token(ring: Keyring) -> None:
    tok = token.mint(make_claims(client_ip="10.0.0.1"), ring)
    cases = [
        refused(tok, ring, NOW + 10_000),
        refused(tok, ring, NOW - 1000),
        refused(tok, ring, client_ip="1.1.1.1"),
        refused(tok, ring, max_ttl=10),
        refused(tok[:-2], ring),
        refused(tok, new_ring()),
        refused(forge(ring, claims_dict(port=0)), ring),
        refused(tok + "A" * MAX_TOKEN_LENGTH, ring),
    ]
    for exc in cases:
        for text in (str(exc), repr(exc), exc.detail, exc.public_message, repr(exc.args), repr(exc.claims)):
            assert PASSWORD not in text and tok[:40] not in text and tok[-40:] not in text


def test_refused_claims_only_for_authentic_tokens(ring: Keyring) -> None:
    tok = token.mint(make_claims(), ring)
    assert refused(tok, ring, NOW + 10_000).claims is not None
    assert refused(tok, ring, max_ttl=5).claims is None
    assert refused(forge(ring, claims_dict(aud="x")), ring).claims is None


def test_verification_does_not_need_the_private_key(ring: Keyring) -> None:
    proxy = ring.for_proxy()
    claims = make_claims()
    assert token.verify(token.mint(claims, ring), proxy, NOW) == claims
    assert not proxy.can_mint
    assert all(key.seed is None for key in proxy.signing.values())


def test_retired_fleet_and_signing_keys_fail_closed(ring: Keyring) -> None:
    tok = token.mint(make_claims(), ring)
    sig, fleet = ring.minting_keys()
    no_fleet = replace(ring, fleet={fleet.kid: replace(fleet, verify_until=NOW)})
    assert refused(tok, no_fleet).reason == "unknown_fleet_key"
    no_sig = replace(ring, signing={sig.kid: replace(sig, verify_until=NOW)})
    assert refused(tok, no_sig).reason == "unknown_signing_key"
    assert token.verify(tok, no_sig, NOW - 1)


def test_openssl_codec_agrees_with_an_independent_implementation(ring: Keyring) -> None:
    # the codec runs on OpenSSL (cryptography); pycryptodome opens and checks what it minted
    from Crypto.Signature import eddsa

    header_b64, _, iv_b64, ct_b64, tag_b64 = token.mint(make_claims(), ring).split(".")
    cipher = AES.new(fleet_key(ring).key, AES.MODE_GCM, nonce=b64url.decode(iv_b64))
    cipher.update(header_b64.encode("ascii"))
    jws = cipher.decrypt_and_verify(b64url.decode(ct_b64), b64url.decode(tag_b64))
    signing_input, _, signature = jws.rpartition(b".")
    eddsa.new(eddsa.import_public_key(signing_key(ring).public), "rfc8032").verify(
        signing_input, b64url.decode(signature.decode("ascii"))
    )
    seed = ECC.generate(curve="ed25519").seed
    stranger = eddsa.new(eddsa.import_private_key(seed), "rfc8032")
    assert not signing_key(ring).verify(signing_input, stranger.sign(signing_input))
    assert FleetKey(kid="k", key=bytes(32), created=0).open(bytes(12), b"x", bytes(16), b"") is None


def test_key_objects_are_built_once_per_key_not_per_token(ring: Keyring, monkeypatch: pytest.MonkeyPatch) -> None:
    from console_proxy import keyring

    proxy_ring = ring.for_proxy()
    tokens = [token.mint(make_claims(), ring) for _ in range(3)]
    monkeypatch.setattr(keyring, "AESGCM", _NoCrypto.new)
    monkeypatch.setattr(keyring.Ed25519PublicKey, "from_public_bytes", _NoCrypto.new)
    monkeypatch.setattr(keyring.Ed25519PrivateKey, "from_private_bytes", _NoCrypto.new)
    assert [token.verify(tok, proxy_ring, NOW).host for tok in tokens] == ["10.1.2.3"] * 3
    assert token.verify(token.mint(make_claims(), ring), proxy_ring, NOW)


def test_checked_claims_equal_the_dataclass_built_ones(ring: Keyring) -> None:
    # check_claims builds Claims without the generated __init__ (per-open cost): same object
    for claims in (make_claims(), full_claims()):
        verified = token.verify(token.mint(claims, ring), ring, NOW, client_ip=claims.cip)
        rebuilt = token.Claims(**{name: getattr(verified, name) for name in token.Claims.__dataclass_fields__})
        assert verified == rebuilt == claims and repr(verified) == repr(rebuilt)
        with pytest.raises(AttributeError):
            verified.host = "elsewhere"  # type: ignore[misc]
