"""The OpenAPI document: valid, complete, and true — schemathesis fuzzes a live broker, no 5xx."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokerproc import BrokerProcess, BrokerState, start_broker
from conftest import ENGINES

from broker import api, openapi

openapi_spec_validator = pytest.importorskip("openapi_spec_validator")


@pytest.fixture(scope="module", params=ENGINES)
def broker(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[BrokerProcess]:
    """A broker per engine: the fuzzer's strings and numbers reach SQLite and PostgreSQL alike."""
    tmp = tmp_path_factory.mktemp("broker-openapi")
    database = request.getfixturevalue("pg_cluster").new_database() if request.param == "postgresql" else None
    state = BrokerState.create(tmp / "state", database=database)
    state.add_proxy("fuzz", "http://127.0.0.1:1")
    process = start_broker(state, heartbeat_interval=600)  # one heartbeat keeps "fuzz" healthy throughout
    yield process
    process.stop()


def test_document_is_valid_openapi() -> None:
    openapi_spec_validator.validate(openapi.document())


def test_document_covers_every_route() -> None:
    documented = {re.sub(r"\{[^}]+\}", "([^/]+)", path) for path in openapi.document()["paths"]}
    routes = {rule.matcher.regex.pattern.rstrip("$").removeprefix(api.PREFIX)
              for rule in _rules() if rule.matcher.regex.pattern.startswith(api.PREFIX)}
    assert routes == documented


def _rules() -> list:
    class _Stub:
        def list_proxies(self) -> dict:
            return {"proxies": []}
    return api.make_app(_Stub()).default_router.rules[0].target.rules  # type: ignore[arg-type]


def test_served_document_is_the_same(broker: BrokerProcess) -> None:
    assert broker.client().openapi() == json.loads(json.dumps(openapi.document()))


def _schemathesis(broker: BrokerProcess, authorization: str, *extra: str) -> subprocess.CompletedProcess[str]:
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    if st is None:
        pytest.skip("schemathesis is not installed")
    command = [st, "run", f"{broker.base}/api/v1/openapi.json", "-H", f"Authorization: {authorization}",
               "--checks", "not_a_server_error", "--max-examples", "10", "--phases", "examples,coverage,fuzzing",
               "--seed", "1", "--request-timeout", "10", *extra]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)


def test_schemathesis_finds_no_server_error(broker: BrokerProcess) -> None:
    """503 no_proxy_available is documented but counts as a 5xx: a healthy proxy avoids it."""
    credential = json.loads(broker.state.proxies["fuzz"].read_text())
    authorization = f"Bearer {credential['proxy_id']}.{credential['secret']}"
    broker.client().request("POST", "/proxy/heartbeat", {
        "proxy_id": "fuzz", "public_url": None, "sessions": 0, "capacity": 10**6, "draining": False, "version": 0},
        authorization=authorization)
    result = _schemathesis(broker, f"Bearer {broker.state.admin_key}", "--exclude-path-regex", "^/proxy/")
    assert result.returncode == 0, result.stdout[-4000:]
    result = _schemathesis(broker, authorization, "--include-path-regex", "^/proxy/")
    assert result.returncode == 0, result.stdout[-4000:]
    assert " 500 " not in broker.log_text() and "Traceback" not in broker.log_text()
