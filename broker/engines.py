"""The two database engines behind :class:`broker.store.Store`: everything that differs between
SQLite and PostgreSQL, and nothing else.

The broker's SQL is written once, with ``?`` placeholders, in the dialect both engines share
(``INSERT … ON CONFLICT``, ``RETURNING``, row values). What differs sits here: how a
connection and a transaction are had, placeholders, row locks, the migration lock, where the
schema version is kept, column types in DDL, and which driver errors mean "conflict" or "try
again later".

- SQLite: one connection, ``BEGIN IMMEDIATE`` takes the database's single write lock, so every
  write transaction is serialised and row locks are not needed (the lock clauses are empty).
- PostgreSQL (psycopg 3 with psycopg_pool): a pool of connections in autocommit, an explicit
  transaction per ``Store.transaction``, READ COMMITTED; transactions that read and then write
  a row lock it (``FOR SHARE`` / ``FOR UPDATE``), migrations run under
  ``pg_advisory_lock``. psycopg is imported only when a ``postgresql://`` URL is used, so
  the embedded SQLite broker needs no driver.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import unquote, urlsplit, urlunsplit

from broker.outage import DatabaseDown, Outage, one_line

MIGRATION_LOCK_KEY = 0x636F6E736F6C65  # "console": one advisory lock id for the broker's migrations
DB_NAME = "broker.db"
BUSY_TIMEOUT_S = 10.0
"""How long SQLite waits for its write lock (the CLI and a running broker share one file)."""
POOL_MAX = 8
"""Connections per broker process: the event loop runs one request at a time, the CLI one
command; a few more let threads (tests, the cleanup) run beside it."""
CONNECT_TIMEOUT = 2
"""Seconds to establish a connection (libpq's ``connect_timeout``; 2 is its smallest)."""
LOCK_TIMEOUT_MS = 1000
"""Longest wait for a row lock (or the audit counter's): then the request fails as
storage_unavailable instead of holding the broker's event loop. Replicas' transactions last
milliseconds, so only a stuck one is ever waited on this long."""
STATEMENT_TIMEOUT_MS = 1500
"""Longest a statement may run on the server: the event loop waits for it (migrations, which
run before the broker serves, are exempt)."""
TCP_USER_TIMEOUT_MS = 2000
"""Longest sent data may stay unacknowledged before the connection counts as broken (a server
gone without closing its sockets: a power cut, a partition)."""
POOL_TIMEOUT = 1.5
"""Seconds a request waits for a pool connection before it fails as storage_unavailable: the
whole answer stays within 2 s. Once one such wait failed the circuit of :mod:`broker.outage`
opens and later requests fail at once."""
CLEANUP_LOCK_KEY = MIGRATION_LOCK_KEY + 1
"""The advisory lock a replica holds around a cleanup tick: one replica cleans at a time."""
CONSOLE_LOCK_PREFIX = b"consolegate console lock:"
"""Hashed with a console's name into its advisory lock id (the VNC password rekey of one domain)."""


def console_lock_id(name: str) -> int:
    """A console's advisory lock id: 64 bits of a hash (a collision only serialises two domains)."""
    digest = hashlib.blake2b(CONSOLE_LOCK_PREFIX + name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class DatabaseUrlError(ValueError):
    """A ``--database`` value this broker cannot use; the message never holds the password."""


@dataclass(frozen=True)
class DatabaseUrl:
    """A parsed ``--database``: ``sqlite:///PATH`` or ``postgresql://USER@HOST:PORT/DB``."""

    engine: str  # "sqlite" or "postgresql"
    path: Path | None = None  # sqlite
    conninfo: str | None = None  # postgresql: the URL as libpq takes it, password included

    @property
    def redacted(self) -> str:
        """For messages and logs: the URL with any password replaced by ``***``."""
        if self.engine == "sqlite":
            return f"sqlite:///{self.path}"
        return redact(self.conninfo or "")


def redact(url: str) -> str:
    """``url`` with the password (user info after ``:``) and any ``password=`` option masked."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:***@{host}" if ":" in userinfo else f"{user}@{host}"
        query = re.sub(r"(?i)(^|&)(password)=[^&]*", r"\1\2=***", parts.query)
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    except ValueError:
        return "(unparseable database URL)"


def parse_database_url(value: str | None, state_dir: str | os.PathLike[str]) -> DatabaseUrl:
    """``None`` means the embedded default, ``<state-dir>/broker.db``."""
    if value is None:
        return DatabaseUrl("sqlite", path=Path(state_dir) / DB_NAME)
    if value.startswith("sqlite://"):
        path = value[len("sqlite://") :]
        if not path.startswith("/") or path == "/":
            raise DatabaseUrlError("a SQLite URL is sqlite:///PATH (three slashes, then the file's path)")
        return DatabaseUrl("sqlite", path=Path(unquote(path[1:]) if path.startswith("//") else unquote(path)))
    if value.startswith(("postgresql://", "postgres://")):
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise DatabaseUrlError(f"cannot parse the database URL {redact(value)}") from None
        if not parts.path.strip("/"):
            raise DatabaseUrlError(f"the database URL {redact(value)} names no database (…/DBNAME)")
        return DatabaseUrl("postgresql", conninfo=value)
    raise DatabaseUrlError("--database must be sqlite:///PATH or postgresql://USER@HOST:PORT/DB")


class EngineOpenError(Exception):
    """The database cannot be opened; one line, no password."""


class SqliteEngine:
    """One connection in WAL mode, ``synchronous=FULL``; the version is ``PRAGMA user_version``."""

    name = "sqlite"
    lock_share = ""  # BEGIN IMMEDIATE already excludes every other writer
    lock_update = ""
    errors: tuple[type[BaseException], ...] = (sqlite3.Error,)
    integrity_errors: tuple[type[BaseException], ...] = (sqlite3.IntegrityError,)
    unavailable_errors: tuple[type[BaseException], ...] = (sqlite3.OperationalError,)
    invalid_value_errors: tuple[type[BaseException], ...] = (UnicodeEncodeError, OverflowError)

    def __init__(self, path: Path, *, create: bool) -> None:
        self.path = path
        if not create and not path.exists():
            raise EngineOpenError(f"no database at {str(path)!r}: run console-broker init first")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        self.conn: Any = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self.conn.row_factory = sqlite3.Row
            self.conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            mode = self._enter_wal()
            if mode != "wal":
                raise EngineOpenError(f"cannot put {str(path)!r} in WAL mode (got {mode})")
            self.conn.execute("PRAGMA synchronous = FULL")
            self.conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as exc:  # not a database, corrupt, locked too long: one line
            self.conn.close()
            raise EngineOpenError(f"cannot use the database {str(path)!r}: {exc}") from None
        except BaseException:
            self.conn.close()
            raise

    def _enter_wal(self) -> str:
        """Switch a new database to WAL. The switch needs the file to itself, and SQLite answers
        "database is locked" at once, without its busy wait, when another connection is opening
        or switching the same new file at that moment (two replicas started together): retry for
        as long as the busy timeout would have waited."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                return str(self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)  # startup only, never on a request

    @property
    def description(self) -> str:
        return str(self.path)

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def reader(self) -> Iterator[Any]:
        yield self.conn

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """BEGIN IMMEDIATE … COMMIT, or ROLLBACK on any exception (the driver's errors pass)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")
            raise

    def notify(self, conn: Any, channel: str) -> None:
        """One process per SQLite file: its watchers are woken in-process (Store.on_change)."""

    def migration(self) -> Any:
        """A migration's transaction: BEGIN IMMEDIATE is the lock."""
        return self.transaction()

    @contextmanager
    def exclusive(self) -> Iterator[bool]:
        """The cleanup's turn: always this process's (one broker serves a SQLite file)."""
        yield True

    def try_console_lock(self, name: str, now: float, lease: float) -> str | None:
        """Claim the ``console_locks`` row of ``name`` (replicas on one machine share the file):
        the INSERT wins when no row is there, or when its holder's lease ran out (a replica that
        crashed holding it). The holder's random id, or None when another holds it now."""
        holder = secrets.token_hex(8)
        with self.transaction() as conn:
            claimed = conn.execute(
                "INSERT INTO console_locks (name, holder, expires) VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE "
                "SET holder = excluded.holder, expires = excluded.expires WHERE console_locks.expires <= ?",
                (name, holder, now + lease, now),
            ).rowcount
        return holder if claimed == 1 else None

    def release_console_lock(self, name: str, holder: str) -> None:
        """Drop the row if it is still ours (a lease that ran out may have gone to another)."""
        with self.transaction() as conn:
            conn.execute("DELETE FROM console_locks WHERE name = ? AND holder = ?", (name, holder))

    def version(self, conn: Any) -> int:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])

    def set_version(self, conn: Any, version: int) -> None:
        conn.execute(f"PRAGMA user_version = {int(version)}")

    def statements(self, script: str) -> Iterator[str]:
        """A migration script statement by statement (``executescript`` would COMMIT the
        transaction that holds the lock), triggers' ``BEGIN … END;`` bodies kept whole."""
        pending = ""
        for line in script.splitlines(keepends=True):
            pending += line
            if sqlite3.complete_statement(pending):
                yield pending.strip()
                pending = ""
        if pending.strip():
            raise EngineOpenError("a migration ends with an incomplete statement")


