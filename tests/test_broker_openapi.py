"""The OpenAPI document: valid, complete, and true — schemathesis fuzzes a live broker, no 5xx.

Every operation is fuzzed: those for API keys with the admin key, the proxy-only ones (heartbeat,
redeem, events) with a proxy credential; the JUnit reports name each operation tested, and their
union must be the document's. Besides "no 5xx", every answer must have a documented status,
content type and schema (errors: ``{"error": CODE, "message": TEXT}``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokerproc import BrokerProcess, BrokerState, start_broker
from conftest import ENGINES
from schemathesisrun import operations, run_schemathesis, served_document

from broker import api, openapi

openapi_spec_validator = pytest.importorskip("openapi_spec_validator")


@pytest.fixture(scope="module", params=ENGINES)
def broker(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[BrokerProcess]:
    """A broker per engine: the fuzzer's strings and numbers reach SQLite and PostgreSQL alike."""
    tmp = tmp_path_factory.mktemp("broker-openapi")
    database = request.getfixturevalue("pg_cluster").new_database() if request.param == "postgresql" else None
    state = BrokerState.create(tmp / "state", database=database)
    state.add_proxy("fuzz", "http://127.0.0.1:1")
    # one heartbeat keeps "fuzz" healthy throughout; a watch without a change answers after 0.1 s, not 25
    process = start_broker(state, "--watch-hold", "0.1", heartbeat_interval=600)
    yield process
    process.stop()


def test_document_is_valid_openapi() -> None:
    openapi_spec_validator.validate(openapi.document())


def test_document_covers_every_route() -> None:
    documented = {re.sub(r"\{[^}]+\}", "([^/]+)", path) for path in openapi.document()["paths"]}
    routes = {
        rule.matcher.regex.pattern.rstrip("$").removeprefix(api.PREFIX)
        for rule in _rules()
        if rule.matcher.regex.pattern.startswith(api.PREFIX)
    }
    assert routes == documented


def _rules() -> list:
    class _Store:
        def on_change(self, listener: object) -> None:
            return None

    class _Stub:
        store = _Store()

        def list_proxies(self) -> dict:
            return {"proxies": []}

        def latest_change(self) -> int:
            return 0

    return api.make_app(_Stub()).default_router.rules[0].target.rules  # type: ignore[arg-type]


def test_served_document_is_the_same(broker: BrokerProcess) -> None:
    assert broker.client().openapi() == json.loads(json.dumps(openapi.document()))


def test_schemathesis_finds_no_server_error(broker: BrokerProcess, tmp_path: Path) -> None:
    """503 no_proxy_available is documented but counts as a 5xx: a healthy proxy avoids it."""
    credential = json.loads(broker.state.proxies["fuzz"].read_text())
    authorization = f"Bearer {credential['proxy_id']}.{credential['secret']}"
    broker.client().request(
        "POST",
        "/proxy/heartbeat",
        {"proxy_id": "fuzz", "public_url": None, "sessions": 0, "capacity": 10**6, "draining": False, "version": 0},
        authorization=authorization,
    )
    spec = served_document(broker.base + "/api/v1", broker.client().openapi(), tmp_path)
    tested = run_schemathesis(
        *spec,
        tmp_path / "keys.xml",
        "-H",
        f"Authorization: Bearer {broker.state.admin_key}",
        "--exclude-path-regex",
        "^/proxy/",
    )
    proxy_only = run_schemathesis(
        *spec, tmp_path / "proxy.xml", "-H", f"Authorization: {authorization}", "--include-path-regex", "^/proxy/"
    )
    assert proxy_only == {
        "POST /proxy/heartbeat",
        "POST /proxy/redeem",
        "POST /proxy/events",
        "GET /proxy/watch",
        "POST /proxy/enroll",
        "POST /proxy/renew",
    }
    assert tested | proxy_only == operations(openapi.document())
    assert " 500 " not in broker.log_text() and "Traceback" not in broker.log_text()
