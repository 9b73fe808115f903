"""contrib/systemd: the units pass ``systemd-analyze verify`` (with no warning: a misspelt
hardening key is only a warning, and would silently not harden), carry the hardening they promise,
and start the commands with flags and example settings the commands accept."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from proxyproc import REPO

from broker import cli as broker_cli
from console_proxy import cli as proxy_cli

UNITS = REPO / "contrib" / "systemd"
INSTALLED_BIN = "/opt/consolegate/bin/"
COMMANDS = {"console-proxy.service": proxy_cli, "console-broker.service": broker_cli}
HARDENING = (
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "CapabilityBoundingSet=",
    "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
    "UMask=0077",
    "SystemCallFilter=@system-service",
)


def directives(unit: Path) -> list[str]:
    return [line for line in unit.read_text().splitlines() if line and not line.startswith(("#", "["))]


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is absent (scripts/setup.sh installs the systemd package)",
)
def test_units_pass_systemd_analyze_verify_without_a_warning(tmp_path: Path) -> None:
    """Verify checks that ExecStart's program exists: the copies point at this venv's commands."""
    venv_bin = str(REPO / ".venv" / "bin") + "/"
    for unit in UNITS.glob("*.service"):
        (tmp_path / unit.name).write_text(unit.read_text().replace(INSTALLED_BIN, venv_bin))
    done = subprocess.run(
        ["systemd-analyze", "verify", *sorted(str(p) for p in tmp_path.glob("*.service"))],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_a_misspelt_key_is_caught_by_the_same_check(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is absent")
    unit = tmp_path / "console-proxy.service"
    text = (UNITS / unit.name).read_text().replace(INSTALLED_BIN, str(REPO / ".venv" / "bin") + "/")
    unit.write_text(text.replace("ProtectSystem=strict", "ProtectSystm=strict"))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], check=False, capture_output=True, text=True, timeout=60
    )
    assert "Unknown key" in done.stdout + done.stderr


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_units_carry_the_hardening(name: str) -> None:
    lines = directives(UNITS / name)
    for wanted in HARDENING:
        assert wanted in lines, wanted
    assert "DynamicUser=yes" in lines or any(line.startswith("User=") for line in lines)
    if name == "console-broker.service":
        assert "StateDirectory=consolegate-broker" in lines and "StateDirectoryMode=0700" in lines
    assert not any(re.search(r"(?i)password|secret=", line) for line in lines)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_exec_start_and_the_example_settings_are_accepted(name: str, tmp_path: Path) -> None:
    """ExecStart's flags parse; the example .toml in the unit's comments passes the config checks."""
    unit = (UNITS / name).read_text()
    exec_start = next(line for line in directives(UNITS / name) if line.startswith("ExecStart="))
    argv = shlex.split(exec_start.removeprefix("ExecStart=").replace("${CREDENTIALS_DIRECTORY}", "/run/creds"))
    assert argv[0].startswith(INSTALLED_BIN)
    example = "\n".join(
        line.removeprefix("#     ")
        for line in unit.splitlines()
        if line.startswith("#     ") and "=" in line and not line.startswith("#     useradd")
    )
    config = tmp_path / "example.toml"
    config.write_text(example + "\n")
    argv = [
        arg if not arg.startswith("/etc/consolegate/") or not arg.endswith(".toml") else str(config) for arg in argv[1:]
    ]
    parser = COMMANDS[name].build_parser()
    args = parser.parse_args(argv)
    args.sources.apply(
        parser,
        args,
        argv,
        {"CONSOLEGATE_STATE_DIR": "/var/lib/consolegate-broker"} if name == "console-broker.service" else {},
    )
    assert args.log_format == "json"


def test_license_file_matches_the_declared_license() -> None:
    declared = next(
        line.split("=", 1)[1].strip()
        for line in (REPO / "setup.cfg").read_text().splitlines()
        if line.startswith("license =")
    )
    text = " ".join((REPO / "LICENSE").read_text().split())
    assert declared == "Apache-2.0" and text.startswith("Apache License Version 2.0, January 2004")
    for name in ("CHANGELOG.md", "SECURITY.md"):
        assert (REPO / name).read_text().startswith("# ")
