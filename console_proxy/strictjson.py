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
from typing import Any

MAX_DEPTH = 32
"""Deepest nesting of arrays and objects accepted; nothing we read needs more than a few levels."""
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
"""Integers outside a signed 64-bit range are refused (SQLite's integers are 64-bit)."""
_INT_DIGITS = len(str(INT_MAX))
_SURROGATE = re.compile("[\ud800-\udfff]")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate JSON member")
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _bounded_int(text: str) -> int:
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


def loads(raw: bytes) -> Any:
    """The decoded value; ValueError, with a message that says what is wrong, for anything else."""
    try:
        value = _DECODER.decode(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("not valid JSON: not UTF-8") from None
    except RecursionError:
        raise ValueError(f"not valid JSON: arrays and objects nest deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc.msg} at character {exc.pos}") from None
    except ValueError as exc:  # a hook's refusal: duplicates, NaN/Infinity, numbers out of range
        raise ValueError(f"not valid JSON: {exc}") from None
    try:
        _check_tree(value)
    except _Invalid as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    return value
