"""Two ``console-broker serve`` replicas on one real PostgreSQL database (each with its own state
dir holding a copy of master.key): any replica serves any request, single use stays exactly-once
across them, a revoke racing a redeem never leaves both committed out of order, a rotation through
one is what the other answers next, and a whole console lives across both."""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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
from pgcluster import PgCluster
from rfbclient import Console, try_upgrade
from test_broker_api import _proxy_auth

from broker.client import BrokerError

Replicas = tuple[BrokerProcess, BrokerProcess]


@pytest.fixture(scope="module")
def replicas(pg_cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    tmp = tmp_path_factory.mktemp("replicas")
    database = pg_cluster.new_database()
    state = BrokerState.create(tmp / "a", database=database)
    state.add_proxy("fake", "http://127.0.0.1:1")
    a = start_broker(state, heartbeat_interval=60.0)
    b = start_broker(state.replica(tmp / "b"), heartbeat_interval=60.0)
    yield a, b
    a.stop()
    b.stop()
    assert pg_cluster.password not in a.log_text() + b.log_text()  # after every request the module made


def _as_proxy(broker: BrokerProcess, path: str, body: Any) -> int:
    try:
        return broker.client().request("POST", path, body, authorization=_proxy_auth(broker))[0]
    except BrokerError as exc:
        return exc.status


def _beat(broker: BrokerProcess, version: int = 0) -> dict[str, Any]:
    body = {
        "proxy_id": "fake",
        "public_url": None,
        "sessions": 0,
        "capacity": 1000,
        "draining": False,
        "version": version,
    }
    return broker.client().request("POST", "/proxy/heartbeat", body, authorization=_proxy_auth(broker))[1]


def _at_once(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run ``calls`` in threads released together; their results in order."""
    start = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        start.wait()
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_the_replicas_share_credentials_targets_and_sessions(replicas: Replicas, pg_cluster: PgCluster) -> None:
    a, b = replicas
    target = a.admin.add_target(name="shared", host="127.0.0.1", port=5901)
    assert b.admin.target(target["id"])["name"] == "shared"
    _beat(b)
    console = b.issuer.mint(target["id"])
    assert [s["state"] for s in a.issuer.sessions() if s["session_id"] == console["session_id"]] == ["minted"]
    assert "postgres:***@127.0.0.1" in a.log_text() and "console-broker listening" in b.log_text()
    assert pg_cluster.password not in a.log_text() + b.log_text()


def test_one_single_use_token_redeemed_at_both_replicas_at_once_is_redeemed_once(replicas: Replicas) -> None:
    """Eight redeems of one jti, four at each replica, released together: one 200, seven 409."""
    a, b = replicas
    for _ in range(5):
        jti = secrets.token_urlsafe(18)
        body = {"jti": jti, "session_id": "race-" + jti[:8], "exp": int(time.time()) + 60}
        results = _at_once([lambda r=r, body=body: _as_proxy(r, "/proxy/redeem", body) for r in (a, b) * 4])
        assert sorted(results) == [200] + [409] * 7, results
        assert [e["type"] for e in a.admin.audit(0, "redeemed", 1000) if e["session_id"] == body["session_id"]] == [
            "redeemed"
        ]


def test_a_revoke_racing_a_redeem_never_commits_both_out_of_order(replicas: Replicas) -> None:
    """Revoke at A and redeem at B released together, many times. Either the redeem is refused
    (session_revoked), or it committed before the revoke: its audit event comes first. Without
    the redeem's row lock, READ COMMITTED lets a revoke commit between the redeem's check and its
    insert, and a redeem of a revoked session commits after the revoke."""
    a, b = replicas
    _beat(a)
    target = a.admin.add_target(name="race", host="127.0.0.1", port=5902)
    sids = [a.issuer.mint(target["id"])["session_id"] for _ in range(30)]
    outcomes: dict[str, int] = {}
    for sid in sids:
        body = {"jti": secrets.token_urlsafe(18), "session_id": sid, "exp": int(time.time()) + 60}
        revoked, redeemed = _at_once(
            [lambda sid=sid: a.admin.revoke(sid), lambda body=body: _as_proxy(b, "/proxy/redeem", body)]
        )
        assert revoked is None and redeemed in (200, 409)
        outcomes[sid] = redeemed
    events = sorted(
        (e for kind in ("redeemed", "revoked") for e in a.admin.audit(0, kind, 1000) if e["session_id"] in outcomes),
        key=lambda e: e["seq"],
    )
    for sid, status in outcomes.items():
        order = [e["type"] for e in events if e["session_id"] == sid and e["type"] in ("redeemed", "revoked")]
        assert order == (["redeemed", "revoked"] if status == 200 else ["revoked"]), (sid, order)


def test_a_rotation_through_one_replica_is_what_the_other_answers_next(replicas: Replicas) -> None:
    a, b = replicas
    before = b.admin.keys()["version"]
    rotated = a.admin.rotate_keys()
    assert rotated["version"] == before + 1
    assert b.admin.keys()["version"] == rotated["version"]
    answer = _beat(b, version=before)
    assert answer["keyring_version"] == rotated["version"] and "keyring" in answer


def test_a_console_lives_across_both_replicas(pg_cluster: PgCluster, tmp_path: Path, xvnc_vncauth: Any) -> None:
    """The proxy talks to replica A only; the console is minted and revoked at replica B. The
    first open redeems at A, the token is then refused, B's revoke closes the session (4410)
    within a heartbeat of the proxy at A."""
    state = BrokerState.create(tmp_path / "a", database=pg_cluster.new_database())
    a = start_broker(state)
    b = start_broker(state.replica(tmp_path / "b"))
    proxy = start_linked_proxy(tmp_path, a, "pa")
    try:
        healthy_proxies(b, 1)
        target = b.admin.add_target(name="vm", host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password)
        console = b.issuer.mint(target["id"])
        sid, tok = console["session_id"], console["token"]

        async def scenario() -> tuple[int | None, float]:
            viewer = await Console.open(proxy.ws_url, tok)
            info = await viewer.handshake()
            assert (info.width, info.height, info.name) == (800, 600, b"vm")
            refused = await try_upgrade(proxy.ws_url, tok)
            assert refused is not None and (refused.status, refused.body["error"]) == (409, "token_used")
            started = time.monotonic()
            await asyncio.to_thread(b.admin.revoke, sid)
            code, _ = await asyncio.wait_for(viewer.wait_closed(), 10)
            return code, time.monotonic() - started

        code, elapsed = asyncio.run(scenario())
        assert code == 4410 and elapsed <= HEARTBEAT + 0.5, (code, elapsed)
        types = [e["type"] for e in b.admin.audit(0, None, 1000) if e["session_id"] == sid]
        assert types.index("minted") < types.index("redeemed") < types.index("revoked")
        for text in (a.log_text(), b.log_text(), proxy.log_text()):
            assert tok not in text and xvnc_vncauth.password not in text
    finally:
        proxy.stop()
        a.stop()
        b.stop()


def _audit_after(broker: BrokerProcess, after: int) -> list[dict[str, Any]]:
    """Every event after ``after``, page by page, as a follower of ``GET /audit?after=SEQ`` reads."""
    events: list[dict[str, Any]] = []
    while page := broker.admin.audit(after, None, 1000):
        events += page
        after = page[-1]["seq"]
    return events


def test_a_reader_following_the_audit_never_skips_a_row_while_both_replicas_write(replicas: Replicas) -> None:
    """Four writers (two per replica) commit audited changes while a reader follows
    ``GET /audit?after=SEQ`` at A: the numbers it sees are consecutive, and exactly the rows
    that the log holds once the writers are done."""
    a, b = replicas
    start = (_audit_after(a, 0) or [{"seq": 0}])[-1]["seq"]
    writers_done = threading.Event()
    seen: list[int] = []

    def follow() -> None:
        after = start
        while True:
            done = writers_done.is_set()
            for event in _audit_after(a, after):
                seen.append(event["seq"])
                after = event["seq"]
            if done:
                return

    def write(replica: BrokerProcess, tag: str) -> None:
        for i in range(25):
            replica.admin.add_target(name=f"{tag}-{i}", host="127.0.0.1", port=5900)

    reader = threading.Thread(target=follow)
    reader.start()
    _at_once([lambda r=r, tag=tag: write(r, tag) for r, tag in ((a, "a1"), (a, "a2"), (b, "b1"), (b, "b2"))])
    writers_done.set()
    reader.join()
    assert seen == list(range(start + 1, start + 101))
    assert [e["seq"] for e in _audit_after(b, start)] == seen


def test_a_row_numbered_later_never_commits_before_an_earlier_one(
    pg_cluster: PgCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The interleaving forced: replica A's transaction has numbered its audit row and is slow to
    commit; replica B's transaction must wait for that COMMIT to number its own, so a follower
    at that moment sees neither row, never B's alone (which would make it skip A's). A sequence
    or identity column would let B commit the next number first."""
    state = BrokerState.create(tmp_path / "a", database=pg_cluster.new_database())
    a, b = state.open(), state.replica(tmp_path / "b").open()
    try:
        start = a.audit(0, None, 1000)["events"][-1]["seq"]
        numbered, go = threading.Event(), threading.Event()
        real = a.store._flush_audit

        def slow_commit(conn: Any, events: list[Any]) -> None:
            real(conn, events)
            numbered.set()
            assert go.wait(10)

        monkeypatch.setattr(a.store, "_flush_audit", slow_commit)
        first = threading.Thread(target=lambda: a.add_target({"id": "first", "name": "A", "host": "h", "port": 1}, "a"))
        first.start()
        assert numbered.wait(10)
        second = threading.Thread(
            target=lambda: b.add_target({"id": "second", "name": "B", "host": "h", "port": 1}, "b")
        )
        second.start()
        wait_for(
            lambda: (
                b.store.one(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE 'UPDATE audit_counter%'"
                )[0]
                == 1
            ),
            what="B waiting",
        )
        assert b.audit(start, None, 1000)["events"] == []
        go.set()
        first.join()
        second.join()
        events = b.audit(start, None, 1000)["events"]
        assert [(e["seq"], e["actor"]) for e in events] == [(start + 1, "a"), (start + 2, "b")]
    finally:
        go.set()
        a.close()
        b.close()
