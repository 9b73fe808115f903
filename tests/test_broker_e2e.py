"""Broker + two proxies + a real Xvnc, all real processes: the whole life of a console.

mint → websocket → VNC session works → active in GET /sessions → the same token on the other
proxy gets 409 → DELETE /sessions/{id} → 4410 within one heartbeat → the audit tells the story.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokerproc import (
    HEARTBEAT,
    BrokerProcess,
    BrokerState,
    healthy_proxies,
    start_broker,
    start_linked_proxy,
    wait_for,
)
from proxyproc import ProxyProcess, free_port, serve_linked
from rfbclient import Console, try_upgrade

from console_proxy.keyring import DEFAULT_SKEW


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BrokerProcess, dict[str, ProxyProcess]]]:
    tmp = tmp_path_factory.mktemp("fleet")
    broker = start_broker(BrokerState.create(tmp / "state"))
    proxies = {name: start_linked_proxy(tmp, broker, name) for name in ("pa", "pb")}
    try:
        healthy_proxies(broker, 2)
        yield broker, proxies
    finally:
        for proxy in proxies.values():
            proxy.stop()
        broker.stop()


def _audit_for(broker: BrokerProcess, sid: str) -> list[dict]:
    return [e for e in broker.admin.audit(0, limit=1000) if e["session_id"] == sid]


def test_console_lifecycle_across_two_proxies(fleet, xvnc_vncauth) -> None:
    broker, proxies = fleet
    target = broker.admin.add_target(
        name="web-vm", host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password
    )
    assert target["has_password"] is True and "password" not in target
    console = broker.issuer.mint(target["id"], user="alice")
    assert console["url"] == f"{proxies[console['proxy_id']].base}/console#token={console['token']}"
    assert console["websocket_url"] == proxies[console["proxy_id"]].ws_url
    assert console["expires_at"] - time.time() <= 61
    here = proxies[console["proxy_id"]]
    there_name = next(name for name in proxies if name != console["proxy_id"])
    there = proxies[there_name]
    sid, tok = console["session_id"], console["token"]

    async def scenario() -> tuple[int | None, float]:
        viewer = await Console.open(here.ws_url, tok)
        info = await viewer.handshake()
        assert (info.width, info.height, info.name) == (800, 600, b"web-vm")
        await viewer.request_update()
        assert (await viewer.read(4))[0] == 0  # FramebufferUpdate: the VNC session works
        await asyncio.to_thread(wait_for, lambda: _state(broker, sid) == "active", 10, what="session active")
        refused = await try_upgrade(there.ws_url, tok)
        assert refused is not None and (refused.status, refused.body["error"]) == (409, "token_used")
        # the broker keeps the jti until the redeeming proxy would stop accepting it (exp + its skew)
        with sqlite3.connect(f"file:{broker.state.root / 'broker.db'}?mode=ro", uri=True) as db:
            kept_until = db.execute("SELECT exp FROM redeemed WHERE session_id = ?", (sid,)).fetchone()[0]
        assert kept_until == int(console["expires_at"]) + DEFAULT_SKEW
        started = time.monotonic()
        await asyncio.to_thread(broker.admin.revoke, sid)
        code, reason = await asyncio.wait_for(viewer.wait_closed(), 10)
        assert reason == "session_ended"
        return code, time.monotonic() - started

    code, elapsed = asyncio.run(scenario())
    assert code == 4410
    assert elapsed <= HEARTBEAT + 0.5, f"revocation took {elapsed:.2f}s"

    def whole_story() -> list[dict] | None:
        events = _audit_for(broker, sid)
        seen = {e["type"] for e in events}
        return events if {"closed", "refused"} <= seen else None

    story = wait_for(whole_story, 10, what="audit story")
    types = [e["type"] for e in story]
    for expected in ("minted", "redeemed", "opened", "refused", "revoked", "closed"):
        assert expected in types, types
    assert types.index("minted") < types.index("redeemed") < types.index("opened") < types.index("revoked")
    refused = next(e for e in story if e["type"] == "refused")
    assert refused["detail"]["code"] == "token_used" and refused["actor"] == f"proxy:{there_name}"
    closed = next(e for e in story if e["type"] == "closed")
    assert closed["detail"]["close_code"] == 4410 and closed["detail"]["bytes_down"] > 0
    assert next(e for e in story if e["type"] == "minted")["actor"] == "apikey:issuer"
    row = next(s for s in broker.admin.sessions() if s["session_id"] == sid)
    assert row["state"] == "revoked" and row["close_code"] == 4410 and row["bytes_down"] > 0

    _no_secrets(broker, proxies, xvnc_vncauth.password, tok)


def _state(broker: BrokerProcess, sid: str) -> str | None:
    return next((s["state"] for s in broker.admin.sessions() if s["session_id"] == sid), None)


def _no_secrets(broker: BrokerProcess, proxies: dict[str, ProxyProcess], password: str, tok: str) -> None:
    """Neither the VNC password, nor the token, nor the API keys in any log or in the database."""
    secrets = [password, tok, broker.state.admin_key, broker.state.issuer_key]
    for text in (broker.log_text(), *(p.log_text() for p in proxies.values())):
        for secret in secrets:
            assert secret not in text
    for path in Path(broker.state.root).glob("broker.db*"):
        data = path.read_bytes()
        assert password.encode() not in data and broker.state.admin_key.encode() not in data


def test_reusable_token_works_on_any_proxy_and_revocation_closes_both(fleet, xvnc_vncauth) -> None:
    broker, proxies = fleet
    target = broker.admin.add_target(
        name="shared", host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password
    )
    console = broker.issuer.mint(target["id"], single_use=False)

    async def scenario() -> tuple[list[int | None], list[tuple[int, str]]]:
        viewers = [await Console.open(p.ws_url, console["token"]) for p in proxies.values()]
        for viewer in viewers:
            await viewer.handshake()
        await asyncio.to_thread(broker.admin.revoke, console["session_id"])
        codes = [(await asyncio.wait_for(v.wait_closed(), 10))[0] for v in viewers]
        # the still valid reusable token must not reopen the revoked session, on any proxy
        reopened = [await try_upgrade(p.ws_url, console["token"]) for p in proxies.values()]
        return codes, [(r.status, r.body["error"]) for r in reopened if r is not None]

    codes, reopened = asyncio.run(scenario())
    assert codes == [4410, 4410]
    assert reopened == [(410, "session_revoked")] * 2


def test_keyring_rotation_reaches_proxies_and_old_tokens_keep_working(fleet, xvnc_vncauth) -> None:
    broker, proxies = fleet
    target = broker.admin.add_target(
        name="rot", host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password
    )
    before = broker.issuer.mint(target["id"], single_use=False)
    rotated = broker.admin.rotate_keys()
    for proxy in proxies.values():
        proxy.wait_for_log(f"-> {rotated['version']}", timeout=5)
    after = broker.issuer.mint(target["id"], single_use=False)

    async def scenario() -> None:
        for tok in (before["token"], after["token"]):
            for proxy in proxies.values():
                viewer = await Console.open(proxy.ws_url, tok)
                await viewer.handshake()
                viewer.close()

    asyncio.run(scenario())
    assert any(e["type"] == "key_rotated" for e in broker.admin.audit(0, "key_rotated"))


def test_broker_down_reusable_tokens_still_work_single_use_fail_closed(tmp_path: Path, xvnc_vncauth) -> None:
    broker = start_broker(BrokerState.create(tmp_path / "state"))
    proxy = start_linked_proxy(tmp_path, broker, "solo")
    try:
        healthy_proxies(broker, 1)
        target = broker.admin.add_target(
            name="vm", host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password
        )
        reusable = broker.issuer.mint(target["id"], single_use=False)["token"]
        once = broker.issuer.mint(target["id"])["token"]
        broker.stop()

        async def scenario() -> None:
            refused = await try_upgrade(proxy.ws_url, once)
            assert refused is not None and (refused.status, refused.body["error"]) == (503, "broker_unavailable")
            viewer = await Console.open(proxy.ws_url, reusable)
            assert (await viewer.handshake()).name == b"vm"
            viewer.close()
            await viewer.wait_closed()

        asyncio.run(scenario())
        assert proxy.stop() == 0  # a clean exit, with no broker to say goodbye to
    finally:
        proxy.stop()
        broker.stop()


def test_proxy_without_broker_or_keyring_fails_with_one_line(tmp_path: Path) -> None:
    credential = tmp_path / "cred.json"
    credential.write_text('{"proxy_id": "x", "secret": "y"}')
    result = serve_linked(f"http://127.0.0.1:{free_port()}", credential, timeout=30)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("console-proxy: error: cannot start: no keyring from the broker"), result.stderr


def test_a_draining_proxy_tells_the_broker_at_once(tmp_path: Path, xvnc_vncauth) -> None:
    """SIGTERM with a session open: the broker hears "draining" long before the next heartbeat."""
    broker = start_broker(BrokerState.create(tmp_path / "state"))
    proxy = start_linked_proxy(tmp_path, broker, "slow", interval=60)
    try:
        target = broker.admin.add_target(
            name="vm", host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password
        )
        console = broker.issuer.mint(target["id"], single_use=False)

        async def scenario() -> bool:
            viewer = await Console.open(proxy.ws_url, console["token"])
            await viewer.handshake()
            proxy.signal(signal.SIGTERM)
            proxy.wait_for_log("draining: 1 open sessions")
            draining = await asyncio.to_thread(
                wait_for, lambda: any(p["draining"] for p in broker.admin.proxies()), 10, what="draining reported"
            )
            viewer.close()
            await viewer.wait_closed()  # the proxy sees the close, so it can exit without the grace
            return bool(draining)

        assert asyncio.run(scenario())
        assert proxy.stop() == 0
    finally:
        proxy.stop()
        broker.stop()
