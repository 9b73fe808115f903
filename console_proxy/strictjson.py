"""Strict JSON for input we did not write: UTF-8, no duplicate members, no NaN or Infinity.

Python's ``json`` keeps the last of duplicate members and accepts NaN; two parsers that disagree
on such input are a classic way to make a check and a use see different values.
"""

from __future__ import annotations

import json
from typing import Any


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate JSON member")
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(object_pairs_hook=_reject_duplicates, parse_constant=_no_constants)


def loads(raw: bytes) -> Any:
    """The decoded value; ValueError for anything that is not strict JSON."""
    try:
        return _DECODER.decode(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ValueError("not valid JSON") from None
