"""Property tests: any change to a valid token is refused with TokenRefused, and nothing else escapes.

Every test first checks its starting token is accepted, so a refusal proves the change was caught.
"""

from __future__ import annotations

import string

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from token_fixtures import NOW, decrypt_inner, encrypt, fleet_key, full_claims, make_claims, new_ring

from console_proxy import b64url, token
from console_proxy.token import TokenRefused

RING = new_ring()
TOKENS = [
    token.mint(make_claims(), RING),
    token.mint(make_claims(password=None, ttl=1), RING),
    token.mint(full_claims(), RING),
]
B64 = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
BOUNDED = settings(max_examples=200, deadline=None)


def accepted(tok: str) -> token.Claims:
    return token.verify(tok, RING, NOW, client_ip="192.0.2.44")


def assert_refused(candidate: object) -> TokenRefused:
    try:
        token.verify(candidate, RING, NOW, client_ip="192.0.2.44")  # type: ignore[arg-type]
    except TokenRefused as exc:
        assert exc.reason in set(token.Reason) and exc.code and exc.status in (401, 403)
        return exc
    pytest.fail("a changed token was accepted")


def test_starting_tokens_are_valid() -> None:
    for tok in TOKENS:
        assert accepted(tok)


tokens = st.sampled_from(TOKENS)


@BOUNDED
@given(tokens, st.data())
def test_every_truncation_is_refused(tok: str, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(tok) - 1))
    assert_refused(tok[:cut])
    assert_refused(tok[cut + 1 :])


def test_every_truncation_of_one_token_exhaustively() -> None:
    tok = TOKENS[0]
    for cut in range(len(tok)):
        assert_refused(tok[:cut])


@BOUNDED
@given(tokens, st.data())
def test_single_bit_flips_are_refused(tok: str, data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(tok) - 1))
    bit = data.draw(st.integers(0, 7))
    flipped = tok[:index] + chr(ord(tok[index]) ^ (1 << bit)) + tok[index + 1 :]
    assert_refused(flipped)


@BOUNDED
@given(tokens, st.integers(0, 4), st.integers(0, 4))
def test_segment_swaps_are_refused(tok: str, i: int, j: int) -> None:
    segments = tok.split(".")
    assume(segments[i] != segments[j])
    segments[i], segments[j] = segments[j], segments[i]
    assert_refused(".".join(segments))


@BOUNDED
@given(tokens, st.integers(0, 4), st.integers(0, 5))
def test_segment_duplication_and_removal_are_refused(tok: str, i: int, j: int) -> None:
    segments = tok.split(".")
    duplicated = [*segments[:j], segments[i], *segments[j:]]
    assert_refused(".".join(duplicated))
    assert_refused(".".join(segments[:i] + segments[i + 1 :]))


@BOUNDED
@given(tokens, st.sampled_from([0, 2, 3, 4]), st.integers(1, 3))
def test_padding_is_refused(tok: str, index: int, pad: int) -> None:
    segments = tok.split(".")
    segments[index] += "=" * pad
    assert_refused(".".join(segments))


@BOUNDED
@given(tokens, st.sampled_from([0, 2, 3, 4]), st.sampled_from([("-", "+"), ("_", "/"), ("-_", "+/")]))
def test_standard_alphabet_is_refused(tok: str, index: int, swap: tuple[str, str]) -> None:
    segments = tok.split(".")
    changed = segments[index].translate(str.maketrans(*swap))
    assume(changed != segments[index])
    segments[index] = changed
    assert_refused(".".join(segments))


@pytest.mark.parametrize("tok", TOKENS)
def test_standard_alphabet_everywhere_is_refused(tok: str) -> None:
    changed = tok.translate(str.maketrans("-_", "+/"))
    if changed != tok:
        assert_refused(changed)


@BOUNDED
@given(tokens, st.sampled_from([0, 2, 3, 4]), st.integers(1, 15))
def test_trailing_bit_variants_of_each_segments_last_character_are_refused(tok: str, index: int, delta: int) -> None:
    segments = tok.split(".")
    segment = segments[index]
    unused_bits = {2: 4, 3: 2}.get(len(segment) % 4, 0)
    assume(unused_bits and delta < (1 << unused_bits))
    value = B64.index(segment[-1])
    variant = B64[value ^ delta]  # same significant bits, other trailing bits
    assert (B64.index(variant) >> unused_bits) == (value >> unused_bits)
    segments[index] = segment[:-1] + variant
    exc = assert_refused(".".join(segments))
    assert exc.reason == "malformed"


