"""Revoking credentials: ``apikey list|revoke`` and ``proxy list|remove`` on real SQLite, checked
against a real ``console-broker serve`` where it matters (the next request after a revocation)."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from brokerproc import BrokerProcess, BrokerState, legacy_state_dir, start_broker
from test_broker_api import _error, _proxy_auth
from test_broker_cli import _run

from broker import fleet
from broker.auth import Hasher, Principal
from broker.service import ApiError, Broker, init_state_dir
from broker.store import MIGRATIONS, SCHEMA_VERSION, IntegrityError, Store, StoreUnavailable
from broker.vault import MASTER_KEY_NAME, Vault
from console_proxy import token
from console_proxy.keyring import Keyring

Capsys = pytest.CaptureFixture[str]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    """A broker of its own per test (removals rotate keys and raise the mint floor). A long
    heartbeat interval keeps the fake proxies healthy for the whole test on a busy machine."""
    state = BrokerState.create(tmp_path / "state")
    process = start_broker(state, heartbeat_interval=60.0)
    yield process
    process.stop()


@pytest.fixture
def state_dir(tmp_path: Path, capsys: Capsys) -> str:
    root = str(tmp_path / "var")
    assert _run(capsys, "init", "--state-dir", root)[0] == 0
    return root


def _cli(capsys: Capsys, *argv: str, state: str | Path) -> tuple[int, str, str]:
    return _run(capsys, *argv, "--state-dir", str(state))


def _beat(broker: BrokerProcess, name: str, version: int, **over: Any) -> dict[str, Any]:
    """One heartbeat as proxy ``name`` (its real credential), reporting keyring ``version``."""
    body = {
        "proxy_id": name,
        "public_url": None,
        "sessions": 0,
        "capacity": 10,
        "draining": False,
        "version": version,
        **over,
    }
    return broker.client().request("POST", "/proxy/heartbeat", body, authorization=_proxy_auth(broker, name))[1]


def _rows(root: str | Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(Path(root) / "broker.db") as conn:
        return [tuple(row) for row in conn.execute(sql)]


def _audit(root: str | Path, type_: str) -> list[dict[str, Any]]:
    return [
        {"actor": actor, **json.loads(detail)}
        for actor, detail in _rows(root, f"SELECT actor, detail FROM audit WHERE type = '{type_}' ORDER BY seq")
    ]


def test_a_revoked_key_gets_401_on_its_next_request_while_others_work(broker: BrokerProcess, capsys: Capsys) -> None:
    root = broker.state.root
    doomed = _cli(capsys, "apikey", "create", "doomed", "--role", "admin", state=root)[1].strip()
    kept = _cli(capsys, "apikey", "create", "kept", "--role", "issuer", state=root)[1].strip()
    assert broker.client(doomed).targets() == [] and broker.client(kept).sessions() == []  # both work now

    status, out, _ = _cli(capsys, "apikey", "revoke", "doomed", state=root)
    assert status == 0 and doomed.split(".")[1] in out

    assert _error(lambda: broker.client(doomed).targets()) == (401, "unauthorized")
    assert _error(lambda: broker.client(doomed).sessions()) == (401, "unauthorized")
    assert broker.client(kept).sessions() == [] and broker.admin.targets() == []
    events = broker.admin.audit(0, "apikey_revoked")
    assert [(e["actor"], e["detail"]["name"], e["detail"]["key_id"]) for e in events] == [
        ("cli", "doomed", doomed.split(".")[1])
    ]


def test_revoking_twice_or_an_unknown_name_fails_in_one_line_and_changes_nothing(
    state_dir: str, capsys: Capsys
) -> None:
    _cli(capsys, "apikey", "create", "once", "--role", "admin", state=state_dir)
    assert _cli(capsys, "apikey", "revoke", "once", state=state_dir)[0] == 0
    before = _rows(state_dir, "SELECT * FROM apikeys"), _rows(state_dir, "SELECT * FROM audit")
    for name, says in (("once", "revoked already"), ("never-made", "no API key named")):
        status, out, err = _cli(capsys, "apikey", "revoke", name, state=state_dir)
        assert (status, out) == (1, "") and says in err and err.count("\n") == 1, err
    # the revoked name is not silently reused by a new key
    status, _, err = _cli(capsys, "apikey", "create", "once", "--role", "issuer", state=state_dir)
    assert status == 1 and "not reused" in err
    assert (_rows(state_dir, "SELECT * FROM apikeys"), _rows(state_dir, "SELECT * FROM audit")) == before


def test_lists_name_every_credential_and_never_a_secret(state_dir: str, tmp_path: Path, capsys: Capsys) -> None:
    keys = {
        name: _cli(capsys, "apikey", "create", name, "--role", role, state=state_dir)[1].strip()
        for name, role in (("ops", "admin"), ("app", "issuer"))
    }
    _cli(capsys, "apikey", "revoke", "app", state=state_dir)
    cred = tmp_path / "px.json"
    _cli(capsys, "proxy", "add", "px", "--public-url", "http://127.0.0.1:1", "--out", str(cred), state=state_dir)
    _cli(capsys, "proxy", "remove", "px", "--no-rotate", state=state_dir)

    status, out, _ = _cli(capsys, "apikey", "list", state=state_dir)
    listed = {k["name"]: k for k in json.loads(out)["apikeys"]}
    assert status == 0 and set(listed["ops"]) == {"name", "key_id", "role", "created_at", "revoked", "revoked_at"}
    assert [(k["key_id"], k["role"], k["revoked"]) for k in listed.values()] == [
        (keys["ops"].split(".")[1], "admin", False),
        (keys["app"].split(".")[1], "issuer", True),
    ]
    status, proxies, _ = _cli(capsys, "proxy", "list", state=state_dir)
    assert status == 0 and [(p["id"], p["removed"]) for p in json.loads(proxies)["proxies"]] == [("px", True)]
    hashes = [h.hex() for (h,) in _rows(state_dir, "SELECT hash FROM apikeys UNION SELECT secret_hash FROM proxies")]
    for secret in [k.split(".")[2] for k in keys.values()] + [json.loads(cred.read_text())["secret"]] + hashes:
        assert secret not in out + proxies
    assert "hash" not in out + proxies


def test_a_removed_proxy_gets_401_and_new_consoles_use_keys_it_never_received(
    broker: BrokerProcess, capsys: Capsys
) -> None:
    root = broker.state.root
    for name, port in (("leaky", 1), ("good", 2)):
        broker.state.add_proxy(name, f"http://127.0.0.1:{port}")
    leaked = Keyring.from_jwks(_beat(broker, "leaky", 0)["keyring"])
    _beat(broker, "leaky", leaked.version, capacity=100)  # the least loaded: it gets the next console
    _beat(broker, "good", leaked.version, sessions=5)
    target = broker.admin.add_target(name="vm", host="127.0.0.1", port=5901)
    assert broker.issuer.mint(target["id"])["proxy_id"] == "leaky"

    status, out, _ = _cli(capsys, "proxy", "remove", "leaky", state=root)
    assert status == 0 and f"version {leaked.version + 1}" in out
    assert broker.admin.keys()["version"] == leaked.version + 1
    for path, body in (
        (
            "/proxy/heartbeat",
            {"proxy_id": "leaky", "public_url": None, "sessions": 0, "capacity": 100, "draining": False, "version": 0},
        ),
        ("/proxy/events", {"events": [{"event": "refused", "code": "token_invalid"}]}),
        ("/proxy/redeem", {"jti": "j" * 24, "session_id": "s1", "exp": int(time.time()) + 60}),
    ):
        assert _error(
            lambda path=path, body=body: broker.client().request(
                "POST", path, body, authorization=_proxy_auth(broker, "leaky")
            )
        ) == (401, "unauthorized"), path
    assert [p["id"] for p in broker.admin.proxies()] == ["good"]

    # "good" still holds only the leaked keys: no console for it until it has fetched the new ones
    assert _error(lambda: broker.issuer.mint(target["id"])) == (503, "no_proxy_available")
    fresh = Keyring.from_jwks(_beat(broker, "good", leaked.version, sessions=5)["keyring"])
    _beat(broker, "good", fresh.version, sessions=5)
    console = broker.issuer.mint(target["id"])
    assert console["proxy_id"] == "good" and token.verify(console["token"], fresh, time.time()).port == 5901
    with pytest.raises(token.TokenRefused) as refused:
        token.verify(console["token"], leaked, time.time())
    assert refused.value.reason == "unknown_fleet_key"

    assert [(e["actor"], e["proxy_id"], e["rotate"]) for e in _audit(root, "proxy_removed")] == [("cli", "leaky", True)]
    rotated = _audit(root, "key_rotated")
    assert [(e["actor"], e["version"], e["reason"], e["proxy_id"]) for e in rotated] == [
        ("cli", fresh.version, "proxy_removed", "leaky")
    ]


def test_remove_with_no_rotate_keeps_the_keys_and_refuses_repeats(
    state_dir: str, tmp_path: Path, capsys: Capsys
) -> None:
    cred = tmp_path / "old.json"
    _cli(capsys, "proxy", "add", "old", "--public-url", "http://127.0.0.1:1", "--out", str(cred), state=state_dir)
    secret = json.loads(cred.read_text())["secret"]
    ring_before = _rows(state_dir, "SELECT * FROM keyring")

    status, out, _ = _cli(capsys, "proxy", "remove", "old", "--no-rotate", state=state_dir)
    assert status == 0 and "not rotated" in out
    assert _rows(state_dir, "SELECT * FROM keyring") == ring_before
    assert [(e["actor"], e["rotate"]) for e in _audit(state_dir, "proxy_removed")] == [("cli", False)]
    assert _audit(state_dir, "key_rotated") == []
    broker = Broker(state_dir)
    try:
        assert broker.authenticate(f"Bearer old.{secret}", proxy=True) is None
    finally:
        broker.close()

    audit = _rows(state_dir, "SELECT * FROM audit")
    for argv, says in (
        (("proxy", "remove", "old"), "removed already"),
        (("proxy", "remove", "nope"), "no proxy"),
        (("proxy", "add", "old", "--public-url", "http://x", "--out", str(cred)), "not reused"),
    ):
        status, _, err = _cli(capsys, *argv, state=state_dir)
        assert status == 1 and says in err and err.count("\n") == 1, err
    assert _rows(state_dir, "SELECT * FROM audit") == audit
    assert _rows(state_dir, "SELECT * FROM keyring") == ring_before


def test_a_database_failure_leaves_credentials_and_keys_as_they_were(
    state_dir: str, tmp_path: Path, capsys: Capsys
) -> None:
    """Real SQLite errors, raised by triggers at the last write of each operation (for removal:
    after the keys were rotated), must roll everything back and print one line."""
    key = _cli(capsys, "apikey", "create", "ops", "--role", "admin", state=state_dir)[1].strip()
    cred = tmp_path / "px.json"
    _cli(capsys, "proxy", "add", "px", "--public-url", "http://127.0.0.1:1", "--out", str(cred), state=state_dir)
    secret = json.loads(cred.read_text())["secret"]
    with sqlite3.connect(Path(state_dir) / "broker.db") as conn:
        conn.executescript("""
            CREATE TRIGGER fail_revoke BEFORE INSERT ON audit WHEN NEW.type = 'apikey_revoked'
                BEGIN SELECT RAISE(ABORT, 'simulated failure'); END;
            CREATE TRIGGER fail_floor BEFORE INSERT ON mint_floor BEGIN SELECT RAISE(ABORT, 'simulated failure'); END;
        """)
    ring_before = _rows(state_dir, "SELECT * FROM keyring")
    rows_before = _rows(state_dir, "SELECT * FROM apikeys"), _rows(state_dir, "SELECT * FROM proxies")
    audit_before = _rows(state_dir, "SELECT * FROM audit")

    for argv in (("apikey", "revoke", "ops"), ("proxy", "remove", "px")):
        status, out, err = _cli(capsys, *argv, state=state_dir)
        assert (status, out) == (1, "") and err.count("\n") == 1 and "Traceback" not in err, err
        assert "simulated failure" in err and "nothing was changed" in err
    assert _rows(state_dir, "SELECT * FROM keyring") == ring_before
    assert (_rows(state_dir, "SELECT * FROM apikeys"), _rows(state_dir, "SELECT * FROM proxies")) == rows_before
    assert _rows(state_dir, "SELECT * FROM audit") == audit_before
    broker = Broker(state_dir)
    try:
        assert broker.authenticate(f"Bearer {key}", proxy=False) is not None
        assert broker.authenticate(f"Bearer px.{secret}", proxy=True) is not None
    finally:
        broker.close()


def test_a_version_1_database_migrates_and_its_credentials_keep_working(tmp_path: Path, capsys: Capsys) -> None:
    """Databases made before revocation existed: the new columns start empty (nothing revoked)."""
    root = tmp_path / "old"
    legacy_state_dir(root)
    hasher = Hasher(Vault.load(root / MASTER_KEY_NAME).derive("credential-hash"))
    with sqlite3.connect(root / "broker.db") as conn:
        conn.executescript(MIGRATIONS[0].sqlite + "PRAGMA user_version = 1;")
        conn.execute(
            "INSERT INTO apikeys VALUES ('k1', 'legacy', 'admin', ?, 1.0)", (hasher.digest("apikey", "k1", "s3cret"),)
        )
    broker = Broker(root)
    try:
        assert broker.authenticate("Bearer cgk.k1.s3cret", proxy=False) is not None
        assert [k["revoked"] for k in broker.list_apikeys()["apikeys"]] == [False]
    finally:
        broker.close()
    assert _cli(capsys, "apikey", "revoke", "legacy", state=root)[0] == 0
    broker = Broker(root)
    try:
        assert broker.authenticate("Bearer cgk.k1.s3cret", proxy=False) is None
    finally:
        broker.close()


# --- races: the interleavings are forced in-process, two Broker objects on one state directory
# standing for the serving broker and a CLI command (each has its own SQLite connection).

ISSUER = Principal("k1", "app", "issuer")


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Broker, Broker]]:
    """(serving, command): a running broker's Broker and a CLI command's, on the same state dir."""
    init_state_dir(tmp_path / "s")
    serving, command = Broker(tmp_path / "s"), Broker(tmp_path / "s")
    yield serving, command
    serving.close()
    command.close()


def _heartbeat(broker: Broker, name: str, version: int) -> dict[str, Any]:
    return broker.heartbeat(
        Principal(name, name, "proxy"),
        {"proxy_id": name, "public_url": None, "sessions": 0, "capacity": 10, "draining": False, "version": version},
    )


_PROXY_CALLS: dict[str, Callable[[Broker, Principal, int], object]] = {
    "heartbeat": lambda broker, who, version: broker.heartbeat(
        who,
        {"proxy_id": who.id, "public_url": None, "sessions": 0, "capacity": 10, "draining": False, "version": version},
    ),
    "redeem": lambda broker, who, _: broker.redeem(
        who, {"jti": "j" * 24, "session_id": "s1", "exp": int(time.time()) + 60}
    ),
    "events": lambda broker, who, _: broker.proxy_events(who, [{"event": "refused", "code": "token_invalid"}]),
}


@pytest.mark.parametrize("call", _PROXY_CALLS)
def test_proxy_requests_authenticated_before_a_removal_committed_get_401_not_the_new_keys(
    pair: tuple[Broker, Broker], call: str
) -> None:
    """The request authenticates, then ``proxy remove`` commits (rotating the keys), then the
    request's transaction runs: it must be refused, not answered with the rotated fleet keys."""
    serving, command = pair
    secret = serving.add_proxy("leaky", "http://127.0.0.1:1", "test")["secret"]
    leaked = serving.keyring().version
    principal = serving.authenticate(f"Bearer leaky.{secret}", proxy=True)
    assert principal is not None
    assert command.remove_proxy("leaky", "cli")["rotation"]["version"] == leaked + 1

    with pytest.raises(ApiError) as refused:
        _PROXY_CALLS[call](serving, principal, leaked)
    assert (refused.value.status, refused.value.code) == (401, "unauthorized")
    assert serving.store.all("SELECT * FROM redeemed") == []
    assert serving.store.one("SELECT last_seen FROM proxies WHERE id = 'leaky'")[0] is None
    assert [r[0] for r in serving.store.all("SELECT type FROM audit WHERE type IN ('redeemed', 'refused')")] == []


