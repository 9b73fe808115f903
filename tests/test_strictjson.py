"""Strict JSON's fast path refuses exactly what the full walk refuses, with the same message.

:func:`strictjson.loads` skips its tree walk (lone surrogates, nesting depth) when the text shows
that the walk cannot fail, and calls the C scanner without :meth:`json.JSONDecoder.decode`'s
wrapper. Both are speed only: these tests hold ``loads`` to a reference that always takes the slow
road (the decoder's own ``decode``, then the walk on every value), on arbitrary JSON text that
leans on each rule (surrogate escapes in any case, paired and not, brackets inside strings,
nesting around the limit, whitespace, extra data, duplicates, big numbers).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from console_proxy import strictjson


def reference(raw: bytes) -> Any:
    """``strictjson.loads`` as it was before the fast paths: decode, then walk every value."""
    try:
        value = strictjson._DECODER.decode(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("not valid JSON: not UTF-8") from None
    except RecursionError:
        raise ValueError(f"not valid JSON: arrays and objects nest deeper than {strictjson.MAX_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc.msg} at character {exc.pos}") from None
    except ValueError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    try:
        strictjson._check_tree(value)
    except strictjson._Invalid as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    return value


def outcome(load: Any, raw: bytes) -> tuple[str, Any]:
    """What ``load`` makes of ``raw``: ("value", the value) or ("refused", the message)."""
    try:
        return "value", load(raw)
    except ValueError as exc:
        return "refused", str(exc)


def assert_same(raw: bytes) -> None:
    assert outcome(strictjson.loads, raw) == outcome(reference, raw), raw


SURROGATE_ESCAPES = ("\\ud800", "\\uD800", "\\udBfF", "\\uDC00", "\\udfff", "\\ud83d\\ude00", "\\ud83d\\ud83d")
"""Lone (either case, low and high) and paired surrogate escapes, and a pair of two highs."""
PIECES = (
    *SURROGATE_ESCAPES,
    "\\\\ud800",  # an escaped backslash, then the letters: not a surrogate, yet matches "\\u"
    "\\u00e9",
    "\\ud7ff",
    "\\ue000",
    "[",
    "{",
    "]",
    "}",
    "é",
    "a",
    " ",
)
string_bodies = st.lists(st.sampled_from(PIECES), max_size=8).map("".join)
json_strings = string_bodies.map(lambda body: f'"{body}"')
scalars = st.one_of(
    json_strings,
    st.sampled_from(["1", "-0", "9223372036854775807", "9223372036854775808", "-9223372036854775809", "1e400"]),
    st.sampled_from(["1.5", "true", "null", "NaN", "-Infinity", "123456789012345678", "-12345678901234567"]),
)


def containers(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    arrays = st.lists(inner, max_size=4).map(lambda items: "[" + ",".join(items) + "]")
    objects = st.lists(st.tuples(json_strings, inner), max_size=4).map(
        lambda members: "{" + ",".join(f"{k}:{v}" for k, v in members) + "}"
    )
    return st.one_of(arrays, objects)


def nested(depth: int, core: str) -> str:
    return "[" * depth + core + "]" * depth


json_texts = st.one_of(
    st.recursive(scalars, containers, max_leaves=12),
    st.builds(nested, st.integers(0, 40), st.recursive(scalars, containers, max_leaves=4)),
    st.builds(lambda d, body: '{"a":' + nested(d, f'"{body}"') + "}", st.integers(0, 40), string_bodies),
)
framed = st.builds(
    lambda before, text, after: before + text + after,
    st.sampled_from(["", " ", "\n\t", "x"]),
    json_texts,
    st.sampled_from(["", " ", "\r\n", ",", "]", " 1", "x"]),
)


@settings(max_examples=600, deadline=None, derandomize=True)
@given(framed)
def test_loads_agrees_with_the_full_walk_on_arbitrary_text(text: str) -> None:
    assert_same(text.encode("utf-8"))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.binary(max_size=60))
def test_loads_agrees_with_the_full_walk_on_arbitrary_bytes(raw: bytes) -> None:
    assert_same(raw)


@pytest.mark.parametrize("escape", ["\\ud800", "\\uD800", "\\uDbFf", "\\udc00", "\\uDFFF", "\\ud83d\\ud83d"])
@pytest.mark.parametrize("where", ['"{}"', '{{"{}": 1}}', '[1, "x{}y"]', '{{"a": [[{{"b": "{}"}}]]}}'])
def test_every_lone_surrogate_escape_is_refused(escape: str, where: str) -> None:
    with pytest.raises(ValueError, match="lone surrogate"):
        strictjson.loads(where.format(escape).encode("ascii"))


@pytest.mark.parametrize("text", ['"\\ud83d\\ude00"', '"\\\\ud800"', '"\\ud7ff\\ue000"', '"\\u00e9"'])
def test_escapes_that_are_no_lone_surrogate_are_kept(text: str) -> None:
    assert strictjson.loads(text.encode("ascii")) == json.loads(text)


def test_nesting_is_refused_from_one_level_past_the_limit() -> None:
    limit = strictjson.MAX_DEPTH
    assert strictjson.loads(nested(limit, "").encode()) == json.loads(nested(limit, ""))
    assert strictjson.loads(nested(limit - 1, "{}").encode()) == json.loads(nested(limit - 1, "{}"))
    for deep in (nested(limit + 1, ""), nested(limit + 1, "1"), nested(limit, "{}"), nested(limit, '{"a":"b"}')):
        with pytest.raises(ValueError, match="nest deeper"):
            strictjson.loads(deep.encode())
    objects = '{"a":' * (limit + 1) + "1" + "}" * (limit + 1)
    with pytest.raises(ValueError, match="nest deeper"):
        strictjson.loads(objects.encode())


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    text = '{"a": "' + "[{" * 100 + '", "b": ["' + "]" * 100 + '"]}'
    assert strictjson.loads(text.encode()) == json.loads(text)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b'{"a": 1, "a": 2}', "duplicate"),
        (b'{"a": {"b": 1, "b": 1}}', "duplicate"),
        (b"9223372036854775808", "64-bit range"),
        (b"-9223372036854775809", "64-bit range"),
        (b"[1e400]", "too large"),
        (b"[NaN]", "NaN"),
        (b'{"a": 1} x', "Extra data at character 9"),
        (b'{"a": 1}{}', "Extra data at character 8"),
        (b" ", "Expecting value at character 1"),
        (b"", "Expecting value at character 0"),
        (b"x", "Expecting value at character 0"),
        (b'{"a": }', "Expecting value at character 6"),
    ],
)
def test_every_rule_still_refuses(raw: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        strictjson.loads(raw)
    assert_same(raw)


@pytest.mark.parametrize(
    "raw", [b' {"a": 1} ', b"\n[1]\r\n", b"0", b"-9223372036854775808", b"123456789012345678", b'"x"\t']
)
def test_whitespace_around_a_value_and_bounded_numbers_are_kept(raw: bytes) -> None:
    assert strictjson.loads(raw) == json.loads(raw)
