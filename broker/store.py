"""The broker's durable state: one database (embedded SQLite, or PostgreSQL shared by replicas),
with versioned migrations.

Only this module and :mod:`broker.engines` speak SQL to the driver. Every change that must
survive a crash is one transaction (``with store.transaction():``) and is committed before the
API answers (SQLite with ``synchronous=FULL``, so a 201 is never lost, not even to a power cut).
The broker's statements are written once, with ``?`` placeholders, in the SQL both engines
share; :mod:`broker.engines` holds what differs (locks, the migration lock, placeholders, the
version's place, DDL types).

:data:`MIGRATIONS` lists the scripts that take the database from version *i* to *i + 1*, each
applied in its own transaction under the migration lock. The first three predate PostgreSQL
and have a script per engine; later ones are one text with ``{blob}``/``{real}`` for the types.
The audit table is append-only, enforced by triggers, so not even a bug here can rewrite it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.engines import (
    DatabaseUrl,
    DatabaseUrlError,
    EngineOpenError,
    PostgresEngine,
    SqliteEngine,
    parse_database_url,
)
from broker.outage import one_line

log = logging.getLogger("consolegate.broker")


@dataclass(frozen=True)
class Migration:
    sqlite: str
    postgresql: str

    @classmethod
    def shared(cls, script: str) -> Migration:
        """One script for both engines, its column types filled in per engine."""
        return cls(
            script.format(blob="BLOB", real="REAL", bigint="INTEGER"),
            script.format(blob="BYTEA", real="DOUBLE PRECISION", bigint="BIGINT"),
        )


_SQLITE_HISTORY: list[str] = [
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

_POSTGRESQL_HISTORY: list[str] = [
    # 0 -> 1: the first schema ("user" quoted: a reserved word in PostgreSQL)
    """
    CREATE TABLE apikeys (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL CHECK (role IN ('admin', 'issuer')),
        hash BYTEA NOT NULL, created_at DOUBLE PRECISION NOT NULL);
    CREATE TABLE targets (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, host TEXT NOT NULL, port INTEGER NOT NULL,
        password_enc BYTEA, tls TEXT, created_at DOUBLE PRECISION NOT NULL);
    CREATE TABLE proxies (
        id TEXT PRIMARY KEY, public_url TEXT NOT NULL, secret_hash BYTEA NOT NULL,
        sessions BIGINT NOT NULL DEFAULT 0, capacity BIGINT NOT NULL DEFAULT 0,
        draining INTEGER NOT NULL DEFAULT 0, last_seen DOUBLE PRECISION,
        keyring_version BIGINT NOT NULL DEFAULT 0, created_at DOUBLE PRECISION NOT NULL);
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY, target_id TEXT, "user" TEXT, proxy_id TEXT, issued_by TEXT,
        state TEXT NOT NULL CHECK (state IN ('minted', 'active', 'closed', 'revoked')),
        single_use INTEGER NOT NULL, exp BIGINT NOT NULL, minted_at DOUBLE PRECISION NOT NULL,
        opened_at DOUBLE PRECISION, closed_at DOUBLE PRECISION, revoked_at DOUBLE PRECISION,
        bytes_up BIGINT NOT NULL DEFAULT 0, bytes_down BIGINT NOT NULL DEFAULT 0, close_code INTEGER);
    CREATE INDEX sessions_state ON sessions (state, exp);
    CREATE TABLE redeemed (
        jti TEXT PRIMARY KEY, session_id TEXT NOT NULL, proxy_id TEXT NOT NULL,
        exp BIGINT NOT NULL, at DOUBLE PRECISION NOT NULL);
    CREATE INDEX redeemed_exp ON redeemed (exp);
    CREATE TABLE audit (
        seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, at DOUBLE PRECISION NOT NULL,
        type TEXT NOT NULL, session_id TEXT, actor TEXT NOT NULL, detail TEXT NOT NULL);
    CREATE INDEX audit_type ON audit (type, seq);
    CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN RAISE EXCEPTION 'the audit log is append-only' USING ERRCODE = 'restrict_violation'; END $$;
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit FOR EACH ROW EXECUTE FUNCTION audit_append_only();
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit FOR EACH ROW EXECUTE FUNCTION audit_append_only();
    """,
    # 1 -> 2: revocation (see the SQLite script). Unique names here: replicas create keys
    # concurrently, and no PostgreSQL database predates unique names (SQLite's may hold duplicates)
    """
    ALTER TABLE apikeys ADD COLUMN revoked_at DOUBLE PRECISION;
    ALTER TABLE proxies ADD COLUMN removed_at DOUBLE PRECISION;
    CREATE UNIQUE INDEX apikeys_name ON apikeys (name);
    CREATE TABLE mint_floor (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL);
    """,
    # 2 -> 3: the sessions' keyset indexes
    """
    CREATE INDEX sessions_minted ON sessions (minted_at, id);
    CREATE INDEX sessions_issuer_minted ON sessions (issued_by, minted_at, id);
    CREATE INDEX sessions_state_minted ON sessions (state, minted_at, id);
    """,
]

MIGRATIONS: list[Migration] = [
    *(Migration(lite, pg) for lite, pg in zip(_SQLITE_HISTORY, _POSTGRESQL_HISTORY, strict=True)),
    # 3 -> 4: the keyring moves into the database, sealed under a key derived from master.key
    # (see broker.keystore); ``revision`` grows with every write, so a replica knows with one
    # small read whether the keys it unsealed are still the current ones.
    Migration.shared("""
    CREATE TABLE keyring (
        id INTEGER PRIMARY KEY CHECK (id = 1), revision {bigint} NOT NULL, version {bigint} NOT NULL,
        sealed {blob} NOT NULL, changed_at {real} NOT NULL);
    """),
    # 4 -> 5: one audit sequence, gap-free and in commit order across replicas. A PostgreSQL
    # sequence (or identity) hands out numbers in allocation order, not commit order, and loses
    # the numbers of rolled-back transactions: a reader of GET /audit?after=SEQ could see 11
    # before 10 commits and never see 10. The counter row is updated as the last statement of
    # the transaction (Store._flush_audit): its lock is held only until the COMMIT, the next
    # writer gets the next number after that COMMIT, and it is the last lock taken, so it is
    # in no deadlock.
    Migration.shared("""
    CREATE TABLE audit_counter (id INTEGER PRIMARY KEY CHECK (id = 1), seq {bigint} NOT NULL);
    INSERT INTO audit_counter (id, seq) SELECT 1, COALESCE(MAX(seq), 0) FROM audit;
    """),
    # 5 -> 6: libvirt connections whose domains' consoles are looked up at mint time
    # (broker.hypervisors); no secret here: libvirt's credentials live where libvirt reads them.
    Migration.shared("""
    CREATE TABLE hypervisors (
        name TEXT PRIMARY KEY, uri TEXT NOT NULL, address TEXT, tls TEXT,
        console_passwords INTEGER NOT NULL DEFAULT 0, created_at {real} NOT NULL);
    """),
    # 6 -> 7: the broker's CA (broker.castore): its certificate and its key sealed under a key
    # derived from master.key; every certificate it issued (serial in hex; ``revoked_at`` read on
    # every request, so a revocation reaches every replica at once); the proxies' one-time join
    # tokens, stored as keyed hashes like the credentials.
    Migration.shared("""
    CREATE TABLE ca (
        id INTEGER PRIMARY KEY CHECK (id = 1), cert_pem TEXT NOT NULL, sealed_key {blob} NOT NULL,
        fingerprint TEXT NOT NULL, created_at {real} NOT NULL);
    CREATE TABLE certificates (
        serial TEXT PRIMARY KEY, subject TEXT NOT NULL, proxy_id TEXT, purpose TEXT NOT NULL,
        not_after {real} NOT NULL, issued_at {real} NOT NULL, revoked_at {real});
    CREATE INDEX certificates_proxy ON certificates (proxy_id);
    CREATE TABLE join_tokens (
        id TEXT PRIMARY KEY, proxy_id TEXT NOT NULL, hash {blob} NOT NULL,
        expires_at {real} NOT NULL, used_at {real}, created_at {real} NOT NULL);
    """),
    # 7 -> 8: per-console VNC passwords across replicas (broker.hypervisors): a session minted
    # for a libvirt domain names it ("HYPERVISOR/UUID"), so any replica reads which consoles are
    # outstanding; console_locks is SQLite's rekey lock (PostgreSQL uses an advisory lock).
    Migration.shared("""
    ALTER TABLE sessions ADD COLUMN console TEXT;
    CREATE INDEX sessions_console ON sessions (console, exp);
    CREATE TABLE console_locks (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires {real} NOT NULL);
    """),
    # 8 -> 9: the clipboard policy of a target's or a hypervisor's consoles (NULL: both ways)
    Migration.shared("""
    ALTER TABLE targets ADD COLUMN clip TEXT;
    ALTER TABLE hypervisors ADD COLUMN clip TEXT;
    """),
    # 9 -> 10: shared consoles (POST /sessions/{id}/viewers). A view-only session records the
    # session it watches (``parent_id``), so revoking the parent revokes it; a session minted for
    # a libvirt domain records the hypervisor and domain (not its port or password, which change:
    # a share looks the console up again), so it can be shared at all.
    Migration.shared("""
    ALTER TABLE sessions ADD COLUMN parent_id TEXT;
    ALTER TABLE sessions ADD COLUMN vm_hypervisor TEXT;
    ALTER TABLE sessions ADD COLUMN vm_domain TEXT;
    CREATE INDEX sessions_parent ON sessions (parent_id);
    """),
]

SCHEMA_VERSION = len(MIGRATIONS)
CHANGES_CHANNEL = "consolegate_changes"
"""PostgreSQL's NOTIFY channel for the watched changes (revocations, rotations, removals)."""