@pytest.mark.parametrize("tok", TOKENS)
def test_all_trailing_bit_variants_exhaustively(tok: str) -> None:
    for index in (0, 2, 3, 4):
        segments = tok.split(".")
        unused_bits = {2: 4, 3: 2}.get(len(segments[index]) % 4, 0)
        value = B64.index(segments[index][-1])
        for delta in range(1, 1 << unused_bits):
            changed = list(segments)
            changed[index] = segments[index][:-1] + B64[value ^ delta]
            assert assert_refused(".".join(changed)).reason == "malformed"


@BOUNDED
@given(tokens, st.text(min_size=1, max_size=40))
@example(TOKENS[0], "=")
@example(TOKENS[0], ".")
@example(TOKENS[0], "\n")
@example(TOKENS[0], "A")
@example(TOKENS[0], "AA")
def test_appended_data_is_refused(tok: str, extra: str) -> None:
    assert_refused(tok + extra)
    assert_refused(extra + tok)


@BOUNDED
@given(tokens, st.integers(0, 4), st.text(alphabet=B64, min_size=1, max_size=8))
def test_appended_base64_inside_a_segment_is_refused(tok: str, index: int, extra: str) -> None:
    segments = tok.split(".")
    segments[index] += extra
    assert_refused(".".join(segments))


@BOUNDED
@given(st.text(max_size=300))
@example("")
@example("....")
@example("e30..AAAAAAAAAAAAAAAA.AA.AAAAAAAAAAAAAAAAAAAAAA")
def test_arbitrary_text_is_refused(text: str) -> None:
    assert_refused(text)


segment_text = st.one_of(st.text(alphabet=B64, max_size=40), st.text(max_size=12))


@BOUNDED
@given(st.lists(segment_text, min_size=5, max_size=5))
def test_arbitrary_five_segment_strings_are_refused(segments: list[str]) -> None:
    assert_refused(".".join(segments))


@BOUNDED
@given(st.lists(segment_text, min_size=5, max_size=5), st.binary(min_size=1, max_size=64))
def test_five_segment_strings_with_the_real_header_are_refused(segments: list[str], ciphertext: bytes) -> None:
    real = TOKENS[0].split(".")
    segments[0], segments[1] = real[0], ""
    assert_refused(".".join(segments))
    # well-formed all the way to AES-GCM: only the authentication can catch it
    exc = assert_refused(".".join((real[0], "", real[2], b64url.encode(ciphertext), real[4])))
    assert exc.reason == "decrypt_failed"


@BOUNDED
@given(st.data())
def test_changes_to_the_inner_jws_under_a_valid_encryption_are_refused(data: st.DataObject) -> None:
    """Reach the signature and claim checks: mangle the JWS, then encrypt it properly again."""
    jws = decrypt_inner(data.draw(tokens), RING)
    kind = data.draw(st.sampled_from(["flip", "truncate", "append", "swap"]))
    if kind == "flip":
        index = data.draw(st.integers(0, len(jws) - 1))
        changed = jws[:index] + chr(ord(jws[index]) ^ (1 << data.draw(st.integers(0, 6)))) + jws[index + 1 :]
    elif kind == "truncate":
        changed = jws[: data.draw(st.integers(1, len(jws) - 1))]
    elif kind == "append":
        changed = jws + data.draw(st.text(alphabet=B64 + ".=", min_size=1, max_size=10))
    else:
        segments = jws.split(".")
        i, j = data.draw(st.integers(0, 2)), data.draw(st.integers(0, 2))
        assume(i != j)
        segments[i], segments[j] = segments[j], segments[i]
        changed = ".".join(segments)
    assume(changed != jws)
    fleet = fleet_key(RING)
    exc = assert_refused(encrypt(changed, key=fleet.key, kid=fleet.kid))
    assert exc.reason in ("malformed", "unknown_signing_key", "bad_signature")
