"""Faults against real processes on a real PostgreSQL: a replica SIGKILLed mid-traffic, the
database stopped with ``pg_ctl stop -m immediate`` and started again, two replicas migrating one
empty database at once.

The outage test stops its own cluster (``private_pg``), never the session's. Answers are bounded
by the client's timeout (:data:`CLIENT_TIMEOUT`): "answered" is the assertion, never a duration.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
from brokerproc import (
    BrokerProcess,
    BrokerState,
    healthy_proxies,
    legacy_state_dir,
    start_broker,
    start_linked_proxy,
    wait_for,
)
from pgcluster import PgCluster
from rfbclient import Console, try_upgrade
from test_broker_api import _proxy_auth

from broker.client import BrokerClient, BrokerError
from broker.service import Broker
from broker.store import SCHEMA_VERSION
from broker.vault import MASTER_KEY_NAME
from console_proxy import token
from console_proxy.keyring import Keyring

CLIENT_TIMEOUT = 5.0
"""Every request here gives up after this long: an answer before it is "no hang"."""
MINTS = 1000


@pytest.fixture
def private_pg() -> Iterator[PgCluster]:
    """A PostgreSQL cluster of this test's own, which it may stop and start."""
    cluster = PgCluster()
    yield cluster
    cluster.destroy()


def _client(broker: BrokerProcess, key: str | None) -> BrokerClient:
    return BrokerClient(broker.base, key, timeout=CLIENT_TIMEOUT)


def _status(call: Any) -> tuple[int, str | None]:
    """(status, error code) of a client call: (200, None) when it succeeded."""
    try:
        call()
    except BrokerError as exc:
        return exc.status, exc.code
    return 200, None


def _get(broker: BrokerProcess, path: str) -> tuple[int, dict[str, Any]]:
    """GET without credentials; (status, JSON body). A timeout raises: that is the hang we test for."""
    try:
        with urllib.request.urlopen(broker.base + path, timeout=CLIENT_TIMEOUT) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _beat(broker: BrokerProcess, name: str = "fake") -> dict[str, Any]:
    body = {"proxy_id": name, "public_url": None, "sessions": 0, "capacity": 100000, "draining": False, "version": 0}
    return _client(broker, None).request("POST", "/proxy/heartbeat", body, authorization=_proxy_auth(broker, name))[1]


def _redeem(client: BrokerClient, auth: str, claims: token.Claims) -> int:
    body = {"jti": claims.jti, "session_id": claims.sid, "exp": claims.exp}
    try:
        return client.request("POST", "/proxy/redeem", body, authorization=auth)[0]
    except BrokerError as exc:
        return exc.status


# --- a replica SIGKILLed during a thousand mints -------------------------------------------------


