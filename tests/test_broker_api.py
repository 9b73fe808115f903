"""The broker's API against a real broker process: auth, validation, errors, minting, redeem, fleet."""

from __future__ import annotations

import json
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from brokerproc import BrokerProcess, BrokerState, start_broker
from conftest import ENGINES

from broker.client import BrokerClient, BrokerError
from console_proxy import token
from console_proxy.keyring import Keyring

PASSWORD = "vnc-Pa55-" + secrets.token_hex(4)
FAKE_PROXY_INTERVAL = 600.0
"""The heartbeat interval of a broker whose one proxy is faked by hand (a heartbeat posted by the
test, none after): the proxy stays healthy for three of these (30 min) after each. With the 0.5 s
of a broker whose proxies are real (brokerproc.HEARTBEAT), it went stale 1.5 s after the test's
heartbeat, and a loaded machine that did not schedule the broker for that long turned the next mint
into a 503 no_proxy_available; a test that wants a 503 gets it by draining or keys, never by age."""


@pytest.fixture(scope="module", params=ENGINES)
def broker(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[BrokerProcess]:
    """One broker process per engine (its SQLite file, or a fresh PostgreSQL database) and its
    fake proxy, healthy for 30 min after each of a test's heartbeats (:data:`FAKE_PROXY_INTERVAL`)."""
    tmp = tmp_path_factory.mktemp("broker-api")
    database = request.getfixturevalue("pg_cluster").new_database() if request.param == "postgresql" else None
    state = BrokerState.create(tmp / "state", database=database)
    state.add_proxy("fake", "http://127.0.0.1:1")
    process = start_broker(state, "--max-ttl", "600", heartbeat_interval=FAKE_PROXY_INTERVAL)
    yield process
    process.stop()


def _proxy_auth(broker: BrokerProcess, name: str = "fake") -> str:
    credential = json.loads(broker.state.proxies[name].read_text())
    return f"Bearer {credential['proxy_id']}.{credential['secret']}"


def _as_proxy(broker: BrokerProcess, path: str, body: Any) -> tuple[int, Any]:
    return broker.client().request("POST", path, body, authorization=_proxy_auth(broker))


def _heartbeat(broker: BrokerProcess, version: int = 0, **over: Any) -> dict[str, Any]:
    body = {
        "proxy_id": "fake",
        "public_url": None,
        "sessions": 0,
        "capacity": 10,
        "draining": False,
        "version": version,
        **over,
    }
    return _as_proxy(broker, "/proxy/heartbeat", body)[1]


def start_with_a_fake_proxy(tmp: Path, *args: str) -> BrokerProcess:
    """A broker (state in ``tmp``, ``args`` for its serve) whose one proxy "fake" stays healthy:
    heartbeats due every :data:`FAKE_PROXY_INTERVAL` and one sent now with room for 10**6
    consoles (consoles minted since the last heartbeat count against it)."""
    state = BrokerState.create(tmp / "state")
    state.add_proxy("fake", "http://127.0.0.1:1")
    process = start_broker(state, *args, heartbeat_interval=FAKE_PROXY_INTERVAL)
    _heartbeat(process, capacity=10**6)
    return process


def _error(call: Any) -> tuple[int, str]:
    with pytest.raises(BrokerError) as info:
        call()
    return info.value.status, info.value.code


def test_401_answers_name_the_bearer_scheme(broker: BrokerProcess) -> None:
    """RFC 6750: a 401 carries WWW-Authenticate. Tornado's send_error clears headers set before
    the raise, so this pins that the header survives to the wire."""
    for path in ("/api/v1/targets", "/api/v1/proxy/heartbeat"):
        request = urllib.request.Request(
            broker.base + path, method="POST", data=b"{}", headers={"Authorization": "Bearer cgk.nope.nope"}
        )
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=10)
        assert info.value.code == 401
        assert info.value.headers["WWW-Authenticate"] == 'Bearer realm="consolegate"', path


def test_authentication_and_roles(broker: BrokerProcess) -> None:
    assert _error(lambda: broker.client().targets()) == (401, "unauthorized")
    assert _error(lambda: broker.client("cgk.nope.nope").targets()) == (401, "unauthorized")
    wrong = broker.state.admin_key[:-2] + ("AA" if not broker.state.admin_key.endswith("AA") else "BB")
    assert _error(lambda: broker.client(wrong).targets()) == (401, "unauthorized")
    assert _error(lambda: broker.issuer.targets()) == (403, "forbidden")
    assert _error(lambda: broker.issuer.revoke("x")) == (403, "forbidden")
    assert _error(lambda: broker.issuer.audit()) == (403, "forbidden")
    # a proxy credential is no API key, and an API key is no proxy credential
    assert _error(lambda: broker.client().request("GET", "/targets", authorization=_proxy_auth(broker))) == (
        401,
        "unauthorized",
    )
    assert _error(lambda: broker.admin.request("POST", "/proxy/redeem", {})) == (401, "unauthorized")
    assert broker.admin.openapi()["openapi"].startswith("3.")
    assert broker.client().openapi()["paths"]  # anyone


