"""The store on both engines (real SQLite, real PostgreSQL 15): schema versions and migrations,
transactions, the keyring sealed in the database, and what a bad ``--database`` says."""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from test_broker_cli import _run

from broker.engines import DatabaseUrl, parse_database_url, redact
from broker.service import ApiError, Broker, init_state_dir
from broker.store import SCHEMA_VERSION, IntegrityError, Store, StoreError
from broker.vault import MASTER_KEY_NAME, Vault, VaultError
from console_proxy import keyring
from console_proxy.command import CommandError
from console_proxy.keyring import Keyring

Capsys = pytest.CaptureFixture[str]


def _url(database: str | None, tmp_path: Path) -> DatabaseUrl:
    return parse_database_url(database, tmp_path)


def _set_version(store: Store, version: int) -> None:
    with store.transaction() as conn:
        store.engine.set_version(conn, version)


def test_a_new_database_is_migrated_once_and_reopening_applies_nothing(database: str | None, tmp_path: Path) -> None:
    store = Store(_url(database, tmp_path), create=True, migrate=True)
    try:
        assert store.version == SCHEMA_VERSION and store.migrate() == SCHEMA_VERSION
        tables = {"apikeys", "targets", "proxies", "sessions", "redeemed", "audit", "mint_floor", "keyring"}
        for table in tables:
            assert store.one(f"SELECT count(*) FROM {table}")[0] == 0
    finally:
        store.close()
    Store(_url(database, tmp_path), migrate=False).close()  # up to date: nothing to ask


def test_a_newer_schema_is_refused_and_an_older_one_needs_migrate(database: str | None, tmp_path: Path) -> None:
    store = Store(_url(database, tmp_path), create=True, migrate=True)
    _set_version(store, SCHEMA_VERSION + 1)
    store.close()
    for migrate in (False, True):
        with pytest.raises(StoreError, match=f"schema {SCHEMA_VERSION + 1} is newer"):
            Store(_url(database, tmp_path), migrate=migrate)
    # an older version: refused without migrate, brought up to date with it
    older = _reopen_at(database, tmp_path, SCHEMA_VERSION - 1)
    with pytest.raises(StoreError, match=f"schema {SCHEMA_VERSION - 1}, older .* console-broker migrate"):
        Store(older, migrate=False)
    store = Store(older, migrate=True)
    assert store.version == SCHEMA_VERSION
    store.close()


LAST_MIGRATION_TABLES = ("ca", "certificates", "join_tokens")
"""The tables the newest migration creates (dropped to fake a database one version older)."""


def _reopen_at(database: str | None, tmp_path: Path, version: int) -> DatabaseUrl:
    """The database with its recorded version one below the current (the last migration's table
    dropped, so applying it again works as on a real older database)."""
    assert version == SCHEMA_VERSION - 1
    url = _url(database, tmp_path)
    if url.engine == "sqlite":
        import sqlite3

        with sqlite3.connect(url.path) as conn:  # type: ignore[arg-type]
            for table in LAST_MIGRATION_TABLES:
                conn.execute(f"DROP TABLE {table}")
            conn.execute(f"PRAGMA user_version = {version}")
    else:
        import psycopg

        with psycopg.connect(url.conninfo or "", autocommit=True) as conn:
            for table in LAST_MIGRATION_TABLES:
                conn.execute(f"DROP TABLE {table}")
            conn.execute("UPDATE schema_version SET version = %s", (version,))
    return url


def test_transactions_roll_back_whole_and_a_duplicate_key_is_an_integrity_error(
    database: str | None, tmp_path: Path
) -> None:
    store = Store(_url(database, tmp_path), create=True, migrate=True)
    try:
        with pytest.raises(RuntimeError), store.transaction() as conn:
            store.append_audit(conn, at=1.0, type_="minted", actor="t")
            raise RuntimeError("boom")
        assert store.one("SELECT count(*) FROM audit")[0] == 0
        insert = "INSERT INTO redeemed (jti, session_id, proxy_id, exp, at) VALUES (?, 's', 'p', 1, 1.0)"
        with store.transaction() as conn:
            conn.execute(insert, ("j1",))
            store.append_audit(conn, at=1.0, type_="redeemed", actor="t", detail={"a": 1})
        seq = store.one("SELECT seq FROM audit")[0]
        with pytest.raises(IntegrityError), store.transaction() as conn:
            store.append_audit(conn, at=2.0, type_="redeemed", actor="t")
            conn.execute(insert, ("j1",))
        assert [tuple(r) for r in store.all("SELECT seq, type FROM audit")] == [(seq, "redeemed")]
        for sql in ("UPDATE audit SET actor = 'x'", "DELETE FROM audit"):
            with pytest.raises(StoreError, match="append-only"), store.transaction() as conn:
                conn.execute(sql)
        assert json.loads(store.one("SELECT detail FROM audit")["detail"]) == {"a": 1}
    finally:
        store.close()


