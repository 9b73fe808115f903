"""Schemathesis on a live server, for the broker's and the proxy's OpenAPI documents."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

#: What schemathesis checks on every answer.
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def served_document(base: str, document: dict[str, Any], tmp_path: Path) -> tuple[str, str]:
    """``st`` arguments for a served document: as a file, with the server's base URL.

    Loaded from its URL, schemathesis 4 leaves out the operation serving the document."""
    path = tmp_path / "openapi.json"
    path.write_text(json.dumps(document))
    return str(path), f"--url={base}"


def run_schemathesis(spec: str, base: str, junit: Path, *extra: str) -> set[str]:
    """Run ``st`` on ``spec`` against ``base``; fail with its report unless it finds nothing.

    Returns the operations it tested ("METHOD /path", from its JUnit report)."""
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    if st is None:
        pytest.skip("schemathesis is not installed")
    command = [
        st,
        "run",
        spec,
        base,
        "--checks",
        CHECKS,
        "--max-examples",
        "10",
        "--phases",
        "examples,coverage,fuzzing",
        "--seed",
        "1",
        "--request-timeout",
        "10",
        "--report",
        "junit",
        "--report-junit-path",
        str(junit),
        *extra,
    ]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:]
    return {case.attrib["name"] for case in ET.parse(junit).getroot().iter("testcase")}


def operations(document: dict[str, Any]) -> set[str]:
    return {
        f"{method.upper()} {path}"
        for path, item in document["paths"].items()
        for method in item
        if method != "parameters"
    }
