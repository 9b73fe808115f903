"""The broker's certificate authority, as pure X.509: no file, no database, no clock of its own.

The broker is the root of trust behind the browser (DESIGN "The broker's CA"): its proxies, its
own HTTPS and the hypervisors' VNC servers get their certificates here. Everything is ECDSA
P-256 with SHA-256 signatures: one key type keeps the checks short (a CSR with any other key is
refused) and every TLS stack in play (OpenSSL behind Python's ``ssl``, QEMU's GnuTLS) takes it.

The time is always passed in (``now``, seconds since the epoch), as in ``console_proxy.token``:
tests issue certificates that expired an hour ago, or that live a minute, without sleeping.
Storage (the key sealed in the database) is :mod:`broker.castore`'s job.
"""

from __future__ import annotations

import datetime
import hmac
import ipaddress
import secrets
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_LIFETIME = 10 * 365 * 86400.0
"""Seconds the root is valid: ten years (it is never renewed; a new one means re-enrolling)."""
BACKDATE = 300.0
"""Seconds a certificate's notBefore lies before its issue, so a peer whose clock is a little
behind accepts it at once (the same skew tokens allow)."""
MAX_CSR_BYTES = 8192
"""Longest PEM CSR read: a P-256 CSR with a few names is under 1 KiB."""
MAX_NAMES = 16
"""Most subjectAltName entries a certificate or a CSR may carry."""
CA_NAME_PREFIX = "consolegate broker CA"
FINGERPRINT_PREFIX = "sha256:"


class CsrError(ValueError):
    """A certificate signing request refused; ``code`` is the stable refusal code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _when(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)


def _check_p256(public_key: object) -> ec.EllipticCurvePublicKey:
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, ec.SECP256R1):
        raise ValueError("only ECDSA P-256 keys are accepted")
    return public_key


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-256 private key (the CA's, a proxy's, a hypervisor's)."""
    return ec.generate_private_key(ec.SECP256R1())


def new_serial() -> int:
    """A random positive 128-bit serial: unguessable, so no two certificates share one."""
    return secrets.randbelow(2**128 - 1) + 1


def serial_hex(serial: int) -> str:
    """How serials are written everywhere (database, audit, ``ca revoke``): lower-case hex."""
    return format(serial, "x")


def create_ca(now: float) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new self-signed root: ECDSA P-256, ten years, a CA that signs certificates and CRLs only
    (pathLen 0: it issues leaves, never another CA). Its name carries a short random part so two
    brokers' CAs are told apart in a certificate viewer."""
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{CA_NAME_PREFIX} {secrets.token_hex(4)}")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(new_serial())
        .not_valid_before(_when(now - BACKDATE))
        .not_valid_after(_when(now + CA_LIFETIME))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def fingerprint(cert: x509.Certificate) -> str:
    """``sha256:<64 hex>`` of the certificate's DER: what a join token pins."""
    return FINGERPRINT_PREFIX + cert.fingerprint(hashes.SHA256()).hex()


def fingerprint_matches(cert: x509.Certificate, expected: str) -> bool:
    """Constant-time comparison of ``cert``'s fingerprint with a pinned one."""
    return hmac.compare_digest(fingerprint(cert).encode(), expected.strip().lower().encode("utf-8", "replace"))


def _san(dns_names: Iterable[str], ip_addresses: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    if len(names) > MAX_NAMES:
        raise ValueError(f"at most {MAX_NAMES} subject alternative names")
    return names


def _leaf_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def issue(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    public_key: object,
    *,
    common_name: str,
    dns_names: Iterable[str] = (),
    ip_addresses: Iterable[str] = (),
    client_auth: bool,
    server_auth: bool,
    lifetime: float,
    now: float,
) -> x509.Certificate:
    """A leaf certificate for ``public_key`` (P-256 only, else ValueError), valid ``lifetime``
    seconds from ``now``, with a random 128-bit serial, SKI/AKI, and the extended key usages
    asked for (at least one)."""
    key = _check_p256(public_key)
    if not client_auth and not server_auth:
        raise ValueError("a certificate needs client or server authentication")
    if lifetime <= 0:
        raise ValueError("the lifetime must be positive")
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] * client_auth + [ExtendedKeyUsageOID.SERVER_AUTH] * server_auth
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key)
        .serial_number(new_serial())
        .not_valid_before(_when(now - BACKDATE))
        .not_valid_after(_when(now + lifetime))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    names = _san(dns_names, ip_addresses)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def check_csr(csr_pem: bytes | str) -> x509.CertificateSigningRequest:
    """A PEM CSR that is small, well formed, signed by its own key, and for a P-256 key; else
    :class:`CsrError` with the reason's code. What names it may ask for is the caller's check."""
    data = csr_pem.encode("utf-8", "replace") if isinstance(csr_pem, str) else bytes(csr_pem)
    if len(data) > MAX_CSR_BYTES:
        raise CsrError("csr_too_large", f"the CSR is over {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError:
        raise CsrError("csr_malformed", "the CSR is not one PEM certificate signing request") from None
    try:
        _check_p256(csr.public_key())
    except (ValueError, TypeError):
        raise CsrError("csr_key_not_p256", "the CSR's key is not ECDSA P-256") from None
    if not csr.is_signature_valid:
        raise CsrError("csr_bad_signature", "the CSR's signature does not verify with its own key")
    return csr


def csr_names(csr: x509.CertificateSigningRequest) -> tuple[list[str], list[str], list[str]]:
    """(common names, DNS names, IP addresses) a CSR asks for; CsrError when they do not parse."""
    try:
        cns = [str(a.value) for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        others = [a for a in csr.subject if a.oid != NameOID.COMMON_NAME]
        if others:
            raise CsrError("csr_names", "the CSR's subject may hold only a common name")
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return cns, [], []
        dns = san.get_values_for_type(x509.DNSName)
        ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
        if len(dns) + len(ips) != len(list(san)):
            raise CsrError("csr_names", "the CSR asks for names other than DNS names and IP addresses")
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        if isinstance(exc, CsrError):
            raise
        raise CsrError("csr_malformed", "the CSR's names do not parse") from None
    return cns, dns, ips


def make_csr(
    key: ec.EllipticCurvePrivateKey, common_name: str, dns_names: Iterable[str] = (), ip_addresses: Iterable[str] = ()
) -> bytes:
    """A PEM CSR for ``key`` (the proxy's side of enrollment and renewal)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    names = _san(dns_names, ip_addresses)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM: for a 0600 file, or to be sealed before it reaches the database."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("the key is not ECDSA P-256")
    return key


def expiry(cert: x509.Certificate) -> float:
    """notAfter as seconds since the epoch."""
    return cert.not_valid_after_utc.timestamp()


def lifetime_of(cert: x509.Certificate) -> float:
    """Seconds from notBefore (less the backdating) to notAfter: the lifetime it was issued with."""
    return cert.not_valid_after_utc.timestamp() - cert.not_valid_before_utc.timestamp() - BACKDATE
