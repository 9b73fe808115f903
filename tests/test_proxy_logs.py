"""No log line, at any level, carries the VNC password, a token or key material."""

from __future__ import annotations

import asyncio
import json
import time

from rfbclient import Console, try_upgrade

from console_proxy import b64url


def _secrets(ring, tokens: list[str], passwords: list[str]) -> list[str]:
    """Every string that must never appear: whole tokens, their segments, passwords, keys."""
    found = list(passwords) + tokens
    for tok in tokens:
        found += [segment for segment in tok.split(".") if len(segment) >= 16]
    for key in ring.fleet.values():
        found += [b64url.encode(key.key), key.key.hex()]
    for key in ring.signing.values():
        found += [b64url.encode(key.seed), key.seed.hex()]
    return found


def test_debug_logs_hold_no_secret(proxy, mint, broker_ring, xvnc_vncauth) -> None:
    ring, _ = broker_ring
    good = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password, vm="vm-9", user="ann")
    wrong = mint(host="127.0.0.1", port=xvnc_vncauth.port, password="Wr0ngPassw0rd!")
    expired = mint(host="127.0.0.1", port=xvnc_vncauth.port, password="an0therSecret", now=time.time() - 7200)

    async def scenario() -> None:
        console = await Console.open(proxy.ws_url, good)
        await console.handshake()
        await console.request_update()
        await console.read(1)
        console.close()
        await console.wait_closed()
        assert (await (await Console.open(proxy.ws_url, wrong, via="query")).wait_closed())[0] == 4501
        assert (await try_upgrade(proxy.ws_url, expired, via="query")).body["error"] == "token_expired"
        assert (await try_upgrade(proxy.ws_url, good[:-3] + "AAA")).body["error"] == "token_invalid"

    asyncio.run(scenario())
    proxy.wait_for_log('"event":"closed"')
    proxy.wait_for_log('"code":"token_invalid"')
    log = proxy.log_text()
    assert "DEBUG" in log  # the scan covers the most verbose level
    for secret in _secrets(ring, [good, wrong, expired], [xvnc_vncauth.password, "Wr0ngPassw0rd!", "an0therSecret"]):
        assert secret not in log, "a secret reached the proxy's log"


def test_session_lines_are_structured(proxy, mint, xvnc_vncauth) -> None:
    tok = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password, vm="vm-42", user="bob")

    async def scenario() -> None:
        console = await Console.open(proxy.ws_url, tok)
        await console.handshake()
        console.close()
        await console.wait_closed()

    asyncio.run(scenario())
    line = proxy.wait_for_log('"event":"closed"', '"vm":"vm-42"')
    closed = json.loads(line.split(" consolegate.proxy.session ", 1)[1])
    assert (closed["event"], closed["vm"], closed["user"], closed["client"]) == ("closed", "vm-42", "bob", "127.0.0.1")
    for field in ("session_id", "vm", "user", "client", "bytes_up", "bytes_down", "duration_s", "close_code"):
        assert field in closed


def test_failing_requests_are_logged_by_path_only(proxy_factory, mint, tmp_path) -> None:
    """Tornado's own warning for a failed request must not carry the query (``?token=``)."""
    bare = proxy_factory("--static-dir", str(tmp_path / "no-viewer-here"))
    tok = mint(host="127.0.0.1", port=5900, password="n0tInLogs")

    async def fetch_all() -> list[int]:
        from tornado.httpclient import AsyncHTTPClient

        client = AsyncHTTPClient()
        codes = []
        for path in ("/console", "/static/console.js", "/novnc/core/rfb.js", "/nowhere"):
            response = await client.fetch(f"{bare.base}{path}?token={tok}", raise_error=False)
            codes.append(response.code)
        return codes

    assert asyncio.run(fetch_all()) == [404, 404, 404, 404]
    bare.wait_for_log("404 GET /console (127.0.0.1)")
    log = bare.log_text()
    assert tok not in log and "token=" not in log and "n0tInLogs" not in log
