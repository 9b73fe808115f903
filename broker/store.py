"""The broker's durable state: one SQLite database in WAL mode, with versioned migrations.

Only this module speaks SQL. Every change that must survive a crash is one transaction
(``with store.transaction():``) and is committed before the API answers, with
``synchronous=FULL`` so a 201 is never lost, not even to a power cut.

The schema version is SQLite's ``PRAGMA user_version``; :data:`MIGRATIONS` lists the scripts
that take the database from version *i* to *i + 1*, each applied in its own transaction.
The audit table is append-only, enforced by triggers, so not even a bug here can rewrite it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MIGRATIONS: list[str] = [
    # 0 -> 1: the first schema
    """
    CREATE TABLE apikeys (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL CHECK (role IN ('admin', 'issuer')),
        hash BLOB NOT NULL, created_at REAL NOT NULL);
    CREATE TABLE targets (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, host TEXT NOT NULL, port INTEGER NOT NULL,
        password_enc BLOB, tls TEXT, created_at REAL NOT NULL);
    CREATE TABLE proxies (
        id TEXT PRIMARY KEY, public_url TEXT NOT NULL, secret_hash BLOB NOT NULL,
        sessions INTEGER NOT NULL DEFAULT 0, capacity INTEGER NOT NULL DEFAULT 0,
        draining INTEGER NOT NULL DEFAULT 0, last_seen REAL, keyring_version INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL);
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY, target_id TEXT, user TEXT, proxy_id TEXT, issued_by TEXT,
        state TEXT NOT NULL CHECK (state IN ('minted', 'active', 'closed', 'revoked')),
        single_use INTEGER NOT NULL, exp INTEGER NOT NULL, minted_at REAL NOT NULL,
        opened_at REAL, closed_at REAL, revoked_at REAL, bytes_up INTEGER NOT NULL DEFAULT 0,
        bytes_down INTEGER NOT NULL DEFAULT 0, close_code INTEGER);
    CREATE INDEX sessions_state ON sessions (state, exp);
    CREATE TABLE redeemed (
        jti TEXT PRIMARY KEY, session_id TEXT NOT NULL, proxy_id TEXT NOT NULL,
        exp INTEGER NOT NULL, at REAL NOT NULL);
    CREATE INDEX redeemed_exp ON redeemed (exp);
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, type TEXT NOT NULL,
        session_id TEXT, actor TEXT NOT NULL, detail TEXT NOT NULL);
    CREATE INDEX audit_type ON audit (type, seq);
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    """,
    # 1 -> 2: revocation. Credentials are marked, never deleted, so the audit trail and the
    # listings still name them and a name cannot be quietly reused; mint_floor is the oldest
    # keyring version a console may be minted for (raised when a proxy is removed and the keys
    # rotated, so no new token uses keys the removed proxy holds).
    """
    ALTER TABLE apikeys ADD COLUMN revoked_at REAL;
    ALTER TABLE proxies ADD COLUMN removed_at REAL;
    CREATE INDEX apikeys_name ON apikeys (name);
    CREATE TABLE mint_floor (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL);
    """,
    # 2 -> 3: GET /sessions pages newest first by the keyset (minted_at, id), filtered by issuer
    # or state; without these indexes every page sorts the whole table. The cleanup's pruning
    # uses the first schema's (state, exp) index.
    """
    CREATE INDEX sessions_minted ON sessions (minted_at, id);
    CREATE INDEX sessions_issuer_minted ON sessions (issued_by, minted_at, id);
    CREATE INDEX sessions_state_minted ON sessions (state, minted_at, id);
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(Exception):
    """The database is missing, newer than this code, or unusable; the message is one line."""


class StoreUnavailable(StoreError):
    """A write failed for a reason outside the request (disk full, I/O error): try again later."""


