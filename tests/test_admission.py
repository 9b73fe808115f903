"""Pre-upgrade admission as a pure function: DESIGN's order and codes."""

from __future__ import annotations

import time

import pytest

from console_proxy import token
from console_proxy.admission import Refusal, Request, admit, bearer_token, token_from
from console_proxy.config import ProxyConfig
from console_proxy.keyring import Keyring
from console_proxy.origin import OriginPolicy

NOW = 1_800_000_000.0
RING = Keyring.generate(NOW)
PROXY_RING = RING.for_proxy()
OWN = "http://proxy:6080"


def _token(**options: object) -> str:
    claims = token.new_claims(host="10.0.0.5", port=5900, now=NOW, ttl=60, **options)  # type: ignore[arg-type]
    return token.mint(claims, RING)


def _admit(
    tok: str | None,
    *,
    origin: str | None = None,
    draining: bool = False,
    sessions: int = 0,
    client: str = "192.0.2.10",
    config: ProxyConfig | None = None,
    now: float = NOW,
) -> token.Claims:
    return admit(
        Request(tok, origin, OWN, client),
        keyring=PROXY_RING,
        config=config or ProxyConfig(),
        now=now,
        draining=draining,
        sessions=sessions,
    )


def _code(**kwargs: object) -> tuple[str, int]:
    with pytest.raises(Refusal) as info:
        _admit(**kwargs)  # type: ignore[arg-type]
    assert info.value.message and info.value.body() == {"error": info.value.code, "message": info.value.message}
    return info.value.code, info.value.status


def test_valid_token_is_admitted() -> None:
    assert _admit(_token(vm="vm-1")).vm == "vm-1"


def test_draining_wins_over_everything() -> None:
    assert _code(tok=None, origin="https://evil.example", draining=True) == ("draining", 503)


def test_origin_then_capacity_then_token() -> None:
    assert _code(tok=None, origin="https://evil.example") == ("origin_denied", 403)
    assert _code(tok=None, sessions=2000) == ("over_capacity", 503)
    assert _code(tok=None) == ("token_missing", 400)


@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        ({"tok": "garbage"}, ("token_invalid", 401)),
        ({"now": NOW + 3600}, ("token_expired", 401)),
        ({"now": NOW - 3600}, ("token_not_yet_valid", 401)),
    ],
)
def test_token_refusals_keep_their_codes(mutation: dict[str, object], expected: tuple[str, int]) -> None:
    assert _code(**{"tok": _token(), **mutation}) == expected


def test_client_ip_binding() -> None:
    bound = _token(client_ip="192.0.2.10")
    assert _admit(bound).cip == "192.0.2.10"
    assert _code(tok=bound, client="192.0.2.11") == ("client_ip_mismatch", 403)


def test_refusal_never_carries_the_password_or_token() -> None:
    tok = _token(password="hunter2")
    with pytest.raises(Refusal) as info:
        _admit(tok, now=time.time() + 10**6)
    text = repr(info.value) + str(info.value) + str(info.value.body())
    assert "hunter2" not in text and tok not in text


def test_token_sources() -> None:
    assert token_from(["binary", "token.abc"], None) == "abc"
    assert token_from(["binary", "token.abc"], "q") == "abc"
    assert token_from(["binary", "token."], "q") == "q"
    assert token_from(["binary"], None) is None
    assert bearer_token("Bearer  abc ") == "abc"
    assert bearer_token("bearer abc") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token(None) is None


def test_spent_tokens_remember_single_use_jtis_boundedly() -> None:
    from console_proxy.admission import SpentTokens

    spent = SpentTokens(limit=4)
    once = [token.new_claims(host="h", port=1, now=NOW, ttl=60, single_use=True) for _ in range(6)]
    reusable = token.new_claims(host="h", port=1, now=NOW, ttl=60)
    spent.add(once[0], NOW)
    with pytest.raises(Refusal) as info:
        spent.check(once[0])
    assert (info.value.code, info.value.status) == ("token_used", 409)
    spent.check(once[1])  # unknown: passes (the broker decides)
    spent.add(reusable, NOW)
    spent.check(reusable)  # reusable tokens are never "used"
    for claims in once[1:]:
        spent.add(claims, NOW)
    assert len(spent._expiry) <= 4  # bounded even when every entry is still live
    with pytest.raises(Refusal):
        spent.check(once[-1])  # the newest is always kept


def test_a_host_the_public_url_does_not_name_is_origin_denied_before_capacity() -> None:
    """DNS rebinding: the page's own origin passes the Origin check, the pinned Host does not."""
    config = ProxyConfig(origin_policy=OriginPolicy.build("https://consoles.example.com", []), max_sessions=1)
    rebound = Request(_token(), "http://evil.example", "http://evil.example:80", "192.0.2.10", "evil.example")
    with pytest.raises(Refusal) as info:
        admit(rebound, keyring=PROXY_RING, config=config, now=NOW, draining=False, sessions=1)
    assert (info.value.code, info.value.status) == ("origin_denied", 403)
    assert "host" in info.value.reason
    right = Request(_token(vm="vm-2"), None, "http://consoles.example.com:80", "192.0.2.10", "consoles.example.com")
    assert admit(right, keyring=PROXY_RING, config=config, now=NOW, draining=False, sessions=0).vm == "vm-2"
