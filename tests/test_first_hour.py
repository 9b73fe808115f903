"""A new user's first hour: the mistakes the README's commands invite get one clear line each.

Real processes (``console-proxy serve``, ``console-broker``), real ``vncpasswd``, real sockets.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest
from brokerproc import BrokerState, start_broker
from proxyproc import REPO, free_port, run_python, serve_linked, start_proxy

from console_proxy import keyring
from console_proxy.command import CommandError, read_secret_file
from console_proxy.keyring import Keyring


def _cli(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_python("-m", module, *args)


def _one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


# --- the broker's private keyring given to a proxy -------------------------------------------


@pytest.fixture
def broker_keyring(tmp_path: Path) -> Path:
    path = tmp_path / "broker-keyring.json"
    keyring.save(Keyring.generate(time.time()), path)
    return path


def test_proxy_refuses_a_keyring_that_could_mint(broker_keyring: Path) -> None:
    line = _one_error_line(
        _cli("console_proxy.cli", "serve", "--listen", f"127.0.0.1:{free_port()}", "--keyring", str(broker_keyring))
    )
    assert "holds private signing keys" in line and "could mint" in line
    assert "--allow-signing-keyring" in line and "export-proxy" in line


def test_proxy_takes_it_when_told_and_says_so(tmp_path: Path, broker_keyring: Path) -> None:
    proxy = start_proxy(tmp_path, broker_keyring, "--allow-signing-keyring")
    try:
        assert "this proxy can mint tokens" in proxy.wait_for_log("private signing keys")
    finally:
        proxy.stop()


# --- password files ---------------------------------------------------------------------------


def test_a_vncpasswd_file_is_named_as_such(tmp_path: Path) -> None:
    obfuscated = tmp_path / "passwd"
    with obfuscated.open("wb") as out:
        subprocess.run(["vncpasswd", "-f"], input=b"secret12\n", stdout=out, check=True)
    with pytest.raises(
        CommandError,
        match="this looks like a vncpasswd file \\(obfuscated\\); give the password as plain text on one line",
    ):
        read_secret_file(str(obfuscated))
    state = tmp_path / "state"
    assert _cli("broker.cli", "init", "--state-dir", str(state)).returncode == 0
    line = _one_error_line(
        _cli(
            "broker.cli",
            "targets",
            "add",
            "--name",
            "vm",
            "--host",
            "127.0.0.1",
            "--port",
            "5900",
            "--password-file",
            str(obfuscated),
            "--state-dir",
            str(state),
        )
    )
    assert "looks like a vncpasswd file" in line and "secret12" not in line


@pytest.mark.parametrize("content", [b"secret12\n", b"secret12", b"p\xc3\xa4sswort\r\n"])
def test_plain_text_password_files_still_read(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "password"
    path.write_bytes(content)
    assert read_secret_file(str(path)) == content.decode().rstrip("\r\n")


def test_password_file_format_and_state_dir_default_are_in_help() -> None:
    mint_help = _cli("broker.cli", "targets", "add", "--help").stdout
    assert "plain text on one line" in " ".join(mint_help.split())
    assert "vncpasswd -f" in " ".join(mint_help.split())
    for command in (["serve"], ["init"], ["targets", "list"]):
        assert "default: ./var" in " ".join(_cli("broker.cli", *command, "--help").stdout.split()), command


# --- the broker unreachable: the real cause, never "HTTP 599" ----------------------------------


def _proxy_against(tmp_path: Path, url: str) -> str:
    credential = tmp_path / "credential.json"
    credential.write_text(json.dumps({"proxy_id": "p", "secret": "s" * 40}))
    line = _one_error_line(serve_linked(url, credential))
    assert "599" not in line and "s" * 40 not in line
    return line


def test_https_to_a_plain_http_broker_says_tls_handshake(tmp_path: Path) -> None:
    broker = start_broker(BrokerState.create(tmp_path / "state"))
    try:
        line = _proxy_against(tmp_path, f"https://127.0.0.1:{broker.port}")
    finally:
        broker.stop()
    assert "TLS handshake failed" in line and "plain http" in line


def test_a_closed_port_says_connection_refused(tmp_path: Path) -> None:
    assert "connection refused" in _proxy_against(tmp_path, f"http://127.0.0.1:{free_port()}")


def test_a_silent_broker_says_timed_out(tmp_path: Path) -> None:
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        assert "timed out" in _proxy_against(tmp_path, f"http://127.0.0.1:{silent.getsockname()[1]}")


# --- set-up ------------------------------------------------------------------------------------


def test_setup_installs_curl_and_git() -> None:
    """The README and the demo use curl; a test uses git: a fresh machine must get both."""
    text = (REPO / "scripts" / "setup.sh").read_text()
    packages = text.split("APT_PACKAGES=(", 1)[1].split(")", 1)[0].split()
    assert {"curl", "git"} <= set(packages)
