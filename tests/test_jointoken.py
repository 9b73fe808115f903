"""The join token codec (console_proxy/jointoken.py), shared by the broker and ``enroll``."""

from __future__ import annotations

import pytest

from console_proxy import b64url
from console_proxy.jointoken import JoinToken, JoinTokenError

FP = "sha256:" + "ab" * 32


def test_round_trip_and_no_secret_in_repr() -> None:
    token = JoinToken(FP, "edge-1", "0123456789abcdef", "s3cret-value")
    text = token.encode()
    assert text.startswith("cgj1.") and JoinToken.parse(text) == token
    assert "s3cret" not in repr(token)


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "cgk.x.y",
        "cgj1.",
        "cgj1.!!!",
        "cgj1." + b64url.encode(b"[1]"),
        "cgj1." + b64url.encode(b'{"ca": "sha256:00", "proxy": "p", "id": "i", "secret": "s"}'),
        "cgj1." + b64url.encode(b'{"ca": "' + FP.encode() + b'", "proxy": "a b", "id": "i", "secret": "s"}'),
        "cgj1." + b64url.encode(b'{"ca": "' + FP.encode() + b'", "proxy": "p", "id": "i", "secret": ""}'),
        "cgj1." + b64url.encode(b'{"ca": "' + FP.encode() + b'", "proxy": "p", "id": 1, "secret": "s"}'),
        "cgj1." + b64url.encode(b'{"ca": "' + FP.encode() + b'", "proxy": "p", "id": "i", "secret": "s", "x": 1}'),
        "cgj1." + "A" * 2000,
    ],
)
def test_malformed_tokens_are_refused_without_echoing_them(text: object) -> None:
    with pytest.raises(JoinTokenError) as refused:
        JoinToken.parse(text)
    assert refused.value.code == "join_token_malformed"
    assert not isinstance(text, str) or len(text) < 6 or text[5:] not in str(refused.value)
