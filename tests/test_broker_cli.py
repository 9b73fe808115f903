"""``console-broker`` commands on a state directory: init, apikey, proxy, targets, keys, audit."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from broker.cli import main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_state_dir_lifecycle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = str(tmp_path / "var")
    assert _run(capsys, "init", "--state-dir", state)[0] == 0
    assert not (tmp_path / "var" / "keyring.json").exists()  # the keyring is sealed in the database
    for name in ("broker.db", "master.key"):
        assert stat.S_IMODE((tmp_path / "var" / name).stat().st_mode) == 0o600
    status, _, err = _run(capsys, "init", "--state-dir", state)
    assert status == 1 and "already holds" in err

    status, key, _ = _run(capsys, "apikey", "create", "ops", "--role", "admin", "--state-dir", state)
    assert status == 0 and key.strip().startswith("cgk.")
    assert key.strip().encode() not in (tmp_path / "var" / "broker.db").read_bytes()
    with pytest.raises(SystemExit) as usage:
        _run(capsys, "apikey", "create", "ops", "--role", "root", "--state-dir", state)
    assert usage.value.code == 2
    capsys.readouterr()

    # the credential cannot be written: nothing is registered, so the same name works afterwards
    status, _, err = _run(
        capsys,
        "proxy",
        "add",
        "p1",
        "--public-url",
        "http://127.0.0.1:1",
        "--out",
        str(tmp_path / "no-such-dir" / "p1.json"),
        "--state-dir",
        state,
    )
    assert status == 1 and "was not registered" in err and err.count("\n") == 1, err
    cred = tmp_path / "p1.json"
    assert (
        _run(
            capsys, "proxy", "add", "p1", "--public-url", "http://127.0.0.1:1", "--out", str(cred), "--state-dir", state
        )[0]
        == 0
    )
    assert set(json.loads(cred.read_text())) == {"proxy_id", "secret"}
    assert stat.S_IMODE(cred.stat().st_mode) == 0o600
    assert (
        _run(capsys, "proxy", "add", "p1", "--public-url", "http://x", "--out", str(cred), "--state-dir", state)[0] == 1
    )

    pw = tmp_path / "pw"
    pw.write_text("s3cret-vnc\n")
    status, out, _ = _run(
        capsys,
        "targets",
        "add",
        "--id",
        "vm1",
        "--name",
        "VM one",
        "--host",
        "10.0.0.1",
        "--port",
        "5901",
        "--password-file",
        str(pw),
        "--state-dir",
        state,
    )
    assert status == 0 and json.loads(out)["has_password"] is True and "s3cret" not in out
    status, out, _ = _run(capsys, "targets", "list", "--state-dir", state)
    assert [t["id"] for t in json.loads(out)["targets"]] == ["vm1"]
    assert (
        _run(capsys, "targets", "add", "--name", "x", "--host", "bad host", "--port", "1", "--state-dir", state)[0] == 1
    )
    assert _run(capsys, "targets", "remove", "vm1", "--state-dir", state)[0] == 0
    status, _, err = _run(capsys, "targets", "remove", "vm1", "--state-dir", state)
    assert status == 1 and "no target" in err

    status, out, _ = _run(capsys, "keys", "rotate", "--state-dir", state)
    assert status == 0 and "version 2" in out

    status, out, _ = _run(capsys, "audit", "tail", "--state-dir", state)
    types = [json.loads(line)["type"] for line in out.splitlines()]
    assert types == ["apikey_created", "proxy_added", "target_changed", "target_changed", "key_rotated"]
    status, out, _ = _run(capsys, "audit", "tail", "--state-dir", state, "--type", "key_rotated")
    assert [json.loads(line)["actor"] for line in out.splitlines()] == ["cli"]
    for secret in ("s3cret-vnc", key.strip()):
        for path in (tmp_path / "var").iterdir():
            assert secret.encode() not in path.read_bytes()


def test_commands_on_a_missing_state_dir_fail_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = _run(capsys, "targets", "list", "--state-dir", str(tmp_path / "nothing"))
    assert status == 1 and err.count("\n") == 1 and "console-broker init" in err


def test_a_corrupt_database_fails_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Not a traceback: the operator learns which file and what SQLite said."""
    state = tmp_path / "s"
    assert _run(capsys, "init", "--state-dir", str(state))[0] == 0
    (state / "broker.db").write_bytes(b"this is not an SQLite database" * 100)
    for name in ("broker.db-wal", "broker.db-shm"):
        (state / name).unlink(missing_ok=True)
    status, _, err = _run(capsys, "targets", "list", "--state-dir", str(state))
    assert status == 1 and err.count("\n") == 1, err
    assert "broker.db" in err and "not a database" in err and "Traceback" not in err


