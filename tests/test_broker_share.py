"""Sharing a console (issue 19 point 5): ``POST /sessions/{id}/viewers`` mints a view-only console
on the shared session's VM for another person, never outliving it, audited, revoked with it.

The rules in-process on both engines (freezegun moves the clock); the HTTP surface (routes, roles,
bodies, the OpenAPI document) against a real ``console-broker serve``. Two Chromium pages on one
Xvnc are in test_viewer_share.py; a libvirt domain's share in test_hypervisors.py.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from brokerproc import BrokerProcess, legacy_state_dir
from freezegun import freeze_time
from test_broker_api import _error, start_with_a_fake_proxy
from test_broker_units import registered_proxy

from broker.auth import Principal
from broker.service import ApiError, Broker, BrokerConfig, init_state_dir
from broker.store import MIGRATIONS, SCHEMA_VERSION
from console_proxy import clock, token

T0 = "2030-01-01 00:00:00"
ISSUER = Principal("k1", "app", "issuer")
OTHER = Principal("k2", "other-app", "issuer")
ADMIN = Principal("k0", "ops", "admin")


@pytest.fixture
def broker(tmp_path: Path, engine: str, request: pytest.FixtureRequest) -> Iterator[tuple[Broker, Principal]]:
    """A Broker (either engine) with target "vm" and proxy "p"; the clock frozen at T0."""
    database = request.getfixturevalue("pg_cluster").new_database() if engine == "postgresql" else None
    init_state_dir(tmp_path / "state", database=database)
    opened = Broker(tmp_path / "state", BrokerConfig(max_ttl=3600), database=database)
    try:
        opened.add_target({"id": "vm", "name": "VM", "host": "10.0.0.5", "port": 5901}, "test")
        with freeze_time(T0, tick=True):
            yield opened, registered_proxy(opened)
    finally:
        opened.close()


def _beat(broker: Broker, proxy: Principal) -> dict[str, Any]:
    body = {"proxy_id": proxy.id, "sessions": 0, "capacity": 100, "draining": False}
    return broker.heartbeat(proxy, {**body, "version": broker.keyring().version})


def _share(broker: Broker, who: Principal, session_id: str, **body: Any) -> dict[str, Any]:
    """What the API's handler does."""
    return asyncio.run(broker.share_console(who, session_id, body))


def _claims(broker: Broker, minted: dict[str, Any], client_ip: str | None = None) -> token.Claims:
    return token.verify(minted["token"], broker.keyring(), clock.now(), client_ip=client_ip)


def _refusal(call: Callable[[], object]) -> tuple[int, str]:
    with pytest.raises(ApiError) as caught:
        call()
    return caught.value.status, caught.value.code


def _session(broker: Broker, session_id: str) -> Any:
    return broker.store.one("SELECT * FROM sessions WHERE id = ?", session_id)


def test_a_share_is_view_only_on_the_same_vm_and_never_outlives_the_session(broker) -> None:
    broker, proxy = broker
    _beat(broker, proxy)
    parent = broker.mint_console(ISSUER, {"target_id": "vm", "ttl": 300, "user": "alice"})
    shared = _share(broker, ISSUER, parent["session_id"], user="bob", ttl=3600, client_ip="192.0.2.7")

    assert set(shared) == {"session_id", "url", "websocket_url", "token", "expires_at", "proxy_id"}
    assert shared["session_id"] != parent["session_id"]
    assert shared["expires_at"] <= parent["expires_at"]  # asked for an hour, capped at the session's end
    claims, owner = _claims(broker, shared, "192.0.2.7"), _claims(broker, parent)
    assert (claims.host, claims.port, claims.vm) == (owner.host, owner.port, owner.vm) == ("10.0.0.5", 5901, "vm")
    assert claims.ro is True and owner.ro is False
    assert (claims.sub, claims.cip, claims.once) == ("bob", "192.0.2.7", True)
    assert shared["url"].endswith("/console#token=" + shared["token"])
    row = _session(broker, shared["session_id"])
    assert (row["parent_id"], row["issued_by"], row["target_id"]) == (parent["session_id"], ISSUER.id, "vm")

    # a shorter ttl is kept; the default is the broker's
    short = _share(broker, ISSUER, parent["session_id"], ttl=10)
    assert short["expires_at"] <= int(clock.now()) + 10
    assert _share(broker, ADMIN, parent["session_id"])["expires_at"] <= int(clock.now()) + 60


def test_a_share_is_audited_with_the_session_and_the_actor(broker) -> None:
    broker, proxy = broker
    _beat(broker, proxy)
    parent = broker.mint_console(ISSUER, {"target_id": "vm", "ttl": 300})
    shared = _share(broker, ADMIN, parent["session_id"], user="carol")

    events = broker.audit(0, "viewer_shared")["events"]
    assert [(e["session_id"], e["actor"]) for e in events] == [(parent["session_id"], "apikey:ops")]
    assert events[0]["detail"] == {
        "viewer_session_id": shared["session_id"],
        "user": "carol",
        "proxy_id": "p",
        "exp": shared["expires_at"],
    }
    minted = [e for e in broker.audit(0, "minted")["events"] if e["session_id"] == shared["session_id"]]
    assert minted[0]["detail"]["view_only"] is True
    assert minted[0]["detail"]["parent_session_id"] == parent["session_id"]
    listed = {s["session_id"]: s for s in broker.list_sessions(ADMIN, "all")["sessions"]}
    assert listed[shared["session_id"]]["parent_session_id"] == parent["session_id"]
    assert listed[parent["session_id"]]["parent_session_id"] is None


