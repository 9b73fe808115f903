"""The proxy's identity from the broker's CA: the files in its state directory.

``console-proxy enroll`` writes, and ``console-proxy serve --state-dir D`` reads (all 0600):

* ``ca-cert.pem``: the broker's CA, pinned at enrollment by the join token's fingerprint; it
  verifies the broker's HTTPS certificate (and, for the ``certs`` work, hypervisors').
* ``proxy-cert.pem`` / ``proxy-key.pem``: the proxy's certificate (CN its id; client and server
  authentication) and its ECDSA P-256 key.
* ``proxy.json``: ``{"proxy_id", "brokers": [URL, ...]}``.

Files are replaced as a set: every new file is written and synced under a temporary name first,
and only then are they renamed over the old ones, so a failure (a full disk, a refused request)
leaves the previous set whole. Renewal makes a new key each time; :meth:`Identity.load` refuses
a certificate that does not match its key.

Never imports ``broker``.
"""

from __future__ import annotations

import json
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from console_proxy import certfiles, hostside, renewloop

CA_CERT = "ca-cert.pem"
PROXY_CERT = "proxy-cert.pem"
PROXY_KEY = "proxy-key.pem"
PROXY_JSON = "proxy.json"
BACKDATE = 300.0
"""The broker's CA backdates notBefore by this much (broker.ca.BACKDATE): the issue time is
notBefore plus it."""


class IdentityError(Exception):
    """The state directory is missing, incomplete or inconsistent; one line, never a key."""


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: ec.EllipticCurvePrivateKey, proxy_id: str) -> bytes:
    """A PEM CSR naming the proxy id only: the broker adds the public URL's host it registered."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, proxy_id)])
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(name)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def fingerprint(cert: x509.Certificate) -> str:
    return "sha256:" + cert.fingerprint(hashes.SHA256()).hex()


def check_issued(
    cert_pem: bytes, key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, proxy_id: str
) -> x509.Certificate:
    """The broker's answer checked before anything is written: the certificate parses, is for
    our key and our id, and is signed by the pinned CA."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        cert.verify_directly_issued_by(ca_cert)
    except Exception as exc:  # ValueError, TypeError, InvalidSignature
        raise IdentityError(f"the broker's certificate is not one of its CA ({type(exc).__name__})") from None
    if cert.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
        raise IdentityError("the broker's certificate is not for the key this proxy sent")
    names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [proxy_id]:
        raise IdentityError(f"the broker's certificate names {names!r}, not the proxy {proxy_id!r}")
    return cert


def write_files(directory: Path, files: dict[str, bytes]) -> None:
    """Replace ``files`` in ``directory`` (created 0700) as a set, each 0600 and synced."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary: dict[str, str] = {}
    try:
        for name, content in files.items():
            temporary[name] = hostside.write_private_temporary(directory, name, content)
    except BaseException:
        for tmp in temporary.values():
            Path(tmp).unlink(missing_ok=True)
        raise
    for name, tmp in temporary.items():
        os.replace(tmp, directory / name)
    hostside.sync_directory(directory)


@dataclass(frozen=True)
class Identity:
    """One consistent set of the state directory's files, loaded."""

    directory: Path
    proxy_id: str
    brokers: tuple[str, ...]
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes = field(repr=False)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Identity:
        root = Path(directory)
        try:
            meta = json.loads((root / PROXY_JSON).read_text(encoding="utf-8"))
            proxy_id, brokers = meta["proxy_id"], tuple(meta["brokers"])
            ca_pem, cert_pem, key_pem = ((root / name).read_bytes() for name in (CA_CERT, PROXY_CERT, PROXY_KEY))
        except OSError as exc:
            raise IdentityError(
                f"{str(root)!r} is not an enrolled proxy state dir ({exc.strerror}: {exc.filename}); "
                "run console-proxy enroll"
            ) from None
        except (ValueError, KeyError, TypeError):
            raise IdentityError(f"{str(root / PROXY_JSON)!r} is damaged: enroll again") from None
        identity = cls(root, str(proxy_id), brokers, ca_pem, cert_pem, key_pem)
        identity.check()
        return identity

    def check(self) -> None:
        """The certificate is the CA's and for the key (a set half-replaced would not be)."""
        try:
            key = serialization.load_pem_private_key(self.key_pem, password=None)
            check_issued(self.cert_pem, key, self.ca, self.proxy_id)  # type: ignore[arg-type]
        except (ValueError, TypeError):
            raise IdentityError(f"{str(self.directory / PROXY_KEY)!r} is not a private key") from None

    @property
    def ca(self) -> x509.Certificate:
        try:
            return x509.load_pem_x509_certificate(self.ca_pem)
        except ValueError:
            raise IdentityError(f"{str(self.directory / CA_CERT)!r} is not a certificate") from None

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    @property
    def not_after(self) -> float:
        return self.certificate.not_valid_after_utc.timestamp()

    @property
    def renew_at(self) -> float:
        """Two thirds into the certificate's life (issue time = notBefore + the CA's backdating)."""
        cert = self.certificate
        issued = cert.not_valid_before_utc.timestamp() + BACKDATE
        return renewloop.renew_at(issued, cert.not_valid_after_utc.timestamp())

    def client_context(self, extra_ca: str | None = None) -> ssl.SSLContext:
        """TLS to the broker: its certificate verified against the pinned CA (and ``extra_ca``,
        a bundle for a broker whose HTTPS certificate comes from elsewhere); ours presented."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=self.ca_pem.decode("ascii"))
        if extra_ca:
            context.load_verify_locations(cafile=extra_ca)
        certfiles._load_chain(context, self.cert_pem, self.key_pem)  # from memory, the key never on disk
        return context

    def files(self) -> dict[str, bytes]:
        meta = {"proxy_id": self.proxy_id, "brokers": list(self.brokers)}
        return {
            CA_CERT: self.ca_pem,
            PROXY_KEY: self.key_pem,
            PROXY_CERT: self.cert_pem,
            PROXY_JSON: json.dumps(meta, indent=2).encode() + b"\n",
        }

    def save(self) -> None:
        write_files(self.directory, self.files())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)
