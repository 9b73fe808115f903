"""Sessions as operational state: retention (cleanup), pagination of GET /sessions, migration 3.

Retention runs in-process with freezegun (days pass in no time); pagination against a real
``console-broker serve``, with sessions minted between pages.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from brokerproc import BrokerProcess, legacy_state_dir
from freezegun import freeze_time
from test_broker_api import _error, start_with_a_fake_proxy
from test_broker_units import registered_proxy

from broker import openapi, serve
from broker.auth import Principal
from broker.cli import main
from broker.client import BrokerClient
from broker.service import (
    CLEANUP_BATCH,
    MIN_SESSION_RETENTION,
    REVOKED_MEMORY,
    ApiError,
    Broker,
    BrokerConfig,
    init_state_dir,
)
from broker.store import MIGRATIONS, SCHEMA_VERSION, Store
from console_proxy import b64url, clock
from console_proxy.keyring import DEFAULT_SKEW, MAX_SKEW

T0 = "2030-01-01 00:00:00"
ISSUER = Principal("k1", "app", "issuer")
ADMIN = Principal("k0", "ops", "admin")
TTL = 60
MAX_PAGES = 100

# --- retention: in-process, time frozen -------------------------------------------------------


@pytest.fixture
def open_broker(
    tmp_path: Path, engine: str, request: pytest.FixtureRequest
) -> Iterator[Callable[..., tuple[Broker, Principal]]]:
    """``open_broker(**config)``: a Broker on a fresh state dir (and database, on either engine)
    with a target and proxy "p"."""
    opened: list[Broker] = []

    def make(**config: Any) -> tuple[Broker, Principal]:
        root = tmp_path / f"s{len(opened)}"
        database = request.getfixturevalue("pg_cluster").new_database() if engine == "postgresql" else None
        init_state_dir(root, database=database)
        broker = Broker(root, BrokerConfig(**config), database=database)
        opened.append(broker)
        broker.add_target({"id": "vm", "name": "VM", "host": "10.0.0.5", "port": 5901}, "test")
        return broker, registered_proxy(broker)

    yield make
    for broker in opened:
        broker.close()


def _beat(broker: Broker, proxy: Principal) -> dict[str, Any]:
    return broker.heartbeat(
        proxy,
        {"proxy_id": proxy.id, "sessions": 0, "capacity": 100, "draining": False, "version": broker.keyring().version},
    )


def _mint(broker: Broker, proxy: Principal, **body: Any) -> str:
    """A console minted as the API would (the heartbeat first keeps the proxy healthy)."""
    _beat(broker, proxy)
    return broker.mint_console(ISSUER, {"target_id": "vm", "ttl": TTL, **body})["session_id"]


def _rows_in(conn: Any) -> int:
    """Sessions and redeemed rows, as the transaction on ``conn`` sees them."""
    return int(conn.execute("SELECT (SELECT count(*) FROM sessions) + (SELECT count(*) FROM redeemed)").fetchone()[0])


def _event(kind: str, sid: str) -> dict[str, Any]:
    return {"event": kind, "session_id": sid, "close_code": 1000 if kind == "closed" else None}


def _ids(broker: Broker) -> set[str]:
    return {r["id"] for r in broker.store.all("SELECT id FROM sessions")}


def _audit_count(broker: Broker) -> int:
    return int(broker.store.one("SELECT count(*) FROM audit")[0])


def test_ended_sessions_go_once_the_retention_passed_and_the_rest_stay(
    open_broker: Callable[..., tuple[Broker, Principal]],
) -> None:
    """Closed, revoked and never-opened expired sessions go one retention after they ended (the
    latest of expiry, close, revocation); an active one never does. The audit log keeps all."""
    retention = 2 * 86400
    broker, proxy = open_broker(session_retention=retention)
    with freeze_time(T0) as frozen:
        closed, expired, revoked, active, late = (_mint(broker, proxy) for _ in range(5))
        broker.proxy_events(
            proxy,
            [_event("opened", closed), _event("closed", closed), _event("opened", active), _event("opened", late)],
        )
        broker.revoke_session(revoked, "test")
        frozen.tick(86400)
        broker.proxy_events(proxy, [_event("closed", late)])  # a console closed a day after it opened
        frozen.tick(TTL + retention - 86400 - 1)  # one second before the retention after exp
        assert broker.cleanup() == 0
        assert _ids(broker) == {closed, expired, revoked, active, late}
        frozen.tick(2)
        audit = _audit_count(broker)
        assert broker.cleanup() == 3
        assert _ids(broker) == {active, late}
        assert _audit_count(broker) == audit  # the permanent record is untouched
        frozen.tick(86400)  # past the late close + the retention
        assert broker.cleanup() == 1
        assert _ids(broker) == {active}


def test_a_revoked_session_stays_while_any_proxy_could_still_accept_it(
    open_broker: Callable[..., tuple[Broker, Principal]],
) -> None:
    """Deleting a revoked row would make it read as "not revoked": redeem would let it through and
    the heartbeat list would drop it. A retention configured below the minimum (in-process; the
    CLI refuses it) acts as the minimum, so the row stays while a proxy running with MAX_SKEW
    still accepts the token, and while the list must still name a revoked session left open."""
    broker, proxy = open_broker(session_retention=0)
    with freeze_time(T0) as frozen:
        closed = _mint(broker, proxy, single_use=False)
        left_open = _mint(broker, proxy, single_use=False)
        broker.proxy_events(proxy, [_event("opened", closed), _event("opened", left_open)])
        broker.revoke_session(closed, "test")
        broker.revoke_session(left_open, "test")
        broker.proxy_events(proxy, [_event("closed", closed)])
        frozen.tick(TTL + MAX_SKEW + DEFAULT_SKEW - 1)  # a proxy with the largest skew still accepts it
        assert broker.cleanup() == 0
        assert set(_beat(broker, proxy)["revoked"]) == {closed, left_open}
        with pytest.raises(ApiError) as refused:
            broker.redeem(proxy, {"jti": "j" * 22, "session_id": closed, "exp": int(clock.now()) + 10})
        assert refused.value.code == "session_revoked"
        frozen.move_to(T0)  # the revocations happened at T0
        frozen.tick(REVOKED_MEMORY - 1)  # the session left open is still on the list
        assert broker.cleanup() == 0
        assert _beat(broker, proxy)["revoked"] == [left_open]
        frozen.tick(TTL + MIN_SESSION_RETENTION - REVOKED_MEMORY + 2)  # one retention after exp, past both
        assert _beat(broker, proxy)["revoked"] == []  # no longer needed anywhere ...
        assert broker.cleanup() == 2  # ... so now they go
        assert _ids(broker) == set()


def test_cleanup_deletes_in_bounded_batches(
    open_broker: Callable[..., tuple[Broker, Principal]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each transaction deletes at most one batch, so the write lock is never held for a whole
    backlog; what one run leaves (max_batches) the next one takes."""
    broker, _ = open_broker()
    with freeze_time(T0):
        old = clock.now() - 30 * 86400
        with broker.store.transaction() as conn:
            conn.executemany(
                "INSERT INTO sessions (id, issued_by, state, single_use, exp, minted_at) "
                "VALUES (?, 'k1', 'minted', 1, ?, ?)",
                [(f"s{i:02}", int(old), old) for i in range(25)],
            )
        per_transaction: list[int] = []
        real = broker.store.transaction

        @contextmanager
        def counted(**options: Any) -> Iterator[Any]:
            with real(**options) as conn:
                before = _rows_in(conn)
                yield conn
                per_transaction.append(before - _rows_in(conn))

        monkeypatch.setattr(broker.store, "transaction", counted)
        assert broker.cleanup(batch=10, max_batches=2) == 20
        assert max(per_transaction) == 10 and sum(per_transaction) == 20
        assert len(_ids(broker)) == 5
        assert broker.cleanup(batch=10, max_batches=2) == 5
        assert max(per_transaction) == 10 and _ids(broker) == set()


