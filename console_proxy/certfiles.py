"""A listener's TLS certificate and key, from files, reloaded without a restart.

A listener is given one ``ssl.SSLContext`` for its life (Tornado's HTTPServer, the proxy's
TlsDoor), so that context stays and only hands out the certificate: its SNI callback, which
OpenSSL calls during every handshake (with or without a server name from the client), moves the
new connection to the context built from the files' latest good contents. A connection already
open keeps the certificate it was made with; only new ones see a reload.

A reload reads each file once, checks it with ``cryptography`` (a PEM chain, an unencrypted key
that matches the first certificate) and only then builds the new context, from those same bytes
(through an in-memory file): a half-written or garbage file, or a key not matching, keeps the
certificate in service and costs one warning line naming the files, never their contents.
SIGHUP reloads (see :func:`on_sighup`); so does a renewal, which calls :meth:`reload`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = logging.getLogger("consolegate.certificates")

#: Bytes read at most from a certificate or key file: a chain of a few certificates is ~5 KiB.
MAX_FILE = 256 * 1024

Prepare = Callable[[ssl.SSLContext], None]


class CertificateFilesError(ValueError):
    """The files do not make a usable certificate and key; the message names no secret."""


@dataclass(frozen=True)
class Loaded:
    """One good reading of the files: the context that serves it and what the metrics show."""

    context: ssl.SSLContext
    not_after: float
    """The leaf certificate's expiry, Unix seconds."""
    fingerprint: str
    """The leaf certificate's SHA-256 as ``openssl x509 -fingerprint -sha256`` prints it
    (``AB:CD:…``): what an operator compares, and what the log's secret filter leaves alone
    (64 hex digits in a row look like a key to it)."""


class CertificateFiles:
    """The TLS material of one listener (``use`` names it in logs and metrics: ``wss``, ``https``).

    ``prepare`` is applied to every context built (the first and each reload), for settings a
    listener adds beyond its certificate (client-certificate verification): the SNI switch
    carries the certificate and the trust store of the new context, so both must have them.
    Raises :class:`CertificateFilesError` when the files are not usable at start.
    """

    def __init__(self, cert_path: str, key_path: str, use: str, *, prepare: Prepare | None = None) -> None:
        self.cert_path, self.key_path, self.use = cert_path, key_path, use
        self._prepare = prepare
        self.current = self._load()
        self.listener = self.current.context
        self.listener.sni_callback = self._pick

    @property
    def not_after(self) -> float:
        return self.current.not_after

    def reload(self) -> bool:
        """Read the files again; True when the new certificate is in service for new connections,
        False (one warning line, the old one kept) when they are not usable."""
        try:
            loaded = self._load()
        except CertificateFilesError as error:
            log.warning(
                "TLS certificate for %s not reloaded, still serving SHA256 %s (expires %s): %s",
                self.use,
                self.current.fingerprint,
                _iso(self.current.not_after),
                error,
            )
            return False
        self.current = loaded
        log.info(
            "TLS certificate for %s reloaded: SHA256 %s, expires %s",
            self.use,
            loaded.fingerprint,
            _iso(loaded.not_after),
        )
        return True

    def _pick(self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext) -> None:
        if connection.context is not self.current.context:
            connection.context = self.current.context

    def _load(self) -> Loaded:
        cert_pem = _read(self.cert_path, "certificate")
        key_pem = _read(self.key_path, "key")
        leaf = check_pair(cert_pem, key_pem, self.cert_path, self.key_path)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            _load_chain(context, cert_pem, key_pem)
        except (ssl.SSLError, OSError) as error:
            raise CertificateFilesError(f"OpenSSL refused {self.cert_path} with {self.key_path}: {error}") from None
        if self._prepare is not None:
            try:
                self._prepare(context)
            except (ssl.SSLError, OSError, ValueError) as error:
                raise CertificateFilesError(f"the TLS settings for {self.use} could not be applied: {error}") from None
        return Loaded(context, leaf.not_valid_after_utc.timestamp(), fingerprint(leaf))


def fingerprint(certificate: x509.Certificate) -> str:
    """The SHA-256 of the DER in openssl's form, ``AB:CD:…`` (see :attr:`Loaded.fingerprint`)."""
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).digest().hex(":").upper()


def check_pair(cert_pem: bytes, key_pem: bytes, cert_name: str, key_name: str) -> x509.Certificate:
    """The leaf certificate, once the PEM chain parses and the unencrypted key is the leaf's."""
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise CertificateFilesError(f"{cert_name} is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):  # TypeError: encrypted, no password (a prompt would hang)
        raise CertificateFilesError(f"{key_name} is not an unencrypted PEM private key") from None
    if key.public_key() != chain[0].public_key():
        raise CertificateFilesError(f"the key in {key_name} is not the key of the certificate in {cert_name}")
    return chain[0]


def certificate_expiry(path: str) -> float | None:
    """Expiry (Unix seconds) of the first certificate in a PEM file; None when it cannot be read."""
    try:
        return x509.load_pem_x509_certificates(_read(path, "certificate"))[0].not_valid_after_utc.timestamp()
    except (CertificateFilesError, ValueError):
        return None


def on_sighup(files: Iterable[CertificateFiles]) -> None:
    """Reload every one of ``files`` on SIGHUP (the running asyncio loop's signal handler)."""
    targets = list(files)
    if targets:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: [f.reload() for f in targets])


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_FILE + 1)
    except OSError as error:
        raise CertificateFilesError(f"cannot read the {what} file {path}: {error.strerror}") from None
    if len(data) > MAX_FILE:
        raise CertificateFilesError(f"the {what} file {path} is larger than {MAX_FILE} bytes")
    return data


def _load_chain(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """``load_cert_chain`` from bytes already checked, not from the paths again: a file replaced
    in between must not pair a new certificate with an old key. The key goes through an
    in-memory file (memfd), never to disk."""
    cert_fd, key_fd = os.memfd_create("certificate"), os.memfd_create("key")
    try:
        _write_all(cert_fd, cert_pem)
        _write_all(key_fd, key_pem)
        context.load_cert_chain(f"/proc/self/fd/{cert_fd}", f"/proc/self/fd/{key_fd}")
    finally:
        os.close(cert_fd)
        os.close(key_fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
