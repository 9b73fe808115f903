"""Every pre-upgrade refusal over real HTTP, with its status and JSON; /token-status agrees."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from rfbclient import Console, try_upgrade
from tornado.httpclient import AsyncHTTPClient, HTTPRequest


async def _status(base: str, tok: str | None, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    all_headers = dict(headers or {})
    if tok is not None:
        all_headers["Authorization"] = f"Bearer {tok}"
    response = await AsyncHTTPClient().fetch(
        HTTPRequest(f"{base}/token-status", headers=all_headers), raise_error=False
    )
    return response.code, json.loads(response.body)


def _refusal(proxy, tok, **kwargs):
    return asyncio.run(try_upgrade(proxy.ws_url, tok, **kwargs))


def _assert_refused(proxy, tok, status: int, code: str, **kwargs) -> None:
    refused = _refusal(proxy, tok, **kwargs)
    assert refused is not None, "the upgrade was not refused"
    assert (refused.status, refused.body["error"]) == (status, code)
    assert refused.body["message"] and (tok is None or tok not in refused.body["message"])
    if "origin" not in kwargs and "headers" not in kwargs:
        assert asyncio.run(_status(proxy.base, tok))[0:1] == (status,)
        assert asyncio.run(_status(proxy.base, tok))[1]["error"] == code


def test_missing_token(proxy) -> None:
    _assert_refused(proxy, None, 400, "token_missing")


@pytest.mark.parametrize("via", ["subprotocol", "query"])
def test_invalid_token_both_ways(proxy, via: str) -> None:
    assert _refusal(proxy, "not.a.token..at-all", via=via).body["error"] == "token_invalid"


def test_expired_and_not_yet_valid(proxy, mint) -> None:
    _assert_refused(proxy, mint(host="127.0.0.1", port=5900, now=time.time() - 3600), 401, "token_expired")
    _assert_refused(proxy, mint(host="127.0.0.1", port=5900, now=time.time() + 3600), 401, "token_not_yet_valid")


def test_client_ip_binding(proxy, mint) -> None:
    _assert_refused(proxy, mint(host="127.0.0.1", port=5900, client_ip="192.0.2.1"), 403, "client_ip_mismatch")
    bound_here = mint(host="127.0.0.1", port=5900, client_ip="127.0.0.1")
    assert asyncio.run(_status(proxy.base, bound_here))[0] == 200


def test_forwarded_for_from_an_untrusted_peer_is_ignored(proxy, mint) -> None:
    tok = mint(host="127.0.0.1", port=5900, client_ip="192.0.2.1")
    refused = _refusal(proxy, tok, headers={"X-Forwarded-For": "192.0.2.1"})
    assert refused is not None and refused.body["error"] == "client_ip_mismatch"


def test_forwarded_for_from_a_trusted_proxy_binds(proxy_factory, mint) -> None:
    trusting = proxy_factory("--trusted-proxy", "127.0.0.0/8")
    tok = mint(host="127.0.0.1", port=5900, client_ip="192.0.2.1")
    code, body = asyncio.run(_status(trusting.base, tok, {"X-Forwarded-For": "192.0.2.1"}))
    assert code == 200 and body["ok"] is True


def test_origin_denied_and_allowed(proxy, mint) -> None:
    tok = mint(host="127.0.0.1", port=5900)
    _assert_refused(proxy, tok, 403, "origin_denied", origin="https://evil.example.com")
    _assert_refused(proxy, tok, 403, "origin_denied", origin=f"http://localhost:{proxy.port}")
    own = f"http://127.0.0.1:{proxy.port}"
    assert asyncio.run(_status(proxy.base, tok, {"Origin": own}))[0] == 200


def test_allowed_origin_option(proxy_factory, mint) -> None:
    portal = proxy_factory("--allowed-origin", "https://portal.example.com")
    tok = mint(host="127.0.0.1", port=5900)
    assert asyncio.run(_status(portal.base, tok, {"Origin": "https://portal.example.com:443"}))[0] == 200
    assert asyncio.run(_status(portal.base, tok, {"Origin": "https://other.example.com"}))[0] == 403


def test_single_use_without_broker_fails_closed(proxy, mint) -> None:
    refused = _refusal(proxy, mint(host="127.0.0.1", port=5900, single_use=True))
    assert refused is not None and (refused.status, refused.body["error"]) == (503, "broker_unavailable")


def test_over_capacity(proxy_factory, mint, xvnc_vncauth) -> None:
    small = proxy_factory("--max-sessions", "1")
    tok = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password)

    async def scenario() -> object:
        console = await Console.open(small.ws_url, tok)
        await console.handshake()
        refused = await try_upgrade(small.ws_url, tok)
        console.close()
        return refused

    refused = asyncio.run(scenario())
    assert refused is not None and (refused.status, refused.body["error"]) == (503, "over_capacity")


def test_token_status_reports_an_acceptable_token(proxy, mint) -> None:
    tok = mint(host="127.0.0.1", port=5900, view_only=True, desktop_name="VM 7")
    code, body = asyncio.run(_status(proxy.base, tok))
    assert code == 200
    assert body["ok"] is True and body["view_only"] is True and body["desktop_name"] == "VM 7"
    assert tok not in json.dumps(body)


def test_refusals_are_counted_in_metrics(proxy) -> None:
    _refusal(proxy, None)

    async def fetch() -> str:
        return (await AsyncHTTPClient().fetch(f"{proxy.base}/metrics")).body.decode()

    text = asyncio.run(fetch())
    assert 'consolegate_proxy_refusals_total{code="token_missing"}' in text
    assert "consolegate_proxy_active_sessions" in text and "consolegate_proxy_handshake_seconds_bucket" in text


def test_refused_and_failed_upgrades_give_their_slot_back(proxy_factory, mint, xvnc_vncauth) -> None:
    one = proxy_factory("--max-sessions", "1")
    good = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password)
    once = mint(host="127.0.0.1", port=xvnc_vncauth.port, single_use=True)

    async def scenario() -> tuple[int, int]:
        for _ in range(3):
            assert (await try_upgrade(one.ws_url, once)).body["error"] == "broker_unavailable"
        plain = await AsyncHTTPClient().fetch(HTTPRequest(f"{one.base}/websockify?token={good}"), raise_error=False)
        console = await Console.open(one.ws_url, good)
        info = await console.handshake()
        console.close()
        return plain.code, info.width

    assert asyncio.run(scenario()) == (400, 800)  # a plain GET is not upgraded; the one slot is still free


def test_request_bodies_are_not_buffered(proxy) -> None:
    """No endpoint takes a body: one announced above the limit is refused from the headers."""
    import socket

    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 104857600\r\n\r\n")
        answer = sock.recv(4096)  # no body sent: the proxy answers or closes without waiting for it
    assert answer == b"" or answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 413"))
    proxy.wait_for_log("Content-Length too long")
    assert asyncio.run(_status(proxy.base, None))[0] == 400  # and it goes on serving
