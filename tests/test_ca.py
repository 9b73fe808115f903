"""The broker's CA: the pure X.509 core (broker/ca.py), its sealed row (broker/castore.py) and
``console-broker ca show``."""

from __future__ import annotations

import datetime
import re
import sqlite3
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker import ca
from broker.cli import main
from broker.service import Broker, init_state_dir

NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def root() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    return ca.create_ca(NOW)


def test_the_root_is_a_p256_ca_for_ten_years(root: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    cert, key = root
    assert isinstance(key.curve, ec.SECP256R1)
    assert re.fullmatch(
        r"consolegate broker CA [0-9a-f]{8}", cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    )
    assert cert.issuer == cert.subject
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert cert.not_valid_after_utc.timestamp() - NOW == ca.CA_LIFETIME
    cert.verify_directly_issued_by(cert)
    assert ca.create_ca(NOW)[0].subject != cert.subject  # two brokers' CAs are told apart


def test_fingerprint_is_sha256_of_the_der(root: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    cert = root[0]
    fp = ca.fingerprint(cert)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", fp)
    assert fp == "sha256:" + cert.fingerprint(hashes.SHA256()).hex()
    assert ca.fingerprint_matches(cert, fp) and ca.fingerprint_matches(cert, fp.upper().replace("SHA256", "sha256"))
    assert not ca.fingerprint_matches(cert, ca.fingerprint(ca.create_ca(NOW)[0]))
    assert not ca.fingerprint_matches(cert, "sha256:\udcff")


def test_issue_a_proxy_certificate(root: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    cert_ca, key_ca = root
    key = ca.new_key()
    leaf = ca.issue(
        cert_ca,
        key_ca,
        key.public_key(),
        common_name="edge-1",
        dns_names=["edge-1.example.com"],
        ip_addresses=["192.0.2.7"],
        client_auth=True,
        server_auth=True,
        lifetime=3600,
        now=NOW,
    )
    leaf.verify_directly_issued_by(cert_ca)
    assert leaf.issuer == cert_ca.subject
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "edge-1"
    assert ca.expiry(leaf) == NOW + 3600 and ca.lifetime_of(leaf) == 3600
    assert 0 < leaf.serial_number < 2**128
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["edge-1.example.com"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["192.0.2.7"]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    assert aki == cert_ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    client_only = ca.issue(
        cert_ca, key_ca, key.public_key(), common_name="c", client_auth=True, server_auth=False, lifetime=60, now=NOW
    )
    assert list(client_only.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert client_only.serial_number != leaf.serial_number


@pytest.mark.parametrize(
    "other",
    [
        lambda: ec.generate_private_key(ec.SECP384R1()).public_key(),
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key(),
        lambda: ed25519.Ed25519PrivateKey.generate().public_key(),
    ],
)
def test_issue_refuses_keys_other_than_p256(root: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], other) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="P-256"):
        ca.issue(*root, other(), common_name="x", client_auth=True, server_auth=False, lifetime=60, now=NOW)


def test_issue_refuses_a_certificate_for_nothing(root: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    with pytest.raises(ValueError, match="client or server"):
        ca.issue(
            *root,
            ca.new_key().public_key(),
            common_name="x",
            client_auth=False,
            server_auth=False,
            lifetime=60,
            now=NOW,
        )


def _csr(key: object, **names: object) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge-1")])
    )
    if names.get("dns"):
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names["dns"]]),  # type: ignore[attr-defined]
            critical=False,
        )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


def test_check_csr_accepts_a_p256_request_and_reads_its_names() -> None:
    pem = ca.make_csr(ca.new_key(), "edge-1", ["edge-1.example.com"], ["192.0.2.7"])
    csr = ca.check_csr(pem)
    assert ca.csr_names(csr) == (["edge-1"], ["edge-1.example.com"], ["192.0.2.7"])
    assert ca.csr_names(ca.check_csr(ca.make_csr(ca.new_key(), "edge-1").decode())) == (["edge-1"], [], [])


