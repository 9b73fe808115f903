"""The architecture rules that a reader of the tree relies on."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PURE_CORES = ("token.py", "keyring.py", "admission.py", "origin.py", "b64url.py")
#: Where pycryptodome may be imported: VNC Authentication's DES, nothing else.
DES_MODULE = "protocol/rfb/vncauth.py"


#: The one Tornado import a sans-I/O core may make: the C websocket mask (a function, no I/O).
NOT_IO = "tornado.speedups"


def _imports(path: Path, *, top_level: bool = True) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return {name.split(".")[0] for name in names} if top_level else names


def test_console_proxy_never_imports_broker_and_needs_only_tornado_cryptography_and_pycryptodome() -> None:
    third_party = set()
    package = REPO / "console_proxy"
    for path in package.rglob("*.py"):
        imported = _imports(path)
        where = path.relative_to(package).as_posix()
        assert "broker" not in imported, f"{where} imports broker"
        assert "Crypto" not in imported or where == DES_MODULE, f"{where}: pycryptodome is for VNC's DES only"
        third_party |= {name for name in imported if name in {"tornado", "Crypto", "cryptography", "requests"}}
    assert third_party <= {"tornado", "cryptography", "Crypto"}


def test_the_cores_do_no_io() -> None:
    """The named cores and every module of the protocol/ sub-package (the sans-I/O codecs)."""
    package = REPO / "console_proxy"
    cores = [package / name for name in PURE_CORES] + sorted((package / "protocol").rglob("*.py"))
    assert len(cores) > len(PURE_CORES) + 5, "the protocol/ sub-package went missing"
    for path in cores:
        imported = {name.split(".")[0] for name in _imports(path, top_level=False) - {NOT_IO}}
        assert not imported & {"tornado", "socket", "asyncio", "time", "ssl"}, path.name


def test_no_novnc_or_node_modules_committed() -> None:
    assert not (REPO / "static" / "core").exists()
    assert (REPO / "static" / "package-lock.json").exists()


def test_the_broker_auth_throttle_is_sans_io() -> None:
    """broker/ratelimit.py takes ``now`` and returns verdicts; the API handler does the rest."""
    imported = _imports(REPO / "broker" / "ratelimit.py")
    assert not imported & {"tornado", "socket", "asyncio", "time", "ssl", "sqlite3"}
