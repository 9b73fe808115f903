"""Behind proxies: RFC 7239 ``Forwarded`` and X-Forwarded-Host with a port, as the proxy's
admission sees them (the client address, the request's own origin, the Host pin).

The view is :func:`console_proxy.upgrade.request_view`, the one function both the front door
and Tornado's handlers call; its answers go straight into the origin check and the Host pin,
which are asserted here too.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rfbclient import Console, try_upgrade

from console_proxy import forwarded, origin, server, upgrade
from console_proxy.config import ProxyConfig
from console_proxy.keyring import Keyring
from console_proxy.origin import OriginPolicy

TRUSTED = origin.parse_networks(["10.0.0.0/8", "2001:db8:ffff::/48"])


def view(
    peer: str,
    headers: dict[str, str],
    *,
    host: str = "10.0.0.5:8080",
    protocol: str = "http",
    public_url: str | None = None,
) -> upgrade.View:
    policy = OriginPolicy.build(public_url, [])
    state = server.ProxyState(ProxyConfig(origin_policy=policy, trusted_proxies=TRUSTED), Keyring.generate(time.time()))
    return upgrade.request_view(state, peer, protocol, host, headers)


@pytest.mark.parametrize(
    ("value", "elements"),
    [
        ("for=192.0.2.60;proto=http;by=203.0.113.43", [{"for": "192.0.2.60", "proto": "http", "by": "203.0.113.43"}]),
        ('For="[2001:db8:cafe::17]:4711"', [{"for": "[2001:db8:cafe::17]:4711"}]),
        ("for=192.0.2.43, for=198.51.100.17", [{"for": "192.0.2.43"}, {"for": "198.51.100.17"}]),
        ('for=unknown;host="a.example:8443"', [{"for": "unknown", "host": "a.example:8443"}]),
        ('for="_gazonk"', [{"for": "_gazonk"}]),
        ('host="a\\"b"', [{"host": 'a"b'}]),
    ],
)
def test_parse_rfc7239_examples(value: str, elements: list[dict[str, str]]) -> None:
    assert forwarded.parse(value) == elements


@pytest.mark.parametrize(
    "value",
    [
        "",
        "for",
        "for=",
        "for=a b",
        'for="unterminated',
        "for=1;for=2",
        "for=1;;",
        "for=1,",
        "=1",
        "for=1 x",
        "for=" + "1" * 5000,
    ],
)
def test_malformed_headers_parse_to_none(value: str) -> None:
    assert forwarded.parse(value) is None


@pytest.mark.parametrize(
    ("node", "address"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("192.0.2.1:80", "192.0.2.1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("[2001:db8::1]:4711", "2001:db8::1"),
        ("192.0.2.1:_abc", "192.0.2.1"),
        ("unknown", None),
        ("_hidden", None),
        ("2001:db8::1", None),
        ("[192.0.2.1]", None),
        ("[2001:db8::1", None),
        ("192.0.2.1:99999x", None),
        ("example.com", None),
        (None, None),
    ],
)
def test_node_addresses(node: str | None, address: str | None) -> None:
    assert forwarded.node_address(node) == address


def test_forwarded_from_a_trusted_proxy_sets_client_origin_and_host() -> None:
    seen = view("10.0.0.2", {"Forwarded": 'for="[2001:db8::1]:4711";host="consoles.example.com:8443";proto=https'})
    assert seen == upgrade.View("2001:db8::1", "https://consoles.example.com:8443", "consoles.example.com:8443")


def test_forwarded_is_read_from_the_right_through_trusted_hops_only() -> None:
    """The client prepended a lie; the hops are walked from the right while they are trusted."""
    value = "for=6.6.6.6;host=evil.example, for=192.0.2.9;host=consoles.example.com;proto=https, for=10.1.1.1"
    seen = view("10.0.0.2", {"Forwarded": value})
    assert seen.client == "192.0.2.9"
    assert seen.own == "https://consoles.example.com:443"


def test_forwarded_from_an_untrusted_peer_is_ignored() -> None:
    seen = view(
        "192.0.2.77", {"Forwarded": "for=10.9.9.9;host=consoles.example.com;proto=https", "X-Forwarded-For": "10.9.9.9"}
    )
    assert seen == upgrade.View("192.0.2.77", "http://10.0.0.5:8080", "10.0.0.5:8080")


def test_a_malformed_forwarded_falls_back_to_x_forwarded() -> None:
    seen = view(
        "10.0.0.2",
        {
            "Forwarded": "for=192.0.2.1;;",
            "X-Forwarded-For": "192.0.2.3",
            "X-Forwarded-Host": "c.example:8443",
            "X-Forwarded-Proto": "https",
        },
    )
    assert seen == upgrade.View("192.0.2.3", "https://c.example:8443", "c.example:8443")


def test_forwarded_without_host_or_proto_keeps_the_requests_own() -> None:
    seen = view("10.0.0.2", {"Forwarded": "for=unknown"})
    assert seen == upgrade.View("10.0.0.2", "http://10.0.0.5:8080", "10.0.0.5:8080")


def test_x_forwarded_host_with_a_port_passes_the_origin_check_and_the_pin() -> None:
    """nginx's ``X-Forwarded-Host $http_host`` keeps the port the browser used: the page's
    origin is then the request's own, and the Host pin of a public URL with that port holds."""
    headers = {"X-Forwarded-Host": "consoles.example.com:8443", "X-Forwarded-Proto": "https"}
    seen = view("10.0.0.2", headers, host="consolegate_proxy")
    assert seen.own == "https://consoles.example.com:8443"
    assert OriginPolicy().allows("https://consoles.example.com:8443", seen.own)
    assert not OriginPolicy().allows("https://consoles.example.com", seen.own)  # the port matters
    pinned = OriginPolicy.build("https://consoles.example.com:8443/", [])
    assert pinned.host_allowed(seen.host)
    assert not pinned.host_allowed(view("10.0.0.2", {"X-Forwarded-Host": "consoles.example.com"}).host)


def test_forwarded_host_with_a_port_passes_the_pin() -> None:
    seen = view("10.0.0.2", {"Forwarded": 'host="consoles.example.com:8443";proto=https'})
    assert OriginPolicy.build("https://consoles.example.com:8443/", []).host_allowed(seen.host)
    assert OriginPolicy().allows("https://consoles.example.com:8443", seen.own)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_header_text_is_believed_or_ignored_never_an_error(value: str) -> None:
    said = forwarded.believed("10.0.0.2", value, TRUSTED)
    assert said is None or isinstance(said.client, str)


def test_forwarded_for_binds_the_token_through_a_real_proxy(proxy_factory, mint, xvnc_none) -> None:  # type: ignore[no-untyped-def]
    """End to end: the address a trusted peer gives in ``Forwarded`` is the one the token's
    client-address binding is checked against (and a different one is refused)."""
    proxy = proxy_factory("--trusted-proxy", "127.0.0.1")
    tok = mint(host="127.0.0.1", port=xvnc_none.port, client_ip="2001:db8::1")

    async def scenario() -> tuple[object, object]:
        console = await Console.open(proxy.ws_url, tok, headers={"Forwarded": 'for="[2001:db8::1]:4711"'})
        info = await console.handshake()
        console.close()
        refused = await try_upgrade(proxy.ws_url, tok, headers={"Forwarded": "for=192.0.2.1"})
        return info, refused

    info, refused = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert info.width == 800  # type: ignore[attr-defined]
    assert refused is not None and refused.body["error"] == "client_ip_mismatch"  # type: ignore[attr-defined]
