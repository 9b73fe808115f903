"""``console-broker keys …``, ``console-broker token mint`` and ``console-proxy token inspect``.

Mostly through ``main()`` (fast, and freezegun moves ``console_proxy.clock.now`` for both
programs); a few real subprocess runs prove the installed console scripts behave the same.
"""

from __future__ import annotations

import io
import json
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time
from token_fixtures import PASSWORD

from broker import cli as broker_cli
from console_proxy import cli as proxy_cli
from console_proxy import keyring, token

BIN = Path(sys.executable).parent  # the venv running the tests, where its console scripts are
START = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUQ2E=\n-----END CERTIFICATE-----\n"


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    @property
    def last(self) -> str:
        return self.out.strip().splitlines()[-1]

    def claims(self) -> dict[str, Any]:
        (line,) = [line for line in self.out.splitlines() if line.startswith("claims: ")]
        return json.loads(line[len("claims: ") :])


def call(main: Any, argv: list[str], capsys: pytest.CaptureFixture[str], *, secret_in_argv: bool = False) -> Result:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    if not secret_in_argv:
        assert PASSWORD not in out + err
    return Result(code, out, err)


def broker(argv: list[str], capsys: pytest.CaptureFixture[str]) -> Result:
    return call(broker_cli.main, argv, capsys)


def proxy(argv: list[str], capsys: pytest.CaptureFixture[str]) -> Result:
    return call(proxy_cli.main, argv, capsys)


def assert_error(result: Result, prog: str, *, usage: bool = False) -> None:
    assert result.code == (2 if usage else 1), result
    lines = result.err.strip().splitlines()
    assert lines and lines[0].startswith(f"{prog}") and ": error: " in lines[0], result.err
    assert len(lines) == (2 if usage else 1), result.err  # usage errors add one "(see … --help)" hint
    assert result.out == ""