def test_events_for_a_deleted_session_do_not_fail_the_batch(
    open_broker: Callable[..., tuple[Broker, Principal]],
) -> None:
    """A proxy's late report about a pruned session is audited like any other, does not bring the
    row back, and the rest of its batch lands."""
    broker, proxy = open_broker()
    with freeze_time(T0) as frozen:
        gone = _mint(broker, proxy)
        broker.proxy_events(proxy, [_event("opened", gone), _event("closed", gone)])
        frozen.tick(TTL + broker.config.session_retention + 1)
        assert broker.cleanup() == 1 and gone not in _ids(broker)
        live = _mint(broker, proxy)
        audit = _audit_count(broker)
        batch = [_event("opened", gone), _event("closed", gone), _event("opened", live)]
        assert broker.proxy_events(proxy, batch) == {"accepted": 3}
        assert _ids(broker) == {live}
        assert broker.store.one("SELECT state FROM sessions WHERE id = ?", live)["state"] == "active"
        assert _audit_count(broker) == audit + 3
        with pytest.raises(ApiError) as unknown:
            broker.revoke_session(gone, "test")
        assert unknown.value.code == "session_not_found"


@pytest.mark.parametrize("seconds", ["3600", str(int(MIN_SESSION_RETENTION) - 1), "-1", "nan"])
def test_serve_refuses_a_retention_below_the_minimum(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], seconds: str
) -> None:
    """Refused in one line (exit 1) before anything is opened, rather than silently raised."""
    status = main(["serve", "--state-dir", str(tmp_path / "none"), "--session-retention", seconds])
    err = capsys.readouterr().err
    assert status == 1 and f"--session-retention must be at least {int(MIN_SESSION_RETENTION)}" in err
    assert err.count("\n") == 1


