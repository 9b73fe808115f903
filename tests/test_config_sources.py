"""``--config FILE`` (TOML) and ``CONSOLEGATE_<FLAG>``: flag > environment > file > default, and
every bad input refused in one line (a file's with FILE:LINE). Parsing in-process; the wiring
(no --listen flag at all, a bad file at start) through real processes."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from proxyproc import REPO, free_port, run_python

from broker import cli as broker_cli
from console_proxy import cli as proxy_cli
from console_proxy import keyring
from console_proxy.command import CommandError
from console_proxy.keyring import Keyring


def parse(build: object, argv: list[str], environ: dict[str, str] | None = None) -> argparse.Namespace:
    """What ``command.run`` hands the serve handler: argv parsed, then the file and environment."""
    parser = build()  # type: ignore[operator]
    args = parser.parse_args(argv)
    args.sources.apply(parser, args, argv, environ or {})
    return args


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "serve.toml"
    path.write_text(text)
    return str(path)


# --- precedence -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "env", "in_file", "expected"),
    [(True, True, True, 30), (False, True, True, 20), (False, False, True, 10), (False, False, False, 2000)],
)
def test_flag_then_environment_then_file_then_default(
    tmp_path: Path, flag: bool, env: bool, in_file: bool, expected: int
) -> None:
    config = write(tmp_path, "max-sessions = 10\n" if in_file else "# nothing\n")
    argv = ["serve", "--config", config, *(["--max-sessions", "30"] if flag else [])]
    environ = {"CONSOLEGATE_MAX_SESSIONS": "20"} if env else {}
    assert parse(proxy_cli.build_parser, argv, environ).max_sessions == expected


def test_every_kind_of_flag_from_a_file(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        """
        listen = ["127.0.0.1:6080", "[::1]:6080"]
        max_sessions = 5            # underscores read like dashes
        idle-timeout = 60           # an integer where a number is taken
        end-at-expiry = true
        log-format = "json"
        allowed-origin = "https://one.example"   # one value for a repeatable flag
        keyring = "/etc/consolegate/proxy-keyring.json"
    """,
    )
    args = parse(proxy_cli.build_parser, ["serve", "--config", config])
    assert args.listen == ["127.0.0.1:6080", "[::1]:6080"]
    assert (args.max_sessions, args.idle_timeout, args.end_at_expiry) == (5, 60.0, True)
    assert (args.log_format, args.allowed_origin) == ("json", ["https://one.example"])
    assert args.keyring == "/etc/consolegate/proxy-keyring.json"


def test_every_kind_of_flag_from_the_environment(tmp_path: Path) -> None:
    environ = {
        "CONSOLEGATE_LISTEN": "127.0.0.1:1, [::]:2",
        "CONSOLEGATE_NO_PIN_HOST": "yes",
        "CONSOLEGATE_SKEW": "5",
        "CONSOLEGATE_CONFIG": write(tmp_path, "skew = 9\nhandshake-timeout = 3\n"),
    }
    args = parse(proxy_cli.build_parser, ["serve"], environ)
    assert (args.listen, args.no_pin_host, args.skew, args.handshake_timeout) == (
        ["127.0.0.1:1", "[::]:2"],
        True,
        5,
        3.0,
    )


def test_a_repeatable_flag_replaces_the_lower_layers_instead_of_adding_to_them(tmp_path: Path) -> None:
    config = write(tmp_path, 'listen = ["127.0.0.1:1"]\n')
    args = parse(
        proxy_cli.build_parser,
        ["serve", "--config", config, "--listen", "127.0.0.1:2"],
        {"CONSOLEGATE_LISTEN": "127.0.0.1:3"},
    )
    assert args.listen == ["127.0.0.1:2"]


def test_the_broker_reads_the_same_way(tmp_path: Path) -> None:
    config = write(tmp_path, 'state-dir = "/var/lib/consolegate"\nlisten = "127.0.0.1:8700"\nmax-ttl = 600\n')
    args = parse(broker_cli.build_parser, ["serve", "--config", config], {"CONSOLEGATE_DEFAULT_TTL": "30"})
    assert (args.state_dir, args.listen, args.max_ttl, args.default_ttl) == (
        "/var/lib/consolegate",
        "127.0.0.1:8700",
        600,
        30,
    )


# --- bad input: refused with the file and the line ----------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ('listen = ["127.0.0.1:1"]\n\nmax-sesions = 5\n', 3, "unknown setting 'max-sesions'"),
        ('skew = 5\nmax-sessions = "5"\n', 2, "max-sessions: expected an integer, got a string"),
        ("idle-timeout = true\n", 1, "expected a number, got a boolean"),
        ('\n\nend-at-expiry = "yes"\n', 3, "expected true or false"),
        ('log-format = "xml"\n', 1, "expected one of text, json"),
        ("listen = [1]\n", 1, "expected a string, got an integer"),
        ('\n[serve]\nlisten = "x"\n', 2, "[serve] is a table"),
        ('skew = 1\npassword = "hunter2"\n', 2, "'password' would hold a secret inline"),
        ('"api_key" = "cgk.x"\n', 1, "would hold a secret inline"),
        ('tls-key = """\n-----BEGIN PRIVATE KEY-----\nMIIE\n"""\n', 1, "looks like a file's content"),
        ("keyring = '{\"keys\": []}'\n", 1, "looks like a file's content"),
    ],
)
def test_a_bad_file_is_refused_with_file_and_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    config = write(tmp_path, text)
    with pytest.raises(CommandError) as refused:
        parse(proxy_cli.build_parser, ["serve", "--config", config])
    assert str(refused.value).startswith(f"{config}:{line}: ")
    assert message in str(refused.value)
    assert "hunter2" not in str(refused.value) and "MIIE" not in str(refused.value)


def test_invalid_toml_names_the_file_and_tomllib_the_line(tmp_path: Path) -> None:
    config = write(tmp_path, "skew = 1\nlisten = 127.0.0.1:1\n")
    with pytest.raises(CommandError, match=rf"^{config}: not valid TOML: .*at line 2"):
        parse(proxy_cli.build_parser, ["serve", "--config", config])


def test_a_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match=r"cannot read the config file .*No such file"):
        parse(proxy_cli.build_parser, ["serve", "--config", str(tmp_path / "absent.toml")])


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"CONSOLEGATE_MAX_SESIONS": "5"}, "CONSOLEGATE_MAX_SESIONS: unknown setting 'max-sesions'"),
        ({"CONSOLEGATE_MAX_SESSIONS": "many"}, "CONSOLEGATE_MAX_SESSIONS: expected an integer"),
        ({"CONSOLEGATE_END_AT_EXPIRY": "maybe"}, "expected true or false"),
        ({"CONSOLEGATE_API_KEY": "cgk.abc"}, "would hold a secret inline"),
        ({"CONSOLEGATE_VNC_PASSWORD": "hunter2"}, "would hold a secret inline"),
        ({"CONSOLEGATE_TLS_KEY": "-----BEGIN PRIVATE KEY-----"}, "looks like a file's content"),
    ],
)
def test_bad_environment_variables_are_refused(environ: dict[str, str], message: str) -> None:
    with pytest.raises(CommandError) as refused:
        parse(proxy_cli.build_parser, ["serve"], environ)
    assert message in str(refused.value)
    assert "hunter2" not in str(refused.value) and "cgk.abc" not in str(refused.value)


# --- through real processes -------------------------------------------------------------------

ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def test_a_proxy_started_from_a_file_and_the_environment(tmp_path: Path) -> None:
    """No flag but --config: the file gives the keyring and level, the environment the listener."""
    ring = tmp_path / "proxy-keyring.json"
    keyring.save(Keyring.generate(time.time()), ring, public_only=True)
    port = free_port()
    config = write(tmp_path, f'keyring = "{ring}"\nlog-level = "DEBUG"\nlisten = ["127.0.0.1:1"]\n')
    done = subprocess.Popen(
        [sys.executable, "-m", "console_proxy", "serve", "--config", config],
        env={**ENV, "CONSOLEGATE_LISTEN": f"127.0.0.1:{port}"},
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert done.stdout is not None
        line = next(line for line in done.stdout if "listening" in line or "error" in line)
        assert f"console-proxy listening on 127.0.0.1:{port}" in line
    finally:
        done.terminate()
        done.wait(20)


def test_a_bad_file_stops_the_start_in_one_line(tmp_path: Path) -> None:
    config = write(tmp_path, 'listen = "127.0.0.1:1"\nmax-sesions = 3\n')
    done = run_python("-m", "console_proxy", "serve", "--config", config)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        (
            f"console-proxy: error: {config}:2: unknown setting 'max-sesions' (not a flag of console-proxy serve; "
            "see console-proxy serve --help)"
        )
    ]


def test_no_listen_anywhere_is_one_line(tmp_path: Path) -> None:
    keyring_file = tmp_path / "k.json"
    keyring.save(Keyring.generate(time.time()), keyring_file, public_only=True)
    done = run_python("-m", "console_proxy", "serve", "--keyring", str(keyring_file))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "console-proxy: error: give --listen HOST:PORT (or listen in --config, or CONSOLEGATE_LISTEN)"
    ]