def test_offline_commands_still_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ring = str(tmp_path / "k.json")
    assert _run(capsys, "keys", "init", "--keyring", ring)[0] == 0
    assert _run(capsys, "keys", "rotate", "--keyring", ring)[0] == 0
    status, out, _ = _run(capsys, "token", "mint", "--keyring", ring, "--host", "h", "--port", "1")
    assert status == 0 and out.count(".") == 4


def test_hypervisors_add_list_remove(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = str(tmp_path / "var")
    assert _run(capsys, "init", "--state-dir", state)[0] == 0
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate")
    status, _, err = _run(
        capsys, "hypervisors", "add", "hv1", "--uri", "qemu+tls://hv1/system", "--tls-ca", str(ca), "--state-dir", state
    )
    assert status == 1 and err.count("\n") == 1, err  # a CA that does not load is refused now
    status, out, _ = _run(
        capsys,
        "hypervisors",
        "add",
        "hv1",
        "--uri",
        "qemu+tls://hv1/system",
        "--address",
        "10.0.0.1",
        "--tls-require",
        "--state-dir",
        state,
    )
    assert status == 0 and json.loads(out)["tls"] == {"require": True}
    status, _, err = _run(capsys, "hypervisors", "add", "hv2", "--uri", "vnc://hv2", "--state-dir", state)
    assert status == 1 and "libvirt" in err
    status, out, _ = _run(capsys, "hypervisors", "list", "--state-dir", state)
    assert [(h["name"], h["address"]) for h in json.loads(out)["hypervisors"]] == [("hv1", "10.0.0.1")]
    assert _run(capsys, "hypervisors", "remove", "hv1", "--state-dir", state)[:2] == (0, "removed hypervisor hv1\n")
    status, _, err = _run(capsys, "hypervisors", "remove", "hv1", "--state-dir", state)
    assert status == 1 and "no hypervisor named 'hv1'" in err


def test_targets_add_takes_the_hypervisors_tls_options(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A target that is not libvirt's gets the same TLS policy flags as a hypervisor: --tls-ca
    pins the CA (only verified X.509 VeNCrypt then), --tls-require demands TLS; an unreadable
    CA file is one line, nothing stored."""
    from xvnc import make_test_pki

    pki = make_test_pki(tmp_path / "pki")
    state = str(tmp_path / "state")
    assert _run(capsys, "init", "--state-dir", state)[0] == 0
    status, out, _ = _run(
        capsys,
        "targets",
        "add",
        "--id",
        "tls1",
        "--name",
        "TLS",
        "--host",
        "10.0.0.2",
        "--port",
        "5901",
        "--tls-ca",
        str(pki.ca_path),
        "--tls-require",
        "--state-dir",
        state,
    )
    assert status == 0, out
    status, out, _ = _run(
        capsys,
        "targets",
        "add",
        "--id",
        "req1",
        "--name",
        "Req",
        "--host",
        "10.0.0.3",
        "--port",
        "5901",
        "--tls-require",
        "--state-dir",
        state,
    )
    assert status == 0, out
    status, _, err = _run(
        capsys,
        "targets",
        "add",
        "--id",
        "bad",
        "--name",
        "Bad",
        "--host",
        "10.0.0.4",
        "--port",
        "5901",
        "--tls-ca",
        str(tmp_path / "missing.pem"),
        "--state-dir",
        state,
    )
    assert status == 1 and "cannot read the CA certificate" in err and err.count("\n") == 1, err
    listed = {t["id"]: t for t in json.loads(_run(capsys, "targets", "list", "--state-dir", state)[1])["targets"]}
    assert set(listed) == {"tls1", "req1"}
    assert listed["tls1"]["tls"]["ca"].strip() == pki.ca_pem.strip() and listed["tls1"]["tls"]["require"] is True
    assert listed["req1"]["tls"]["require"] is True and not listed["req1"]["tls"].get("ca")