def test_pages_break_ties_on_the_session_id(open_broker: Callable[..., tuple[Broker, Principal]]) -> None:
    """Sessions minted in the same instant: the keyset's id part keeps a walk from skipping one."""
    broker, _ = open_broker()
    with broker.store.transaction() as conn:
        conn.executemany(
            "INSERT INTO sessions (id, issued_by, state, single_use, exp, minted_at) "
            "VALUES (?, 'k1', 'minted', 1, 100, 50.25)",
            [(f"tie{i}",) for i in range(5)],
        )
    seen, cursor = [], None
    for _ in range(MAX_PAGES):
        page = broker.list_sessions(ADMIN, "all", limit=2, cursor=cursor)
        seen += [s["session_id"] for s in page["sessions"]]
        if (cursor := page["next_cursor"]) is None:
            break
    assert seen == [f"tie{i}" for i in reversed(range(5))]


# --- migration 3 -----------------------------------------------------------------------------


def test_a_version_2_database_gains_the_session_indexes(tmp_path: Path) -> None:
    """A database made before migration 3 keeps its sessions and pages them through the indexes."""
    root = tmp_path / "old"
    legacy_state_dir(root)
    with sqlite3.connect(root / "broker.db") as conn:
        conn.executescript(MIGRATIONS[0].sqlite + MIGRATIONS[1].sqlite + "PRAGMA user_version = 2;")
        conn.executemany(
            "INSERT INTO sessions (id, issued_by, state, single_use, exp, minted_at) "
            "VALUES (?, 'k1', 'closed', 1, 100, ?)",
            [(f"old{i}", float(i)) for i in range(3)],
        )
    broker = Broker(root)
    try:
        assert broker.store.version == SCHEMA_VERSION
        assert not (root / "keyring.json").exists() and (root / "keyring.json.imported").exists()
        indexes = {r["name"] for r in broker.store.all("PRAGMA index_list(sessions)")}
        assert {"sessions_minted", "sessions_issuer_minted", "sessions_state_minted"} <= indexes
        plan = " ".join(
            r["detail"]
            for r in broker.store.all(
                "EXPLAIN QUERY PLAN SELECT * FROM sessions WHERE issued_by = ? AND (minted_at, id) < (?, ?) "
                "ORDER BY minted_at DESC, id DESC LIMIT 2",
                "k1",
                9.0,
                "z",
            )
        )
        assert "sessions_issuer_minted" in plan and "TEMP B-TREE" not in plan
        first = broker.list_sessions(ISSUER, "closed", limit=2)
        rest = broker.list_sessions(ISSUER, "closed", limit=2, cursor=first["next_cursor"])
        assert [s["session_id"] for s in first["sessions"] + rest["sessions"]] == ["old2", "old1", "old0"]
        assert rest["next_cursor"] is None
    finally:
        broker.close()
    store = Store(root / "broker.db")  # reopening applies nothing twice
    try:
        assert store.version == SCHEMA_VERSION
    finally:
        store.close()