class PostgresEngine:
    """A psycopg_pool of autocommit connections; ``?`` placeholders become ``%s``."""

    name = "postgresql"
    lock_share = " FOR SHARE"
    lock_update = " FOR UPDATE"

    def __init__(self, url: DatabaseUrl) -> None:
        try:
            import psycopg
            import psycopg_pool
        except ImportError:
            raise EngineOpenError(
                "PostgreSQL needs psycopg 3 and psycopg-pool: pip install 'consolegate[broker]'"
            ) from None
        self.url = url
        self._psycopg, self._psycopg_pool = psycopg, psycopg_pool
        self.errors = (psycopg.Error, psycopg_pool.PoolTimeout, DatabaseDown)
        self.integrity_errors = (psycopg.errors.IntegrityError,)
        self.unavailable_errors = (
            psycopg.OperationalError,
            psycopg_pool.PoolTimeout,
            DatabaseDown,
            psycopg.errors.DeadlockDetected,
            psycopg.errors.SerializationFailure,
        )
        # NUL in a string (PostgreSQL's text cannot hold it), a number out of a column's range
        self.invalid_value_errors = (psycopg.DataError, UnicodeEncodeError, OverflowError)
        # the URL's own libpq options win over these defaults
        self.options: dict[str, Any] = {
            name: value
            for name, value in (
                ("connect_timeout", CONNECT_TIMEOUT),
                ("tcp_user_timeout", TCP_USER_TIMEOUT_MS),
                ("keepalives_idle", 5),
                ("keepalives_interval", 1),
                ("keepalives_count", 3),
            )
            if name not in (url.conninfo or "")
        }
        try:  # fail at start, in one line, when the server cannot be reached or refuses us
            psycopg.connect(url.conninfo or "", **self.options).close()
        except psycopg.Error as exc:
            raise EngineOpenError(f"cannot connect to {url.redacted}: {one_line(exc)}") from None
        self.lock_timeout_ms = LOCK_TIMEOUT_MS
        self.outage = Outage(url.redacted, self._probe, self._renew_pool)
        self.pool = self._new_pool()
        self.pool.open()

    def _new_pool(self) -> Any:
        def configure(conn: Any) -> None:
            conn.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
            conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")

        return self._psycopg_pool.ConnectionPool(
            self.url.conninfo or "",
            min_size=1,
            max_size=POOL_MAX,
            timeout=POOL_TIMEOUT,
            open=False,
            kwargs={"autocommit": True, **self.options},
            name="consolegate",
            configure=configure,
        )

    def _probe(self) -> None:
        """One fresh connection and ``SELECT 1`` (the outage's probe, in its thread)."""
        with self._psycopg.connect(self.url.conninfo or "", **self.options) as conn:
            conn.execute("SELECT 1")

    def _renew_pool(self) -> None:
        """The database is back: a fresh pool with a connection ready, the old one closed behind
        (its reconnection attempts back off for up to minutes; connections still lent out are
        closed when they come back)."""
        pool = self._new_pool()
        pool.open(wait=True, timeout=CONNECT_TIMEOUT)
        old, self.pool = self.pool, pool
        threading.Thread(target=old.close, kwargs={"timeout": 1.0}, daemon=True).start()

    @property
    def description(self) -> str:
        return self.url.redacted

    def close(self) -> None:
        self.outage.close()
        self.pool.close()

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        """A pool connection, failing at once while the circuit is open; a connection found
        broken (or none to be had in time) opens it."""
        self.outage.check()
        try:
            with self.pool.connection() as conn:
                try:
                    yield conn
                except self._psycopg.OperationalError as exc:
                    if conn.broken or conn.closed:
                        self.outage.begin(exc)
                    raise
        except self._psycopg_pool.PoolTimeout as exc:
            self.outage.begin(exc)
            raise

    @contextmanager
    def reader(self) -> Iterator[PgConnection]:
        with self._connection() as conn:
            yield PgConnection(conn)

    @contextmanager
    def transaction(self) -> Iterator[PgConnection]:
        with self._connection() as conn, conn.transaction():
            if self.lock_timeout_ms != LOCK_TIMEOUT_MS:  # changed (tests): for this transaction only
                conn.execute(f"SET LOCAL lock_timeout = {int(self.lock_timeout_ms)}")
            yield PgConnection(conn)

    def notify(self, conn: PgConnection, channel: str) -> None:
        """NOTIFY inside the transaction: PostgreSQL delivers it to every listener on COMMIT (and
        never on ROLLBACK), so a woken watcher always reads the change."""
        conn.execute("SELECT pg_notify(?, '')", (channel,))

    @contextmanager
    def migration(self) -> Iterator[PgConnection]:
        """A transaction begun once ``pg_advisory_lock`` is held (two replicas starting at once
        apply each migration once). The lock comes before BEGIN so that the transaction's
        catalog snapshot already shows what the previous holder committed. No lock or statement
        timeout here: the other replica's migration is waited for, however long it takes."""
        with self._connection() as conn:
            conn.execute("SET lock_timeout = 0")
            conn.execute("SET statement_timeout = 0")
            try:
                conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
                try:
                    with conn.transaction():
                        yield PgConnection(conn)
                finally:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
            finally:
                with contextlib.suppress(self._psycopg.Error):  # a broken connection is discarded anyway
                    conn.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
                    conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")

    @contextmanager
    def exclusive(self) -> Iterator[bool]:
        """Whether this process got the cleanup's advisory lock (``pg_try_advisory_lock``, no
        wait), held until the block ends: one replica at a time runs a cleanup tick. The lock
        belongs to this connection's session, so a replica that dies mid-tick releases it."""
        with self._connection() as conn:
            got = bool(conn.execute("SELECT pg_try_advisory_lock(%s)", (CLEANUP_LOCK_KEY,)).fetchone()[0])
            try:
                yield got
            finally:
                if got:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (CLEANUP_LOCK_KEY,))

    def try_console_lock(self, name: str, now: float, lease: float) -> Any | None:
        """``pg_try_advisory_lock`` on the console's id, on a pool connection kept until
        :meth:`release_console_lock` (the lock is the session's: a replica that dies releases it
        with its connection, so no lease is needed). None when another session holds it."""
        del now, lease
        held = contextlib.ExitStack()
        conn = held.enter_context(self._connection())
        try:
            got = conn.execute("SELECT pg_try_advisory_lock(%s)", (console_lock_id(name),)).fetchone()[0]
        except BaseException:
            held.close()
            raise
        if not got:
            held.close()
            return None
        return held, conn

    def release_console_lock(self, name: str, handle: Any) -> None:
        held, conn = handle
        with held:  # the connection goes back to the pool (discarded if broken: the lock goes with it)
            conn.execute("SELECT pg_advisory_unlock(%s)", (console_lock_id(name),))

    def version(self, conn: PgConnection) -> int:
        if conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()[0] is not True:
            return 0
        row = conn.execute("SELECT version FROM schema_version WHERE id = 1").fetchone()
        return int(row[0]) if row else 0

    def set_version(self, conn: PgConnection, version: int) -> None:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (id INTEGER PRIMARY KEY CHECK (id = 1), "
            "version INTEGER NOT NULL)"
        )
        conn.execute(
            "INSERT INTO schema_version (id, version) VALUES (1, ?) "
            "ON CONFLICT (id) DO UPDATE SET version = excluded.version",
            (version,),
        )

    def statements(self, script: str) -> Iterator[str]:
        """A PostgreSQL migration runs as one script (several statements, no parameters)."""
        yield script


