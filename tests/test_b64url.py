"""Strict base64url: exactly one accepted spelling per byte string."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from console_proxy import b64url


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=80))
def test_roundtrip_and_matches_stdlib_without_padding(data: bytes) -> None:
    text = b64url.encode(data)
    assert "=" not in text and "+" not in text and "/" not in text
    assert text == base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")
    assert b64url.decode(text) == data


@pytest.mark.parametrize(
    ("text", "data"),
    [("", b""), ("AA", b"\x00"), ("AAA", b"\x00\x00"), ("-_8", b"\xfb\xff"), ("AAAA", b"\x00\x00\x00")],
)
def test_known_values(text: str, data: bytes) -> None:
    assert b64url.decode(text) == data
    assert b64url.encode(data) == text


@pytest.mark.parametrize(
    "text",
    [
        "AA==",  # padding
        "AAA=",
        "A",  # impossible length
        "AAAAA",
        "+_8",  # standard alphabet
        "-/8",
        "AB",  # non-zero trailing bits (the canonical spelling of b"\x00" is "AA")
        "AAB",  # likewise for two bytes
        "A A",  # whitespace
        "AA\n",
        "\nAA",
        "AA.A",
        "A*A",
        "\u00c0AA",  # non-ASCII
        "AA\x00",
    ],
)
def test_non_canonical_spellings_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        b64url.decode(text)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=40), st.data())
def test_every_other_spelling_of_the_last_character_is_refused(data: bytes, draw: st.DataObject) -> None:
    text = b64url.encode(data)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    other = draw.draw(st.sampled_from(alphabet).filter(lambda ch: ch != text[-1]))
    changed = text[:-1] + other
    try:
        decoded = b64url.decode(changed)
    except ValueError:
        return
    assert decoded != data  # a different character may only ever mean different bytes


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_arbitrary_text_decodes_only_if_canonical(text: str) -> None:
    try:
        data = b64url.decode(text)
    except ValueError:
        return
    assert b64url.encode(data) == text


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=40), st.binary(max_size=12).map(b64url.encode).map(str.encode)))
def test_bytes_decode_exactly_as_their_ascii_text(raw: bytes) -> None:
    # a token's inner parts are decoded as bytes: the same answer as for the text, byte for byte
    def outcome(value: str | bytes) -> bytes | str:
        try:
            return b64url.decode(value)
        except ValueError:
            return "refused"

    as_text = outcome(raw.decode("ascii")) if raw.isascii() else "refused"
    assert outcome(raw) == as_text


@pytest.mark.parametrize("raw", [b"AB", b"AAB", b"AA==", b"\xc3\x80AA", b"AA\x00", b"+_8", b"AA\x80A"])
def test_non_canonical_bytes_are_refused(raw: bytes) -> None:
    with pytest.raises(ValueError):
        b64url.decode(raw)


def test_other_types_are_a_type_error() -> None:
    for value in (bytearray(b"AA"), memoryview(b"AA"), ["A", "A"]):
        with pytest.raises(TypeError):
            b64url.decode(value)  # type: ignore[arg-type]
