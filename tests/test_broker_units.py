"""Pure parts of the broker: storage and migrations, the vault, credentials, fleet assignment, schemas."""

from __future__ import annotations

import sqlite3
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time

from broker import auth, fleet, schemas
from broker.auth import Principal
from broker.fleet import ProxyView
from broker.service import REVOKED_MEMORY, ApiError, Broker, init_state_dir
from broker.store import SCHEMA_VERSION, Store, StoreError, StoreUnavailable
from broker.vault import Vault, VaultError
from console_proxy import clock, token
from console_proxy.keyring import DEFAULT_SKEW, MAX_SKEW


def test_store_is_wal_migrated_and_private(tmp_path: Path) -> None:
    store = Store(tmp_path / "b.db", create=True)
    assert store.version == SCHEMA_VERSION
    assert store.one("PRAGMA journal_mode")[0] == "wal"
    assert store.one("PRAGMA synchronous")[0] == 2  # FULL
    assert stat.S_IMODE((tmp_path / "b.db").stat().st_mode) == 0o600
    assert store.migrate() == SCHEMA_VERSION  # idempotent
    store.close()


def test_store_refuses_missing_and_newer_databases(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="init"):
        Store(tmp_path / "missing.db")
    Store(tmp_path / "b.db", create=True).close()
    with sqlite3.connect(tmp_path / "b.db") as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer"):
        Store(tmp_path / "b.db")


