"""Revocation and rotation pushed: ``GET /api/v1/proxy/watch?since=N`` on both engines, real
brokers (two replicas on PostgreSQL, one on SQLite), and real proxies that act on its answers
long before their (30 s) heartbeat; and a proxy failing over between replicas.

Each held watch is shown held (the broker's ``consolegate_broker_watches`` gauge) before the
change is made, and its answer is awaited with a bound far below the 25 s hold, so only the
change can have answered it."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from brokerproc import (
    BrokerProcess,
    BrokerState,
    healthy_proxies,
    start_broker,
    start_linked_proxy,
    wait_for,
)
from rfbclient import Console, try_upgrade
from test_broker_api import _proxy_auth

Pair = tuple[BrokerProcess, BrokerProcess]
ANSWERED = 10.0
"""Bound on a woken watch's answer, and on a pushed 4410: far below the 25 s hold and the
proxies' 30 s heartbeat, so meeting it shows the push worked."""
SLOW_HEARTBEAT = 30.0


@pytest.fixture
def pair(database: str | None, tmp_path: Path) -> Iterator[Pair]:
    """(A, B): two replicas on PostgreSQL; on SQLite one broker plays both."""
    state = BrokerState.create(tmp_path / "a", database=database)
    state.add_proxy("fake", "http://127.0.0.1:1")
    a = start_broker(state, heartbeat_interval=60.0)
    b = start_broker(state.replica(tmp_path / "b"), heartbeat_interval=60.0) if database else a
    yield a, b
    a.stop()
    b.stop()


def _watch(
    broker: BrokerProcess, since: int | None = None, *, authorization: str | None = None, raw_since: str | None = None
) -> tuple[int, dict[str, Any]]:
    query = f"?since={raw_since if raw_since is not None else since}" if since is not None or raw_since else ""
    request = urllib.request.Request(
        f"{broker.base}/api/v1/proxy/watch{query}", headers={"Authorization": authorization or _proxy_auth(broker)}
    )
    try:
        with urllib.request.urlopen(request, timeout=40) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _held(broker: BrokerProcess) -> int:
    with urllib.request.urlopen(f"{broker.base}/metrics", timeout=10) as response:
        text = response.read().decode()
    line = next(line for line in text.splitlines() if line.startswith("consolegate_broker_watches "))
    return int(float(line.split()[1]))


class HeldWatch:
    """A watch at ``broker`` from ``since``, in a thread; :meth:`answer` waits for its answer."""

    def __init__(self, broker: BrokerProcess, since: int) -> None:
        self.result: tuple[int, dict[str, Any]] | None = None
        self.done = threading.Event()
        before = _held(broker)

        def run() -> None:
            self.result = _watch(broker, since)
            self.done.set()

        threading.Thread(target=run, daemon=True).start()
        wait_for(lambda: _held(broker) > before, what="the watch held at the broker")
        assert not self.done.is_set()

    def answer(self) -> tuple[int, dict[str, Any]]:
        assert self.done.wait(ANSWERED), "the watch was not answered by the change"
        assert self.result is not None
        return self.result


def _beat(broker: BrokerProcess) -> None:
    body = {"proxy_id": "fake", "public_url": None, "sessions": 0, "capacity": 1000, "draining": False, "version": 0}
    broker.client().request("POST", "/proxy/heartbeat", body, authorization=_proxy_auth(broker))


def test_a_held_watch_at_a_answers_a_revocation_made_at_b(pair: Pair) -> None:
    a, b = pair
    _beat(b)
    target = b.admin.add_target(name="vm", host="127.0.0.1", port=5901)
    sid = b.issuer.mint(target["id"])["session_id"]
    status, snapshot = _watch(a)  # no since: at once, the position and what is revoked now
    assert status == 200 and snapshot["revoked"] == [] and snapshot["keyring_version"] == b.admin.keys()["version"]
    held = HeldWatch(a, snapshot["seq"])
    b.admin.revoke(sid)
    status, answer = held.answer()
    assert status == 200 and answer["revoked"] == [sid] and answer["seq"] > snapshot["seq"]
    assert answer["seq"] == max(e["seq"] for e in b.admin.audit(0, None, 1000))
    status, again = _watch(a)  # a proxy starting now learns it from the snapshot
    assert again["revoked"] == [sid] and again["seq"] == answer["seq"]
    status, replay = _watch(b, snapshot["seq"])  # any replica answers from any position, at once
    assert (status, replay["revoked"]) == (200, [sid])


def test_a_rotation_at_b_answers_a_watch_at_a_with_the_new_version(pair: Pair) -> None:
    a, b = pair
    _, snapshot = _watch(a)
    held = HeldWatch(a, snapshot["seq"])
    rotated = b.admin.rotate_keys()
    status, answer = held.answer()
    assert (status, answer["revoked"], answer["keyring_version"]) == (200, [], rotated["version"])


