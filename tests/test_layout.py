"""The architecture rules that a reader of the tree relies on."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PURE_CORES = ("token.py", "keyring.py", "rfb.py", "admission.py", "origin.py", "b64url.py")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_console_proxy_never_imports_broker_and_needs_only_tornado_cryptography_and_pycryptodome() -> None:
    third_party = set()
    for path in (REPO / "console_proxy").glob("*.py"):
        imported = _imports(path)
        assert "broker" not in imported, f"{path.name} imports broker"
        assert "Crypto" not in imported or path.name == "rfb.py", f"{path.name}: pycryptodome is for VNC's DES only"
        third_party |= {name for name in imported if name in {"tornado", "Crypto", "cryptography", "requests"}}
    assert third_party <= {"tornado", "cryptography", "Crypto"}


def test_the_cores_do_no_io() -> None:
    for name in PURE_CORES:
        imported = _imports(REPO / "console_proxy" / name)
        assert not imported & {"tornado", "socket", "asyncio", "time", "ssl"}, name


def test_no_novnc_or_node_modules_committed() -> None:
    assert not (REPO / "static" / "core").exists()
    assert (REPO / "static" / "package-lock.json").exists()


def test_the_broker_auth_throttle_is_sans_io() -> None:
    """broker/ratelimit.py takes ``now`` and returns verdicts; the API handler does the rest."""
    imported = _imports(REPO / "broker" / "ratelimit.py")
    assert not imported & {"tornado", "socket", "asyncio", "time", "ssl", "sqlite3"}