def test_audit_is_append_only(tmp_path: Path) -> None:
    store = Store(tmp_path / "b.db", create=True)
    with store.transaction() as conn:
        store.append_audit(conn, at=1.0, type_="minted", actor="t", detail={"a": 1})
    seq = store.one("SELECT seq FROM audit")[0]
    for sql in ("UPDATE audit SET actor = 'x'", "DELETE FROM audit"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            store.conn.execute(sql)
    assert store.one("SELECT seq FROM audit")[0] == seq
    store.close()


def test_transaction_rolls_back_on_error(tmp_path: Path) -> None:
    store = Store(tmp_path / "b.db", create=True)
    with pytest.raises(RuntimeError), store.transaction() as conn:
        store.append_audit(conn, at=1.0, type_="minted", actor="t")
        raise RuntimeError("boom")
    assert store.one("SELECT COUNT(*) FROM audit")[0] == 0
    store.close()


def test_a_full_disk_fails_the_write_whole_and_loses_nothing(tmp_path: Path) -> None:
    """SQLite's own "database or disk is full" (max_page_count caps the file like a full disk)."""
    init_state_dir(tmp_path)
    broker = Broker(tmp_path)
    broker.add_target({"id": "kept", "name": "kept", "host": "10.0.0.1", "port": 5900}, "t")
    audit_before = broker.store.one("SELECT COUNT(*) FROM audit")[0]
    pages = broker.store.one("PRAGMA page_count")[0]
    broker.store.conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(StoreUnavailable, match="cannot write its database"):
        for number in range(200):  # fill the last free pages, then fail
            broker.add_target({"id": f"t{number}", "name": "x" * 2000, "host": "10.0.0.2", "port": 5900}, "t")
    broker.store.conn.execute("PRAGMA max_page_count = 1073741823")
    ids = {t["id"] for t in broker.list_targets()["targets"]}
    added = ids - {"kept"}
    assert "kept" in ids
    # every target that was added has its audit event: nothing half-written
    assert broker.store.one("SELECT COUNT(*) FROM audit")[0] == audit_before + len(added)
    broker.add_target({"id": "after", "name": "after", "host": "10.0.0.3", "port": 5900}, "t")  # usable again
    broker.close()


def test_a_target_ca_must_be_a_certificate(tmp_path: Path, database: str | None) -> None:
    from xvnc import make_test_pki

    init_state_dir(tmp_path / "s", database=database)
    broker = Broker(tmp_path / "s", database=database)
    try:
        with pytest.raises(ApiError, match="PEM"):
            broker.add_target({"name": "x", "host": "h", "port": 1, "tls": {"ca": "not a certificate"}}, "t")
        with pytest.raises(ApiError, match="PEM"):  # non-ASCII text: ssl raises TypeError, not a 500
            broker.add_target({"name": "x", "host": "h", "port": 1, "tls": {"ca": "@\U000929a4"}}, "t")
        ca = make_test_pki(tmp_path / "pki").ca_pem
        assert broker.add_target({"name": "y", "host": "h", "port": 1, "tls": {"ca": ca}}, "t")["name"] == "y"
        assert [t["name"] for t in broker.list_targets()["targets"]] == ["y"]
    finally:
        broker.close()


def test_vault_seals_per_context_and_derives_per_purpose(tmp_path: Path) -> None:
    vault = Vault.create(tmp_path / "master.key")
    assert stat.S_IMODE((tmp_path / "master.key").stat().st_mode) == 0o600
    sealed = vault.seal("hunter22", context="t-1")
    assert b"hunter22" not in sealed and sealed != vault.seal("hunter22", context="t-1")
    assert Vault.load(tmp_path / "master.key").open(sealed, context="t-1") == "hunter22"
    with pytest.raises(VaultError):
        vault.open(sealed, context="t-2")
    with pytest.raises(VaultError):
        vault.open(sealed[:-1] + bytes([sealed[-1] ^ 1]), context="t-1")
    assert vault.derive("a") != vault.derive("b") and len(vault.derive("a")) == 32
    with pytest.raises(VaultError, match="exists"):
        Vault.create(tmp_path / "master.key")


def test_values_sealed_before_the_move_to_openssl_still_open(tmp_path: Path) -> None:
    # the layout pycryptodome wrote (version, nonce, ciphertext, tag; AAD version + context),
    # built here independently of the vault, and the other way round
    from Crypto.Cipher import AES

    vault = Vault.create(tmp_path / "master.key")
    key, nonce = vault.derive("target-password-seal"), bytes(range(12))
    cipher = AES.new(key, AES.MODE_GCM, nonce=nonce)
    cipher.update(b"\x01t-9")
    body, tag = cipher.encrypt_and_digest("pässwörd".encode())
    assert vault.open(b"\x01" + nonce + body + tag, context="t-9") == "pässwörd"
    sealed = vault.seal("", context="t-9")
    opener = AES.new(key, AES.MODE_GCM, nonce=sealed[1:13])
    opener.update(b"\x01t-9")
    assert opener.decrypt_and_verify(sealed[13:-16], sealed[-16:]) == b""


def test_credential_hashes_are_keyed_and_checked() -> None:
    hasher = auth.Hasher(b"k" * 32)
    stored = hasher.digest("apikey", "id1", "secret")
    assert hasher.matches(stored, "apikey", "id1", "secret")
    assert not hasher.matches(stored, "apikey", "id1", "secreT")
    assert not hasher.matches(stored, "proxy", "id1", "secret")  # kinds never cross
    assert not hasher.matches(None, "apikey", "id1", "secret")
    assert auth.Hasher(b"j" * 32).digest("apikey", "id1", "secret") != stored
    key_id, secret, whole = auth.new_api_key()
    assert auth.split_api_key(whole) == (key_id, secret)
    assert auth.split_api_key("nope") is None and auth.split_proxy_credential("bad name.x") is None


def _proxy(
    name: str, sessions: int, capacity: int = 10, *, seen: float = 100.0, draining: bool = False, pending: int = 0
) -> ProxyView:
    return ProxyView(name, f"http://{name}", sessions, capacity, draining, seen, pending)


def test_fleet_picks_the_least_loaded_healthy_non_draining_proxy() -> None:
    proxies = [
        _proxy("a", 5),
        _proxy("b", 2, 4),
        _proxy("c", 1, draining=True),
        _proxy("d", 0, seen=80.0),
        _proxy("e", 3),
    ]
    assert fleet.choose(proxies, 100.0, 5.0).id == "e"  # 0.3 < 0.5 = b; c draining; d stale (20 s > 15 s)
    assert fleet.choose([_proxy("a", 1), _proxy("b", 1, pending=3)], 100.0, 5.0).id == "a"
    assert fleet.choose([_proxy("full", 10)], 100.0, 5.0) is None
    assert fleet.choose([_proxy("never", 0, seen=None)], 100.0, 5.0) is None  # type: ignore[arg-type]
    assert fleet.choose([], 100.0, 5.0) is None


@pytest.mark.parametrize(
    ("reported", "ring_version", "floor", "previous_usable", "served"),
    [
        (5, 5, 0, True, True),
        (4, 5, 0, True, True),  # current, or one behind (minted with the previous keys)
        (4, 5, 0, False, False),  # one behind, but the previous keys expire before this console would
        (3, 5, 0, True, False),  # two behind: holds neither the current nor the previous keys
        (6, 5, 0, True, False),  # ahead: the broker's keyring was replaced; it holds other keys
        (0, 5, 0, False, True),  # fresh: was just sent the whole current keyring
        (0, 5, 5, True, False),
        (4, 5, 5, True, False),
        (5, 5, 5, True, True),  # after a removal, only the new keys
    ],
)
def test_a_console_goes_only_to_a_proxy_whose_keys_can_open_it(
    reported: int, ring_version: int, floor: int, previous_usable: bool, served: bool
) -> None:
    proxy = ProxyView("p", "http://p", 0, 10, False, 100.0, 0, reported)
    assert fleet.holds_minting_keys(proxy, ring_version, floor, previous_usable) is served
    chosen = fleet.choose([proxy], 100.0, 5.0, ring_version=ring_version, floor=floor, previous_usable=previous_usable)
    assert (chosen is proxy) is served


def test_websocket_url() -> None:
    assert fleet.websocket_url("https://p.example/x/") == "wss://p.example/x/websockify"
    assert fleet.websocket_url("http://127.0.0.1:8") == "ws://127.0.0.1:8/websockify"


@pytest.mark.parametrize(
    "body",
    [
        {"name": "n", "host": "h", "port": 1, "tls": {"bogus": True}},
        {"name": "n", "host": "a b", "port": 1},
        {"name": "", "host": "h", "port": 1},
        {"name": "n", "host": "h", "port": 1, "id": "bad id"},
        {"name": "n", "host": "h", "port": 1.5},
    ],
)
def test_schema_rejects(body: dict) -> None:
    with pytest.raises(ValueError):
        schemas.validate(body, schemas.TARGET_CREATE)


def test_schema_accepts_and_documents() -> None:
    body = {"name": "n", "host": "h", "port": 1, "tls": {"require": True}}
    assert schemas.validate(body, schemas.TARGET_CREATE) == body
    rendered = schemas.object_schema(schemas.TARGET_CREATE)
    assert rendered["required"] == ["name", "host", "port"] and rendered["additionalProperties"] is False


def test_redeemed_rows_are_cleaned_up_after_exp(tmp_path: Path, database: str | None) -> None:
    init_state_dir(tmp_path / "s", database=database)
    broker = Broker(tmp_path / "s", database=database)
    proxy = registered_proxy(broker)
    try:
        with freeze_time("2030-01-01 00:00:00") as frozen:
            now = int(broker_now())
            body = {"jti": "j" * 22, "session_id": "s1", "exp": now + 60}
            broker.redeem(proxy, body)
            with pytest.raises(ApiError):
                broker.redeem(proxy, body)
            frozen.tick(60 + MAX_SKEW)
            assert broker.cleanup() == 0  # a proxy with the largest skew allowed may still accept it
            frozen.tick(DEFAULT_SKEW + 1)
            assert broker.cleanup() == 1
    finally:
        broker.close()


def registered_proxy(broker: Broker) -> Principal:
    """A proxy with a row, as authentication would have found (proxy requests need one)."""
    broker.add_proxy("p", "https://p.example", "test")
    return Principal("p", "p", "proxy")


def broker_now() -> float:
    return clock.now()


@contextmanager
def _revoked_session_announced(
    tmp_path: Path, ttl: int, database: str | None
) -> Iterator[tuple[Any, Callable[[], list[str]]]]:
    """At a frozen time, a session "s1" whose token lives ``ttl`` s, revoked and closed right
    after minting: (the frozen clock, what a proxy's heartbeat answer now lists as revoked)."""
    init_state_dir(tmp_path / "s", database=database)
    broker = Broker(tmp_path / "s", database=database)
    proxy = registered_proxy(broker)
    beat = {"proxy_id": "p", "sessions": 0, "capacity": 1, "draining": False, "version": 0}
    try:
        with freeze_time("2030-01-01 00:00:00") as frozen:
            now = int(broker_now())
            with broker.store.transaction() as conn:
                conn.execute(
                    'INSERT INTO sessions (id, target_id, "user", proxy_id, issued_by, state, single_use, exp, '
                    "minted_at, revoked_at, closed_at) VALUES ('s1', 't', NULL, 'p', 'k', 'revoked', 0, ?, ?, ?, ?)",
                    (now + ttl, now, now + 1, now + 2),
                )
            yield frozen, lambda: broker.heartbeat(proxy, beat)["revoked"]
    finally:
        broker.close()


def test_a_revoked_session_is_announced_while_any_proxy_could_still_accept_its_token(
    tmp_path: Path, database: str | None
) -> None:
    """Proxies replace their revoked set with each heartbeat's list, and a proxy may run with a
    skew of up to MAX_SKEW: a closed, revoked session must stay on the list until its token's
    exp + MAX_SKEW, or a reusable token could reopen it on such a proxy."""
    with _revoked_session_announced(tmp_path, ttl=60, database=database) as (frozen, announced):
        frozen.tick(60 + DEFAULT_SKEW + 60)  # past exp + the default skew
        assert announced() == ["s1"]
        frozen.tick(MAX_SKEW)  # past exp + MAX_SKEW + the default skew: no proxy accepts it now
        assert announced() == []


def test_a_long_lived_token_revoked_at_once_stays_announced_until_it_expires_everywhere(
    tmp_path: Path, database: str | None
) -> None:
    """REVOKED_MEMORY bounds how long an open session is announced, not a token's validity: a
    token living longer than that (a keyring max_ttl near a day) must stay on the list until
    exp + MAX_SKEW + the default skew, or a proxy could reopen it with the reusable token."""
    with _revoked_session_announced(tmp_path, ttl=int(REVOKED_MEMORY), database=database) as (frozen, announced):
        frozen.tick(REVOKED_MEMORY + MAX_SKEW)  # revoked over a day ago; a MAX_SKEW proxy still accepts it
        assert announced() == ["s1"]
        frozen.tick(DEFAULT_SKEW + 1)
        assert announced() == []


def test_a_rotation_the_database_cannot_record_leaves_the_keys_as_they_were(tmp_path: Path) -> None:
    """The audit row and the new keys go together: with the database locked by another writer
    the rotation is refused (503) and the sealed keyring is untouched."""
    init_state_dir(tmp_path / "s")
    broker = Broker(tmp_path / "s")
    before = tuple(broker.store.one("SELECT * FROM keyring"))
    other = sqlite3.connect(tmp_path / "s" / "broker.db", isolation_level=None)
    try:
        broker.store.conn.execute("PRAGMA busy_timeout = 50")
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailable):
            broker.rotate_keys("test")
        assert tuple(broker.store.one("SELECT * FROM keyring")) == before
        assert broker.keyring().version == 1
    finally:
        other.close()
        broker.close()