def _key_material(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    return [k[m] for k in data["keys"] for m in ("d", "k", "x") if m in k]


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    secret = tmp_path / "vnc-password"
    secret.write_text(PASSWORD + "\n", encoding="utf-8")
    ca = tmp_path / "ca.pem"
    ca.write_text(CA_PEM)
    return {
        "broker": tmp_path / "broker.json",
        "proxy": tmp_path / "proxy.json",
        "pw": secret,
        "ca": ca,
        "dir": tmp_path,
    }


@pytest.fixture()
def ready(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> dict[str, Path]:
    """A broker keyring and its proxy export, made at START."""
    with freeze_time(START):
        assert broker(["keys", "init", "--keyring", str(files["broker"])], capsys).code == 0
        assert (
            broker(
                ["keys", "export-proxy", "--keyring", str(files["broker"]), "--out", str(files["proxy"])], capsys
            ).code
            == 0
        )
    return files


def mint(files: dict[str, Path], capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    result = broker(
        [
            "token",
            "mint",
            "--keyring",
            str(files["broker"]),
            "--host",
            "10.0.0.5",
            "--port",
            "5901",
            "--password-file",
            str(files["pw"]),
            *extra,
        ],
        capsys,
    )
    assert result.code == 0, result.err
    assert result.err == ""
    (tok,) = result.out.splitlines()
    return tok


# --- keys -----------------------------------------------------------------------------------------------------------


def test_keys_init_refuses_to_overwrite_and_force_replaces(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = files["broker"]
    first = broker(["keys", "init", "--keyring", str(path), "--max-ttl", "900"], capsys)
    assert first.code == 0 and str(path) in first.out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    ring = keyring.load(path)
    assert ring.can_mint and ring.max_ttl == 900
    before = path.read_bytes()

    again = broker(["keys", "init", "--keyring", str(path)], capsys)
    assert_error(again, "console-broker")
    assert "--force" in again.err and path.read_bytes() == before

    forced = broker(["keys", "init", "--keyring", str(path), "--force"], capsys)
    assert forced.code == 0
    replaced = keyring.load(path)
    assert replaced.active_signing != ring.active_signing and replaced.max_ttl == keyring.DEFAULT_MAX_TTL

    assert_error(
        broker(["keys", "init", "--keyring", str(files["dir"] / "x.json"), "--max-ttl", "0"], capsys), "console-broker"
    )
    assert not (files["dir"] / "x.json").exists()


def test_keys_rotate_list_and_export(ready: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    path = ready["broker"]
    old = keyring.load(path)
    with freeze_time(START + timedelta(days=1)):
        rotated = broker(["keys", "rotate", "--keyring", str(path)], capsys)
    assert rotated.code == 0 and "version 2" in rotated.out
    ring = keyring.load(path)
    assert ring.active_signing != old.active_signing and ring.active_fleet != old.active_fleet
    assert (
        ring.signing[old.active_signing or ""].verify_until
        == int((START + timedelta(days=1)).timestamp()) + ring.max_ttl + keyring.DEFAULT_SKEW
    )

    listed = broker(["keys", "list", "--keyring", str(path)], capsys)
    assert listed.code == 0
    rows = json.loads(listed.out)["keys"]
    assert {(r["kid"], r["status"]) for r in rows} == {
        (old.active_signing, "verify-only"),
        (old.active_fleet, "verify-only"),
        (ring.active_signing, "active"),
        (ring.active_fleet, "active"),
    }
    for secret in _key_material(path):
        assert secret not in listed.out

    out = ready["dir"] / "proxy2.json"
    with freeze_time(START + timedelta(days=1)):
        exported = broker(["keys", "export-proxy", "--keyring", str(path), "--out", str(out)], capsys)
    assert exported.code == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert '"d"' not in out.read_text()
    proxy_ring = keyring.load(out)
    assert not proxy_ring.can_mint and set(proxy_ring.fleet) == set(ring.fleet)

    # export prunes keys past their verification window
    with freeze_time(START + timedelta(days=3)):
        assert broker(["keys", "export-proxy", "--keyring", str(path), "--out", str(out)], capsys).code == 0
    assert set(keyring.load(out).fleet) == {ring.active_fleet}


def test_keys_with_a_state_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    state.mkdir()
    keyring.save(keyring.Keyring.generate(0), state / "keyring.json")
    assert broker(["keys", "rotate", "--state-dir", str(state)], capsys).code == 0
    assert keyring.load(state / "keyring.json").version == 2
    listed = broker(["keys", "list", "--state-dir", str(state)], capsys)
    assert len(json.loads(listed.out)["keys"]) == 4
    assert_error(
        broker(["keys", "list", "--state-dir", str(state), "--keyring", str(state / "keyring.json")], capsys),
        "console-broker",
    )


# --- mint and inspect -----------------------------------------------------------------------------------------------


def test_mint_with_every_option_and_inspect(ready: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    with freeze_time(START):
        tok = mint(
            ready,
            capsys,
            "--ttl",
            "300",
            "--view-only",
            "--client-ip",
            "192.0.2.7",
            "--single-use",
            "--vm",
            "vm-42",
            "--user",
            "alice",
            "--desktop-name",
            "Alice's desktop",
            "--tls-ca",
            str(ready["ca"]),
            "--clip",
            "out",
        )
        result = proxy(["token", "inspect", "--keyring", str(ready["proxy"]), "--client-ip", "192.0.2.7", tok], capsys)
    assert result.code == 0, result.out
    assert result.last == "accepted"
    assert result.out.startswith("verdict: accepted") and "single use" in result.out.splitlines()[0]
    now = int(START.timestamp())
    claims = result.claims()
    assert claims["pw"] == "********"
    assert claims["tls"] == {"ca": f"<{len(CA_PEM.rstrip())} bytes of PEM>", "require": True}
    assert {
        k: claims[k]
        for k in ("host", "port", "ro", "once", "vm", "sub", "dn", "cip", "aud", "iat", "nbf", "exp", "clip")
    } == {
        "clip": "out",
        "host": "10.0.0.5",
        "port": 5901,
        "ro": True,
        "once": True,
        "vm": "vm-42",
        "sub": "alice",
        "dn": "Alice's desktop",
        "cip": "192.0.2.7",
        "aud": "console-proxy",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
    }
    assert "BEGIN CERTIFICATE" not in result.out
    # the real claims carry the password and the CA, without the file's newline
    full = token.verify(tok, keyring.load(ready["proxy"]), now, client_ip="192.0.2.7")
    assert full.pw == PASSWORD and full.tls == {"require": True, "ca": CA_PEM.rstrip("\n")}


def test_mint_defaults_reusable_and_anon_tls(ready: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    with freeze_time(START):
        plain = mint(ready, capsys)
        reusable = mint(ready, capsys, "--reusable", "--tls-anon")
        now = int(START.timestamp())
    ring = keyring.load(ready["proxy"])
    claims = token.verify(plain, ring, now)
    assert (claims.once, claims.ro, claims.exp - claims.iat, claims.cip, claims.tls) == (False, False, 60, None, None)
    assert token.verify(reusable, ring, now).tls == {"require": True, "allow_anon": True}
    assert token.verify(reusable, ring, now).once is False


def test_inspect_reads_the_token_from_stdin(
    ready: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with freeze_time(START):
        tok = mint(ready, capsys)
        monkeypatch.setattr("sys.stdin", io.StringIO(tok + "\n"))
        result = proxy(["token", "inspect", "--keyring", str(ready["proxy"]), "-"], capsys)
    assert result.code == 0 and result.last == "accepted"
    assert "verdict: accepted" in result.out and "single use" not in result.out


def test_inspect_follows_the_clock_at_the_edges(ready: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    with freeze_time(START):
        tok = mint(ready, capsys, "--ttl", "60")
    args = ["token", "inspect", "--keyring", str(ready["proxy"]), tok]
    exp = START + timedelta(seconds=60)
    cases = [
        (exp + timedelta(seconds=29), [], 0, "accepted"),
        (exp + timedelta(seconds=29.999), [], 0, "accepted"),
        (exp + timedelta(seconds=30), [], 1, "token_expired"),
        (exp + timedelta(seconds=119), ["--skew", "120"], 0, "accepted"),
        (exp + timedelta(seconds=120), ["--skew", "120"], 1, "token_expired"),
        (exp - timedelta(seconds=0.001), ["--skew", "0"], 0, "accepted"),
        (exp, ["--skew", "0"], 1, "token_expired"),
        (START - timedelta(seconds=30), [], 0, "accepted"),
        (START - timedelta(seconds=30.001), [], 1, "token_not_yet_valid"),
        (START, ["--skew", "0"], 0, "accepted"),
        (START - timedelta(seconds=0.001), ["--skew", "0"], 1, "token_not_yet_valid"),
    ]
    for when, options, code, last in cases:
        with freeze_time(when):
            result = proxy(args[:2] + options + args[2:], capsys)
        assert (result.code, result.last) == (code, last), (when, options, result.out)
        assert result.claims()["pw"] == "********"
        if code:
            assert result.out.startswith("verdict: refused")


def test_inspect_refusals(ready: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    with freeze_time(START):
        bound = mint(ready, capsys, "--client-ip", "10.9.9.9", "--ttl", "600")
        long_lived = mint(ready, capsys, "--ttl", "600")
        cases = [
            (["--client-ip", "10.9.9.8", bound], "client_ip_mismatch", "client_ip_mismatch"),
            ([bound], "client_ip_mismatch", "client_ip_mismatch"),
            (["--max-ttl", "599", long_lived], "lifetime_too_long", "token_invalid"),
            ([long_lived[:-3]], "malformed", "token_invalid"),
            (["not-a-token"], "malformed", "token_invalid"),
            (["x" * 9000], "too_long", "token_invalid"),
        ]
        for extra, reason, code in cases:
            result = proxy(["token", "inspect", "--keyring", str(ready["proxy"]), *extra], capsys)
            assert result.code == 1 and result.last == code, result.out
            assert f"reason: {reason}" in result.out
            assert long_lived not in result.out and bound not in result.out
        # a token from another broker
        other = ready["dir"] / "other.json"
        keyring.save(keyring.Keyring.generate(0), other)
        result = proxy(["token", "inspect", "--keyring", str(other), long_lived], capsys)
        assert (result.code, result.last) == (1, "token_invalid") and "unknown_fleet_key" in result.out
        # the broker's own keyring also verifies
        assert proxy(["token", "inspect", "--keyring", str(ready["broker"]), long_lived], capsys).code == 0


# --- errors ---------------------------------------------------------------------------------------------------------


def test_mint_argument_errors(ready: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    base = ["token", "mint", "--keyring", str(ready["broker"])]
    usage = [
        [*base, "--port", "5900"],  # no --host
        [*base, "--host", "h"],  # no --port
        [*base, "--host", "h", "--port", "vnc"],
        [*base, "--host", "h", "--port", "5900", "--ttl", "soon"],
        [*base, "--host", "h", "--port", "5900", "--single-use", "--reusable"],
        [*base, "--host", "h", "--port", "5900", "--bogus"],
        ["keys", "init"],
        ["nonsense"],
    ]
    for argv in usage:
        assert_error(broker(argv, capsys), "console-broker", usage=True)
    # no abbreviated options: --password is not --password-file (which would try to open a file named the password)
    typo = call(
        broker_cli.main, [*base, "--host", "h", "--port", "5900", "--password", "hunter2"], capsys, secret_in_argv=True
    )
    assert_error(typo, "console-broker", usage=True)
    assert "unrecognized arguments" in typo.err and "cannot read" not in typo.err
    failing = [
        [*base, "--host", "h", "--port", "0"],
        [*base, "--host", "h", "--port", "65536"],
        [*base, "--host", "", "--port", "5900"],
        [*base, "--host", "a b", "--port", "5900"],
        [*base, "--host", "h", "--port", "5900", "--ttl", "0"],
        [*base, "--host", "h", "--port", "5900", "--ttl", "3601"],
        [*base, "--host", "h", "--port", "5900", "--client-ip", "10.0.0.999"],
        [*base, "--host", "h", "--port", "5900", "--password-file", str(ready["dir"] / "absent")],
        [*base, "--host", "h", "--port", "5900", "--tls-ca", str(ready["dir"] / "absent.pem")],
        [*base, "--host", "h", "--port", "5900", "--password-file", str(ready["dir"])],
    ]
    for argv in failing:
        assert_error(broker(argv, capsys), "console-broker")


def test_password_file_content_is_never_echoed_in_errors(
    ready: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    bad = ready["dir"] / "latin1"
    bad.write_bytes(PASSWORD.encode("latin-1", "replace") + b"\xff")
    result = broker(
        [
            "token",
            "mint",
            "--keyring",
            str(ready["broker"]),
            "--host",
            "h",
            "--port",
            "5900",
            "--password-file",
            str(bad),
        ],
        capsys,
    )
    assert_error(result, "console-broker")


def test_keyring_errors(ready: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    corrupt = ready["dir"] / "corrupt.json"
    corrupt.write_text(ready["broker"].read_text()[:200])
    absent = ready["dir"] / "absent.json"
    mint_args = ["--host", "h", "--port", "5900"]
    secrets = _key_material(ready["broker"])
    checks = [
        (broker, ["token", "mint", "--keyring", str(absent), *mint_args], "absent.json"),
        (broker, ["token", "mint", "--keyring", str(corrupt), *mint_args], "corrupt.json"),
        (broker, ["token", "mint", "--keyring", str(ready["proxy"]), *mint_args], "proxy keyring"),
        (broker, ["keys", "rotate", "--keyring", str(ready["proxy"])], "proxy keyring"),
        (
            broker,
            ["keys", "export-proxy", "--keyring", str(ready["proxy"]), "--out", str(ready["dir"] / "o.json")],
            "proxy keyring",
        ),
        (broker, ["keys", "list", "--keyring", str(corrupt)], "corrupt.json"),
        (broker, ["keys", "rotate", "--keyring", str(absent)], "absent.json"),
        (proxy, ["token", "inspect", "--keyring", str(absent), "x"], "absent.json"),
        (proxy, ["token", "inspect", "--keyring", str(corrupt), "x"], "corrupt.json"),
    ]
    before = ready["proxy"].read_bytes()
    for program, argv, needle in checks:
        result = program(argv, capsys)
        assert_error(result, "console-broker" if program is broker else "console-proxy")
        assert needle in result.err, result.err
        for secret in secrets:
            assert secret not in result.err
    assert ready["proxy"].read_bytes() == before
    assert not (ready["dir"] / "o.json").exists()


def test_inspect_usage_errors(ready: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert_error(proxy(["token", "inspect", "x"], capsys), "console-proxy", usage=True)
    assert_error(proxy(["token", "inspect", "--keyring", str(ready["proxy"])], capsys), "console-proxy", usage=True)
    assert_error(
        proxy(["token", "inspect", "--keyring", str(ready["proxy"]), "--skew", "lots", "x"], capsys),
        "console-proxy",
        usage=True,
    )


# --- the installed console scripts ----------------------------------------------------------------------------------


def _run(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, input=stdin, timeout=60, check=False)
    assert "Traceback" not in done.stdout + done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    return done


def test_console_scripts_end_to_end(files: dict[str, Path]) -> None:
    broker_file, proxy_file = str(files["broker"]), str(files["proxy"])
    assert _run(str(BIN / "console-broker"), "keys", "init", "--keyring", broker_file).returncode == 0
    assert (
        _run(
            str(BIN / "console-broker"), "keys", "export-proxy", "--keyring", broker_file, "--out", proxy_file
        ).returncode
        == 0
    )
    minted = _run(
        str(BIN / "console-broker"),
        "token",
        "mint",
        "--keyring",
        broker_file,
        "--host",
        "127.0.0.1",
        "--port",
        "5900",
        "--password-file",
        str(files["pw"]),
        "--ttl",
        "120",
        "--view-only",
    )
    assert minted.returncode == 0 and minted.stderr == ""
    tok = minted.stdout.strip()
    inspected = _run(str(BIN / "console-proxy"), "token", "inspect", "--keyring", proxy_file, "-", stdin=tok + "\n")
    assert inspected.returncode == 0, inspected.stdout + inspected.stderr
    assert inspected.stdout.strip().splitlines()[-1] == "accepted"
    assert '"pw": "********"' in inspected.stdout and '"ro": true' in inspected.stdout


def test_console_scripts_fail_with_one_line(files: dict[str, Path]) -> None:
    done = _run(
        str(BIN / "console-broker"),
        "token",
        "mint",
        "--keyring",
        str(files["dir"] / "absent.json"),
        "--host",
        "h",
        "--port",
        "5900",
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("console-broker: error: ") and len(done.stderr.strip().splitlines()) == 1
    expired = _run(
        str(BIN / "console-proxy"), "token", "inspect", "--keyring", str(files["dir"] / "absent.json"), "abc"
    )
    assert expired.returncode == 1 and expired.stderr.startswith("console-proxy: error: ")