class Row(tuple[Any, ...]):
    """A row read by name or by position, as ``sqlite3.Row`` is: one row type for both engines."""

    _index: dict[str, int]

    def __new__(cls, index: dict[str, int], values: Sequence[Any]) -> Self:
        row = super().__new__(cls, values)
        row._index = index
        return row

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self._index[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._index)


def _row_factory(cursor: Any) -> Any:
    index = {column.name: i for i, column in enumerate(cursor.description or ())}
    return lambda values: Row(index, values)


_PLACEHOLDERS: dict[str, str] = {}
_PLACEHOLDERS_LOCK = threading.Lock()


def _pg_sql(sql: str) -> str:
    """``?`` → ``%s`` (and a literal ``%`` doubled); the broker's SQL has no ``?`` in literals."""
    translated = _PLACEHOLDERS.get(sql)
    if translated is None:
        translated = sql.replace("%", "%%").replace("?", "%s")
        with _PLACEHOLDERS_LOCK:
            if len(_PLACEHOLDERS) < 4096:
                _PLACEHOLDERS[sql] = translated
    return translated


class PgConnection:
    """The slice of ``sqlite3.Connection`` the store uses, over a psycopg connection."""

    def __init__(self, conn: Any) -> None:
        self.raw = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        cursor = self.raw.cursor(row_factory=_row_factory)
        if params:
            return cursor.execute(_pg_sql(sql), tuple(params))
        return cursor.execute(sql if "?" not in sql else _pg_sql(sql))

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Any:
        cursor = self.raw.cursor(row_factory=_row_factory)
        cursor.executemany(_pg_sql(sql), [tuple(row) for row in rows])
        return cursor