def test_only_an_admin_or_the_sessions_issuer_may_share_it(broker) -> None:
    broker, proxy = broker
    _beat(broker, proxy)
    parent = broker.mint_console(ISSUER, {"target_id": "vm", "ttl": 300})
    assert _refusal(lambda: _share(broker, OTHER, parent["session_id"])) == (403, "forbidden")
    assert _refusal(lambda: _share(broker, ISSUER, "no-such-session")) == (404, "session_not_found")
    assert _refusal(lambda: _share(broker, ADMIN, "no-such-session")) == (404, "session_not_found")
    assert broker.audit(0, "viewer_shared")["events"] == []


def test_revoking_the_session_revokes_its_shares_and_proxies_are_told(broker) -> None:
    broker, proxy = broker
    _beat(broker, proxy)
    parent = broker.mint_console(ISSUER, {"target_id": "vm", "ttl": 300})
    other = broker.mint_console(ISSUER, {"target_id": "vm", "ttl": 300})
    viewers = [_share(broker, ISSUER, parent["session_id"])["session_id"] for _ in range(2)]
    bystander = _share(broker, ISSUER, other["session_id"])["session_id"]
    position = broker.change_position()

    broker.revoke_session(parent["session_id"], "apikey:ops")

    states = {sid: _session(broker, sid)["state"] for sid in (parent["session_id"], *viewers, bystander)}
    assert states == {
        parent["session_id"]: "revoked",
        viewers[0]: "revoked",
        viewers[1]: "revoked",
        bystander: "minted",
    }
    revoked = set(_beat(broker, proxy)["revoked"])
    assert revoked == {parent["session_id"], *viewers}
    answer, changed = broker.watch(proxy, position)
    assert changed and set(answer["revoked"]) == {parent["session_id"], *viewers}
    events = [e for e in broker.audit(0, "revoked")["events"] if e["session_id"] in viewers]
    assert [e["detail"]["parent_session_id"] for e in events] == [parent["session_id"]] * 2
    # revoking a share revokes it alone
    broker.revoke_session(bystander, "apikey:ops")
    assert _session(broker, other["session_id"])["state"] == "minted"


@pytest.mark.parametrize(
    ("end", "code"),
    [("revoked", "session_revoked"), ("closed", "session_closed"), ("expired", "session_expired")],
)
def test_a_session_that_ended_cannot_be_shared(broker, end: str, code: str) -> None:
    broker, proxy = broker
    _beat(broker, proxy)
    parent = broker.mint_console(ISSUER, {"target_id": "vm", "ttl": 30})["session_id"]
    if end == "revoked":
        broker.revoke_session(parent, "apikey:ops")
    elif end == "closed":
        broker.proxy_events(proxy, [{"event": "opened", "session_id": parent}])
        broker.proxy_events(proxy, [{"event": "closed", "session_id": parent, "close_code": 1000}])
    else:
        with freeze_time(T0, tick=True) as frozen:
            frozen.tick(31)
            assert _refusal(lambda: _share(broker, ISSUER, parent)) == (409, code)
        return
    assert _refusal(lambda: _share(broker, ISSUER, parent)) == (409, code)
    assert _refusal(lambda: _share(broker, ADMIN, parent)) == (409, code)


def test_a_revocation_between_the_check_and_the_mint_refuses_the_share(broker) -> None:
    """The second check, in the minting transaction, is what keeps a share from escaping its
    parent's revocation (the first one only fails fast)."""
    broker, proxy = broker
    _beat(broker, proxy)
    parent = broker.mint_console(ISSUER, {"target_id": "vm", "ttl": 300})["session_id"]
    request = asyncio.run(broker.locate_share(ISSUER, parent, {}))
    broker.revoke_session(parent, "apikey:ops")
    refused = _refusal(lambda: asyncio.run(broker.create_console(ISSUER, request, parent=parent)))
    assert refused == (409, "session_revoked")
    assert broker.store.one("SELECT count(*) FROM sessions WHERE parent_id = ?", parent)[0] == 0


def test_a_share_cannot_be_shared_again(broker) -> None:
    broker, proxy = broker
    _beat(broker, proxy)
    parent = broker.mint_console(ISSUER, {"target_id": "vm", "ttl": 300})["session_id"]
    viewer = _share(broker, ISSUER, parent)["session_id"]
    assert _refusal(lambda: _share(broker, ISSUER, viewer)) == (409, "session_is_shared_view")