# --- pagination: a real broker process ---------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """Started with the shortest retention allowed (accepted); one heartbeat keeps "fake" healthy."""
    tmp = tmp_path_factory.mktemp("broker-sessions")
    process = start_with_a_fake_proxy(tmp, "--session-retention", str(int(MIN_SESSION_RETENTION)))
    yield process
    process.stop()


def _issuer(served: BrokerProcess, name: str) -> tuple[BrokerClient, str]:
    """A fresh issuer key (so each test sees only its own sessions) and its key id."""
    broker = Broker(served.state.root)
    try:
        key = broker.create_apikey(name, "issuer", "test")
    finally:
        broker.close()
    return served.client(key), key.split(".")[1]


def _walk(client: BrokerClient, limit: int, between: Callable[[], None] = lambda: None) -> list[str]:
    """Every page from the newest on, calling ``between`` before each next page (a bounded number
    of pages: a cursor that does not move on fails the test instead of looping)."""
    seen: list[str] = []
    cursor = None
    for _ in range(MAX_PAGES):
        page = client.sessions_page(limit=limit, cursor=cursor)
        assert len(page["sessions"]) <= limit
        seen += [s["session_id"] for s in page["sessions"]]
        if (cursor := page["next_cursor"]) is None:
            return seen
        between()
    raise AssertionError(f"still not done after {MAX_PAGES} pages")


def test_a_walk_sees_every_session_once_newest_first_while_more_are_minted(served: BrokerProcess) -> None:
    client, _ = _issuer(served, "walker")
    target = served.admin.add_target(name="walk", host="127.0.0.1", port=5910)
    for _ in range(7):
        client.mint(target["id"])
    listed = client.sessions()
    assert len(listed) == 7
    assert listed == sorted(listed, key=lambda s: (s["minted_at"], s["session_id"]), reverse=True)
    minted_meanwhile: list[str] = []
    walked = _walk(client, 3, lambda: minted_meanwhile.append(client.mint(target["id"])["session_id"]))
    assert walked == [s["session_id"] for s in listed]  # 3 + 3 + 1, none twice, none of the new ones
    assert len(minted_meanwhile) == 2
    assert _walk(client, 4) == minted_meanwhile[::-1] + walked


def test_the_default_page_is_1000_and_a_cursor_leads_to_the_rest(served: BrokerProcess) -> None:
    client, key_id = _issuer(served, "bulk")
    broker = Broker(served.state.root)
    try:
        with broker.store.transaction() as conn:  # the running broker sees them at once (WAL)
            conn.executemany(
                "INSERT INTO sessions (id, issued_by, state, single_use, exp, minted_at) "
                "VALUES (?, ?, 'closed', 1, 100, ?)",
                [(f"b{i:04}", key_id, i + 0.5) for i in range(1001)],
            )
    finally:
        broker.close()
    first = client.sessions_page()
    assert len(first["sessions"]) == 1000 and first["sessions"][0]["session_id"] == "b1000"
    last = client.sessions_page(cursor=first["next_cursor"])
    assert [s["session_id"] for s in last["sessions"]] == ["b0000"] and last["next_cursor"] is None
    assert client.sessions("closed", limit=1000, cursor=first["next_cursor"]) == last["sessions"]


def test_issuers_page_through_their_own_sessions_only(served: BrokerProcess) -> None:
    ann, _ = _issuer(served, "ann")
    bob, _ = _issuer(served, "bob")
    target = served.admin.add_target(name="own", host="127.0.0.1", port=5911)
    mine = {ann.mint(target["id"])["session_id"] for _ in range(3)}
    theirs = {bob.mint(target["id"])["session_id"] for _ in range(3)}
    walked = _walk(ann, 2)
    assert len(walked) == 3 and set(walked) == mine
    bobs_cursor = bob.sessions_page(limit=1)["next_cursor"]  # a position, not a permission
    assert not {s["session_id"] for s in ann.sessions(cursor=bobs_cursor)} & theirs
    assert mine | theirs <= set(_walk(served.admin, 500))