def test_two_processes_migrating_an_empty_database_at_once_apply_each_migration_once(
    database: str | None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two replicas started at the same moment on an empty database (two connections racing
    under the migration lock): each migration is applied once, and both end up current."""
    url = _url(database, tmp_path)
    start = threading.Barrier(2)
    versions: list[int] = []
    failures: list[BaseException] = []

    def replica() -> None:
        try:
            start.wait()
            store = Store(url, create=True, migrate=True)
            versions.append(store.version)
            store.close()
        except BaseException as exc:
            failures.append(exc)

    caplog.set_level(logging.INFO, logger="consolegate.broker")
    threads = [threading.Thread(target=replica) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == [] and versions == [SCHEMA_VERSION, SCHEMA_VERSION]
    applied = [r.getMessage().rsplit(" ", 1)[-1] for r in caplog.records if "migrated to schema" in r.getMessage()]
    assert sorted(applied, key=int) == [str(v) for v in range(1, SCHEMA_VERSION + 1)]


def test_the_keyring_is_sealed_in_the_database_and_a_rotation_reaches_the_other_replica(
    database: str | None, tmp_path: Path
) -> None:
    """Two Broker objects on one database stand for two replicas: a rotation committed by one is
    what the other uses on its very next call; the sealed row opens under master.key only."""
    a, b = _two_replicas(tmp_path, database)
    try:
        before = b.keyring()
        sealed = bytes(a.store.one("SELECT sealed FROM keyring")["sealed"])
        assert before.active_signing is not None and before.active_signing.encode() not in sealed
        assert a.rotate_keys("test")["version"] == before.version + 1
        assert b.keyring().version == before.version + 1
        assert b.keyring().active_signing == a.keyring().active_signing != before.active_signing
        assert b.list_keys()["version"] == before.version + 1
    finally:
        a.close()
        b.close()


def test_a_master_key_that_does_not_open_the_keyring_fails_at_start(
    database: str | None, tmp_path: Path, capsys: Capsys
) -> None:
    init_state_dir(tmp_path / "a", database=database)
    (tmp_path / "b").mkdir()
    Vault.create(tmp_path / "b" / MASTER_KEY_NAME)
    url = database or f"sqlite:///{tmp_path / 'a' / 'broker.db'}"
    with pytest.raises(VaultError, match=r"does not open under this master\.key"):
        Broker(tmp_path / "b", database=url)
    status, out, err = _run(capsys, "apikey", "list", "--state-dir", str(tmp_path / "b"), "--database", url)
    assert (status, out) == (1, "") and err.count("\n") == 1 and "master.key" in err


def test_keyring_json_is_imported_once(database: str | None, tmp_path: Path) -> None:
    """A state dir from before the keyring moved into the database: its keyring.json becomes the
    database's keyring and is renamed; another replica's file never replaces it."""
    root = tmp_path / "old"
    root.mkdir()
    Vault.create(root / MASTER_KEY_NAME)
    ring = Keyring.generate(1_700_000_000).rotate(1_700_000_100)
    keyring.save(ring, root / "keyring.json")
    store = Store(_url(database, root), create=True, migrate=True)
    store.close()
    broker = Broker(root, database=database)
    try:
        assert broker.keyring().to_jwks() == ring.to_jwks()
        assert not (root / "keyring.json").exists() and (root / "keyring.json.imported").exists()
    finally:
        broker.close()
    keyring.save(Keyring.generate(1_700_000_000), root / "keyring.json")  # a stray copy comes back
    broker = Broker(root, database=database)
    try:
        assert broker.keyring().to_jwks() == ring.to_jwks()
        assert (root / "keyring.json").exists()  # left alone, and said to be unused
    finally:
        broker.close()


def test_init_refuses_a_database_that_has_its_keyring_and_writes_nothing(database: str | None, tmp_path: Path) -> None:
    init_state_dir(tmp_path / "a", database=database)
    if database is None:
        database = f"sqlite:///{tmp_path / 'a' / 'broker.db'}"
    with pytest.raises(Exception, match="initialised"):
        init_state_dir(tmp_path / "b", database=database)
    assert not (tmp_path / "b" / MASTER_KEY_NAME).exists()


def test_database_urls_never_show_the_password() -> None:
    assert redact("postgresql://alice:s3cret@db.example:5432/cg") == "postgresql://alice:***@db.example:5432/cg"
    assert (
        redact("postgresql://alice@db/cg?password=s3cret&sslmode=require")
        == "postgresql://alice@db/cg?password=***&sslmode=require"
    )
    assert parse_database_url("sqlite:///var/lib/cg/broker.db", "x").path == Path("/var/lib/cg/broker.db")
    for bad in ("mysql://x/y", "sqlite://relative.db", "postgresql://alice:s3cret@db.example:5432/"):
        with pytest.raises(ValueError) as refused:
            parse_database_url(bad, "x")
        assert "s3cret" not in str(refused.value)


def test_an_unreachable_database_is_one_line_without_the_password(
    tmp_path: Path, capsys: Capsys, pg_cluster: object
) -> None:
    from proxyproc import free_port

    init_state_dir(tmp_path / "s")
    url = f"postgresql://postgres:pa55-s3cret@127.0.0.1:{free_port()}/nowhere?connect_timeout=2"
    for argv in (("apikey", "list", "--state-dir", str(tmp_path / "s")), ("migrate", "--state-dir", str(tmp_path))):
        status, out, err = _run(capsys, *argv, "--database", url)
        assert (status, out) == (1, "") and err.count("\n") == 1, err
        assert "pa55-s3cret" not in err and "postgres:***@127.0.0.1" in err and "cannot connect" in err


def test_a_wrong_password_or_an_unknown_database_is_one_line_at_start(
    pg_cluster: object, tmp_path: Path, capsys: Capsys
) -> None:
    init_state_dir(tmp_path / "s")
    wrong = pg_cluster.url("postgres", password="not-the-password")  # type: ignore[attr-defined]
    missing = pg_cluster.url("no_such_database")  # type: ignore[attr-defined]
    for url, says in ((wrong, "password authentication failed"), (missing, "does not exist")):
        status, out, err = _run(
            capsys, "serve", "--state-dir", str(tmp_path / "s"), "--listen", "127.0.0.1:1", "--database", url
        )
        assert (status, out) == (1, "") and err.count("\n") == 1 and says in err, err
        assert "not-the-password" not in err and pg_cluster.password not in err  # type: ignore[attr-defined]


def test_password_from_pgpassword_when_the_url_has_none(
    pg_cluster: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libpq's own sources of the password work unchanged (PGPASSWORD here; ~/.pgpass likewise)."""
    database = pg_cluster.new_database()  # type: ignore[attr-defined]
    bare = database.replace(f":{pg_cluster.password}@", "@")  # type: ignore[attr-defined]
    monkeypatch.setenv("PGPASSWORD", pg_cluster.password)  # type: ignore[attr-defined]
    init_state_dir(tmp_path / "s", database=bare)
    broker = Broker(tmp_path / "s", database=bare)
    try:
        assert broker.list_keys()["version"] == 1 and broker.store.description == bare
    finally:
        broker.close()


def test_migrate_and_serve_on_postgresql(pg_cluster: object, tmp_path: Path, capsys: Capsys) -> None:
    """``migrate`` brings an empty database to the current schema; ``serve`` refuses an empty or
    older one (without --migrate) in one line, before listening."""
    database = pg_cluster.new_database()  # type: ignore[attr-defined]
    init_state_dir(tmp_path / "s", database=database)
    for argv in (
        ("serve", "--state-dir", str(tmp_path / "s"), "--listen", "127.0.0.1:1"),
        ("apikey", "list", "--state-dir", str(tmp_path / "s")),
    ):
        empty = pg_cluster.new_database()  # type: ignore[attr-defined]
        status, out, err = _run(capsys, *argv, "--database", empty)
        assert status == 1 and "is empty: run console-broker init" in err and err.count("\n") == 1, err
    _reopen_at(database, tmp_path, SCHEMA_VERSION - 1)  # an older release's database
    status, _, err = _run(capsys, "apikey", "list", "--state-dir", str(tmp_path / "s"), "--database", database)
    assert status == 1 and "console-broker migrate" in err and err.count("\n") == 1
    bare = tmp_path / "bare"  # a state dir without master.key: migrate needs only the database
    status, out, _ = _run(capsys, "migrate", "--state-dir", str(bare), "--database", database)
    assert status == 0 and f"at schema {SCHEMA_VERSION}" in out and "postgres:***@127.0.0.1" in out
    assert pg_cluster.password not in out + err  # type: ignore[attr-defined]


def _two_replicas(tmp_path: Path, database: str | None) -> list[Broker]:
    """Two Broker objects on one database, each with its own state dir and connections."""
    init_state_dir(tmp_path / "a", database=database)
    (tmp_path / "b").mkdir()
    shutil.copy2(tmp_path / "a" / MASTER_KEY_NAME, tmp_path / "b" / MASTER_KEY_NAME)
    url = database or f"sqlite:///{tmp_path / 'a' / 'broker.db'}"
    return [Broker(tmp_path / "a", database=database), Broker(tmp_path / "b", database=url)]


def _race(call: Callable[[Broker], object], replicas: list[Broker]) -> list[str]:
    """``call`` on every replica at once (threads released together): "ok" or the refusal's code."""
    start = threading.Barrier(len(replicas))
    outcomes: list[str] = []

    def run(broker: Broker) -> None:
        start.wait()
        try:
            call(broker)
            outcomes.append("ok")
        except (ApiError, CommandError) as exc:
            outcomes.append(getattr(exc, "code", str(exc)))

    threads = [threading.Thread(target=run, args=(broker,)) for broker in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(outcomes)


def test_one_name_created_at_two_replicas_at_once_is_one_key(database: str | None, tmp_path: Path) -> None:
    """Check-then-insert: SQLite's write lock serialises it, PostgreSQL needs the unique index."""
    replicas = _two_replicas(tmp_path, database)
    try:
        assert _race(lambda broker: broker.create_apikey("ops", "admin", "test"), replicas) == [
            "an API key named 'ops' exists already (revoked names are not reused)",
            "ok",
        ]
        assert [k["name"] for k in replicas[1].list_apikeys()["apikeys"]] == ["ops"]
    finally:
        for broker in replicas:
            broker.close()


def test_one_key_revoked_at_two_replicas_at_once_is_revoked_once(database: str | None, tmp_path: Path) -> None:
    """Check-then-update: on PostgreSQL the rows are read FOR UPDATE."""
    replicas = _two_replicas(tmp_path, database)
    try:
        replicas[0].create_apikey("ops", "admin", "test")
        assert _race(lambda broker: broker.revoke_apikey("ops", "test"), replicas) == ["apikey_revoked", "ok"]
        assert len(replicas[1].audit(0, "apikey_revoked")["events"]) == 1
    finally:
        for broker in replicas:
            broker.close()


_FAIL_ROTATION = {
    "sqlite": "CREATE TRIGGER fail_rotation BEFORE INSERT ON audit WHEN NEW.type = 'key_rotated' "
    "BEGIN SELECT RAISE(ABORT, 'simulated failure'); END",
    "postgresql": "CREATE FUNCTION fail_rotation() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "IF NEW.type = 'key_rotated' THEN RAISE EXCEPTION 'simulated failure' USING ERRCODE = "
    "'check_violation'; END IF; RETURN NEW; END $$; CREATE TRIGGER fail_rotation BEFORE INSERT "
    "ON audit FOR EACH ROW EXECUTE FUNCTION fail_rotation()",
}


def test_a_removal_whose_rotation_fails_changes_nothing_on_either_replica(database: str | None, tmp_path: Path) -> None:
    """``proxy remove`` is one transaction: the removal, the new sealed keyring, the mint floor
    and both audit events commit together or not at all."""
    a, b = _two_replicas(tmp_path, database)
    try:
        a.add_proxy("px", "http://127.0.0.1:1", "test")
        before = b.keyring().to_jwks()
        with a.store.transaction() as conn:
            conn.execute(_FAIL_ROTATION[a.store.engine.name])
        with pytest.raises(IntegrityError, match="simulated failure"):
            a.remove_proxy("px", "test")
        assert b.keyring().to_jwks() == before and a.keyring().to_jwks() == before
        assert [p["removed"] for p in b.list_proxy_records()["proxies"]] == [False]
        assert b.mint_floor() == 0 and b.audit(0, "proxy_removed")["events"] == []
    finally:
        a.close()
        b.close()


def test_serve_migrates_an_older_postgresql_database_only_when_told(
    pg_cluster: object, tmp_path: Path, capsys: Capsys
) -> None:
    """A database one migration behind (with audit rows already): ``serve`` refuses it in one
    line; ``serve --migrate`` applies the migration, and the audit numbering goes on after the
    rows it found."""
    from brokerproc import BrokerState, start_broker

    state = BrokerState.create(tmp_path / "a", database=pg_cluster.new_database())  # type: ignore[attr-defined]
    assert state.database is not None
    before = _reopen_at(state.database, tmp_path, SCHEMA_VERSION - 1)
    status, out, err = _run(
        capsys, "serve", "--state-dir", str(state.root), "--listen", "127.0.0.1:1", "--database", state.database
    )
    assert (status, out) == (1, "") and err.count("\n") == 1 and "console-broker migrate" in err, err
    process = start_broker(state, "--migrate")
    try:
        last = process.admin.audit(0, None, 1000)[-1]["seq"]
        process.admin.add_target(name="after-upgrade", host="h", port=1)
        assert [e["seq"] for e in process.admin.audit(last, None, 1000)] == [last + 1]
        assert f"migrated to schema {SCHEMA_VERSION}" in process.log_text()
    finally:
        process.stop()
    reopened = Store(before, migrate=False)
    assert reopened.version == SCHEMA_VERSION
    reopened.close()