@pytest.mark.parametrize(
    "raw, code",
    [
        (b"{", "bad_request"),
        (b"[]", "bad_request"),
        (b'{"name": "a", "name": "b", "host": "h", "port": 1}', "bad_request"),
        (b'{"name": "a", "host": "h", "port": "1"}', "bad_request"),
        (b'{"name": "a", "host": "h", "port": true}', "bad_request"),
        (b'{"name": "a", "host": "h", "port": 1, "extra": 1}', "bad_request"),
        (b'{"name": "a", "port": 1}', "bad_request"),
        (b'{"name": "a", "host": "h", "port": 70000}', "bad_request"),
        (b"\xff\xfe", "bad_request"),
        (b'{"name": "a", "host": "h", "port": NaN}', "bad_request"),
    ],
)
def test_bad_bodies_are_400(broker: BrokerProcess, raw: bytes, code: str) -> None:
    status, error = _error(lambda: broker.admin.request("POST", "/targets", raw=raw))
    assert (status, error) == (400, code)


def test_body_over_the_limit_is_413(broker: BrokerProcess) -> None:
    raw = json.dumps({"name": "x" * 70000, "host": "h", "port": 1}).encode()
    assert _error(lambda: broker.admin.request("POST", "/targets", raw=raw)) == (413, "body_too_large")
    assert _error(lambda: _as_proxy(broker, "/proxy/events", {"events": [{"event": "x" * 70000}]})) == (
        413,
        "body_too_large",
    )


def test_error_shape_for_unknown_paths_and_methods(broker: BrokerProcess) -> None:
    for method, path in (("GET", "/nope"), ("PUT", "/targets"), ("GET", "/targets/missing")):
        with pytest.raises(BrokerError) as info:
            broker.admin.request(method, path)
        assert info.value.code and info.value.message and info.value.status in (404, 405)


def test_targets_crud_and_password_is_write_only(broker: BrokerProcess) -> None:
    created = broker.admin.add_target(
        id="crud-1",
        name="CRUD",
        host="10.0.0.5",
        port=5901,
        password=PASSWORD,
        tls={"require": True, "sni": "vm.example"},
    )
    assert created == {**created, "id": "crud-1", "has_password": True, "tls": {"require": True, "sni": "vm.example"}}
    assert PASSWORD not in json.dumps(broker.admin.targets()) + json.dumps(broker.admin.target("crud-1"))
    assert _error(lambda: broker.admin.add_target(id="crud-1", name="x", host="h", port=1)) == (409, "target_exists")
    broker.admin.delete_target("crud-1")
    assert _error(lambda: broker.admin.target("crud-1")) == (404, "target_not_found")
    assert _error(lambda: broker.admin.delete_target("crud-1")) == (404, "target_not_found")
    for path in Path(broker.state.root).glob("broker.db*"):  # SQLite: the files, WAL included
        assert PASSWORD.encode() not in path.read_bytes()
    stored = broker.state.open()
    try:  # either engine: what the database hands back
        assert all(
            PASSWORD.encode() not in repr(tuple(row)).encode() for row in stored.store.all("SELECT * FROM targets")
        )
    finally:
        stored.close()
    assert PASSWORD not in broker.log_text()


def test_no_healthy_proxy_is_503(broker: BrokerProcess) -> None:
    target = broker.admin.add_target(name="lonely", host="127.0.0.1", port=5900)
    _heartbeat(broker, draining=True)
    assert _error(lambda: broker.issuer.mint(target["id"])) == (503, "no_proxy_available")