class Store:
    """One connection (the broker is one event loop), autocommit outside explicit transactions."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = False) -> None:
        self.path = Path(path)
        if not create and not self.path.exists():
            raise StoreError(f"no database at {str(self.path)!r}: run console-broker init first")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self._open()
        except BaseException as exc:
            self.conn.close()
            if isinstance(exc, sqlite3.Error):  # not a database, corrupt, locked too long: one line
                raise StoreError(f"cannot use the database {str(self.path)!r}: {exc}") from None
            raise

    def _open(self) -> None:
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA busy_timeout = 10000")
        mode = self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise StoreError(f"cannot put {str(self.path)!r} in WAL mode (got {mode})")
        self.conn.execute("PRAGMA synchronous = FULL")
        self.conn.execute("PRAGMA foreign_keys = ON")
        self.migrate()

    def close(self) -> None:
        self.conn.close()

    @property
    def version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> int:
        """Apply the missing migrations in order; refuse a database from a newer release.

        The version is read again under the write lock before each migration: two processes
        opening an old database at once would otherwise both apply the same one (and the second
        fail on "duplicate column name"). The first read, without the lock, only spares an
        up-to-date database a write lock."""
        while (current := self.version) != SCHEMA_VERSION:
            if current > SCHEMA_VERSION:
                raise StoreError(f"database schema {current} is newer than this broker's {SCHEMA_VERSION}")
            with self.transaction() as conn:
                current = self.version
                if current < SCHEMA_VERSION:  # else another process migrated meanwhile: check again
                    for statement in _statements(MIGRATIONS[current]):
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {current + 1}")
        return current

    @contextmanager
    def transaction(self, *, undo: Callable[[], None] | None = None) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT, or ROLLBACK on any exception.

        A write SQLite cannot make (disk full, I/O error, database locked too long) becomes
        StoreUnavailable after the rollback: the request fails as a whole and nothing half-written
        stays behind.

        ``undo`` takes back what the transaction changed outside the database (keyring.json) when
        it fails, its COMMIT included, while this connection still holds the write lock: no other
        writer can see or build on a change being taken back. See :meth:`_abort`.
        """
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
                self.conn.execute("COMMIT")
            except BaseException:
                self._abort(undo)
                raise
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"the broker cannot write its database: {exc}") from None

    def _abort(self, undo: Callable[[], None] | None) -> None:
        """``undo``, then ROLLBACK. A failed statement or a COMMIT refused for a deferred
        constraint leaves the transaction (and the lock) open, so ``undo`` runs under the lock.
        After an I/O error or a full disk SQLite may have rolled back by itself and released the
        lock: it is taken again for ``undo``, but in the gap another writer may have read what is
        being undone (the undo must check the file is still its own)."""
        try:
            if undo is not None:
                if not self.conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):  # undo even so: better than a file left changed
                        self.conn.execute("BEGIN IMMEDIATE")
                undo()
        finally:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")

    def one(self, sql: str, *params: Any) -> sqlite3.Row | None:
        return self.conn.execute(sql, params).fetchone()

    def all(self, sql: str, *params: Any) -> list[sqlite3.Row]:
        return self.conn.execute(sql, params).fetchall()

    def delete_in_batches(self, table: str, where: str, params: Sequence[Any], *, batch: int,
                          max_batches: int) -> int:
        """Delete the rows of ``table`` matching ``where``, at most ``batch`` per transaction and
        ``max_batches`` transactions per call; returns how many went.

        One DELETE of a large backlog would hold the write lock for as long as it takes; each
        batch commits on its own, so other processes get the lock in between, and what a call
        leaves waits for the next one (the running broker asks for one batch per tick, so its
        own requests are served in between too).
        ``table`` and ``where`` are this module's callers' SQL, never request input."""
        total = 0
        for _ in range(max_batches):
            with self.transaction() as conn:
                deleted = conn.execute(f"DELETE FROM {table} WHERE rowid IN "
                                       f"(SELECT rowid FROM {table} WHERE {where} LIMIT ?)",
                                       (*params, batch)).rowcount
            total += deleted
            if deleted < batch:
                break
        return total

    def append_audit(self, conn: sqlite3.Connection, *, at: float, type_: str, actor: str,
                     session_id: str | None = None, detail: dict[str, Any] | None = None) -> int:
        """Add one audit event inside the caller's transaction; returns its sequence number."""
        cursor = conn.execute("INSERT INTO audit (at, type, session_id, actor, detail) VALUES (?, ?, ?, ?, ?)",
                              (at, type_, session_id, actor, json.dumps(detail or {}, sort_keys=True)))
        return int(cursor.lastrowid or 0)


def _statements(script: str) -> Iterator[str]:
    """The statements of a migration script, one by one (``executescript`` would COMMIT the
    transaction that holds the write lock), triggers' ``BEGIN … END;`` bodies kept whole."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending.strip()
            pending = ""
    if pending.strip():
        raise StoreError("a migration ends with an incomplete statement")
