"""``console-broker ca issue-host`` (QEMU/libvirt's layout from the broker's CA) and targets or
hypervisors whose ``tls`` says ``{"ca": "broker"}`` (kept in the token as that word).

QEMU accepting these files, and a proxy verifying them, is tests/test_qemu_broker_ca.py.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from test_broker_units import registered_proxy

from broker import ca, hostcerts
from broker.auth import Principal
from broker.cli import main
from broker.service import Broker, init_state_dir
from console_proxy import clock, token

LAYOUT = {"ca-cert.pem": 0o644, "server-cert.pem": 0o644, "server-key.pem": 0o600}
CLIENT = {"client-cert.pem": 0o644, "client-key.pem": 0o600}


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return init_state_dir(tmp_path / "state")


def issue_host(capsys: pytest.CaptureFixture[str], state: Path, *argv: str) -> tuple[int, str, str]:
    code = main(["ca", "issue-host", "--state-dir", str(state), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def audit(state: Path) -> list[dict[str, object]]:
    broker = Broker(state)
    try:
        return [json.loads(row["detail"]) | {"type": row["type"]} for row in broker.store.all("SELECT * FROM audit")]
    finally:
        broker.close()


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_issue_host_writes_qemus_layout_from_the_brokers_ca(
    state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hv1"
    code, printed, _ = issue_host(capsys, state, "--host", "hv1.example", "--san", "10.0.0.7", "--out", str(out))
    assert code == 0
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == LAYOUT
    broker = Broker(state)
    try:
        authority = broker.ca.certificate()
        server = load(out / "server-cert.pem")
        row = broker.ca.lookup(ca.serial_hex(server.serial_number))
    finally:
        broker.close()
    assert load(out / "ca-cert.pem") == authority
    server.verify_directly_issued_by(authority)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["hv1.example"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    usages = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.SERVER_AUTH]
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key((out / "server-key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.public_key() == server.public_key()
    assert row is not None and (row["purpose"], row["subject"], row["revoked_at"]) == ("host", "hv1.example", None)
    assert ca.serial_hex(server.serial_number) in printed
    events = audit(state)
    assert [(e["type"], e["purpose"], e["via"]) for e in events] == [("cert_issued", "host", "issue-host")]


def test_issue_host_client_adds_libvirts_client_pair(
    state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hv2"
    assert issue_host(capsys, state, "--host", "10.0.0.8", "--client", "--out", str(out))[0] == 0
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == LAYOUT | CLIENT
    client = load(out / "client-cert.pem")
    usages = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert load(out / "server-cert.pem").serial_number != client.serial_number
    assert [e["purpose"] for e in audit(state)] == ["host", "host-client"]


def test_issuing_again_replaces_every_file(state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "hv3"
    issue_host(capsys, state, "--host", "hv3", "--out", str(out))
    first = load(out / "server-cert.pem").serial_number
    (out / "server-key.pem").chmod(0o644)  # a mode an operator loosened is tightened again
    assert issue_host(capsys, state, "--host", "hv3", "--out", str(out))[0] == 0
    assert load(out / "server-cert.pem").serial_number != first
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == LAYOUT


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--host", "bad name"], "neither a DNS name nor an IP address"),
        (["--host", "hv", "--san=-leading.example"], "neither a DNS name nor an IP address"),
        (["--host", "hv", "--lifetime", "10"], "--lifetime must be at least 60 seconds"),
        (["--host", "hv", "--lifetime", "nan"], "--lifetime must be at least 60 seconds"),
    ],
)
def test_bad_input_issues_and_writes_nothing(
    state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    out = tmp_path / "out"
    code, _, err = issue_host(capsys, state, *argv, "--out", str(out))
    assert code != 0 and message in err
    assert not out.exists() and audit(state) == []


def test_an_unwritable_directory_issues_nothing(
    state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, _, err = issue_host(capsys, state, "--host", "hv", "--out", str(blocker / "sub"))
    assert code != 0 and "nothing was issued" in err
    assert audit(state) == []


def test_a_failed_record_leaves_the_directory_as_it_was(state: Path, tmp_path: Path) -> None:
    """The files are renamed into place only after the certificates are recorded."""
    out = tmp_path / "hv"
    out.mkdir()
    (out / "server-cert.pem").write_text("old")
    broker = Broker(state)
    try:
        broker.store.close()  # recording fails
        with pytest.raises(Exception):  # noqa: B017 - whatever the closed store raises
            hostcerts.issue_host(broker, "hv", [], client=True, lifetime=3600, out=out, actor="t", now=clock.now())
    finally:
        broker.close()
    assert [p.name for p in out.iterdir()] == ["server-cert.pem"] and (out / "server-cert.pem").read_text() == "old"


def test_a_broker_ca_target_keeps_the_short_form_in_its_tokens(state: Path) -> None:
    broker = Broker(state)
    try:
        proxy = registered_proxy(broker)
        beat = {"proxy_id": "p", "sessions": 0, "capacity": 5, "draining": False, "version": broker.keyring().version}
        broker.heartbeat(proxy, beat)
        target = broker.add_target({"name": "vm", "host": "10.0.0.5", "port": 5901, "tls": {"ca": "broker"}}, "t")
        assert target["tls"] == {"ca": "broker"}
        hypervisor = broker.add_hypervisor(
            {"name": "hv1", "uri": "qemu+tls://hv1.example/system", "tls": {"ca": "broker"}}, "t"
        )
        assert hypervisor["tls"] == {"ca": "broker"}
        minted = broker.mint_console(Principal("k", "issuer", "issuer"), {"target_id": target["id"]})["token"]
        claims = token.verify(minted, broker.keyring().for_proxy(), clock.now())
        assert claims.tls == {"ca": "broker"}
    finally:
        broker.close()


def test_the_cli_tls_ca_broker_is_the_word_not_a_file(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--state-dir", str(state), "--tls-ca", "broker"]
    assert main(["targets", "add", "--name", "vm", "--host", "10.0.0.5", "--port", "5901", *base]) == 0
    assert main(["hypervisors", "add", "hv1", "--uri", "qemu+tls://hv1.example/system", *base]) == 0
    capsys.readouterr()
    broker = Broker(state)
    try:
        assert [t["tls"] for t in broker.list_targets()["targets"]] == [{"ca": "broker"}]
        assert [h["tls"] for h in broker.list_hypervisors()["hypervisors"]] == [{"ca": "broker"}]
    finally:
        broker.close()