def test_mint_claims_defaults_and_limits(broker: BrokerProcess) -> None:
    target = broker.admin.add_target(name="Mint VM", host="127.0.0.1", port=5905, password=PASSWORD)
    ring = Keyring.from_jwks(_heartbeat(broker)["keyring"])
    console = broker.issuer.mint(target["id"], user="bob", client_ip="192.0.2.7", view_only=True)
    assert console["proxy_id"] == "fake" and console["url"].startswith("http://127.0.0.1:1/console#token=")
    assert console["websocket_url"] == "ws://127.0.0.1:1/websockify"
    claims = token.verify(console["token"], ring, time.time(), client_ip="192.0.2.7")
    assert (claims.host, claims.port, claims.pw, claims.sub, claims.once, claims.ro, claims.dn, claims.vm) == (
        "127.0.0.1",
        5905,
        PASSWORD,
        "bob",
        True,
        True,
        "Mint VM",
        target["id"],
    )
    assert claims.exp - claims.iat == 60 and claims.sid == console["session_id"]
    assert broker.issuer.mint(target["id"], ttl=600)["expires_at"] > time.time() + 590
    assert _error(lambda: broker.issuer.mint(target["id"], ttl=601)) == (400, "bad_request")
    assert _error(lambda: broker.issuer.mint(target["id"], client_ip="not-an-ip")) == (400, "bad_request")
    assert _error(lambda: broker.issuer.mint("no-such-target")) == (404, "target_not_found")
    # within every field's limit, but the token would exceed what a proxy accepts: 400, not 500
    assert _error(lambda: broker.issuer.mint(target["id"], desktop_name="\U0001f600" * 1024, user="u" * 256)) == (
        400,
        "bad_request",
    )
    assert PASSWORD not in broker.log_text()


def test_clip_defaults_per_target_and_a_mint_may_only_narrow_it(broker: BrokerProcess) -> None:
    ring = Keyring.from_jwks(_heartbeat(broker)["keyring"])
    open_target = broker.admin.add_target(name="Clip default", host="127.0.0.1", port=5906)
    paste_only = broker.admin.add_target(name="Paste only", host="127.0.0.1", port=5907, clip="in")
    assert (open_target["clip"], paste_only["clip"]) == ("both", "in")
    assert broker.admin.target(paste_only["id"])["clip"] == "in"

    def mint(target: dict[str, Any], **options: Any) -> dict[str, Any]:
        return broker.issuer.mint(target["id"], **options)

    def minted(target: dict[str, Any], **options: Any) -> str | None:
        return token.verify(mint(target, **options)["token"], ring, time.time()).clip

    # the broker always writes the claim: the target's default, or what the request narrowed it to
    assert minted(open_target) == "both"
    assert [minted(open_target, clip=c) for c in ("none", "in", "out", "both")] == ["none", "in", "out", "both"]
    assert minted(paste_only) == "in"
    assert [minted(paste_only, clip=c) for c in ("none", "in")] == ["none", "in"]
    for wider in ("out", "both"):
        assert _error(lambda w=wider: mint(paste_only, clip=w)) == (403, "clip_not_allowed")
    assert _error(lambda: mint(open_target, clip="all")) == (400, "bad_request")
    assert _error(lambda: broker.admin.add_target(name="x", host="127.0.0.1", port=5908, clip="read")) == (
        400,
        "bad_request",
    )
    minted_events = [e for e in broker.admin.audit(type_="minted") if e["detail"]["target_id"] == paste_only["id"]]
    assert {e["detail"]["clip"] for e in minted_events} == {"none", "in"}


def test_heartbeat_keyring_only_when_changed_and_identity_checked(broker: BrokerProcess) -> None:
    first = _heartbeat(broker)
    ring = Keyring.from_jwks(first["keyring"])
    assert not ring.can_mint and all(k.seed is None for k in ring.signing.values())
    assert "keyring" not in _heartbeat(broker, version=first["keyring_version"])
    assert _error(
        lambda: _as_proxy(
            broker,
            "/proxy/heartbeat",
            {"proxy_id": "other", "public_url": None, "sessions": 0, "capacity": 1, "draining": False, "version": 0},
        )
    ) == (403, "forbidden")


def test_redeem_first_wins_then_409_even_under_a_race(broker: BrokerProcess) -> None:
    jti = secrets.token_urlsafe(18)
    body = {"jti": jti, "session_id": "race-" + jti[:6], "exp": int(time.time()) + 60}
    results: list[int] = []
    barrier = threading.Barrier(8)

    def attempt() -> None:
        barrier.wait()
        try:
            results.append(_as_proxy(broker, "/proxy/redeem", body)[0])
        except BrokerError as exc:
            results.append(exc.status)

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [200] + [409] * 7
    assert _error(lambda: _as_proxy(broker, "/proxy/redeem", body)) == (409, "token_used")


