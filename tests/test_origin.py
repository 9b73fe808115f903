"""Origin check (cross-site websocket hijacking) and client address behind trusted proxies."""

from __future__ import annotations

import pytest

from console_proxy import origin
from console_proxy.origin import OriginPolicy

TRUSTED = origin.parse_networks(["10.0.0.0/8", "::1"])


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("https://Console.Example.com", "https://console.example.com:443"),
        ("http://example.com:80", "http://example.com:80"),
        ("http://example.com", "http://example.com:80"),
        ("https://example.com:8443/", "https://example.com:8443"),
        ("http://[::1]:6080", "http://[::1]:6080"),
        ("http://127.0.0.1:6080", "http://127.0.0.1:6080"),
    ],
)
def test_normalize_makes_default_ports_explicit_and_hosts_lowercase(raw: str, normal: str) -> None:
    assert origin.normalize_origin(raw) == normal


@pytest.mark.parametrize(
    "raw",
    [
        "null",
        "",
        "file://x",
        "ftp://a.b",
        "http://",
        "http://u:p@a.b",
        "http://a.b/path",
        "http://a.b?q",
        "http://a.b:99999",
        "javascript:x",
    ],
)
def test_normalize_refuses_non_origins(raw: str) -> None:
    assert origin.normalize_origin(raw) is None


def test_missing_origin_is_a_non_browser_client_and_allowed() -> None:
    assert OriginPolicy().allows(None, "http://proxy:6080")


def test_own_origin_is_allowed_with_explicit_default_port() -> None:
    own = origin.origin_of("https", "Proxy.Example.com")
    assert OriginPolicy().allows("https://proxy.example.com:443", own)
    assert OriginPolicy().allows("https://proxy.example.com", own)


@pytest.mark.parametrize(
    "hostile",
    [
        "https://evil.example.com",
        "http://proxy.example.com",  # other host, other scheme
        "https://proxy.example.com:444",
        "null",
        "https://proxy.example.com.evil.com",
    ],
)
def test_other_origins_are_denied(hostile: str) -> None:
    assert not OriginPolicy().allows(hostile, origin.origin_of("https", "proxy.example.com"))


def test_localhost_and_loopback_address_are_different_hosts() -> None:
    own = origin.origin_of("http", "127.0.0.1:6080")
    assert not OriginPolicy().allows("http://localhost:6080", own)


def test_public_url_and_allow_list_are_accepted() -> None:
    policy = OriginPolicy.build("https://consoles.example.com/base/", ["https://portal.example.com"])
    own = origin.origin_of("http", "10.1.2.3:6080")
    assert policy.allows("https://consoles.example.com", own)
    assert policy.allows("https://PORTAL.example.com:443", own)
    assert not policy.allows("https://portal.example.com:8443", own)


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="allowed-origin"):
        OriginPolicy.build(None, ["not an origin"])
    with pytest.raises(ValueError, match="trusted-proxy"):
        origin.parse_networks(["300.1.1.1"])


def test_forwarded_headers_count_only_from_trusted_proxies() -> None:
    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "consoles.example.com"}
    assert (
        origin.effective_origin("10.2.3.4", "http", "10.0.0.5:6080", headers, TRUSTED)
        == "https://consoles.example.com:443"
    )
    assert origin.effective_origin("192.0.2.9", "http", "10.0.0.5:6080", headers, TRUSTED) == "http://10.0.0.5:6080"


@pytest.mark.parametrize(
    ("peer", "xff", "client"),
    [
        ("192.0.2.1", "203.0.113.7", "192.0.2.1"),  # untrusted peer: header ignored
        ("10.0.0.2", "203.0.113.7", "203.0.113.7"),  # trusted balancer
        ("10.0.0.2", "1.1.1.1, 203.0.113.7", "203.0.113.7"),  # client-prepended entries ignored
        ("10.0.0.2", "203.0.113.7, 10.0.0.9", "203.0.113.7"),  # two trusted hops
        ("10.0.0.2", "garbage", "10.0.0.2"),
        ("::ffff:10.0.0.2", "198.51.100.4", "198.51.100.4"),  # IPv4-mapped peer
    ],
)
def test_client_address(peer: str, xff: str, client: str) -> None:
    assert origin.client_address(peer, xff, TRUSTED) == client


def test_long_values_are_answered_but_not_cached() -> None:
    """The cache holds short values only: attacker-chosen Host or Origin headers of kilobytes
    must not stay in memory after their request (checked before any token)."""
    long_origin = "http://" + "a" * 300 + ".example"
    before = origin._normalize.cache_info()
    assert origin.normalize_origin(long_origin) == long_origin + ":80"
    assert origin.normalize_origin(long_origin) == long_origin + ":80"
    assert origin._normalize.cache_info() == before  # the cache was not even asked
    origin.normalize_origin("http://short.example")
    hits = origin._normalize.cache_info().hits
    origin.normalize_origin("http://short.example")
    assert origin._normalize.cache_info().hits == hits + 1


# --- Host pinning (DNS rebinding) --------------------------------------------------------------------

PINNED = OriginPolicy.build("https://Consoles.Example.com/base/", ["http://portal.example.com:8080"])


@pytest.mark.parametrize(
    "host",
    [
        "consoles.example.com",
        "consoles.example.com:443",
        "CONSOLES.Example.COM",  # default port, any case
        "portal.example.com:8080",  # an allowed origin's host
    ],
)
def test_pinned_host_accepts_the_public_url_and_allowed_origins(host: str) -> None:
    assert PINNED.host_allowed(host)


@pytest.mark.parametrize(
    "host",
    [
        "evil.example.com",
        "consoles.example.com:80",
        "consoles.example.com:8443",
        "consoles.example.com.evil.com",
        "portal.example.com",
        "portal.example.com:80",
        "127.0.0.1",
        "",
        None,
        "consoles.example.com:x",
        "user@consoles.example.com",
        "consoles.example.com/x",
    ],
)
def test_pinned_host_refuses_every_other_host(host: str | None) -> None:
    assert not PINNED.host_allowed(host)


def test_http_public_url_pins_port_80_written_or_not_and_ipv6_literals() -> None:
    policy = OriginPolicy.build("http://proxy.example.com", [])
    assert policy.host_allowed("proxy.example.com") and policy.host_allowed("proxy.example.com:80")
    assert not policy.host_allowed("proxy.example.com:443")
    v6 = OriginPolicy.build("http://[::1]:6080", [])
    assert v6.host_allowed("[::1]:6080") and not v6.host_allowed("[::1]") and not v6.host_allowed("[::2]:6080")


def test_no_public_url_or_opting_out_accepts_any_host() -> None:
    assert OriginPolicy.build(None, ["https://portal.example.com"]).host_allowed("evil.example.com")
    assert OriginPolicy.build("https://c.example.com", [], pin_host=False).host_allowed("evil.example.com")
    assert OriginPolicy().host_allowed(None)


def test_effective_host_is_forwarded_only_by_trusted_proxies() -> None:
    assert origin.effective_host("10.2.3.4", "10.0.0.5:6080", "c.example.com, x", TRUSTED) == "c.example.com"
    assert origin.effective_host("10.2.3.4", "10.0.0.5:6080", None, TRUSTED) == "10.0.0.5:6080"
    assert origin.effective_host("192.0.2.9", "10.0.0.5:6080", "c.example.com", TRUSTED) == "10.0.0.5:6080"
