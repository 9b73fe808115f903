"""The broker keyring in the database: one row, sealed under a key derived from master.key.

Every replica reads the same row, so a rotation committed through one replica is what the
others mint with from their next request on. Each read costs one small query (the row's
``revision``); the keyring is unsealed again only when the revision changed, so the in-process
copy never outlives a request without that check.

Locks (PostgreSQL; SQLite's single write lock already serialises writers): a transaction that
mints, answers a heartbeat or redeems reads the row ``FOR SHARE``, a rotation (``keys rotate``,
``proxy remove``) ``FOR UPDATE``. So a console is never signed with keys from a rotation that
has not committed, nor sent to a proxy whose removal committed while the mint waited.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from broker.store import IntegrityError, Store, StoreError
from broker.vault import Vault
from console_proxy import keyring
from console_proxy.keyring import Keyring, KeyringError

log = logging.getLogger("consolegate.broker")

IMPORTED_SUFFIX = ".imported"


class KeyStore:
    """Read, create and replace the keyring row."""

    def __init__(self, store: Store, vault: Vault) -> None:
        self.store, self.vault = store, vault
        self._cached: tuple[int, Keyring] | None = None

    def exists(self) -> bool:
        return self.store.one("SELECT 1 FROM keyring WHERE id = 1") is not None

    def current(self, *, for_update: bool = False) -> Keyring:
        """The keyring as committed (or as this transaction changed it). Inside a transaction the
        row is locked: shared, or exclusive ``for_update``."""
        lock = ""
        if self.store.in_transaction:
            lock = self.store.lock_update if for_update else self.store.lock_share
        row = self.store.one(f"SELECT revision FROM keyring WHERE id = 1{lock}")
        if row is None:
            raise StoreError(f"the database {self.store.description} holds no keyring: run console-broker init")
        cached = self._cached
        if cached is not None and cached[0] == int(row[0]):
            return cached[1]
        sealed = self.store.one("SELECT revision, sealed FROM keyring WHERE id = 1")
        ring = _parse(self.vault.open_keyring(sealed["sealed"]))
        if not ring.can_mint:
            raise StoreError("the database's keyring has no private signing key")
        self._cached = (int(sealed["revision"]), ring)
        return ring

    def create(self, conn: Any, ring: Keyring, now: float) -> None:
        """The first keyring (``init``, or the import of keyring.json); IntegrityError if one exists."""
        conn.execute(
            "INSERT INTO keyring (id, revision, version, sealed, changed_at) VALUES (1, 1, ?, ?, ?)",
            (ring.version, self.vault.seal_keyring(_dump(ring)), now),
        )

    def replace(self, conn: Any, ring: Keyring, now: float) -> None:
        """Inside the rotation's transaction, after :meth:`current` with ``for_update``."""
        conn.execute(
            "UPDATE keyring SET revision = revision + 1, version = ?, sealed = ?, changed_at = ? WHERE id = 1",
            (ring.version, self.vault.seal_keyring(_dump(ring)), now),
        )

    def import_file(self, path: Path, now: float) -> bool:
        """Once: a state dir's keyring.json into an empty keyring row, then renamed to
        ``keyring.json.imported`` (the database is the keyring from now on; the old file kept for
        the operator to delete). A file beside a database that has its keyring is left alone
        (another replica's copy, or one restored from a backup) and a warning says it is unused."""
        if not path.exists():
            return False
        if self.exists():
            log.warning("%s is not used: the database %s holds the keyring", path, self.store.description)
            return False
        ring = keyring.load(path)
        if not ring.can_mint:
            raise KeyringError(f"{str(path)!r} is a proxy keyring (no private signing key): it cannot be imported")
        try:
            with self.store.transaction() as conn:
                self.create(conn, ring, now)
        except IntegrityError:  # another replica imported one at the same moment: theirs stands
            log.warning("%s is not used: another process imported a keyring first", path)
            return False
        with contextlib.suppress(OSError):
            path.replace(path.with_name(path.name + IMPORTED_SUFFIX))
        log.info(
            "imported %s into the database (version %d); the file is now %s%s",
            path,
            ring.version,
            path.name,
            IMPORTED_SUFFIX,
        )
        return True


def _dump(ring: Keyring) -> bytes:
    return json.dumps(ring.to_jwks(), sort_keys=True).encode("utf-8")


def _parse(plaintext: bytes) -> Keyring:
    try:
        return Keyring.from_jwks(json.loads(plaintext))
    except (ValueError, KeyringError) as exc:
        raise StoreError(f"the database's keyring is unusable: {exc}") from None
