"""Strict JSON for input we did not write: UTF-8, no duplicate members, only values every part can hold.

Python's ``json`` keeps the last of duplicate members and accepts NaN; two parsers that disagree
on such input are a classic way to make a check and a use see different values. It also accepts
what the rest of the program cannot carry, and each of those once surfaced as a 500 deep inside
a handler: a lone surrogate (``"\\ud800"``: a str that cannot be encoded as UTF-8, so SQLite and
every encoder refuse it), an integer of thousands of digits (``float()`` overflows), a float
that rounds to infinity (``1e400``), and nesting deep enough to exhaust the stack. They are
refused here, at the one door all untrusted JSON comes through (the I-JSON profile, RFC 7493,
with integers bounded to 64 bits), so no check further in needs to think of them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

MAX_DEPTH = 32
"""Deepest nesting of arrays and objects accepted; nothing we read needs more than a few levels."""
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
"""Integers outside a signed 64-bit range are refused (SQLite's integers are 64-bit)."""
_INT_DIGITS = len(str(INT_MAX))
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
"""Where a lone surrogate can come from: the text itself is decoded from strict UTF-8, which
cannot hold one, so only a ``\\uD800``-``\\uDFFF`` escape can put one in a string."""


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate JSON member")
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _bounded_int(text: str) -> int:
    if len(text) < _INT_DIGITS:  # at most 18 characters: below 10**18 either way, always in range
        return int(text)
    if len(text.lstrip("-")) > _INT_DIGITS:  # int() itself refuses only past 4300 digits
        raise ValueError("an integer is out of the 64-bit range")
    value = int(text)
    if not INT_MIN <= value <= INT_MAX:
        raise ValueError("an integer is out of the 64-bit range")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # "1e400" is valid JSON grammar that Python reads as inf
        raise ValueError("a number is too large to represent")
    return value


_DECODER = json.JSONDecoder(
    object_pairs_hook=_reject_duplicates,
    parse_constant=_no_constants,
    parse_int=_bounded_int,
    parse_float=_finite_float,
)
_SCAN: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]
"""The decoder's C scanner (an attribute it documents in its source, not in typeshed)."""
_WHITESPACE = re.compile(r"[ \t\n\r]*")
"""JSON's whitespace, as :mod:`json.decoder` skips it after the value."""


class _Invalid(ValueError):
    """A specific reason, kept as the message (other ValueErrors are the parser's own)."""


def _check_tree(value: Any) -> None:
    """Every string (members' names too) encodable as UTF-8, no nesting past :data:`MAX_DEPTH`.

    Iterative: the value may be nested as deep as the parser allowed, near the recursion limit."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                raise _Invalid("a string holds a lone surrogate (U+D800 to U+DFFF), which is not text UTF-8 can encode")
        elif isinstance(item, dict | list):
            if depth >= MAX_DEPTH:
                raise _Invalid(f"arrays and objects nest deeper than {MAX_DEPTH} levels")
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def _may_fail_check(text: str) -> bool:
    """False only when :func:`_check_tree` cannot refuse the value of ``text``, so the walk may be
    skipped; True sends the value through the walk (a false alarm costs only the walk).

    Both conditions are read off the text, in C: a lone surrogate needs a ``\\uD800``-``\\uDFFF``
    escape (see :data:`_SURROGATE_ESCAPE`), and a container at depth :data:`MAX_DEPTH` needs
    ``MAX_DEPTH + 1`` nested containers, each opened by its own ``[`` or ``{`` (brackets inside
    strings only make the count larger). A token's claims have neither, and the walk (6 µs) was
    a fifth of what a token verify added to its signature check."""
    if "\\u" in text and _SURROGATE_ESCAPE.search(text) is not None:
        return True
    return text.count("[") + text.count("{") > MAX_DEPTH


def _decode(text: str) -> Any:
    """``_DECODER.decode(text)``, with the same value or the same error, without its Python
    wrapper when the text starts with a value (the usual case): the C scanner straight, then
    :meth:`json.JSONDecoder.decode`'s own check for extra data."""
    try:
        value, end = _SCAN(text, 0)
    except StopIteration:  # nothing scans at 0 (whitespace first, or not JSON): the decoder says why
        return _DECODER.decode(text)
    if end != len(text):
        end = _WHITESPACE.match(text, end).end()  # type: ignore[union-attr]  # matches everywhere
        if end != len(text):
            raise json.JSONDecodeError("Extra data", text, end)
    return value


def loads(raw: bytes) -> Any:
    """The decoded value; ValueError, with a message that says what is wrong, for anything else."""
    try:
        text = raw.decode("utf-8")
        value = _decode(text)
    except UnicodeDecodeError:
        raise ValueError("not valid JSON: not UTF-8") from None
    except RecursionError:
        raise ValueError(f"not valid JSON: arrays and objects nest deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc.msg} at character {exc.pos}") from None
    except ValueError as exc:  # a hook's refusal: duplicates, NaN/Infinity, numbers out of range
        raise ValueError(f"not valid JSON: {exc}") from None
    if _may_fail_check(text):
        try:
            _check_tree(value)
        except _Invalid as exc:
            raise ValueError(f"not valid JSON: {exc}") from None
    return value