def test_a_libvirt_session_from_before_the_migration_cannot_be_shared(broker) -> None:
    """Its row names neither a target nor a hypervisor and domain: nothing to look up."""
    broker, _ = broker
    with broker.store.transaction() as conn:
        conn.execute(
            'INSERT INTO sessions (id, target_id, "user", proxy_id, issued_by, state, single_use, exp, minted_at) '
            "VALUES ('old', NULL, NULL, 'p', ?, 'active', 1, ?, ?)",
            (ISSUER.id, int(clock.now()) + 300, clock.now()),
        )
    assert _refusal(lambda: _share(broker, ISSUER, "old")) == (409, "session_not_shareable")


# --- the migration --------------------------------------------------------------------------------


def test_a_database_from_before_sharing_gains_the_parent_columns(tmp_path: Path) -> None:
    """Built from the migrations before this one (whatever its number after later merges)."""
    sharing = next(i for i, m in enumerate(MIGRATIONS) if "parent_id" in m.sqlite)
    root = tmp_path / "old"
    legacy_state_dir(root)
    with sqlite3.connect(root / "broker.db") as conn:
        conn.executescript("".join(m.sqlite for m in MIGRATIONS[:sharing]) + f"PRAGMA user_version = {sharing};")
        conn.execute(
            "INSERT INTO sessions (id, issued_by, state, single_use, exp, minted_at) "
            "VALUES ('old', 'k1', 'closed', 1, 1, 0)"
        )
    migrated = Broker(root)
    try:
        assert migrated.store.version == SCHEMA_VERSION
        row = _session(migrated, "old")
        assert (row["parent_id"], row["vm_hypervisor"], row["vm_domain"]) == (None, None, None)
        assert migrated.list_sessions(ADMIN, "all")["sessions"][0]["parent_session_id"] is None
    finally:
        migrated.close()


# --- the HTTP surface: a real broker process ------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    process = start_with_a_fake_proxy(tmp_path_factory.mktemp("broker-share"), "--max-ttl", "600")
    yield process
    process.stop()


def test_the_viewers_endpoint_answers_like_a_mint(served: BrokerProcess) -> None:
    target = served.admin.add_target(name="shared", host="127.0.0.1", port=5999)
    parent = served.issuer.mint(target["id"], ttl=120)
    shared = served.issuer.share(parent["session_id"], user="bob", ttl=600)
    assert set(shared) == {"session_id", "url", "websocket_url", "token", "expires_at", "proxy_id"}
    assert shared["expires_at"] <= parent["expires_at"] and shared["proxy_id"] == "fake"
    assert served.admin.share(parent["session_id"])["session_id"] != shared["session_id"]  # empty body: defaults
    # the issuer sees the share among its sessions, with its parent
    listed = {s["session_id"]: s for s in served.issuer.sessions()}
    assert listed[shared["session_id"]]["parent_session_id"] == parent["session_id"]

    served.admin.revoke(parent["session_id"])
    assert {s["session_id"]: s["state"] for s in served.issuer.sessions()}[shared["session_id"]] == "revoked"
    assert _error(lambda: served.issuer.share(parent["session_id"])) == (409, "session_revoked")


def test_share_requests_are_checked_like_every_request(served: BrokerProcess) -> None:
    target = served.admin.add_target(name="checked", host="127.0.0.1", port=5998)
    parent = served.issuer.mint(target["id"], ttl=120)["session_id"]
    path = f"/sessions/{parent}/viewers"
    other = served.state.open()
    try:
        stranger = other.create_apikey("stranger", "issuer", "test")
    finally:
        other.close()
    assert _error(lambda: served.client().share(parent)) == (401, "unauthorized")
    assert _error(lambda: served.client(stranger).share(parent)) == (403, "forbidden")
    assert _error(lambda: served.issuer.share("no-such-session")) == (404, "session_not_found")
    for raw in (
        b'{"view_only": false}',  # a share is view-only: the member does not exist
        b'{"target_id": "elsewhere"}',  # nor can it name another VM
        b'{"ttl": 0}',
        b'{"ttl": "60"}',
        b'{"user": 5}',
        b"[]",
        b"{",
    ):
        assert _error(lambda raw=raw: served.issuer.request("POST", path, raw=raw)) == (400, "bad_request"), raw
    huge = b'{"user": "' + b"x" * 70000 + b'"}'
    assert _error(lambda: served.issuer.request("POST", path, raw=huge)) == (413, "body_too_large")
    assert _error(lambda: served.issuer.request("GET", path)) == (405, "method_not_allowed")


def test_the_openapi_document_describes_sharing(served: BrokerProcess) -> None:
    document = served.client().openapi()
    operation = document["paths"]["/sessions/{id}/viewers"]["post"]
    assert {"201", "400", "401", "403", "404", "409", "413", "429", "503"} <= set(operation["responses"])
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == {"user", "ttl", "single_use", "client_ip", "desktop_name"}
    assert body["additionalProperties"] is False
    assert "viewer_shared" in document["paths"]["/audit"]["get"]["parameters"][1]["schema"]["enum"]
    assert "session_revoked" in operation["description"]