def test_sessions_issuer_sees_own_revoke_reaches_heartbeat_and_blocks_redeem(broker: BrokerProcess) -> None:
    _heartbeat(broker)
    target = broker.admin.add_target(name="sess", host="127.0.0.1", port=5906)
    console = broker.issuer.mint(target["id"])
    sid = console["session_id"]
    mine = {s["session_id"]: s for s in broker.issuer.sessions("minted")}
    assert mine[sid]["state"] == "minted" and mine[sid]["target_id"] == target["id"]
    broker.admin.revoke(sid)
    broker.admin.revoke(sid)  # idempotent
    assert sid in _heartbeat(broker, version=1 << 40)["revoked"]
    assert [s["state"] for s in broker.admin.sessions("revoked") if s["session_id"] == sid] == ["revoked"]
    assert _error(
        lambda: _as_proxy(
            broker, "/proxy/redeem", {"jti": secrets.token_urlsafe(18), "session_id": sid, "exp": int(time.time()) + 60}
        )
    ) == (409, "session_revoked")
    assert _error(lambda: broker.admin.revoke("no-such-session")) == (404, "session_not_found")
    other = broker.state.open()
    try:
        other_key = other.create_apikey("issuer2", "issuer", "test")
    finally:
        other.close()
    assert sid not in [s["session_id"] for s in broker.client(other_key).sessions()]
    assert _error(lambda: broker.issuer.sessions("bogus")) == (400, "bad_request")


def test_events_update_sessions_and_audit(broker: BrokerProcess) -> None:
    _heartbeat(broker)
    target = broker.admin.add_target(name="ev", host="127.0.0.1", port=5907)
    sid = broker.issuer.mint(target["id"])["session_id"]
    mark = broker.admin.audit(0, limit=1000)[-1]["seq"]
    _as_proxy(
        broker,
        "/proxy/events",
        {
            "events": [
                {"event": "opened", "session_id": sid, "client": "198.51.100.1", "at": time.time(), "extra": "ignored"},
                {
                    "event": "closed",
                    "session_id": sid,
                    "bytes_up": 10,
                    "bytes_down": 2000,
                    "close_code": 1000,
                    "duration_s": 1.5,
                    "close_reason": "browser_closed",
                },
                {
                    "event": "refused",
                    "code": "token_expired",
                    "reason": "expired",
                    "status": 401,
                    "client": "198.51.100.2",
                    "path": "/websockify",
                },
            ]
        },
    )
    row = next(s for s in broker.admin.sessions() if s["session_id"] == sid)
    assert (row["state"], row["bytes_up"], row["bytes_down"], row["close_code"]) == ("closed", 10, 2000, 1000)
    assert row["opened_at"] is not None and row["closed_at"] is not None
    events = broker.admin.audit(mark)
    assert [e["type"] for e in events] == ["opened", "closed", "refused"]
    assert events[2]["detail"]["reason"] == "expired" and all(e["actor"] == "proxy:fake" for e in events)
    assert [e["type"] for e in broker.admin.audit(mark, "refused")] == ["refused"]
    assert _error(lambda: _as_proxy(broker, "/proxy/events", {"events": [{"event": "bogus"}]})) == (400, "bad_request")
    # beyond SQLite's 64-bit integers: refused as a bad request, not a 500 that loses the batch
    assert _error(
        lambda: _as_proxy(
            broker, "/proxy/events", {"events": [{"event": "closed", "session_id": sid, "bytes_up": 2**64}]}
        )
    ) == (400, "bad_request")
    assert _error(lambda: broker.admin.audit("\u00b2")) == (400, "bad_request")  # a digit, not ASCII


def test_keys_listing_and_rotation_never_show_key_material(broker: BrokerProcess) -> None:
    before = broker.admin.keys()
    rotated = broker.admin.rotate_keys()
    after = broker.admin.keys()
    assert rotated["version"] == before["version"] + 1 == after["version"]
    text = json.dumps(after)
    assert '"d"' not in text and '"k"' not in text
    assert {k["status"] for k in after["keys"]} == {"active", "verify-only"}
    assert broker.admin.audit(0, "key_rotated")[-1]["detail"]["version"] == rotated["version"]


def test_proxies_listing(broker: BrokerProcess) -> None:
    _heartbeat(broker, sessions=3, capacity=7, public_url="http://127.0.0.1:1")
    fake = next(p for p in broker.admin.proxies() if p["id"] == "fake")
    assert (fake["sessions"], fake["capacity"], fake["healthy"], fake["draining"]) == (3, 7, True, False)


def test_client_reports_unreachable_broker() -> None:
    from proxyproc import free_port

    with pytest.raises(BrokerError) as info:
        BrokerClient(f"http://127.0.0.1:{free_port()}", "k").targets()
    assert (info.value.status, info.value.code) == (0, "broker_unreachable")