def test_a_replica_killed_mid_traffic_loses_no_acknowledged_console_and_none_redeems_twice(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    """1,000 mints from eight threads spread over replicas A and B; B is SIGKILLed after 300
    acknowledgements (a thread whose replica is gone carries on at the other, as a balancer
    would). Every mint answered 201 is in the database with its audit event; B is started
    again and every console's token is redeemed at both replicas at once: one 200 and one 409
    each, one "redeemed" event each."""
    database = pg_cluster.new_database()
    state = BrokerState.create(tmp_path / "a", database=database)
    state.add_proxy("fake", "http://127.0.0.1:1")
    b_state = state.replica(tmp_path / "b")
    a = start_broker(state, heartbeat_interval=600.0)
    b = start_broker(b_state, heartbeat_interval=600.0)
    try:
        ring = Keyring.from_jwks(_beat(a)["keyring"])
        target = a.admin.add_target(name="vm", host="127.0.0.1", port=5901)
        acked: list[tuple[str, str]] = []  # (session_id, token) answered 201
        lock, killed, halfway = threading.Lock(), threading.Event(), threading.Event()

        def mint_some(worker: int, count: int) -> None:
            clients = [_client(r, state.issuer_key) for r in ([a, b] if worker % 2 else [b, a])]
            for _ in range(count):
                for client in clients:
                    try:
                        console = client.mint(target["id"], ttl=600)
                    except BrokerError as exc:
                        assert exc.status == 0 or exc.code == "storage_unavailable", exc  # B gone
                        continue
                    with lock:
                        acked.append((console["session_id"], console["token"]))
                        if len(acked) >= 300:
                            halfway.set()
                    break

        killer = threading.Thread(target=lambda: (halfway.wait(60), b.kill(), killed.set()))
        killer.start()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda w: mint_some(w, MINTS // 8), range(8)))
        killer.join()
        assert killed.is_set() and len(acked) >= MINTS * 0.9, len(acked)

        with psycopg.connect(database) as conn:
            sessions = {row[0] for row in conn.execute("SELECT id FROM sessions")}
            minted = [row[0] for row in conn.execute("SELECT session_id FROM audit WHERE type = 'minted'")]
        ids = [sid for sid, _ in acked]
        assert set(ids) <= sessions and set(ids) <= set(minted)
        assert len(minted) == len(set(minted))  # one event per console, none written twice

        b = start_broker(b_state, heartbeat_interval=600.0)  # the killed replica comes back
        claims = [token.verify(tok, ring, time.time()) for _, tok in acked]
        auth, local = _proxy_auth(a), threading.local()

        def redeem(job: tuple[token.Claims, int]) -> tuple[str, int]:
            if not hasattr(local, "clients"):  # a client per thread: making one costs ~0.1 s of CPU
                local.clients = [_client(r, None) for r in (a, b)]
            return job[0].jti, _redeem(local.clients[job[1]], auth, job[0])

        jobs = [(c, replica) for c in claims for replica in (0, 1)]
        random.Random(7).shuffle(jobs)
        with ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(redeem, jobs))
        wins: dict[str, list[int]] = {}
        for jti, status in statuses:
            wins.setdefault(jti, []).append(status)
        assert all(sorted(s) == [200, 409] for s in wins.values()), [
            s for s in wins.values() if sorted(s) != [200, 409]
        ]
        with psycopg.connect(database) as conn:
            redeemed = [row[0] for row in conn.execute("SELECT session_id FROM audit WHERE type = 'redeemed'")]
        assert sorted(redeemed) == sorted(ids)
    finally:
        a.stop()
        b.stop()


# --- PostgreSQL stopped with -m immediate mid-traffic --------------------------------------------


class Traffic:
    """Mints in a loop at one replica until stopped, recording every answer (a client timeout
    would raise in the thread and end the answers: the test then fails waiting for more)."""

    def __init__(self, broker: BrokerProcess, key: str, target_id: str) -> None:
        self.broker, self.key, self.target_id = broker, key, target_id
        self.answers: list[tuple[int, str | None]] = []
        self.slowest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        client = _client(self.broker, self.key)
        while not self._stop.is_set():
            started = time.monotonic()
            answer = _status(lambda: client.mint(self.target_id, single_use=False))
            self.slowest = max(self.slowest, time.monotonic() - started)
            self.answers.append(answer)

    def stop(self) -> list[tuple[int, str | None]]:
        self._stop.set()
        self._thread.join(CLIENT_TIMEOUT * 2)
        return self.answers


def test_postgresql_stopped_mid_traffic_answers_503_at_once_and_recovers_by_itself(
    private_pg: PgCluster, tmp_path: Path, xvnc_vncauth: Any
) -> None:
    """``pg_ctl stop -m immediate`` while mints flow: /readyz and the API answer 503
    storage_unavailable (never a hang, never a 500), /healthz stays 200, a linked proxy keeps
    opening a reusable console at the real Xvnc and refuses a single-use one (503
    broker_unavailable); once PostgreSQL is started again the broker is ready by itself, mints
    again, and the single-use console minted before the outage opens."""
    state = BrokerState.create(tmp_path / "a", database=private_pg.new_database())
    broker = start_broker(state)
    proxy = start_linked_proxy(tmp_path, broker, "pa")
    traffic: Traffic | None = None
    try:
        healthy_proxies(broker, 1)
        target = broker.admin.add_target(
            name="vm", host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password
        )
        reusable = broker.issuer.mint(target["id"], single_use=False, ttl=600)["token"]
        single = broker.issuer.mint(target["id"], ttl=600)["token"]
        traffic = Traffic(broker, state.issuer_key, target["id"])
        wait_for(lambda: len(traffic.answers) >= 20, what="mints flowing")

        private_pg.stop("immediate")
        status, body = _get(broker, "/readyz")
        assert (status, body["error"]) == (503, "storage_unavailable")
        for call in (
            lambda: broker.issuer.mint(target["id"]),
            broker.issuer.sessions,
            lambda: broker.admin.audit(0),
            broker.admin.proxies,
            lambda: _beat(broker, "pa"),
        ):
            assert _status(call) == (503, "storage_unavailable")
        assert _get(broker, "/healthz")[0] == 200

        async def proxy_during_outage() -> None:
            viewer = await Console.open(proxy.ws_url, reusable)
            assert (await viewer.handshake()).name == b"vm"
            viewer.close()
            refused = await try_upgrade(proxy.ws_url, single)
            assert refused is not None and (refused.status, refused.body["error"]) == (503, "broker_unavailable")

        asyncio.run(proxy_during_outage())
        during = len(traffic.answers)

        private_pg.start()
        back = time.monotonic()
        wait_for(lambda: _get(broker, "/readyz")[0] == 200, timeout=30, what="the broker ready again")
        ready_after = time.monotonic() - back
        wait_for(
            lambda: len(traffic.answers) > during and traffic.answers[-1][0] == 200,
            timeout=10,
            what="mints answered again",
        )
        answers = traffic.stop()
        # no_proxy_available: for a heartbeat interval after the outage, the proxy's heartbeats
        # (refused while it lasted) have not yet made it healthy again
        assert set(answers) <= {(200, None), (503, "storage_unavailable"), (503, "no_proxy_available")}, set(answers)
        assert (503, "storage_unavailable") in answers[:during]
        assert broker.issuer.mint(target["id"])["token"]

        async def single_use_after() -> None:
            viewer = await Console.open(proxy.ws_url, single)
            assert (await viewer.handshake()).name == b"vm"
            viewer.close()

        asyncio.run(single_use_after())
        healthy_proxies(broker, 1)
        print(
            f"slowest mint answer through the outage: {traffic.slowest:.3f} s; "
            f"ready {ready_after:.2f} s after PostgreSQL was"
        )
        text = broker.log_text()
        assert private_pg.password not in text + proxy.log_text()
        assert "Traceback" not in text and " 500 " not in text
    finally:
        if traffic is not None:
            traffic.stop()
        proxy.stop()
        broker.stop()


# --- two replicas migrating one empty database at once -------------------------------------------


def test_two_replicas_started_at_once_on_an_empty_database_migrate_it_once(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    """Both state dirs hold master.key and keyring.json (as an upgrade from the embedded
    store leaves them); both ``serve --migrate`` on one empty PostgreSQL database, started
    together. Each migration is applied once (one log line per schema version across both),
    the schema is at this release's version, one keyring was imported, and both serve."""
    database = pg_cluster.new_database()
    legacy_state_dir(tmp_path / "a")
    (tmp_path / "b").mkdir(mode=0o700)
    for name in (MASTER_KEY_NAME, "keyring.json"):
        shutil.copy2(tmp_path / "a" / name, tmp_path / "b" / name)
    states = [BrokerState(tmp_path / name, "", "", database=database) for name in ("a", "b")]
    go = threading.Barrier(2)
    started: list[BrokerProcess | None] = [None, None]

    def start(i: int) -> None:
        go.wait()
        started[i] = start_broker(states[i], "--migrate")

    threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    a, b = started
    try:
        assert a is not None and b is not None
        logs = a.log_text() + b.log_text()
        migrated = re.findall(r"migrated to schema (\d+)", logs)
        assert sorted(map(int, migrated)) == list(range(1, SCHEMA_VERSION + 1)), logs
        with psycopg.connect(database) as conn:
            assert conn.execute("SELECT id, version FROM schema_version").fetchall() == [(1, SCHEMA_VERSION)]
            assert conn.execute("SELECT count(*) FROM keyring").fetchone() == (1,)
        assert logs.count("into the database (version") == 1
        broker = Broker(tmp_path / "a", database=database)
        try:
            keys = {"admin": broker.create_apikey("admin", "admin", "test")}
        finally:
            broker.close()
        for replica in (a, b):
            assert _get(replica, "/readyz") == (200, {"status": "ready"})
        assert _client(a, keys["admin"]).keys() == _client(b, keys["admin"]).keys()
    finally:
        for replica in started:
            if replica is not None:
                replica.stop()


# --- the periodic cleanup, one replica at a time ---------------------------------------------------


def test_a_cleanup_tick_is_skipped_while_another_replica_runs_one(
    engine: str, database: str | None, tmp_path: Path
) -> None:
    """While the cleanup's advisory lock is held (by "another replica": a plain connection here),
    a tick deletes nothing; once it is released, the next tick does. SQLite: always this
    process's turn."""
    from broker import serve
    from broker.engines import CLEANUP_LOCK_KEY

    state = BrokerState.create(tmp_path / "a", database=database)
    broker = state.open()
    try:
        with broker.store.transaction() as conn:
            conn.execute("INSERT INTO redeemed (jti, session_id, proxy_id, exp, at) VALUES ('old', 's', 'p', 1, 1.0)")

        def count():
            return broker.store.one("SELECT count(*) FROM redeemed")[0]

        if engine == "postgresql":
            assert database is not None
            with psycopg.connect(database, autocommit=True) as other:
                other.execute("SELECT pg_advisory_lock(%s)", (CLEANUP_LOCK_KEY,))
                serve._cleanup(broker)
                assert count() == 1
                other.execute("SELECT pg_advisory_unlock(%s)", (CLEANUP_LOCK_KEY,))  # closing frees it later
        serve._cleanup(broker)
        assert count() == 0
    finally:
        broker.close()


def test_a_lock_held_elsewhere_or_a_slow_statement_is_a_503_not_a_stuck_loop_nor_an_outage(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    """Another session holds the keyring row (a stuck transaction elsewhere): a mint waits at
    most the lock timeout and fails as storage_unavailable; a statement running past the
    statement timeout is cancelled the same way. Neither opens the outage circuit: the next
    request goes through."""
    from broker.auth import Principal
    from broker.store import StoreUnavailable

    state = BrokerState.create(tmp_path / "a", database=pg_cluster.new_database())
    state.add_proxy("fake", "http://127.0.0.1:1")
    broker = state.open()
    try:
        issuer = broker.authenticate(f"Bearer {state.issuer_key}", proxy=False)
        assert isinstance(issuer, Principal)
        target = broker.add_target({"name": "vm", "host": "127.0.0.1", "port": 5901}, "t")
        assert state.database is not None
        with psycopg.connect(state.database) as other:
            other.execute("SELECT * FROM keyring FOR UPDATE")
            with pytest.raises(StoreUnavailable, match="lock timeout"):
                broker.mint_console(issuer, {"target_id": target["id"]})
            other.rollback()
        assert not broker.store.unreachable
        with pytest.raises(StoreUnavailable, match="statement timeout"):
            broker.store.one("SELECT pg_sleep(5)")
        assert not broker.store.unreachable
        broker.store.ready()
    finally:
        broker.close()