def test_a_proxy_removed_by_another_process_gets_401_on_its_held_watch(pair: Pair) -> None:
    """``console-broker proxy remove`` is another process: on SQLite the feed's poll finds it, on
    PostgreSQL the NOTIFY of its transaction."""
    a, _ = pair
    _, snapshot = _watch(a)
    held = HeldWatch(a, snapshot["seq"])
    broker = a.state.open()
    try:
        broker.remove_proxy("fake", "test")
    finally:
        broker.close()
    status, answer = held.answer()
    assert (status, answer["error"]) == (401, "unauthorized")


def test_watch_refusals(pair: Pair) -> None:
    a, _ = pair
    _, snapshot = _watch(a)
    for raw in ("abc", "-1", "1.5", "99999999999999999999999"):
        status, answer = _watch(a, raw_since=raw)
        assert (status, answer["error"]) == (400, "bad_request"), raw
    status, answer = _watch(a, 0, authorization="Bearer fake.wrong")
    assert (status, answer["error"]) == (401, "unauthorized")
    status, answer = _watch(a, snapshot["seq"] + 1000)  # ahead of the database (restored): a snapshot, at once
    assert status == 200 and answer["seq"] == snapshot["seq"]


def test_a_revocation_at_b_closes_a_console_whose_proxy_watches_a_long_before_a_heartbeat(
    pair: Pair, tmp_path: Path, xvnc_vncauth: Any
) -> None:
    """A real console (Xvnc) through a real proxy linked to A only, heartbeating every 30 s: the
    revoke at B reaches it through the watch, 4410, well within one heartbeat."""
    a, b = pair
    proxy = start_linked_proxy(tmp_path, a, "pa", interval=SLOW_HEARTBEAT)
    try:
        healthy_proxies(b, 1)
        target = b.admin.add_target(name="vm", host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password)
        console = b.issuer.mint(target["id"], single_use=False)
        assert console["proxy_id"] == "pa"
        sid, tok = console["session_id"], console["token"]

        async def scenario() -> tuple[int | None, str | None]:
            viewer = await Console.open(proxy.ws_url, tok)
            await viewer.handshake()
            await asyncio.to_thread(b.admin.revoke, sid)
            code, reason = await asyncio.wait_for(viewer.wait_closed(), ANSWERED)
            refused = await try_upgrade(proxy.ws_url, tok)  # the reusable token cannot reopen it
            assert refused is not None and (refused.status, refused.body["error"]) == (410, "session_revoked")
            return code, reason

        assert asyncio.run(scenario()) == (4410, "session_ended")
        assert "the broker revoked 1 session(s)" in proxy.log_text()
        before = b.admin.keys()["version"]
        rotated = b.admin.rotate_keys()["version"]  # the watch answers; the proxy fetches the keys at once
        proxy.wait_for_log(f"keyring version {before} -> {rotated}", timeout=ANSWERED)
        assert tok not in proxy.log_text() + a.log_text() + b.log_text()
    finally:
        proxy.stop()


@pytest.mark.parametrize("engine", ["postgresql"])
def test_a_proxy_fails_over_to_the_second_replica_when_the_first_is_killed(
    pair: Pair, tmp_path: Path, xvnc_vncauth: Any
) -> None:
    """``--broker A --broker B``: A is SIGKILLed; the next single-use redeem succeeds through B
    and the heartbeats go on there (B lists the proxy healthy, seen after the kill)."""
    a, b = pair
    b.stop()
    b = start_broker(b.state)  # the default 0.5 s heartbeat interval: "healthy" means beating now
    try:
        proxy = start_linked_proxy(tmp_path, a, "pa", "--broker", b.base)
        target = b.admin.add_target(name="vm", host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password)
        healthy_proxies(b, 1)
        console = b.issuer.mint(target["id"])  # single use: the proxy must redeem it
        a.kill()
        killed = time.time()

        async def scenario() -> None:
            viewer = await Console.open(proxy.ws_url, console["token"])
            info = await viewer.handshake()
            assert info.name == b"vm"
            viewer.close()

        asyncio.run(scenario())
        redeemed = [e for e in b.admin.audit(0, "redeemed", 1000) if e["session_id"] == console["session_id"]]
        assert [e["actor"] for e in redeemed] == ["proxy:pa"]
        wait_for(
            lambda: any(p["id"] == "pa" and p["healthy"] and p["last_seen"] > killed for p in b.admin.proxies()),
            what="heartbeats through B",
        )
        proxy.wait_for_log("broker replica", "failed", b.base)
    finally:
        proxy.stop()
        b.stop()