def test_a_heartbeat_reads_the_keys_under_its_write_lock(
    pair: tuple[Broker, Broker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """keyring.json is replaced before its transaction commits (and put back if it fails): read
    outside a write transaction, it may hold keys that never get committed."""
    serving, command = pair
    serving.add_proxy("px", "http://127.0.0.1:1", "test")
    before = serving.keyring().version
    command.store.conn.execute("PRAGMA busy_timeout = 0")
    rotation: list[str] = []
    real_keyring = serving.keyring

    def rotate_then_read() -> Keyring:
        try:
            command.rotate_keys("cli")
            rotation.append("committed")
        except StoreUnavailable:
            rotation.append("waits for the lock")
        return real_keyring()

    monkeypatch.setattr(serving, "keyring", rotate_then_read)
    answer = _heartbeat(serving, "px", 0)
    assert rotation == ["waits for the lock"] and answer["keyring_version"] == before


def test_a_console_is_assigned_under_the_write_lock_so_a_removal_cannot_slip_in(
    pair: tuple[Broker, Broker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``proxy remove`` tries to commit right after the mint chose its proxy: it must wait for
    the mint's commit (the console went to a proxy that was live then), never commit in between
    (a console recorded for a removed proxy, signed with the keys it holds)."""
    serving, command = pair
    serving.add_proxy("leaky", "http://127.0.0.1:1", "test")
    serving.add_target({"id": "vm", "name": "vm", "host": "127.0.0.1", "port": 5901}, "test")
    _heartbeat(serving, "leaky", serving.keyring().version)
    command.store.conn.execute("PRAGMA busy_timeout = 0")
    removal: list[str] = []
    real_choose = fleet.choose

    def choose_then_remove(*args: Any, **kwargs: Any) -> fleet.ProxyView | None:
        chosen = real_choose(*args, **kwargs)
        try:
            command.remove_proxy("leaky", "cli")
            removal.append("committed")
        except StoreUnavailable:
            removal.append("waits for the lock")
        return chosen

    monkeypatch.setattr(fleet, "choose", choose_then_remove)
    console = serving.mint_console(ISSUER, {"target_id": "vm"})
    monkeypatch.undo()
    assert removal == ["waits for the lock"] and console["proxy_id"] == "leaky"
    command.remove_proxy("leaky", "cli")  # after the mint's commit it goes through
    with pytest.raises(ApiError) as refused:
        serving.mint_console(ISSUER, {"target_id": "vm"})
    assert refused.value.code == "no_proxy_available"


_FAIL_AT_COMMIT = """
    CREATE TABLE parent (id INTEGER PRIMARY KEY);
    CREATE TABLE child (parent_id INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED);
    CREATE TRIGGER fail_commit AFTER INSERT ON audit WHEN NEW.type = 'key_rotated'
        BEGIN INSERT INTO child VALUES (42); END;
"""
"""A real COMMIT failure: a deferred foreign key is checked only at COMMIT."""


def test_a_failing_commit_leaves_the_keys_as_they_were(pair: tuple[Broker, Broker]) -> None:
    """The keyring is a row of the rotation's transaction: a refused COMMIT takes it back too."""
    serving, command = pair
    serving.store.conn.executescript(_FAIL_AT_COMMIT)
    before = serving.keyring().to_jwks()
    with pytest.raises(IntegrityError, match="FOREIGN KEY"):
        serving.rotate_keys("test")
    assert serving.keyring().to_jwks() == before and command.keyring().to_jwks() == before
    assert serving.store.all("SELECT * FROM audit WHERE type = 'key_rotated'") == []
    assert not serving.store.conn.in_transaction


def test_two_processes_opening_an_old_database_at_once_migrate_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other process migrates right after this one read the version: this one must see that
    under the write lock instead of applying migration 2 again ("duplicate column name")."""
    db = tmp_path / "b.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(MIGRATIONS[0].sqlite + "PRAGMA user_version = 1;")
    real = Store.version.fget
    assert real is not None
    raced: list[int] = []

    def version(store: Store) -> int:
        current = int(real(store))
        if not raced:
            raced.append(current)
            Store(db).close()  # the other process
        return current

    monkeypatch.setattr(Store, "version", property(version))
    store = Store(db)
    try:
        assert raced == [1] and store.version == SCHEMA_VERSION
        assert "removed_at" in [r["name"] for r in store.all("PRAGMA table_info(proxies)")]
    finally:
        store.close()


def test_a_heartbeat_cannot_steer_consoles_only_set_url_can(broker: BrokerProcess, capsys: Capsys) -> None:
    """A stolen proxy credential gets the fleet keys; if its heartbeat could also change the
    proxy's public URL, every browser (token in hand) would go to the thief. Only an operator
    moves a proxy, audited."""
    root = broker.state.root
    broker.state.add_proxy("only", "http://127.0.0.1:7001")
    version = Keyring.from_jwks(_beat(broker, "only", 0)["keyring"]).version
    _beat(broker, "only", version, public_url="https://thief.example")
    target = broker.admin.add_target(name="Steered VM", host="127.0.0.1", port=5910)
    assert broker.issuer.mint(target["id"])["url"].startswith("http://127.0.0.1:7001/console#token=")
    broker.wait_for_log("reports public URL 'https://thief.example'")
    assert _audit(root, "proxy_changed") == []

    assert _cli(capsys, "proxy", "set-url", "only", "https://px-only.example/", state=root)[0] == 0
    assert broker.issuer.mint(target["id"])["url"].startswith("https://px-only.example/console#token=")
    assert _audit(root, "proxy_changed") == [
        {
            "actor": "cli",
            "proxy_id": "only",
            "public_url": "https://px-only.example",
            "previous": "http://127.0.0.1:7001",
        }
    ]
    assert _cli(capsys, "proxy", "set-url", "nobody", "https://x.example", state=root)[0] == 1
    for bad in (
        "ftp://x.example",
        "https://user:pw@x.example",
        "https://x.example/a b",
        "https://x.example?q=1",
        "https://x.example#",
        "https://evil.example\\.x.example",
    ):
        assert _cli(capsys, "proxy", "set-url", "only", bad, state=root)[0] == 1, bad
    assert len(_audit(root, "proxy_changed")) == 1