@pytest.mark.parametrize(
    ("pem", "code"),
    [
        (lambda: b"-----BEGIN CERTIFICATE REQUEST-----\n" + b"A" * 9000 + b"\n", "csr_too_large"),
        (lambda: b"not a csr", "csr_malformed"),
        (lambda: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "csr_malformed"),
        (lambda: _csr(ec.generate_private_key(ec.SECP384R1())), "csr_key_not_p256"),
        (lambda: _csr(rsa.generate_private_key(public_exponent=65537, key_size=2048)), "csr_key_not_p256"),
        (lambda: _csr(ed25519.Ed25519PrivateKey.generate()), "csr_key_not_p256"),
    ],
)
def test_check_csr_refusals(pem, code: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ca.CsrError) as refused:
        ca.check_csr(pem())
    assert refused.value.code == code


def test_check_csr_refuses_a_request_not_signed_by_its_key() -> None:
    good = x509.load_pem_x509_csr(ca.make_csr(ca.new_key(), "edge-1"))
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the signature's last integer
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(ca.CsrError) as refused:
        ca.check_csr(tampered)
    assert refused.value.code in {"csr_bad_signature", "csr_malformed"}


def test_csr_names_refuses_subjects_beyond_a_common_name() -> None:
    key = ca.new_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [x509.NameAttribute(NameOID.COMMON_NAME, "a"), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "o")]
            )
        )
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(ca.CsrError) as refused:
        ca.csr_names(csr)
    assert refused.value.code == "csr_names"


def test_init_creates_a_sealed_ca_and_ca_show_prints_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "var"
    assert main(["init", "--state-dir", str(state)]) == 0
    capsys.readouterr()
    assert main(["ca", "show", "--state-dir", str(state)]) == 0
    out = capsys.readouterr().out
    pem, _, rest = out.partition("-----END CERTIFICATE-----\n")
    cert = x509.load_pem_x509_certificate((pem + "-----END CERTIFICATE-----\n").encode())
    assert rest.strip() == ca.fingerprint(cert)
    broker = Broker(state)
    try:
        cert_db, key = broker.ca.current()
        assert cert_db == cert and key.public_key().public_numbers() == cert.public_key().public_numbers()
        secret = key.private_numbers().private_value.to_bytes(32, "big")
    finally:
        broker.close()
    database = (state / "broker.db").read_bytes()
    assert secret not in database and b"PRIVATE KEY" not in database  # sealed: a dump opens nothing


def test_a_state_from_before_the_ca_gets_one_once(tmp_path: Path) -> None:
    state = init_state_dir(tmp_path / "var")
    with sqlite3.connect(state / "broker.db") as conn:
        conn.execute("DELETE FROM ca")
    first = Broker(state)
    second = Broker(state)  # the CA now exists: not created again
    try:
        assert first.ca.certificate() == second.ca.certificate()
        assert first.store.one("SELECT COUNT(*) AS n FROM ca")["n"] == 1
    finally:
        first.close()
        second.close()


def test_the_ca_key_does_not_open_under_another_master_key(tmp_path: Path) -> None:
    state = init_state_dir(tmp_path / "a")
    other = init_state_dir(tmp_path / "b")
    with sqlite3.connect(state / "broker.db") as conn, sqlite3.connect(other / "broker.db") as theirs:
        sealed = theirs.execute("SELECT sealed_key FROM ca").fetchone()[0]
        conn.execute("UPDATE ca SET sealed_key = ?", (sealed,))
    with pytest.raises(Exception, match="CA key does not open"):
        Broker(state)


def test_issued_certificates_verify_as_of_their_validity(
    root: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
) -> None:
    leaf = ca.issue(
        *root, ca.new_key().public_key(), common_name="x", client_auth=True, server_auth=False, lifetime=60, now=NOW
    )
    assert leaf.not_valid_before_utc == datetime.datetime.fromtimestamp(NOW - ca.BACKDATE, tz=datetime.UTC)
