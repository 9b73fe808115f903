"""The broker's CA in the database: its certificate, its key sealed, and what it issued.

Every replica signs with the same CA, so its key lives in the database, sealed under a key
derived from master.key exactly as the keyring is (:mod:`broker.vault`): a dump of the database
opens nothing. The CA is created by ``console-broker init``; a state made before the CA existed
gets one the first time ``migrate`` or ``serve`` opens it, under the migration lock, so two
replicas starting at once create one CA, not two.

Every certificate issued is a row (serial in lower-case hex); ``revoked_at`` is read on every
request a certificate authenticates, so ``ca revoke`` or ``proxy remove`` through any replica
refuses the certificate from the next request on, on all of them.
"""

from __future__ import annotations

import logging
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from broker import ca
from broker.store import Store, StoreError
from broker.vault import Vault, VaultError

log = logging.getLogger("consolegate.broker")

PURPOSES = ("proxy", "broker", "host", "host-client")
"""What a certificate is for: a proxy's (client + server), the broker's HTTPS, a hypervisor's."""


class CaStore:
    """Read (and create, once) the CA row; record, look up and revoke issued certificates."""

    def __init__(self, store: Store, vault: Vault) -> None:
        self.store, self.vault = store, vault
        self._cached: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None

    def exists(self) -> bool:
        return self.store.one("SELECT 1 FROM ca WHERE id = 1") is not None

    def create(self, conn: Any, now: float) -> x509.Certificate:
        """A new CA into the empty row (inside the caller's transaction); IntegrityError if one exists."""
        cert, key = ca.create_ca(now)
        conn.execute(
            "INSERT INTO ca (id, cert_pem, sealed_key, fingerprint, created_at) VALUES (1, ?, ?, ?, ?)",
            (ca.cert_pem(cert), self.vault.seal_ca_key(ca.key_pem(key)), ca.fingerprint(cert), now),
        )
        return cert

    def ensure(self, now: float) -> bool:
        """Create the CA if the database has none (a state from before the CA): once, under the
        migration lock, the row read again under it. True when this call created it."""
        if self.exists():
            return False
        with self.store.transaction(migration=True) as conn:
            if conn.execute("SELECT 1 FROM ca WHERE id = 1").fetchone() is not None:
                return False
            cert = self.create(conn, now)
        log.info("created the broker CA %s (%s)", cert.subject.rfc4514_string(), ca.fingerprint(cert))
        return True

    def certificate(self) -> x509.Certificate:
        return self.current()[0]

    def current(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """The CA certificate and its key (unsealed once per process: the CA never changes)."""
        if self._cached is not None:
            return self._cached
        row = self.store.one("SELECT cert_pem, sealed_key FROM ca WHERE id = 1")
        if row is None:
            raise StoreError(f"the database {self.store.description} holds no CA: run console-broker migrate")
        try:
            cert = x509.load_pem_x509_certificate(str(row["cert_pem"]).encode("ascii"))
            key = ca.load_key(self.vault.open_ca_key(row["sealed_key"]))
        except VaultError:
            raise
        except ValueError as exc:
            raise StoreError(f"the database's CA is unusable: {exc}") from None
        if cert.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
            raise StoreError("the database's CA key does not match its certificate")
        self._cached = (cert, key)
        return self._cached

    def record(self, conn: Any, cert: x509.Certificate, *, subject: str, purpose: str, proxy_id: str | None) -> str:
        """Note an issued certificate (in the issuing transaction); returns its serial in hex."""
        serial = ca.serial_hex(cert.serial_number)
        conn.execute(
            "INSERT INTO certificates (serial, subject, proxy_id, purpose, not_after, issued_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (serial, subject, proxy_id, purpose, ca.expiry(cert), cert.not_valid_before_utc.timestamp() + ca.BACKDATE),
        )
        return serial

    def lookup(self, serial: str) -> Any:
        """The certificate's row (serial, subject, proxy_id, purpose, not_after, revoked_at), or None."""
        return self.store.one(
            "SELECT serial, subject, proxy_id, purpose, not_after, issued_at, revoked_at FROM certificates "
            "WHERE serial = ?",
            serial,
        )
