"""The proxy's OpenAPI document: valid, complete, served, and true — schemathesis fuzzes a live proxy.

The same checks as the broker's (tests/test_broker_openapi.py): no 5xx, and every answer with a
documented status, content type and schema (errors: ``{"error": CODE, "message": TEXT}``), over
every operation of the document.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from schemathesisrun import operations, run_schemathesis, served_document

from console_proxy import openapi, server
from console_proxy.config import ProxyConfig

openapi_spec_validator = pytest.importorskip("openapi_spec_validator")


def test_document_is_valid_openapi() -> None:
    openapi_spec_validator.validate(openapi.document())


def test_document_covers_every_route() -> None:
    app = server.make_app(server.ProxyState(ProxyConfig(), None))  # type: ignore[arg-type]
    routes = {
        rule.matcher.regex.pattern.rstrip("$").replace("(.*)", "{path}")
        for rule in app.default_router.rules[0].target.rules
    }
    assert routes == set(openapi.document()["paths"])


def test_served_document_is_the_same(proxy) -> None:
    with urllib.request.urlopen(f"{proxy.base}/openapi.json", timeout=10) as answer:
        assert answer.headers["Content-Type"] == "application/json"
        assert json.load(answer) == json.loads(json.dumps(openapi.document()))


def test_schemathesis_finds_no_server_error(proxy, tmp_path: Path) -> None:
    document = openapi.document()
    tested = run_schemathesis(*served_document(proxy.base, document, tmp_path), tmp_path / "proxy.xml")
    assert tested == operations(document)
    log = proxy.log_text()
    assert " 500 " not in log and "Traceback" not in log and "uncaught" not in log