def test_healthz_and_metrics(broker: BrokerProcess) -> None:
    import urllib.request

    with urllib.request.urlopen(f"{broker.base}/healthz", timeout=10) as response:
        assert response.status == 200 and json.loads(response.read())
    with urllib.request.urlopen(f"{broker.base}/readyz", timeout=10) as response:
        assert response.status == 200 and json.loads(response.read()) == {"status": "ready"}
    with urllib.request.urlopen(f"{broker.base}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert response.headers["Content-Type"].startswith("text/plain")
    for name in (
        "consolegate_broker_responses_total",
        "consolegate_broker_consoles_minted_total",
        "consolegate_broker_healthy_proxies",
    ):
        assert f"# TYPE {name}" in text


def test_a_proxy_two_rotations_behind_gets_no_console_until_it_reports_the_new_keys(broker: BrokerProcess) -> None:
    """The broker can mint with the keys of one rotation back, not two: a proxy that missed two
    (both within its heartbeat interval) would get a console it cannot open. It waits for its next
    heartbeat instead, and a fresh proxy (version 0, just sent the whole keyring) is served."""
    old_ring = Keyring.from_jwks(_heartbeat(broker)["keyring"])
    _heartbeat(broker, version=old_ring.version)
    target = broker.admin.add_target(name="Twice rotated VM", host="127.0.0.1", port=5909)
    broker.admin.rotate_keys()
    broker.admin.rotate_keys()
    assert _error(lambda: broker.issuer.mint(target["id"])) == (503, "no_proxy_available")
    new_ring = Keyring.from_jwks(_heartbeat(broker, version=0)["keyring"])  # as a fresh proxy
    assert token.verify(broker.issuer.mint(target["id"])["token"], new_ring, time.time()).port == 5909


def test_a_console_minted_right_after_a_rotation_opens_on_a_proxy_not_yet_told(broker: BrokerProcess) -> None:
    """Proxies learn a rotation at their next heartbeat. Until the chosen proxy reports the new
    keyring version, the broker mints with the keys that proxy holds (the previous ones, which
    still verify); once it has reported it, with the new ones."""
    old_ring = Keyring.from_jwks(_heartbeat(broker)["keyring"])
    _heartbeat(broker, version=old_ring.version)
    target = broker.admin.add_target(name="Rotated VM", host="127.0.0.1", port=5908)
    broker.admin.rotate_keys()
    minted = broker.issuer.mint(target["id"])["token"]
    assert token.verify(minted, old_ring, time.time()).port == 5908  # the proxy's keys open it
    new_ring = Keyring.from_jwks(_heartbeat(broker, version=old_ring.version)["keyring"])
    assert new_ring.version > old_ring.version
    _heartbeat(broker, version=new_ring.version)
    minted = broker.issuer.mint(target["id"])["token"]
    assert token.verify(minted, new_ring, time.time()).port == 5908
    with pytest.raises(token.TokenRefused) as refused:
        token.verify(minted, old_ring, time.time())
    assert refused.value.reason == "unknown_fleet_key"  # minted with the new keys now


def test_strings_no_database_can_hold_are_400_on_both_engines(broker: BrokerProcess) -> None:
    """A NUL (PostgreSQL's text cannot hold it), an unpaired surrogate (no driver can encode it),
    in a body or a path: 400, never a 500, and the same answer from either engine."""
    for name in ("a\u0000b", "\ud800"):
        assert _error(lambda name=name: broker.admin.add_target(name=name, host="h", port=1)) == (400, "bad_request")
    assert _error(lambda: broker.admin.request("DELETE", "/sessions/x%00y")) == (400, "bad_request")
    assert _error(lambda: broker.admin.request("GET", "/audit", query={"type": "x\u0000"})) == (400, "bad_request")
    assert " 500 " not in broker.log_text()


def test_byte_counters_stop_at_their_maximum(broker: BrokerProcess) -> None:
    _heartbeat(broker)
    target = broker.admin.add_target(name="bytes", host="127.0.0.1", port=5907)
    sid = broker.issuer.mint(target["id"])["session_id"]
    closed = {"event": "closed", "session_id": sid, "bytes_up": 2**62, "bytes_down": 1, "close_code": 1000}
    assert _as_proxy(broker, "/proxy/events", {"events": [closed, closed]})[0] == 200
    row = next(s for s in broker.admin.sessions() if s["session_id"] == sid)
    assert (row["bytes_up"], row["bytes_down"]) == (2**62, 2)
