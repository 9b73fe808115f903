"""Strict base64url (RFC 4648 §5, no padding) as JOSE uses it.

Strictness matters for tokens: a lenient decoder accepts several spellings of the same bytes
(padding, stray characters, non-zero trailing bits), so a "changed" token could still verify.
Decoding here accepts exactly one spelling per byte string.
"""

from __future__ import annotations

import base64
import binascii

# '+', '/' and '=' are not base64url: they become '!', which strict decoding refuses like any stray byte
_FROM_URLSAFE = bytes.maketrans(b"-_+/=", b"+/!!!")
_PADDING = (b"", b"", b"==", b"=")  # by length % 4 (1 is refused before)
# The last character of a canonical spelling carries no set bits past the data: 4 spare bits
# after one trailing byte (length % 4 == 2), 2 spare bits after two (length % 4 == 3). Each set
# holds the characters and their byte values, so one lookup serves text and bytes alike.
_CANONICAL_LAST: tuple[frozenset[str | int], ...] = (
    frozenset(),
    frozenset(),
    frozenset([*"AQgw", *b"AQgw"]),
    frozenset([*"AEIMQUYcgkosw048", *b"AEIMQUYcgkosw048"]),
)


def encode(data: bytes) -> str:
    """Encode without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def decode(text: str | bytes) -> bytes:
    """Decode the canonical unpadded spelling only; anything else raises ValueError.

    ``binascii``'s strict mode refuses every byte outside the alphabet (whitespace and non-ASCII
    bytes included) and misplaced padding; the padding is ours, so ``=`` in ``text`` is refused;
    the spare bits of the last character must be zero. Together: exactly the texts that
    ``encode`` produces. ``bytes`` are read as ASCII text (a token's inner parts are bytes, and
    decoding them to ``str`` first would copy them twice for nothing).
    """
    remainder = len(text) % 4
    if remainder == 1:
        raise ValueError("impossible base64url length")
    try:
        raw = text if isinstance(text, bytes) else text.encode("ascii")
        data = binascii.a2b_base64(raw.translate(_FROM_URLSAFE) + _PADDING[remainder], strict_mode=True)
    except (UnicodeEncodeError, binascii.Error) as exc:
        raise ValueError("not base64url") from exc
    except AttributeError:  # neither str nor bytes: the same TypeError as before
        raise TypeError(f"base64url text must be str or bytes, not {type(text).__name__}") from None
    if remainder and text[-1] not in _CANONICAL_LAST[remainder]:
        raise ValueError("non-canonical base64url")
    return data