def test_a_console_outliving_the_previous_keys_waits_for_a_proxy_with_the_new_ones(
    tmp_path: Path, database: str | None
) -> None:
    """The previous keys verify until their rotation + max_ttl + skew. For a proxy not yet told
    of the rotation, a console that would outlive them cannot be minted with them (nor with keys
    that proxy lacks): no proxy for it until the proxy reports the new keyring."""
    init_state_dir(tmp_path / "s", database=database)
    broker = Broker(tmp_path / "s", database=database)
    proxy = registered_proxy(broker)
    target = broker.add_target({"name": "VM", "host": "10.0.0.5", "port": 5901}, "test")["id"]
    issuer = Principal("k", "issuer", "issuer")
    try:
        with freeze_time("2030-01-01 00:00:00") as frozen:
            old = broker.keyring()
            beat = {"proxy_id": "p", "sessions": 0, "capacity": 5, "draining": False, "version": old.version}
            broker.heartbeat(proxy, beat)
            broker.rotate_keys("test")
            frozen.tick(old.max_ttl - 600)  # the previous keys verify for 630 s more
            broker.heartbeat(proxy, beat)  # still reporting the old keyring
            with pytest.raises(ApiError) as refused:
                broker.mint_console(issuer, {"target_id": target, "ttl": 1200})
            assert refused.value.code == "no_proxy_available"
            short = broker.mint_console(issuer, {"target_id": target, "ttl": 60})["token"]
            assert token.verify(short, old.for_proxy(), clock.now()).port == 5901
    finally:
        broker.close()
