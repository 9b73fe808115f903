"""Certificates the broker's CA issues to machines that do not enroll: hypervisors' VNC servers
(``console-broker ca issue-host``) and the broker's own HTTPS (``serve --tls-auto``).

A hypervisor gets QEMU's and libvirt's file layout (``ca-cert.pem``, ``server-cert.pem``,
``server-key.pem``; with ``--client`` also ``client-cert.pem``/``client-key.pem``), so
``tls-creds-x509,dir=DIR`` or libvirt's ``vnc_tls_x509_cert_dir`` takes the directory as it is.
The files are written aside and renamed into place only once every one of them is written and
the certificates are recorded, so a failure leaves the directory as it was: never a new
certificate beside an old key. Keys are 0600. Every certificate is a row of the CA's
``certificates`` table (``ca revoke`` knows it) and an audited ``cert_issued`` event.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from broker import ca

if TYPE_CHECKING:
    from broker.service import Broker

DEFAULT_CERT_LIFETIME = 7 * 86400.0
"""``serve --cert-lifetime``: the certificates the broker renews itself (its HTTPS with --tls-auto)."""
MIN_CERT_LIFETIME = 60.0
HOST_LIFETIME = 365 * 86400.0
"""A hypervisor's certificate: a year by default (it is replaced by running issue-host again)."""
ISSUED = "cert_issued"
CA_CERT, SERVER_CERT, SERVER_KEY = "ca-cert.pem", "server-cert.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client-cert.pem", "client-key.pem"
_DNS_NAME = re.compile(r"(?=.{1,253}$)(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


@dataclass(frozen=True)
class Issued:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    serial: str


def split_names(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """DNS names and IP addresses, in order and without repeats; ValueError names a bad one."""
    dns: list[str] = []
    ips: list[str] = []
    for name in names:
        try:
            address = str(ipaddress.ip_address(name.strip("[]")))
        except ValueError:
            if not _DNS_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is neither a DNS name nor an IP address") from None
            dns += [name.rstrip(".").lower()] if name.rstrip(".").lower() not in dns else []
        else:
            ips += [address] if address not in ips else []
    return dns, ips


def new_leaf(
    broker: Broker,
    *,
    common_name: str,
    names: Sequence[str],
    client_auth: bool,
    server_auth: bool,
    lifetime: float,
    now: float,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A fresh P-256 key and its certificate from the broker's CA (not recorded yet)."""
    dns, ips = split_names(names)
    key = ca.new_key()
    cert = ca.issue(
        *broker.ca.current(),
        key.public_key(),
        common_name=common_name,
        dns_names=dns,
        ip_addresses=ips,
        client_auth=client_auth,
        server_auth=server_auth,
        lifetime=lifetime,
        now=now,
    )
    return cert, key


def record(
    broker: Broker, leaves: Sequence[tuple[x509.Certificate, str]], *, actor: str, via: str, now: float
) -> list[str]:
    """Record the certificates (``(certificate, purpose)``) and audit each, in one transaction;
    their serials."""
    serials = []
    with broker.store.transaction() as conn:
        for cert, purpose in leaves:
            subject = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
            serial = broker.ca.record(conn, cert, subject=str(subject), purpose=purpose, proxy_id=None)
            detail = {"serial": serial, "subject": str(subject), "purpose": purpose, "not_after": ca.expiry(cert)}
            broker.store.append_audit(conn, at=now, type_=ISSUED, actor=actor, detail={**detail, "via": via})
            serials.append(serial)
    return serials


def issue_host(
    broker: Broker, host: str, sans: Sequence[str], *, client: bool, lifetime: float, out: Path, actor: str, now: float
) -> list[Issued]:
    """``ca issue-host``: the server certificate (and with ``client`` the client one) for
    ``host``, written in QEMU/libvirt's layout into ``out``; recorded and audited."""
    names = [host, *sans]
    server = new_leaf(
        broker, common_name=host, names=names, client_auth=False, server_auth=True, lifetime=lifetime, now=now
    )
    files = {CA_CERT: ca.cert_pem(broker.ca.certificate()).encode(), SERVER_CERT: _pem(server[0])}
    files[SERVER_KEY] = ca.key_pem(server[1])
    leaves = [(server, "host")]
    if client:
        pair = new_leaf(
            broker, common_name=host, names=names, client_auth=True, server_auth=False, lifetime=lifetime, now=now
        )
        files[CLIENT_CERT], files[CLIENT_KEY] = _pem(pair[0]), ca.key_pem(pair[1])
        leaves.append((pair, "host-client"))
    with AsideFiles(out, files) as aside:
        serials = record(
            broker, [(cert, purpose) for (cert, _), purpose in leaves], actor=actor, via="issue-host", now=now
        )
        aside.commit()
    return [Issued(cert, key, serial) for ((cert, key), _), serial in zip(leaves, serials, strict=True)]


def _pem(cert: x509.Certificate) -> bytes:
    return ca.cert_pem(cert).encode()


class AsideFiles:
    """Files written next to their final names (``.NAME.new``, keys 0600 from the start) and
    renamed into place by :meth:`commit`; removed if the block ends without it."""

    def __init__(self, directory: Path, files: dict[str, bytes]) -> None:
        self.directory, self.files = directory, files
        self.written: list[Path] = []

    def __enter__(self) -> AsideFiles:
        self.directory.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            path = self.directory / f".{name}.new"
            mode = 0o600 if name.endswith("-key.pem") else 0o644
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            self.written.append(path)
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.chmod(path, mode)  # an earlier leftover keeps its mode through O_CREAT
        return self

    def commit(self) -> None:
        for path in self.written:
            os.replace(path, self.directory / path.name[1:].removesuffix(".new"))
        self.written = []

    def __exit__(self, *exc: object) -> None:
        for path in self.written:
            path.unlink(missing_ok=True)
