"""Strict base64url (RFC 4648 §5, no padding) as JOSE uses it.

Strictness matters for tokens: a lenient decoder accepts several spellings of the same bytes
(padding, stray characters, non-zero trailing bits), so a "changed" token could still verify.
Decoding here accepts exactly one spelling per byte string.
"""

from __future__ import annotations

import base64
import binascii


def encode(data: bytes) -> str:
    """Encode without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def decode(text: str) -> bytes:
    """Decode the canonical unpadded spelling only; anything else raises ValueError."""
    if len(text) % 4 == 1:
        raise ValueError("impossible base64url length")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url") from exc
    if encode(data) != text:
        raise ValueError("non-canonical base64url")
    return data