class StoreError(Exception):
    """The database is missing, newer than this code, or unusable; the message is one line."""


class StoreUnavailable(StoreError):
    """A write failed for a reason outside the request (disk full, I/O error, the server gone,
    the pool exhausted): try again later."""


class IntegrityError(StoreError):
    """A constraint refused the change (a duplicate key: the token redeemed already, the name
    taken); the transaction was rolled back."""


class InvalidValue(StoreError):
    """A value the database cannot hold (a NUL or a lone surrogate in a string, a number out of
    range): the request is refused as bad, nothing was written."""

    def __init__(self) -> None:
        super().__init__(
            "a value in the request cannot be stored (a NUL or a lone surrogate in a string, or a number out of range)"
        )


class Store:
    """The broker's database, either engine: ``transaction()``, ``one()``, ``all()``.

    ``target`` is a ``sqlite:///…`` or ``postgresql://…`` URL, a :class:`DatabaseUrl`, or a
    path (SQLite). ``migrate``: apply missing migrations on open (None: the engine's default,
    yes for the embedded SQLite file, no for a shared PostgreSQL database: see :meth:`check`).
    """

    def __init__(
        self, target: str | os.PathLike[str] | DatabaseUrl, *, create: bool = False, migrate: bool | None = None
    ) -> None:
        url = _as_url(target)
        self.url = url
        try:
            self.engine: Any = _open_engine(url, create=create)
        except EngineOpenError as exc:
            raise StoreError(str(exc)) from None
        self._local = threading.local()
        self.watched: frozenset[str] = frozenset()
        """Audit types whose commit wakes the watchers (``GET /proxy/watch``): see :meth:`on_change`."""
        self._change_listeners: list[Callable[[], None]] = []
        try:
            self.check(migrate=url.engine == "sqlite" if migrate is None else migrate)
        except BaseException as exc:
            self.engine.close()
            if isinstance(exc, self.engine.errors):
                raise StoreError(f"cannot use the database {self.description}: {one_line(exc)}") from None
            raise

    @property
    def description(self) -> str:
        """The database for messages: a path, or the URL without its password."""
        return str(self.engine.description)

    @property
    def path(self) -> Path:
        """The SQLite file (tests and SQLite-only tools)."""
        return Path(self.engine.path)

    @property
    def conn(self) -> Any:
        """SQLite's one connection (for SQLite-only tests that reach below the store)."""
        return self.engine.conn

    @conn.setter
    def conn(self, value: Any) -> None:
        self.engine.conn = value

    def close(self) -> None:
        self.engine.close()

    @property
    def version(self) -> int:
        with self._reader() as conn:
            return int(self.engine.version(conn))

    def check(self, *, migrate: bool) -> int:
        """Migrate, or refuse a database this broker cannot serve: one from a newer release
        always, an older one unless ``migrate`` (``console-broker migrate``, ``serve --migrate``)."""
        current = self.version
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"database schema {current} is newer than this broker's {SCHEMA_VERSION}: run the newer release"
            )
        if current < SCHEMA_VERSION:
            if not migrate:
                what = "empty" if current == 0 else f"at schema {current}, older than this broker's {SCHEMA_VERSION}"
                raise StoreError(
                    f"the database {self.description} is {what}: run console-broker "
                    f"{'init' if current == 0 else 'migrate'} (or serve --migrate)"
                )
            return self.migrate()
        return current

    def migrate(self) -> int:
        """Apply the missing migrations in order; refuse a database from a newer release.

        Each migration is one transaction holding the migration lock (SQLite's write lock,
        PostgreSQL's advisory lock), and the version is read again under it: two processes
        opening an old database at once would otherwise both apply the same one (and the second
        fail on "duplicate column name"). The first read, without the lock, only spares an
        up-to-date database the lock."""
        while (current := self.version) != SCHEMA_VERSION:
            if current > SCHEMA_VERSION:
                raise StoreError(f"database schema {current} is newer than this broker's {SCHEMA_VERSION}")
            with self.transaction(migration=True) as conn:
                current = self.engine.version(conn)
                if current < SCHEMA_VERSION:  # else another process migrated meanwhile: check again
                    script = getattr(MIGRATIONS[current], self.engine.name)
                    for statement in self.engine.statements(script):
                        conn.execute(statement)
                    self.engine.set_version(conn, current + 1)
                    log.info("database %s migrated to schema %d", self.description, current + 1)
        return current

    @contextmanager
    def transaction(self, *, migration: bool = False) -> Iterator[Any]:
        """One write transaction: COMMIT, or ROLLBACK on any exception.

        A constraint violation becomes :class:`IntegrityError`; a write the engine cannot make
        now (disk full, I/O error, lock held too long, server unreachable) becomes
        :class:`StoreUnavailable`, after the rollback: the request fails as a whole and nothing
        half-written stays behind. ``one``/``all`` called inside read through this transaction.
        ``migration``: the transaction starts once the migration lock is held."""
        if getattr(self._local, "conn", None) is not None:
            raise RuntimeError("transactions do not nest")
        changed = False
        try:
            with self.engine.migration() if migration else self.engine.transaction() as conn:
                self._local.conn, self._local.audit = conn, []
                try:
                    yield conn
                    changed = any(event[1] in self.watched for event in self._local.audit)
                    self._flush_audit(conn, self._local.audit)
                    if changed:  # PostgreSQL: delivered to every replica's listener on COMMIT, not before
                        self.engine.notify(conn, CHANGES_CHANNEL)
                finally:
                    self._local.conn, self._local.audit = None, []
        except self.engine.integrity_errors as exc:
            raise IntegrityError(one_line(exc)) from None
        except self.engine.unavailable_errors as exc:
            raise StoreUnavailable(f"the broker cannot write its database: {one_line(exc)}") from None
        except self.engine.invalid_value_errors:
            raise InvalidValue() from None
        if changed:  # committed: this process's watchers need not wait for the notification's round trip
            for listener in list(self._change_listeners):
                listener()

    def on_change(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener`` (in the committing thread) after each commit of a :attr:`watched`
        audit type by this process; returns the function that removes it."""
        self._change_listeners.append(listener)
        return lambda: self._change_listeners.remove(listener)

    @contextmanager
    def _reader(self) -> Iterator[Any]:
        current = getattr(self._local, "conn", None)
        if current is not None:
            yield current
            return
        try:
            with self.engine.reader() as conn:
                yield conn
        except self.engine.unavailable_errors as exc:
            raise StoreUnavailable(f"the broker cannot read its database: {one_line(exc)}") from None
        except self.engine.invalid_value_errors:
            raise InvalidValue() from None

    @contextmanager
    def exclusive(self) -> Iterator[bool]:
        """Whether this replica has the periodic cleanup's turn (PostgreSQL's
        ``pg_try_advisory_lock``, never waited for; always on SQLite), held for the block."""
        try:
            with self.engine.exclusive() as got:
                yield got
        except self.engine.unavailable_errors as exc:
            raise StoreUnavailable(f"the broker cannot use its database: {one_line(exc)}") from None

    @contextmanager
    def console_lock(self, name: str, now: float, lease: float) -> Iterator[bool]:
        """Whether this replica got the lock of console ``name`` (never waited for: the caller
        retries, off the event loop's time), held for the block. PostgreSQL: an advisory lock;
        SQLite: a ``console_locks`` row with a lease of ``lease`` seconds."""
        try:
            handle = self.engine.try_console_lock(name, now, lease)
        except self.engine.unavailable_errors as exc:
            raise StoreUnavailable(f"the broker cannot use its database: {one_line(exc)}") from None
        try:
            yield handle is not None
        finally:
            if handle is not None:
                try:
                    self.engine.release_console_lock(name, handle)
                except self.engine.errors as exc:  # PostgreSQL: gone with the connection; SQLite: the lease ends it
                    log.warning("could not release the lock of console %s: %s", name, one_line(exc))

    @property
    def unreachable(self) -> bool:
        """True while the engine knows its server is gone (PostgreSQL's outage circuit is open)."""
        outage = getattr(self.engine, "outage", None)
        return bool(outage is not None and outage.down)

    def ready(self) -> None:
        """Raise :class:`StoreUnavailable` unless the database answers a query now (``/readyz``)."""
        self.one("SELECT 1")

    def one(self, sql: str, *params: Any) -> Any:
        with self._reader() as conn:
            return conn.execute(sql, params).fetchone()

    def all(self, sql: str, *params: Any) -> list[Any]:
        with self._reader() as conn:
            return list(conn.execute(sql, params).fetchall())

    @property
    def in_transaction(self) -> bool:
        return getattr(self._local, "conn", None) is not None

    @property
    def lock_share(self) -> str:
        """Append to a SELECT whose rows the transaction relies on staying as read (empty on SQLite,
        whose write lock already excludes every other writer)."""
        return str(self.engine.lock_share)

    @property
    def lock_update(self) -> str:
        """Append to a SELECT of rows the transaction will change (empty on SQLite)."""
        return str(self.engine.lock_update)

    def delete_in_batches(
        self, table: str, key: str, where: str, params: Sequence[Any], *, batch: int, max_batches: int
    ) -> int:
        """Delete the rows of ``table`` matching ``where``, at most ``batch`` per transaction and
        ``max_batches`` transactions per call; returns how many went.

        One DELETE of a large backlog would hold the write lock for as long as it takes; each
        batch commits on its own, so other processes get the lock in between, and what a call
        leaves waits for the next one (the running broker asks for one batch per tick, so its
        own requests are served in between too). ``key`` is the table's primary key.
        ``table``, ``key`` and ``where`` are this module's callers' SQL, never request input."""
        total = 0
        for _ in range(max_batches):
            with self.transaction() as conn:
                deleted = conn.execute(
                    f"DELETE FROM {table} WHERE {key} IN (SELECT {key} FROM {table} WHERE {where} LIMIT ?)",
                    (*params, batch),
                ).rowcount
            total += deleted
            if deleted < batch:
                break
        return total

    def append_audit(
        self,
        conn: Any,
        *,
        at: float,
        type_: str,
        actor: str,
        session_id: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Add one audit event to the caller's transaction ``conn``: written, numbered, as its
        last statements (see :meth:`_flush_audit`), so it commits with the change it records."""
        if conn is not getattr(self._local, "conn", None):
            raise RuntimeError("audit events are appended inside the store's transaction")
        self._local.audit.append((at, type_, session_id, actor, json.dumps(detail or {}, sort_keys=True)))

    @staticmethod
    def _flush_audit(conn: Any, events: list[tuple[Any, ...]]) -> None:
        """The transaction's audit rows, numbered from the counter row (migration 5), right before
        COMMIT: gap-free and in commit order on both engines, and the counter is the last lock a
        transaction takes."""
        if not events:
            return
        last = int(
            conn.execute(
                "UPDATE audit_counter SET seq = seq + ? WHERE id = 1 RETURNING seq", (len(events),)
            ).fetchone()[0]
        )
        first = last - len(events) + 1
        for offset, event in enumerate(events):
            conn.execute(
                "INSERT INTO audit (seq, at, type, session_id, actor, detail) VALUES (?, ?, ?, ?, ?, ?)",
                (first + offset, *event),
            )


def _as_url(target: str | os.PathLike[str] | DatabaseUrl) -> DatabaseUrl:
    if isinstance(target, DatabaseUrl):
        return target
    text = os.fspath(target)
    if isinstance(text, str) and "://" in text:
        try:
            return parse_database_url(text, ".")
        except DatabaseUrlError as exc:
            raise StoreError(str(exc)) from None
    return DatabaseUrl("sqlite", path=Path(text))


def _open_engine(url: DatabaseUrl, *, create: bool) -> SqliteEngine | PostgresEngine:
    if url.engine != "sqlite":
        return PostgresEngine(url)
    if url.path is None:  # parse_database_url gives every sqlite URL a path
        raise StoreError("a sqlite database URL without a path")
    return SqliteEngine(url.path, create=create)