def _cursor(value: str) -> str:
    return b64url.encode(value.encode())


@pytest.mark.parametrize(
    "query",
    [
        {"limit": "0"},
        {"limit": "1001"},
        {"limit": "-1"},
        {"limit": "1.5"},
        {"limit": "²"},
        {"limit": "٣"},
        {"limit": ""},
        {"limit": "ten"},
        {"limit": "9" * 5000},  # int() refuses > 4300 digits: not a 500
        {"cursor": ""},
        {"cursor": "not a cursor!"},
        {"cursor": "x" * 600},
        {"cursor": _cursor("{")},
        {"cursor": _cursor("[1]")},
        {"cursor": _cursor('["a", "b"]')},
        {"cursor": _cursor('[true, "b"]')},
        {"cursor": _cursor('[1e400, "b"]')},
        {"cursor": _cursor("[" + "9" * 330 + ', "b"]')},
        {"cursor": _cursor('[1, "\\ud800"]')},
        {"cursor": _cursor('{"a": 1, "b": 2}')},
        {"cursor": _cursor('[NaN, "b"]')},
        {"cursor": _cursor('[1, "b"]') + "="},
    ],
)
def test_bad_limit_or_cursor_is_400(served: BrokerProcess, query: dict[str, str]) -> None:
    assert _error(lambda: served.issuer.request("GET", "/sessions", query=query)) == (400, "bad_request")


def test_pagination_is_documented() -> None:
    operation = openapi.document()["paths"]["/sessions"]["get"]
    assert {p["name"] for p in operation["parameters"]} == {"state", "limit", "cursor"}
    answer = operation["responses"]["200"]["content"]["application/json"]["schema"]["properties"]
    assert answer["next_cursor"] == {**answer["next_cursor"], "type": "string", "nullable": True}
    assert json.dumps(answer["sessions"])  # the session list is still there


def test_a_limit_with_leading_zeros_is_its_value(served: BrokerProcess) -> None:
    status, page = served.issuer.request("GET", "/sessions", query={"limit": "0" * 5000 + "1"})
    assert status == 200 and len(page["sessions"]) <= 1


def _locked(broker: Broker, call: Callable[[], object]) -> None:
    """``call`` while another connection holds the lock the broker needs (waits cut short)."""
    if broker.store.engine.name == "sqlite":
        other = sqlite3.connect(broker.root / "broker.db", isolation_level=None)
        broker.store.conn.execute("PRAGMA busy_timeout = 50")
        other.execute("BEGIN IMMEDIATE")
    else:
        import psycopg

        other = psycopg.connect(broker.store.url.conninfo)
        other.execute("LOCK TABLE redeemed IN ACCESS EXCLUSIVE MODE")
        broker.store.engine.lock_timeout_ms = 50
    try:
        call()
    finally:
        other.close()


def test_the_served_cleanup_takes_one_batch_per_tick_and_survives_a_locked_database(
    open_broker: Callable[..., tuple[Broker, Principal]], caplog: pytest.LogCaptureFixture
) -> None:
    """It runs on the broker's event loop: one batch per table per tick keeps mints and redeems
    flowing behind a backlog, and a locked database is a warning, not the end of serve."""
    broker, _ = open_broker()
    far_past = clock.now() - 30 * 86400
    with broker.store.transaction() as conn:
        conn.executemany(
            "INSERT INTO redeemed (jti, session_id, proxy_id, exp, at) VALUES (?, 's', 'p', ?, ?)",
            [(f"j{i:030d}", far_past, far_past) for i in range(CLEANUP_BATCH + 5)],
        )
    serve._cleanup(broker)
    assert broker.store.one("SELECT count(*) FROM redeemed")[0] == 5  # one batch this tick, the rest next
    _locked(broker, lambda: serve._cleanup(broker))  # no exception
    assert "cleanup skipped" in caplog.text
    serve._cleanup(broker)
    assert broker.store.one("SELECT count(*) FROM redeemed")[0] == 0
