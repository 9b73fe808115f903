"""Failed authentication throttled per address: the bucket as plain calls, then a real broker.

The unit tests move time by passing ``now``; the end-to-end ones run a broker whose bucket does
not refill within a test (``--auth-refill 600``), so nothing waits on a clock. The second
client address is 127.0.0.2, a loopback address of its own: the broker keys buckets by the
peer address it sees.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from brokerproc import BrokerProcess, BrokerState, start_broker
from proxyproc import REPO

from broker import openapi
from broker.ratelimit import AuthThrottle, client_key

T0 = 1000.0


# --- the bucket -----------------------------------------------------------------------------------


def _fail(
    throttle: AuthThrottle, times: int, address: str = "192.0.2.1", kind: str = "apikey", now: float = T0
) -> None:
    for _ in range(times):
        assert not throttle.check(kind, address, now).throttled
        throttle.failed(kind, address, now)


def test_a_burst_of_failures_then_throttled_with_retry_after() -> None:
    throttle = AuthThrottle(burst=10, refill=6.0)
    _fail(throttle, 10)
    verdict = throttle.check("apikey", "192.0.2.1", T0)
    assert verdict.throttled and verdict.retry_after == 6 and verdict.first
    again = throttle.check("apikey", "192.0.2.1", T0 + 2.5)
    assert again.throttled and again.retry_after == 4 and not again.first  # ceil(3.5), same episode


def test_refill_allows_one_more_attempt_per_interval() -> None:
    throttle = AuthThrottle(burst=2, refill=6.0)
    _fail(throttle, 2)
    assert throttle.check("apikey", "192.0.2.1", T0 + 5.9).throttled
    _fail(throttle, 1, now=T0 + 6.0)
    assert throttle.check("apikey", "192.0.2.1", T0 + 6.0).throttled


def test_checks_and_successes_take_nothing() -> None:
    """Only failures count: a client that authenticates correctly a thousand times is never throttled,
    and successes in between do not give a guesser its burst back."""
    throttle = AuthThrottle(burst=3, refill=6.0)
    for _ in range(1000):
        assert not throttle.check("apikey", "192.0.2.1", T0).throttled
    _fail(throttle, 3)
    assert throttle.check("apikey", "192.0.2.1", T0).throttled


def test_kinds_and_addresses_have_their_own_buckets() -> None:
    throttle = AuthThrottle(burst=1, refill=6.0)
    _fail(throttle, 1, kind="apikey")
    assert throttle.check("apikey", "192.0.2.1", T0).throttled
    assert not throttle.check("proxy", "192.0.2.1", T0).throttled
    assert not throttle.check("apikey", "192.0.2.2", T0).throttled


def test_ipv6_is_grouped_by_its_64_and_mapped_ipv4_is_ipv4() -> None:
    throttle = AuthThrottle(burst=1, refill=6.0)
    _fail(throttle, 1, address="2001:db8:1:2::10")
    assert throttle.check("apikey", "2001:db8:1:2:ffff::1", T0).throttled
    assert not throttle.check("apikey", "2001:db8:1:3::10", T0).throttled
    assert client_key("2001:db8:1:2::10") == "2001:db8:1:2::/64"
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_key("not an address") == "not an address"


def test_one_episode_lasts_until_the_bucket_is_full_again() -> None:
    """A guesser trickling one attempt per refill stays in one episode (one audit event); an
    address left alone until its bucket is full starts a new one."""
    throttle = AuthThrottle(burst=2, refill=6.0)
    _fail(throttle, 2)
    assert throttle.check("apikey", "192.0.2.1", T0).first
    _fail(throttle, 1, now=T0 + 6)
    assert not throttle.check("apikey", "192.0.2.1", T0 + 6).first
    full = T0 + 6 + 2 * 6
    _fail(throttle, 2, now=full)
    assert throttle.check("apikey", "192.0.2.1", full).first


def test_memory_is_bounded_evicting_the_least_recently_failed() -> None:
    throttle = AuthThrottle(burst=1, refill=6.0, max_entries=3)
    for n in range(3):
        _fail(throttle, 1, address=f"192.0.2.{n}", now=T0 + n)
    throttle.failed("apikey", "192.0.2.0", T0 + 3)  # the oldest fails again: now the most recent
    _fail(throttle, 1, address="192.0.2.9", now=T0 + 4)
    assert throttle.entries() == 3
    assert not throttle.check("apikey", "192.0.2.1", T0 + 4).throttled  # evicted
    assert throttle.check("apikey", "192.0.2.0", T0 + 4).throttled


def test_a_clock_going_back_neither_fails_nor_refills() -> None:
    throttle = AuthThrottle(burst=1, refill=6.0)
    _fail(throttle, 1)
    assert throttle.check("apikey", "192.0.2.1", T0 - 100).throttled


@pytest.mark.parametrize(("burst", "refill"), [(0, 6.0), (10, 0.0), (10, -1.0), (10, float("nan")), (10, float("inf"))])
def test_nonsense_limits_are_refused(burst: int, refill: float) -> None:
    with pytest.raises(ValueError):
        AuthThrottle(burst, refill)


def test_the_command_line_refuses_nonsense_limits(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "broker.cli", "serve", "--state-dir", str(tmp_path), "--auth-burst", "0"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0 and "--auth-burst" in done.stderr


# --- a real broker --------------------------------------------------------------------------------

BURST = 3
OTHER = "127.0.0.2"


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def call(
    broker: BrokerProcess,
    method: str,
    path: str,
    credential: str | None,
    *,
    source: str = "127.0.0.1",
    body: dict | None = None,
    forwarded_for: str | None = None,
) -> Answer:
    """One request from ``source`` (a loopback address of this machine), on a fresh connection."""
    connection = http.client.HTTPConnection("127.0.0.1", broker.port, timeout=10, source_address=(source, 0))
    try:
        headers = {"Authorization": f"Bearer {credential}"} if credential is not None else {}
        if forwarded_for is not None:
            headers["X-Forwarded-For"] = forwarded_for
        data = json.dumps(body).encode() if body is not None else None
        connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
        return Answer(response.status, response.headers, response.read())
    finally:
        connection.close()


@pytest.fixture
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """A fresh broker per test: each starts with empty buckets."""
    state = BrokerState.create(tmp_path_factory.mktemp("broker-ratelimit") / "state")
    state.add_proxy("edge", "http://127.0.0.1:1")
    process = start_broker(state, "--auth-burst", str(BURST), "--auth-refill", "600")
    yield process
    process.stop()


WRONG_KEY = "cgk.0123456789abcdef.not-the-secret"
HEARTBEAT = {"proxy_id": "edge", "public_url": None, "sessions": 0, "capacity": 1, "draining": False, "version": 0}


def test_a_burst_of_failures_then_429_even_for_the_right_key(broker: BrokerProcess) -> None:
    for _ in range(BURST):
        assert call(broker, "GET", "/api/v1/targets", WRONG_KEY).status == 401
    throttled = call(broker, "GET", "/api/v1/targets", broker.state.admin_key)  # correct, but throttled
    assert throttled.status == 429
    assert throttled.json()["error"] == "too_many_attempts"
    assert "too many failed authentication attempts" in throttled.json()["message"]
    retry_after = throttled.headers["Retry-After"]
    assert retry_after is not None and retry_after.isdigit() and 1 <= int(retry_after) <= 600
    assert broker.state.admin_key not in throttled.body.decode()
    again = call(broker, "GET", "/api/v1/audit", WRONG_KEY)
    assert again.status == 429  # a wrong key is not even examined

    # another address with the right key is unaffected, as is a proxy credential from the first
    assert call(broker, "GET", "/api/v1/targets", broker.state.admin_key, source=OTHER).status == 200
    proxy = json.loads(broker.state.proxies["edge"].read_text())
    assert call(broker, "POST", "/api/v1/proxy/heartbeat", f"edge.{proxy['secret']}", body=HEARTBEAT).status == 200


def test_the_episode_is_audited_once_and_counted(broker: BrokerProcess) -> None:
    """Several 429s from 127.0.0.1 make one audit event; every failure and refusal is counted."""
    for _ in range(BURST):
        assert call(broker, "GET", "/api/v1/keys", WRONG_KEY).status == 401
    for _ in range(3):
        assert call(broker, "GET", "/api/v1/keys", WRONG_KEY).status == 429
    events = json.loads(
        call(broker, "GET", "/api/v1/audit?type=auth_throttled", broker.state.admin_key, source=OTHER).body
    )["events"]
    assert len(events) == 1, events
    assert events[0]["detail"]["address"] == "127.0.0.1" and events[0]["detail"]["kind"] == "apikey"
    assert WRONG_KEY.split(".")[-1] not in json.dumps(events) and "secret" not in json.dumps(events)

    metrics = call(broker, "GET", "/metrics", None).body.decode()
    failures = re.search(r'^consolegate_broker_auth_failures_total\{kind="apikey"\} (\d+)$', metrics, re.MULTILINE)
    throttled = re.search(r'^consolegate_broker_auth_throttled_total\{kind="apikey"\} (\d+)$', metrics, re.MULTILINE)
    assert failures is not None and int(failures.group(1)) == BURST
    assert throttled is not None and int(throttled.group(1)) == 3
    assert WRONG_KEY.split(".")[-1] not in broker.log_text()


def test_failed_proxy_credentials_have_their_own_bucket(broker: BrokerProcess) -> None:
    for _ in range(BURST):
        assert call(broker, "POST", "/api/v1/proxy/heartbeat", "edge.wrong", body=HEARTBEAT, source=OTHER).status == 401
    refused = call(broker, "POST", "/api/v1/proxy/redeem", "edge.wrong", body={}, source=OTHER)
    assert refused.status == 429 and refused.headers["Retry-After"].isdigit()
    assert call(broker, "GET", "/api/v1/targets", broker.state.admin_key, source=OTHER).status == 200
    events = json.loads(
        call(broker, "GET", "/api/v1/audit?type=auth_throttled", broker.state.admin_key, source=OTHER).body
    )["events"]
    assert [(e["detail"]["address"], e["detail"]["kind"]) for e in events] == [(OTHER, "proxy")]
    metrics = call(broker, "GET", "/metrics", None, source=OTHER).body.decode()
    assert f'consolegate_broker_auth_failures_total{{kind="proxy"}} {BURST}' in metrics


@pytest.fixture
def behind_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """A broker behind a reverse proxy at 127.0.0.1 (``--trusted-proxy``); 127.0.0.2 is not one."""
    state = BrokerState.create(tmp_path_factory.mktemp("broker-behind") / "state")
    process = start_broker(state, "--auth-burst", str(BURST), "--auth-refill", "600", "--trusted-proxy", "127.0.0.1/32")
    yield process
    process.stop()


def test_behind_a_trusted_proxy_each_forwarded_client_has_its_bucket(behind_proxy: BrokerProcess) -> None:
    guesser, admin = "198.51.100.7", "198.51.100.8"
    for _ in range(BURST):
        assert call(behind_proxy, "GET", "/api/v1/targets", WRONG_KEY, forwarded_for=guesser).status == 401
    assert call(behind_proxy, "GET", "/api/v1/targets", WRONG_KEY, forwarded_for=guesser).status == 429
    # a client-prepended hop changes nothing: the right-most one the trusted proxy added counts
    assert (
        call(behind_proxy, "GET", "/api/v1/targets", WRONG_KEY, forwarded_for=f"203.0.113.1, {guesser}").status == 429
    )
    assert call(behind_proxy, "GET", "/api/v1/targets", behind_proxy.state.admin_key, forwarded_for=admin).status == 200
    events = json.loads(
        call(
            behind_proxy, "GET", "/api/v1/audit?type=auth_throttled", behind_proxy.state.admin_key, forwarded_for=admin
        ).body
    )["events"]
    assert [e["detail"]["address"] for e in events] == [guesser]


def test_an_untrusted_peer_cannot_escape_its_bucket_with_x_forwarded_for(behind_proxy: BrokerProcess) -> None:
    for n in range(BURST):
        assert (
            call(
                behind_proxy, "GET", "/api/v1/targets", WRONG_KEY, source=OTHER, forwarded_for=f"198.51.100.{n}"
            ).status
            == 401
        )
    assert (
        call(behind_proxy, "GET", "/api/v1/targets", WRONG_KEY, source=OTHER, forwarded_for="198.51.100.99").status
        == 429
    )


def test_every_authenticated_operation_documents_429_with_retry_after() -> None:
    for path, item in openapi.document()["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            throttled = operation["responses"].get("429")
            if operation["security"] or path == "/proxy/enroll":  # the join token in its body is the credential
                assert throttled is not None and "Retry-After" in throttled["headers"], (method, path)
            else:
                assert throttled is None, (method, path)
