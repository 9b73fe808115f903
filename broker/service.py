"""The broker's operations: what the API, the command line and the tests all call.

One :class:`Broker` per state directory. Each operation validates what is left to validate,
changes the database in one transaction together with its audit event, and returns plain JSON
data. HTTP lives in :mod:`broker.api`; SQL in :mod:`broker.store`; choices about the fleet in
:mod:`broker.fleet`. Failures are :class:`ApiError` with DESIGN's status and a stable code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import tornado.web

from broker import auth, ca, fleet, hypervisors, keyfiles
from broker.auth import Hasher, Principal
from broker.castore import CaStore
from broker.clippolicy import ClipNotAllowed, effective_clip
from broker.engines import DB_NAME, DatabaseUrl, parse_database_url
from broker.enrollment import CERT_AUDIT_TYPES, DEFAULT_CERT_LIFETIME, Enrollment, Refusal
from broker.keystore import KeyStore
from broker.store import IntegrityError, Store
from broker.vault import MASTER_KEY_NAME, Vault
from broker.watch import WATCH_CHANGES_MAX, WATCH_HOLD, WATCHED_TYPES
from console_proxy import b64url, clock, strictjson, token
from console_proxy.command import CommandError
from console_proxy.keyring import DEFAULT_MAX_TTL, DEFAULT_SKEW, MAX_SKEW, Keyring
from console_proxy.upstream_tls import BROKER_CA

log = logging.getLogger("consolegate.broker")
CONSOLE_LOCK_RETRY = 0.05
"""Seconds between tries of a domain's rekey lock (jittered up to twice that)."""
CONSOLE_LOCK_LEASE_MARGIN = 10.0
"""Seconds beyond two libvirt deadlines a SQLite rekey lock is leased for."""

SESSION_STATES = ("minted", "active", "closed", "revoked")
AUDIT_TYPES = (
    "minted",
    "redeemed",
    "refused",
    "opened",
    "closed",
    "revoked",
    "key_rotated",
    "apikey_created",
    "apikey_revoked",
    "target_changed",
    "hypervisor_changed",
    "proxy_added",
    "proxy_changed",
    "proxy_removed",
    "auth_throttled",
    *CERT_AUDIT_TYPES,
    "viewer_shared",
)
REVOKED_MEMORY = 86400.0
"""Seconds a revoked session that is still open (its close never reported) is sent to proxies.
A revoked session is also sent, whatever its age, while any proxy could accept its token
(``exp`` + MAX_SKEW + DEFAULT_SKEW): proxies replace their revoked set with each list."""
MIN_SESSION_RETENTION = max(REVOKED_MEMORY, MAX_SKEW + DEFAULT_SKEW)
"""Shortest history a session row is kept after it ended: until then the heartbeat's revoked
list may still name it, or a proxy (skew up to MAX_SKEW) still accept its token, and redeem
must still find it revoked. A missing row reads as "not revoked", so it must outlive both."""
DEFAULT_SESSION_RETENTION = 7 * 86400.0
SESSIONS_PAGE_MAX = 1000
"""Most sessions one ``GET /sessions`` answer holds (and its default, as before pagination)."""
CLEANUP_BATCH = 2000
"""Rows one cleanup transaction deletes at most: the write lock is held for one batch only."""
CLEANUP_MAX_BATCHES = 10
"""Transactions per table per cleanup run; a larger backlog waits for the next run."""
CURSOR_MAX_LENGTH = 512
"""Longest ``cursor`` accepted; the ones the broker hands out are far shorter."""


class ApiError(tornado.web.HTTPError):
    """A refusal with its HTTP status, stable code and a human message (never a secret).

    An HTTPError so that Tornado answers it with its status instead of logging a 500.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status)
        self.status, self.code, self.message = status, code, message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class BrokerConfig:
    default_ttl: int = 60
    max_ttl: int = DEFAULT_MAX_TTL
    """Longest console lifetime a request may ask for (the keyring's max_ttl caps it too)."""
    heartbeat_interval: float = 5.0
    """The proxies' heartbeat interval; a proxy is healthy while its last one is < 3 intervals old."""
    cleanup_interval: float = 60.0
    """How often redeemed-token rows past their ``exp`` (+ skew) and old sessions are deleted."""
    session_retention: float = DEFAULT_SESSION_RETENTION
    """Seconds a session's row outlives its end (token expiry, close, revocation: the latest);
    values below :data:`MIN_SESSION_RETENTION` act as it (``serve`` refuses them)."""
    issuer: str = "consolegate"
    hypervisor_timeout: float = hypervisors.LOOKUP_TIMEOUT
    """Seconds a mint naming a hypervisor waits for libvirt before its 503."""
    watch_hold: float = WATCH_HOLD
    """Longest ``GET /proxy/watch`` waits for a change before answering the current position."""
    cert_lifetime: float = DEFAULT_CERT_LIFETIME
    """Seconds a proxy certificate issued or renewed here is valid (``serve --cert-lifetime``)."""
    require_mtls: bool = False
    """Refuse the proxies' bearer credential: only a client certificate of the CA authenticates."""


def init_state_dir(
    path: str | os.PathLike[str], *, max_ttl: int = DEFAULT_MAX_TTL, database: str | None = None
) -> Path:
    """Create the state directory (0700) with master.key (0600), and the database with its schema
    and the keyring sealed in it (``<state-dir>/broker.db`` unless ``database`` names another).

    A shared PostgreSQL database is initialised once, from the first replica; the others get a
    copy of its master.key, not an ``init``. Nothing is written when the database cannot be
    reached or already holds a keyring."""
    root = Path(path)
    url = parse_database_url(database, root)
    names = (DB_NAME, keyfiles.KEYRING_NAME, MASTER_KEY_NAME) if database is None else (MASTER_KEY_NAME,)
    existing = [name for name in names if (root / name).exists()]
    if existing:
        raise CommandError(f"{str(root)!r} already holds {', '.join(existing)}: it is initialised")
    if url.engine == "sqlite" and url.path is not None and url.path.exists():
        raise CommandError(f"{str(url.path)!r} exists: it is initialised")
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    if max_ttl <= 0:
        raise CommandError("--max-ttl must be a positive number of seconds")
    store = Store(url, create=True, migrate=True)
    try:
        if store.one("SELECT 1 FROM keyring WHERE id = 1") is not None:
            raise CommandError(
                f"the database {store.description} is initialised already: copy master.key "
                "from the state dir that initialised it instead"
            )
        vault = Vault.create(root / MASTER_KEY_NAME)
        now = clock.now()
        with store.transaction() as conn:
            KeyStore(store, vault).create(conn, Keyring.generate(now, max_ttl=max_ttl), now)
            CaStore(store, vault).create(conn, now)
    finally:
        store.close()
    return root


class Broker:
    """The state directory opened: master.key, the database, the keyring in it."""

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        config: BrokerConfig | None = None,
        *,
        database: str | DatabaseUrl | None = None,
        migrate: bool | None = None,
    ) -> None:
        self.root = Path(state_dir)
        self.config = config or BrokerConfig()
        if not (self.root / MASTER_KEY_NAME).exists():
            raise CommandError(
                f"{str(self.root)!r} is not a broker state directory (no master.key): "
                "run console-broker init, or copy master.key from the first replica"
            )
        self.vault = Vault.load(self.root / MASTER_KEY_NAME)
        url = database if isinstance(database, DatabaseUrl) else parse_database_url(database, self.root)
        self.store = Store(url, migrate=migrate)
        try:
            self.hasher = Hasher(self.vault.derive("credential-hash"))
            self.keys = KeyStore(self.store, self.vault)
            self.keys.import_file(self.root / keyfiles.KEYRING_NAME, clock.now())
            self.keys.current()  # fail at start when master.key does not open the database's keyring
            self.ca = CaStore(self.store, self.vault)
            self.ca.ensure(clock.now())  # a state from before the CA: created once, under the migration lock
            self.ca.current()
            self.enrollment = Enrollment(self.store, self.ca, self.hasher)
            self.store.watched = frozenset(WATCHED_TYPES)
        except BaseException:
            self.store.close()
            raise
        self.pending: dict[str, int] = {}
        self.reported_urls: dict[str, str] = {}  # the last differing public_url each proxy reported

    def close(self) -> None:
        self.store.close()

    # --- keys ---------------------------------------------------------------------------

    def keyring(self) -> Keyring:
        """The broker keyring as committed in the database: a rotation through any replica (or
        the CLI) is used from the next request on. Inside a transaction, the row is read locked."""
        return self.keys.current()

    def rotate_keys(self, actor: str) -> dict[str, Any]:
        """New active keys; the old ones verify until their tokens expired. Audited."""
        now = clock.now()
        with self.store.transaction() as conn:
            ring = self._rotate(conn, now, actor)
        return _rotation_json(ring)

    def _rotate(self, conn: Any, now: float, actor: str, **why: str) -> Keyring:
        """The one rotation code path (``keys rotate``, ``POST /keys/rotate``, ``proxy remove``),
        inside the caller's transaction with the audit event: both commit or neither."""
        ring = self.keys.current(for_update=True).rotate(now)
        self.store.append_audit(
            conn,
            at=now,
            type_="key_rotated",
            actor=actor,
            detail={"version": ring.version, "signing": ring.active_signing, "fleet": ring.active_fleet, **why},
        )
        self.keys.replace(conn, ring, now)
        log.info("keys rotated to version %d by %s", ring.version, actor)
        return ring

    def list_keys(self) -> dict[str, Any]:
        ring = self.keyring()
        return {"version": ring.version, "max_ttl": ring.max_ttl, "keys": ring.kids()}

    # --- credentials --------------------------------------------------------------------

    def create_apikey(self, name: str, role: str, actor: str) -> str:
        """A new API key, returned once; only its keyed hash is stored. Names are never reused,
        not even a revoked key's, so ``revoke NAME`` and the audit trail mean one key."""
        if role not in auth.ROLES:
            raise CommandError(f"role must be one of {', '.join(auth.ROLES)}")
        if not auth.NAME_PATTERN.match(name):
            raise CommandError("the name must be 1-64 letters, digits, '-' or '_'")
        key_id, secret, whole = auth.new_api_key()
        now = clock.now()
        taken = CommandError(f"an API key named {name!r} exists already (revoked names are not reused)")
        try:
            with self.store.transaction() as conn:
                if conn.execute("SELECT 1 FROM apikeys WHERE name = ?", (name,)).fetchone():
                    raise taken
                conn.execute(
                    "INSERT INTO apikeys (id, name, role, hash, created_at) VALUES (?, ?, ?, ?, ?)",
                    (key_id, name, role, self.hasher.digest("apikey", key_id, secret), now),
                )
                self.store.append_audit(
                    conn,
                    at=now,
                    type_="apikey_created",
                    actor=actor,
                    detail={"name": name, "role": role, "key_id": key_id},
                )
        except IntegrityError:  # PostgreSQL: another replica created the name meanwhile (unique index)
            raise taken from None
        return whole

    def list_apikeys(self) -> dict[str, Any]:
        """Every key ever created, revoked ones included; never a secret or a hash."""
        rows = self.store.all("SELECT id, name, role, created_at, revoked_at FROM apikeys ORDER BY created_at, id")
        return {
            "apikeys": [
                {
                    "name": r["name"],
                    "key_id": r["id"],
                    "role": r["role"],
                    "created_at": r["created_at"],
                    "revoked": r["revoked_at"] is not None,
                    "revoked_at": r["revoked_at"],
                }
                for r in rows
            ]
        }

    def revoke_apikey(self, name: str, actor: str) -> list[str]:
        """Mark the key revoked: :meth:`authenticate` reads the row on every request, so a running
        broker refuses it from its next request on. Returns the key ids revoked (more than one
        only for names duplicated before names became unique)."""
        now = clock.now()
        with self.store.transaction() as conn:
            rows = conn.execute(
                "SELECT id, role, revoked_at FROM apikeys WHERE name = ?" + self.store.lock_update, (name,)
            ).fetchall()
            if not rows:
                raise ApiError(404, "apikey_not_found", f"no API key named {name!r}")
            live = [r for r in rows if r["revoked_at"] is None]
            if not live:
                raise ApiError(409, "apikey_revoked", f"the API key {name!r} is revoked already")
            for row in live:
                conn.execute("UPDATE apikeys SET revoked_at = ? WHERE id = ?", (now, row["id"]))
                self.store.append_audit(
                    conn,
                    at=now,
                    type_="apikey_revoked",
                    actor=actor,
                    detail={"name": name, "role": row["role"], "key_id": row["id"]},
                )
        return [r["id"] for r in live]

    def add_proxy(
        self, name: str, public_url: str, actor: str, deliver: Callable[[dict[str, str]], None] | None = None
    ) -> dict[str, str]:
        """Register a proxy; the credential ``{proxy_id, secret}`` is returned once. ``deliver``
        (writing it out) runs before the commit: if it fails, the name is not used up."""
        if not auth.NAME_PATTERN.match(name):
            raise CommandError("the proxy name must be 1-64 letters, digits, '-' or '_'")
        public_url = _checked_public_url(public_url)
        secret, now = auth.new_secret(), clock.now()
        try:
            with self.store.transaction() as conn:
                conn.execute(
                    "INSERT INTO proxies (id, public_url, secret_hash, created_at) VALUES (?, ?, ?, ?)",
                    (name, public_url, self.hasher.digest("proxy", name, secret), now),
                )
                self.store.append_audit(
                    conn, at=now, type_="proxy_added", actor=actor, detail={"proxy_id": name, "public_url": public_url}
                )
                join_token = self.enrollment.create_join_token(conn, name, now)
                if deliver is not None:
                    deliver({"proxy_id": name, "secret": secret})
        except IntegrityError:
            raise CommandError(f"a proxy named {name!r} exists already (removed names are not reused)") from None
        return {"proxy_id": name, "secret": secret, "join_token": join_token}

    def new_join_token(self, name: str, actor: str) -> str:
        """Another one-time join token for a registered proxy (the first expired, or the proxy is
        re-enrolled on a new machine); the earlier unused ones stay valid until they expire."""
        now = clock.now()
        with self.store.transaction() as conn:
            row = conn.execute("SELECT removed_at FROM proxies WHERE id = ?", (name,)).fetchone()
            if row is None or row["removed_at"] is not None:
                raise ApiError(404, "proxy_not_found", f"no registered proxy named {name!r}")
            token = self.enrollment.create_join_token(conn, name, now)
            log.info("join token made for proxy %s by %s", name, actor)
        return token

    # --- the CA -------------------------------------------------------------------------

    def ca_answer(self) -> dict[str, Any]:
        """``GET /ca``: the CA certificate and its fingerprint (public)."""
        cert = self.ca.certificate()
        return {"certificate": ca.cert_pem(cert), "fingerprint": ca.fingerprint(cert)}

    def enroll(self, body: dict[str, Any]) -> dict[str, Any]:
        with _refusals():
            return self.enrollment.enroll(
                body["join_token"], body["csr"], lifetime=self.config.cert_lifetime, now=clock.now()
            )

    def renew_certificate(self, who: Principal, body: dict[str, Any]) -> dict[str, Any]:
        with _refusals():
            return self.enrollment.renew(who, body["csr"], lifetime=self.config.cert_lifetime, now=clock.now())

    def revoke_certificate(self, serial: str, actor: str) -> dict[str, Any]:
        with _refusals():
            return self.enrollment.revoke(serial, actor, clock.now())

    def authenticate_certificate(self, der: bytes) -> Principal:
        """The proxy a verified client certificate names (every request: revocation is read
        from the database each time), else ApiError 401 with the reason's code."""
        with _refusals():
            return self.enrollment.authenticate(der, clock.now())

    def _note_reported_url(self, proxy_id: str, registered: str, reported: str | None) -> None:
        """A heartbeat's ``public_url`` never moves consoles: a stolen proxy credential would
        otherwise send every browser, token in hand, to the thief's host (who also has the fleet
        keys). A mismatch is logged once per new value; ``proxy set-url`` is the way to change it."""
        if reported is None or reported == registered or self.reported_urls.get(proxy_id) == reported:
            return
        self.reported_urls[proxy_id] = reported
        log.warning(
            "proxy %s reports public URL %r but is registered as %s; consoles keep the registered one "
            "(change it with `console-broker proxy set-url`)",
            proxy_id,
            reported,
            registered,
        )

    def set_proxy_url(self, name: str, public_url: str, actor: str) -> None:
        """The browsers' way to a proxy, changed by an operator only (audited)."""
        public_url = _checked_public_url(public_url)
        now = clock.now()
        with self.store.transaction() as conn:
            row = conn.execute(
                "SELECT public_url FROM proxies WHERE id = ? AND removed_at IS NULL" + self.store.lock_update, (name,)
            ).fetchone()
            if row is None:
                raise ApiError(404, "proxy_not_found", f"no registered proxy named {name!r}")
            conn.execute("UPDATE proxies SET public_url = ? WHERE id = ?", (public_url, name))
            self.store.append_audit(
                conn,
                at=now,
                type_="proxy_changed",
                actor=actor,
                detail={"proxy_id": name, "public_url": public_url, "previous": row["public_url"]},
            )

    def list_proxy_records(self) -> dict[str, Any]:
        """Every registered proxy, removed ones included, as the database knows it (``healthy``
        depends on the running broker's heartbeat interval: see ``GET /proxies``); no secret."""
        rows = self.store.all(
            "SELECT id, public_url, created_at, last_seen, sessions, capacity, draining, "
            "keyring_version, removed_at FROM proxies ORDER BY id"
        )
        return {
            "proxies": [
                {
                    "id": r["id"],
                    "public_url": r["public_url"],
                    "created_at": r["created_at"],
                    "last_seen": r["last_seen"],
                    "sessions": r["sessions"],
                    "capacity": r["capacity"],
                    "draining": bool(r["draining"]),
                    "keyring_version": r["keyring_version"],
                    "removed": r["removed_at"] is not None,
                    "removed_at": r["removed_at"],
                }
                for r in rows
            ]
        }

    def remove_proxy(self, name: str, actor: str, *, rotate: bool = True) -> dict[str, Any]:
        """Mark the proxy removed: its credential stops authenticating (heartbeat, redeem, events)
        and it is no longer chosen. With ``rotate``, in the same transaction, new keys: the
        removed proxy holds the fleet keys that decrypt every token minted under them, so new
        consoles must use keys it never received (and ``mint_floor`` keeps the broker from
        falling back to the previous keys for proxies that have not fetched the new ones)."""
        now = clock.now()
        with self.store.transaction() as conn:
            self.keys.current(for_update=True)  # waits for mints and heartbeats in flight, then holds them
            public_url = self._mark_removed(conn, name, now)
            self.enrollment.revoke_proxy(conn, name, actor, now)
            self.store.append_audit(
                conn,
                at=now,
                type_="proxy_removed",
                actor=actor,
                detail={"proxy_id": name, "public_url": public_url, "rotate": rotate},
            )
            ring = self._rotate(conn, now, actor, reason="proxy_removed", proxy_id=name) if rotate else None
            if ring is not None:
                conn.execute(
                    "INSERT INTO mint_floor (id, version) VALUES (1, ?) "
                    "ON CONFLICT (id) DO UPDATE SET version = excluded.version",
                    (ring.version,),
                )
        self.pending.pop(name, None)
        return {"proxy_id": name, "rotation": _rotation_json(ring) if ring else None}

    @staticmethod
    def _mark_removed(conn: Any, name: str, now: float) -> str:
        row = conn.execute("SELECT public_url, removed_at FROM proxies WHERE id = ?", (name,)).fetchone()
        if row is None:
            raise ApiError(404, "proxy_not_found", f"no proxy named {name!r}")
        if row["removed_at"] is not None:
            raise ApiError(409, "proxy_removed", f"the proxy {name!r} is removed already")
        conn.execute("UPDATE proxies SET removed_at = ? WHERE id = ?", (now, name))
        return str(row["public_url"])

    def authenticate(self, authorization: str | None, *, proxy: bool) -> Principal | None:
        """The caller of a request, or None; proxies and API keys have separate endpoints.

        No cache: every request reads the row, so a revoked key or a removed proxy is refused
        from its next request on, and it costs the same HMAC as an unknown one."""
        value = auth.bearer(authorization)
        if value is None:
            return None
        if proxy:
            parts = auth.split_proxy_credential(value)
            if parts is None:
                return None
            row = self.store.one("SELECT secret_hash FROM proxies WHERE id = ? AND removed_at IS NULL", parts[0])
            ok = self.hasher.matches(row["secret_hash"] if row else None, "proxy", *parts)
            return Principal(parts[0], parts[0], "proxy") if ok else None
        key = auth.split_api_key(value)
        if key is None:
            return None
        row = self.store.one("SELECT name, role, hash FROM apikeys WHERE id = ? AND revoked_at IS NULL", key[0])
        ok = self.hasher.matches(row["hash"] if row else None, "apikey", *key)
        return Principal(key[0], row["name"], row["role"]) if ok and row else None

    def record_throttled(self, address: str, kind: str, retry_after: int) -> None:
        """Audit the start of a throttling episode (broker.ratelimit): who, which credential kind,
        never what was presented."""
        with self.store.transaction() as conn:
            self.store.append_audit(
                conn,
                at=clock.now(),
                type_="auth_throttled",
                actor="unauthenticated",
                detail={"address": address, "kind": kind, "retry_after": retry_after},
            )

    # --- targets ------------------------------------------------------------------------

    def add_target(self, body: dict[str, Any], actor: str) -> dict[str, Any]:
        _check_ca((body.get("tls") or {}).get("ca"))
        target_id = body.get("id") or f"t-{secrets.token_hex(6)}"
        password = body.get("password")
        sealed = self.vault.seal(password, context=target_id) if password else None
        tls = json.dumps(body["tls"]) if body.get("tls") is not None else None
        now = clock.now()
        try:
            with self.store.transaction() as conn:
                conn.execute(
                    "INSERT INTO targets (id, name, host, port, password_enc, tls, clip, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (target_id, body["name"], body["host"], body["port"], sealed, tls, body.get("clip"), now),
                )
                self.store.append_audit(
                    conn,
                    at=now,
                    type_="target_changed",
                    actor=actor,
                    detail={
                        "action": "created",
                        "target_id": target_id,
                        "name": body["name"],
                        "host": body["host"],
                        "port": body["port"],
                        "has_password": sealed is not None,
                        "clip": body.get("clip") or "both",
                    },
                )
        except IntegrityError:
            raise ApiError(409, "target_exists", f"a target with id {target_id!r} exists already") from None
        return self.get_target(target_id)

    def get_target(self, target_id: str) -> dict[str, Any]:
        row = self.store.one("SELECT * FROM targets WHERE id = ?", target_id)
        if row is None:
            raise ApiError(404, "target_not_found", "no target with this id")
        return _target_json(row)

    def list_targets(self) -> dict[str, Any]:
        return {"targets": [_target_json(r) for r in self.store.all("SELECT * FROM targets ORDER BY id")]}

    def delete_target(self, target_id: str, actor: str) -> None:
        now = clock.now()
        with self.store.transaction() as conn:
            if conn.execute("DELETE FROM targets WHERE id = ?", (target_id,)).rowcount == 0:
                raise ApiError(404, "target_not_found", "no target with this id")
            self.store.append_audit(
                conn, at=now, type_="target_changed", actor=actor, detail={"action": "deleted", "target_id": target_id}
            )

    # --- consoles -----------------------------------------------------------------------

    def max_ttl(self) -> int:
        return min(self.config.max_ttl, self.keyring().max_ttl)

    def proxies(self) -> list[fleet.ProxyView]:
        return [
            fleet.ProxyView(
                r["id"],
                r["public_url"],
                r["sessions"],
                r["capacity"],
                bool(r["draining"]),
                r["last_seen"],
                self.pending.get(r["id"], 0),
                r["keyring_version"] or 0,
            )
            for r in self.store.all("SELECT * FROM proxies WHERE removed_at IS NULL")
        ]

    def mint_floor(self) -> int:
        """The oldest keyring version a proxy must hold to be given consoles (0: any)."""
        row = self.store.one("SELECT version FROM mint_floor WHERE id = 1")
        return int(row["version"]) if row else 0

    # --- hypervisors ---------------------------------------------------------------------

    def add_hypervisor(self, body: dict[str, Any], actor: str) -> dict[str, Any]:
        try:
            hypervisors.check_uri(body["uri"])
        except ValueError as exc:
            raise ApiError(400, "bad_request", str(exc)) from None
        _check_ca((body.get("tls") or {}).get("ca"))
        tls = json.dumps(body["tls"]) if body.get("tls") is not None else None
        now = clock.now()
        try:
            with self.store.transaction() as conn:
                conn.execute(
                    "INSERT INTO hypervisors (name, uri, address, tls, console_passwords, clip, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        body["name"],
                        body["uri"],
                        body.get("address"),
                        tls,
                        int(body.get("console_passwords", False)),
                        body.get("clip"),
                        now,
                    ),
                )
                self.store.append_audit(
                    conn,
                    at=now,
                    type_="hypervisor_changed",
                    actor=actor,
                    detail={
                        "action": "created",
                        "name": body["name"],
                        "uri": body["uri"],
                        "address": body.get("address"),
                        "console_passwords": body.get("console_passwords", False),
                        "clip": body.get("clip") or "both",
                    },
                )
        except IntegrityError:
            raise ApiError(409, "hypervisor_exists", f"a hypervisor named {body['name']!r} exists already") from None
        return self.get_hypervisor(body["name"])

    def get_hypervisor(self, name: str) -> dict[str, Any]:
        return _hypervisor_json(self._hypervisor_row(name))

    def _hypervisor_row(self, name: str) -> Any:
        row = self.store.one("SELECT * FROM hypervisors WHERE name = ?", name)
        if row is None:
            raise ApiError(404, "hypervisor_not_found", f"no hypervisor named {name!r}")
        return row

    def list_hypervisors(self) -> dict[str, Any]:
        rows = self.store.all("SELECT * FROM hypervisors ORDER BY name")
        return {"hypervisors": [_hypervisor_json(r) for r in rows]}

    def delete_hypervisor(self, name: str, actor: str) -> None:
        now = clock.now()
        with self.store.transaction() as conn:
            if conn.execute("DELETE FROM hypervisors WHERE name = ?", (name,)).rowcount == 0:
                raise ApiError(404, "hypervisor_not_found", f"no hypervisor named {name!r}")
            self.store.append_audit(
                conn, at=now, type_="hypervisor_changed", actor=actor, detail={"action": "deleted", "name": name}
            )

    async def create_console(
        self, principal: Principal, body: dict[str, Any], *, parent: str | None = None
    ) -> dict[str, Any]:
        """POST /consoles: a target's console, or a libvirt domain's, located now (libvirt off
        the event loop, within the mint's deadline) and, with per-console passwords, rekeyed.
        With ``parent``, a view-only share of that session (:meth:`share_console`)."""
        if ("target_id" in body) == ("hypervisor" in body) or ("hypervisor" in body) != ("domain" in body):
            raise ApiError(400, "bad_request", "name either target_id, or hypervisor and domain")
        if "target_id" in body:
            return self.mint_console(principal, body, parent=parent)
        deadline = time.monotonic() + self.config.hypervisor_timeout
        row = self._hypervisor_row(body["hypervisor"])
        tls = json.loads(row["tls"]) if row["tls"] else None
        hypervisor = hypervisors.Hypervisor(
            row["name"], row["uri"], row["address"], tls, bool(row["console_passwords"])
        )
        self._ttl(body)  # a bad ttl is a 400 before libvirt is asked anything
        try:
            found = await hypervisors.lookup_async(hypervisor, body["domain"], self.config.hypervisor_timeout)
            located = {
                "id": None,
                "vm": f"{row['name']}/{body['domain']}",
                "console": f"{row['name']}/{found.uuid}",
                "name": body["domain"],
                "host": found.host,
                "port": found.port,
                "password": found.password,
                "tls": row["tls"],
                "clip": row["clip"],
                "hypervisor": row["name"],
                "domain": body["domain"],
            }
            if not hypervisor.console_passwords:
                return self.mint_console(principal, body, located, parent=parent)
            return await self._mint_rekeyed(principal, body, hypervisor, located, found.uuid, deadline, parent)
        except hypervisors.HypervisorError as exc:
            raise ApiError(exc.status, exc.code, exc.message) from None

    async def _mint_rekeyed(
        self,
        principal: Principal,
        body: dict[str, Any],
        hypervisor: hypervisors.Hypervisor,
        located: dict[str, Any],
        uuid: str,
        deadline: float,
        parent: str | None,
    ) -> dict[str, Any]:
        """A per-console password: under the domain's database lock, the outstanding consoles
        read from the sessions rows (every replica's), the password set valid until the latest
        ``exp`` (DESIGN), and the session committed before the lock goes. A mint that fails once
        the password is set puts the validity back to what the committed sessions need (no
        committed session: a fresh password, expired at once)."""
        async with self._console_locked(located["console"], hypervisor, deadline):
            now = clock.now()
            committed = self._outstanding_exp(located["console"], now)
            until = max(int(now) + self._ttl(body), committed or 0)
            located["password"] = await hypervisors.rekey_async(
                hypervisor, uuid, until, committed is not None, deadline - time.monotonic()
            )
            try:
                return self.mint_console(principal, body, {**located, "now": now}, parent=parent)
            except BaseException:
                await self._restore_password(hypervisor, uuid, committed)
                raise

    async def _restore_password(self, hypervisor: hypervisors.Hypervisor, uuid: str, committed: int | None) -> None:
        """After a failed mint: the password valid only as long as committed consoles need it."""
        until = committed if committed is not None else int(clock.now()) - 1  # QEMU: expired once past it
        try:
            await hypervisors.rekey_async(
                hypervisor, uuid, until, committed is not None, self.config.hypervisor_timeout
            )
        except hypervisors.HypervisorError as exc:  # the mint's own error is what the caller gets
            log.warning(
                "mint failed and the VNC password of %s/%s could not be put back: %s",
                hypervisor.name,
                uuid,
                exc.message,
            )

    def _outstanding_exp(self, console: str, now: float) -> int | None:
        """The latest ``exp`` of the console's committed, unexpired, unrevoked sessions."""
        row = self.store.one(
            "SELECT MAX(exp) FROM sessions WHERE console = ? AND exp > ? AND state <> 'revoked'", console, int(now)
        )
        return int(row[0]) if row is not None and row[0] is not None else None

    @contextlib.asynccontextmanager
    async def _console_locked(
        self, console: str, hypervisor: hypervisors.Hypervisor, deadline: float
    ) -> AsyncIterator[None]:
        """The console's rekey lock, tried and retried (never waited for on the event loop)
        until the mint's deadline: then 503 ``hypervisor_unavailable``. The SQLite lease covers
        a whole rekeyed mint (two libvirt deadlines and the commit)."""
        lease = 2 * self.config.hypervisor_timeout + CONSOLE_LOCK_LEASE_MARGIN
        while True:
            with self.store.console_lock(console, time.time(), lease) as got:
                if got:
                    yield
                    return
            pause = CONSOLE_LOCK_RETRY * (1 + secrets.randbelow(100) / 100)  # jittered: replicas interleave
            if time.monotonic() + pause >= deadline:
                raise hypervisors.HypervisorError(
                    503,
                    "hypervisor_unavailable",
                    f"hypervisor {hypervisor.name!r} did not answer in time: another mint for this domain "
                    "is still setting its VNC password; try again",
                )
            await asyncio.sleep(pause)

    def mint_console(
        self,
        principal: Principal,
        body: dict[str, Any],
        located: dict[str, Any] | None = None,
        *,
        parent: str | None = None,
    ) -> dict[str, Any]:
        """Claims from the target and the request, a proxy from the fleet, one audited session.

        Keys, fleet, mint floor and choice are read in the transaction that records the session,
        the keyring row locked first (SQLite: the write lock; PostgreSQL: FOR SHARE, which a
        rotation or removal's FOR UPDATE excludes), so the console can neither go to a proxy
        removed meanwhile nor be signed with keys that were leaked (or not committed yet).

        ``parent``: a view-only share of that session (see :meth:`locate_share`), checked again
        here, its row locked, so a revocation commits wholly before (409) or after (it revokes
        this console too); its ``exp`` caps this one's."""
        with self.store.transaction() as conn:
            self.keyring()  # locks the keys (shared) first: a rotation or removal is before or after, whole
            row = located or conn.execute("SELECT * FROM targets WHERE id = ?", (body.get("target_id"),)).fetchone()
            if row is None:
                raise ApiError(404, "target_not_found", "no target with this id")
            ttl = self._ttl(body)
            now = (located or {}).get("now") or clock.now()  # a rekeyed console's: its password's until
            if parent is not None:
                ttl = min(ttl, self._shareable(conn, parent, principal, now)["exp"] - int(now))
            chosen, ring = self._choose(now, int(now) + ttl + DEFAULT_SKEW)
            claims = self._claims(row, body, now, ttl)
            minted = _sign(claims, ring)
            _insert_session(conn, claims, row, chosen.id, principal.id, now, parent, located)
            self.store.append_audit(
                conn,
                at=now,
                type_="minted",
                actor=principal.actor,
                session_id=claims.sid,
                detail={
                    "target_id": row["id"],
                    "vm": claims.target,
                    "user": claims.user,
                    "proxy_id": chosen.id,
                    "ttl": ttl,
                    "single_use": claims.single_use,
                    "view_only": claims.view_only,
                    "clip": claims.clip_policy.name,
                    "client_ip": claims.client_ip,
                    "exp": claims.exp,
                    "parent_session_id": parent,
                },
            )
            if parent is not None:
                self._audit_share(conn, principal, parent, claims, chosen.id, now)
        self.pending[chosen.id] = self.pending.get(chosen.id, 0) + 1
        return {
            "session_id": claims.sid,
            "url": f"{chosen.public_url}/console#token={minted}",
            "websocket_url": fleet.websocket_url(chosen.public_url),
            "token": minted,
            "expires_at": claims.exp,
            "proxy_id": chosen.id,
        }

    def _audit_share(
        self, conn: Any, principal: Principal, parent: str, claims: token.Claims, proxy_id: str, now: float
    ) -> None:
        """``viewer_shared``, on the shared session's history: who let whom watch, until when."""
        self.store.append_audit(
            conn,
            at=now,
            type_="viewer_shared",
            actor=principal.actor,
            session_id=parent,
            detail={"viewer_session_id": claims.sid, "user": claims.user, "proxy_id": proxy_id, "exp": claims.exp},
        )

    def _ttl(self, body: dict[str, Any]) -> int:
        ttl: int = body.get("ttl", self.config.default_ttl)
        if not 1 <= ttl <= self.max_ttl():
            raise ApiError(400, "bad_request", f"ttl must be from 1 to {self.max_ttl()} seconds")
        return ttl

    def _choose(self, now: float, until: float) -> tuple[fleet.ProxyView, Keyring]:
        """The proxy for the next console and the keys to mint it with: the previous generation
        for a proxy one rotation behind, else the current ones (called inside the minting
        transaction).

        Proxies whose keyring cannot open the console wait for their next heartbeat (see
        :func:`fleet.holds_minting_keys`). ``until``: the console's last moment, which the
        previous keys must still cover to be used (a long console right after a rotation
        outlives them). min() keeps a replaced, younger keyring's floor from shutting out the
        whole fleet."""
        ring = self.keyring()
        previous = ring.previous_generation(until)
        chosen = fleet.choose(
            self.proxies(),
            now,
            self.config.heartbeat_interval,
            ring_version=ring.version,
            floor=min(self.mint_floor(), ring.version),
            previous_usable=previous is not None,
        )
        if chosen is None:
            raise ApiError(503, "no_proxy_available", "no healthy console proxy can take a session now")
        if previous is not None and fleet.one_rotation_behind(chosen, ring.version):
            return chosen, previous
        return chosen, ring

    def _claims(self, row: Any, body: dict[str, Any], now: float, ttl: int) -> token.Claims:
        if row["id"] is None:  # located in libvirt just now (create_console)
            password, vm = row["password"], row["vm"]
        else:
            password = self.vault.open(row["password_enc"], context=row["id"]) if row["password_enc"] else None
            vm = row["id"]
        try:
            return token.new_claims(
                host=row["host"],
                port=row["port"],
                now=now,
                ttl=ttl,
                issuer=self.config.issuer,
                password=password,
                vm=vm,
                user=body.get("user"),
                client_ip=body.get("client_ip"),
                view_only=body.get("view_only", False),
                single_use=body.get("single_use", True),
                desktop_name=body.get("desktop_name") or row["name"],
                tls=json.loads(row["tls"]) if row["tls"] else None,
                clip=effective_clip(row["clip"], body.get("clip")),
            )
        except ClipNotAllowed as exc:
            raise ApiError(403, "clip_not_allowed", str(exc)) from None
        except ValueError as exc:
            raise ApiError(400, "bad_request", f"invalid console request: {exc}") from None

    # --- sessions -----------------------------------------------------------------------

    def list_sessions(
        self, principal: Principal, state: str, *, limit: int = SESSIONS_PAGE_MAX, cursor: str | None = None
    ) -> dict[str, Any]:
        """One page, newest first; ``next_cursor`` (None on the last page) continues after it.

        The cursor is the keyset (minted_at, id) of the page's last row, not an offset: sessions
        minted meanwhile sort before it, so a walk sees every older row exactly once. Issuers see
        only their own, whatever the cursor says."""
        sql = "SELECT * FROM sessions WHERE 1 = 1"
        params: list[object] = []
        if state != "all":
            sql += " AND state = ?"
            params.append(state)
        if principal.role != "admin":
            sql += " AND issued_by = ?"
            params.append(principal.id)
        if cursor is not None:
            sql += " AND (minted_at, id) < (?, ?)"
            params.extend(_cursor_position(cursor))
        rows = self.store.all(sql + " ORDER BY minted_at DESC, id DESC LIMIT ?", *params, limit + 1)
        page = rows[:limit]
        return {
            "sessions": [_session_json(r) for r in page],
            "next_cursor": _page_cursor(page[-1]) if len(rows) > limit else None,
        }

    def revoke_session(self, session_id: str, actor: str) -> None:
        """Mark revoked, with the view-only sessions shared from it; every proxy learns it from
        its watch (at the latest its next heartbeat) and closes them (4410).

        A session pruned by :meth:`cleanup` is 404 like an unknown one: its token is dead."""
        now = clock.now()
        with self.store.transaction() as conn:
            row = conn.execute(
                "SELECT state FROM sessions WHERE id = ?" + self.store.lock_update, (session_id,)
            ).fetchone()
            if row is None:
                raise ApiError(404, "session_not_found", "no session with this id")
            if row["state"] != "revoked":
                self._mark_revoked(conn, session_id, row["state"], actor, now)
            children = conn.execute(
                "SELECT id, state FROM sessions WHERE parent_id = ? AND state != 'revoked'" + self.store.lock_update,
                (session_id,),
            ).fetchall()
            for child in children:
                self._mark_revoked(conn, child["id"], child["state"], actor, now, parent_session_id=session_id)

    def _mark_revoked(self, conn: Any, session_id: str, previous: str, actor: str, now: float, **why: str) -> None:
        """One session revoked, with its audit event (what the proxies' watch reads)."""
        conn.execute("UPDATE sessions SET state = 'revoked', revoked_at = ? WHERE id = ?", (now, session_id))
        self.store.append_audit(
            conn,
            at=now,
            type_="revoked",
            actor=actor,
            session_id=session_id,
            detail={"previous_state": previous, **why},
        )

    # --- sharing: POST /sessions/{id}/viewers ---------------------------------------------

    async def share_console(self, principal: Principal, session_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST /sessions/{id}/viewers: a view-only console on the same VM, under ``session_id``."""
        request = await self.locate_share(principal, session_id, body)
        return await self.create_console(principal, request, parent=session_id)

    async def locate_share(self, principal: Principal, session_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """The console request for a view-only share of ``session_id`` (for :meth:`create_console`
        with ``parent``): the parent's target, or its libvirt domain, to be looked up again.

        A libvirt console is looked up again rather than reusing the parent's: its port and
        password are never stored (they change when the VM restarts or migrates, and a stored
        password would be one more secret at rest), and with per-console passwords the lookup
        stretches the password's validity to this console's ``exp``, which is never past the
        parent's. The checks here fail fast; :meth:`mint_console` makes them again, locked."""
        now = clock.now()
        with self.store.transaction() as conn:
            parent = self._shareable(conn, session_id, principal, now)
        request: dict[str, Any] = {**body, "view_only": True}
        request["ttl"] = min(self._ttl(body), parent["exp"] - int(now))
        if parent["target_id"] is not None:
            request["target_id"] = parent["target_id"]
        elif parent["vm_hypervisor"] is not None:
            request["hypervisor"], request["domain"] = parent["vm_hypervisor"], parent["vm_domain"]
        else:
            raise ApiError(
                409,
                "session_not_shareable",
                "this session was minted for a libvirt domain before sharing existed; mint a new console to share it",
            )
        return request

    def _shareable(self, conn: Any, session_id: str, principal: Principal, now: float) -> Any:
        """The parent's row, locked (FOR SHARE: a revocation waits, or went first), if ``principal``
        may share it (an admin, or the issuer that minted it) and it can still be watched."""
        row = conn.execute("SELECT * FROM sessions WHERE id = ?" + self.store.lock_share, (session_id,)).fetchone()
        if row is None:
            raise ApiError(404, "session_not_found", "no session with this id")
        if principal.role != "admin" and row["issued_by"] != principal.id:
            raise ApiError(403, "forbidden", "only an admin or the issuer that minted a session may share it")
        refusal = _share_refusal(row, now)
        if refusal is not None:
            raise ApiError(409, *refusal)
        return row

    # --- fleet --------------------------------------------------------------------------

    def heartbeat(self, principal: Principal, body: dict[str, Any]) -> dict[str, Any]:
        """Record the proxy's report; answer the keys it lacks and the sessions it must close.

        The removal check, the update and the keyring read are one transaction: a heartbeat that
        authenticated just before ``proxy remove`` committed gets 401 once it holds the keyring
        row's lock (taken first), never the keys rotated because of that removal.

        The revoked list names a revoked session while any proxy could still accept its token,
        however long ago it was revoked, and an open one for REVOKED_MEMORY."""
        if body["proxy_id"] != principal.id:
            raise ApiError(403, "forbidden", "proxy_id differs from the authenticated proxy")
        with self.store.transaction() as conn:
            now = clock.now()
            ring = self.keyring()  # locked (shared) before the removal check: see remove_proxy
            _check_proxy_live(conn, principal.id)
            conn.execute(
                "UPDATE proxies SET sessions = ?, capacity = ?, draining = ?, last_seen = ?, "
                "keyring_version = ? WHERE id = ? AND removed_at IS NULL",
                (body["sessions"], body["capacity"], int(body["draining"]), now, body["version"], principal.id),
            )
            registered = conn.execute("SELECT public_url FROM proxies WHERE id = ?", (principal.id,)).fetchone()[0]
        self._note_reported_url(principal.id, registered, _public_url(body.get("public_url")))
        self.pending[principal.id] = 0
        revoked = self._revoked_now(now)
        answer: dict[str, Any] = {"keyring_version": ring.version, "revoked": revoked}
        if body["version"] != ring.version:
            answer["keyring"] = ring.pruned(now).for_proxy().to_jwks()
        return answer

    def redeem(self, principal: Principal, body: dict[str, Any]) -> dict[str, Any]:
        """First redeem of a ``jti`` wins (primary key); any later one is 409 token_used."""
        now = clock.now()
        exp = min(body["exp"], int(now) + self.keyring().max_ttl + MAX_SKEW)
        try:
            with self.store.transaction() as conn:
                self.keyring()  # locked (shared): a removal of this proxy commits before or after, whole
                _check_proxy_live(conn, principal.id)
                # FOR SHARE (PostgreSQL): a revoke cannot commit between this check and the commit
                session = conn.execute(
                    "SELECT state FROM sessions WHERE id = ?" + self.store.lock_share, (body["session_id"],)
                ).fetchone()
                if session is not None and session["state"] == "revoked":
                    raise ApiError(409, "session_revoked", "this console session was revoked")
                conn.execute(
                    "INSERT INTO redeemed (jti, session_id, proxy_id, exp, at) VALUES (?, ?, ?, ?, ?)",
                    (body["jti"], body["session_id"], principal.id, exp, now),
                )
                self.store.append_audit(
                    conn,
                    at=now,
                    type_="redeemed",
                    actor=principal.actor,
                    session_id=body["session_id"],
                    detail={"proxy_id": principal.id},
                )
        except IntegrityError:
            raise ApiError(409, "token_used", "this token has been redeemed already") from None
        return {"redeemed": True}

    def proxy_events(self, principal: Principal, events: list[dict[str, Any]]) -> dict[str, Any]:
        """Sessions opened / closed and refusals reported by a proxy, into sessions and audit."""
        now = clock.now()
        with self.store.transaction() as conn:
            _check_proxy_live(conn, principal.id)
            for event in events:
                _EVENT_HANDLERS[event["event"]](self.store, conn, principal, event, now)
        return {"accepted": len(events)}

    def list_proxies(self) -> dict[str, Any]:
        now, interval = clock.now(), self.config.heartbeat_interval
        return {
            "proxies": [
                {
                    "id": p.id,
                    "public_url": p.public_url,
                    "sessions": p.sessions,
                    "capacity": p.capacity,
                    "draining": p.draining,
                    "last_seen": p.last_seen,
                    "healthy": p.healthy(now, interval),
                }
                for p in self.proxies()
            ]
        }

    def cleanup(self, *, batch: int = CLEANUP_BATCH, max_batches: int = CLEANUP_MAX_BATCHES) -> int:
        """The periodic housekeeping, in bounded batches (see Store.delete_in_batches); returns
        the rows deleted.

        Redeemed rows go once their token can no longer be accepted anywhere: a row's ``exp``
        covers the redeeming proxy's skew, but another proxy may run with up to ``MAX_SKEW``.
        Session rows go per :meth:`_prune_sessions`."""
        now = clock.now()
        redeemed = self.store.delete_in_batches(
            "redeemed", "jti", "exp < ?", (now - MAX_SKEW - DEFAULT_SKEW,), batch=batch, max_batches=max_batches
        )
        sessions = self._prune_sessions(now, batch=batch, max_batches=max_batches)
        if redeemed or sessions:
            log.info("cleanup removed %d expired redeemed-token rows and %d ended sessions", redeemed, sessions)
        return redeemed + sessions

    def _prune_sessions(self, now: float, *, batch: int, max_batches: int) -> int:
        """Delete sessions that ended (token expired, and closed or revoked if it was) more than
        the retention ago; the audit log keeps their history. Never 'active' ones: a console may
        stay open past its token's expiry, and its close event still has to land.

        The retention is at least MIN_SESSION_RETENTION, and a session's end is at least its
        ``exp`` and its ``revoked_at``: so a row outlives both exp + MAX_SKEW + DEFAULT_SKEW (no
        proxy accepts the token, redeem need not find it revoked) and revoked_at + REVOKED_MEMORY
        (the heartbeat's revoked list no longer names it). ``exp < ?`` first: the (state, exp)
        index finds the candidates."""
        cutoff = now - max(self.config.session_retention, MIN_SESSION_RETENTION)
        return self.store.delete_in_batches(
            "sessions",
            "id",
            "state IN ('minted', 'closed', 'revoked') AND exp < ? "
            "AND COALESCE(closed_at, 0) < ? AND COALESCE(revoked_at, 0) < ?",
            (cutoff, cutoff, cutoff),
            batch=batch,
            max_batches=max_batches,
        )

    # --- push: GET /proxy/watch (broker.watch) -----------------------------------------------

    def change_position(self) -> int:
        """The audit sequence as committed: every event numbered up to it has committed."""
        row = self.store.one("SELECT seq FROM audit_counter WHERE id = 1")
        return int(row[0]) if row else 0

    def latest_change(self) -> int:
        """The newest watched event's number (0: none yet); one index lookup per type."""
        row = self.store.one(
            "SELECT MAX(m) FROM ("
            + " UNION ALL ".join("SELECT MAX(seq) AS m FROM audit WHERE type = ?" for _ in WATCHED_TYPES)
            + ") AS latest",
            *WATCHED_TYPES,
        )
        return int(row[0]) if row and row[0] is not None else 0

    def watch(self, principal: Principal, since: int | None) -> tuple[dict[str, Any], bool]:
        """The answer to ``GET /proxy/watch?since=N``, and whether it holds a change after N.

        Without ``since`` (or one ahead of the database: restored from a backup), a snapshot:
        the position and every revoked session the heartbeat would list. Otherwise the watched
        changes after ``since``. The position is read first: every change up to it has committed
        (commit order), so the changes read next include them all; a truncated answer ends at its
        last change. A removed proxy gets 401, as on every proxy call."""
        row = self.store.one("SELECT removed_at FROM proxies WHERE id = ?", principal.id)
        if row is None or row["removed_at"] is not None:
            raise ApiError(401, "unauthorized", "this endpoint needs a proxy credential as a Bearer token")
        position, now = self.change_position(), clock.now()
        version = self.keyring().version
        if since is None or since > position:
            return {"seq": position, "revoked": self._revoked_now(now), "keyring_version": version}, True
        rows = self.store.all(
            "SELECT seq, type, session_id FROM audit WHERE seq > ? AND type IN (?, ?, ?) ORDER BY seq LIMIT ?",
            since,
            *WATCHED_TYPES,
            WATCH_CHANGES_MAX,
        )
        if len(rows) == WATCH_CHANGES_MAX:
            position = int(rows[-1]["seq"])
        else:
            position = max(position, *(int(r["seq"]) for r in rows)) if rows else position
        revoked = [r["session_id"] for r in rows if r["type"] == "revoked" and r["session_id"]]
        return {"seq": position, "revoked": revoked, "keyring_version": version}, bool(rows)

    def _revoked_now(self, now: float) -> list[str]:
        """Revoked sessions any proxy must still refuse or close (see :meth:`heartbeat`)."""
        return [
            r["id"]
            for r in self.store.all(
                "SELECT id FROM sessions WHERE state = 'revoked'"
                " AND (exp > ? OR (closed_at IS NULL AND revoked_at > ?))",
                now - MAX_SKEW - DEFAULT_SKEW,
                now - REVOKED_MEMORY,
            )
        ]

    # --- audit --------------------------------------------------------------------------

    def audit(self, after: int, type_: str | None, limit: int = 100) -> dict[str, Any]:
        sql = "SELECT * FROM audit WHERE seq > ?"
        params: list[object] = [after]
        if type_:
            sql += " AND type = ?"
            params.append(type_)
        rows = self.store.all(sql + " ORDER BY seq LIMIT ?", *params, limit)
        return {
            "events": [
                {
                    "seq": r["seq"],
                    "at": r["at"],
                    "type": r["type"],
                    "session_id": r["session_id"],
                    "actor": r["actor"],
                    "detail": json.loads(r["detail"]),
                }
                for r in rows
            ]
        }


def _insert_session(
    conn: Any,
    claims: token.Claims,
    row: Any,
    proxy_id: str,
    issued_by: str,
    now: float,
    parent: str | None,
    located: dict[str, Any] | None,
) -> None:
    """The session's row: a libvirt console records its hypervisor and domain (never its port or
    password), and a shared view the session it watches, so both can be found again."""
    hypervisor, domain, console = (
        (located["hypervisor"], located["domain"], located["console"]) if located else (None, None, None)
    )
    conn.execute(
        'INSERT INTO sessions (id, target_id, "user", proxy_id, issued_by, state, single_use, exp, minted_at, '
        "parent_id, vm_hypervisor, vm_domain, console) VALUES (?, ?, ?, ?, ?, 'minted', ?, ?, ?, ?, ?, ?, ?)",
        (
            claims.sid,
            row["id"],
            claims.user,
            proxy_id,
            issued_by,
            int(claims.single_use),
            claims.exp,
            now,
            parent,
            hypervisor,
            domain,
            console,
        ),
    )


def _share_refusal(row: Any, now: float) -> tuple[str, str] | None:
    """Why a session cannot be shared (code, message), or None when it can."""
    if row["parent_id"] is not None:
        return "session_is_shared_view", "this session is itself a shared view; share the session it watches"
    if row["state"] == "revoked":
        return "session_revoked", "this console session was revoked; it cannot be shared"
    if row["state"] == "closed":
        return "session_closed", "this console session has ended; it cannot be shared"
    if row["exp"] <= int(now):
        return "session_expired", "this console session's link has expired; it cannot be shared"
    return None


def _sign(claims: token.Claims, ring: Keyring) -> str:
    """The token under ``ring`` (the keys :meth:`Broker._choose` picked for the chosen proxy)."""
    try:
        return token.mint(claims, ring)
    except ValueError as exc:  # above the proxies' token size limit (e.g. a long name and a CA)
        raise ApiError(400, "bad_request", str(exc)) from None


def _rotation_json(ring: Keyring) -> dict[str, Any]:
    return {"version": ring.version, "active": {"signing": ring.active_signing, "fleet": ring.active_fleet}}


def _check_proxy_live(conn: Any, proxy_id: str) -> None:
    """Inside the request's write transaction: a proxy removed after its request authenticated
    (the removal committed while the request waited for the lock) is refused as api.caller refuses
    an unknown credential. A missing row is refused too (fail closed), though authentication
    already needs one and rows are never deleted."""
    row = conn.execute("SELECT removed_at FROM proxies WHERE id = ?", (proxy_id,)).fetchone()
    if row is None or row["removed_at"] is not None:
        raise ApiError(401, "unauthorized", "this endpoint needs a proxy credential as a Bearer token")


def _checked_public_url(url: str) -> str:
    """The URL browsers are sent to, without a trailing slash: http(s), a host, no user info,
    query, fragment or whitespace (it is pasted into every console URL of the proxy)."""
    try:
        parts = urlsplit(url)
        valid = (
            parts.scheme in ("http", "https")
            and bool(parts.hostname)
            and parts.port != 0
            and parts.username is None
            and not any(c in url for c in "?#\\")
            and url.isprintable()
            and not any(c.isspace() for c in url)
        )
    except ValueError:
        valid = False
    if not valid:
        raise CommandError("the public URL must be http(s)://HOST[:PORT][/PATH], without user info, query or spaces")
    return url.rstrip("/")


def _public_url(value: str | None) -> str | None:
    """The proxy's own idea of its URL, when it gives a usable one (compared, never adopted)."""
    if value and value.startswith(("http://", "https://")):
        return value.rstrip("/")
    return None


def _hypervisor_json(row: Any) -> dict[str, Any]:
    return {
        "name": row["name"],
        "uri": row["uri"],
        "address": row["address"],
        "tls": json.loads(row["tls"]) if row["tls"] else None,
        "console_passwords": bool(row["console_passwords"]),
        "clip": row["clip"] or "both",
        "created_at": row["created_at"],
    }


def _target_json(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "name": row["name"],
        "host": row["host"],
        "port": row["port"],
        "has_password": row["password_enc"] is not None,
        "tls": json.loads(row["tls"]) if row["tls"] else None,
        "clip": row["clip"] or "both",
        "created_at": row["created_at"],
    }


def _session_json(row: Any) -> dict[str, Any]:
    return {
        "session_id": row["id"],
        "target_id": row["target_id"],
        "user": row["user"],
        "proxy_id": row["proxy_id"],
        "state": row["state"],
        "single_use": bool(row["single_use"]),
        "expires_at": row["exp"],
        "minted_at": row["minted_at"],
        "opened_at": row["opened_at"],
        "closed_at": row["closed_at"],
        "bytes_up": row["bytes_up"],
        "bytes_down": row["bytes_down"],
        "close_code": row["close_code"],
        "parent_session_id": row["parent_id"],
    }


def _page_cursor(row: Any) -> str:
    """Opaque to clients: base64url of the JSON [minted_at, id] of a page's last row (repr of a
    float round-trips exactly, so the next page starts right after it)."""
    return b64url.encode(json.dumps([row["minted_at"], row["id"]]).encode())


def _cursor_position(cursor: str) -> tuple[float, str]:
    """The keyset a cursor stands for; 400 for anything :func:`_page_cursor` could not have made."""
    try:
        if len(cursor) > CURSOR_MAX_LENGTH:
            raise ValueError("too long")
        value = strictjson.loads(b64url.decode(cursor))
        if not isinstance(value, list) or len(value) != 2:
            raise ValueError("not a pair")
        minted_at, session_id = value
        if isinstance(minted_at, bool) or not isinstance(minted_at, int | float):
            raise ValueError("minted_at is not a number")
        if not isinstance(session_id, str) or not session_id.isascii():  # a lone surrogate cannot be bound
            raise ValueError("id is not an ASCII string")
        if not math.isfinite(float(minted_at)):
            raise ValueError("not finite")
    except (ValueError, TypeError, OverflowError):
        raise ApiError(400, "bad_request", "query parameter 'cursor' is not a next_cursor from this API") from None
    return float(minted_at), session_id


def _event_time(event: dict[str, Any], now: float) -> float:
    at = event.get("at")
    return float(at) if isinstance(at, int | float) and abs(at - now) < 86400 else now


def _pick(event: dict[str, Any], *names: str) -> dict[str, Any]:
    """The named fields of a proxy's event, in that order; an absent one as None."""
    return {name: event.get(name) for name in names}


def _audit_event(
    store: Store, conn: Any, who: Principal, type_: str, event: dict[str, Any], now: float, /, **detail: Any
) -> None:
    """The audit row of a proxy's event: one shape for every event type, the reporting proxy first
    in its detail, so a reader of the audit log finds the same keys where it expects them."""
    store.append_audit(
        conn,
        at=now,
        type_=type_,
        actor=who.actor,
        session_id=event.get("session_id"),
        detail={"proxy_id": who.id, **detail},
    )


def _opened(store: Store, conn: Any, who: Principal, event: dict[str, Any], now: float) -> None:
    at, sid = _event_time(event, now), event.get("session_id")
    if sid:
        conn.execute(
            "UPDATE sessions SET state = CASE WHEN state = 'revoked' THEN state ELSE 'active' END, "
            "opened_at = COALESCE(opened_at, ?), proxy_id = ? WHERE id = ?",
            (at, who.id, sid),
        )
    keep = _pick(event, "client", "vm", "user", "security", "view_only", "handshake_ms")
    _audit_event(store, conn, who, "opened", event, now, **keep)


BYTES_MAX = 2**62
"""Byte counters stop here (the events' schema caps one report at it too): a sum past 2**63 is
an error on PostgreSQL's BIGINT and a silent float on SQLite."""
_ADD_BYTES = f"CASE WHEN {{column}} > {BYTES_MAX} - ? THEN {BYTES_MAX} ELSE {{column}} + ? END"


def _closed(store: Store, conn: Any, who: Principal, event: dict[str, Any], now: float) -> None:
    at, sid = _event_time(event, now), event.get("session_id")
    up, down = event.get("bytes_up") or 0, event.get("bytes_down") or 0
    if sid:
        conn.execute(
            "UPDATE sessions SET state = CASE WHEN state = 'revoked' THEN state ELSE 'closed' END, "
            f"closed_at = ?, bytes_up = {_ADD_BYTES.format(column='bytes_up')}, "
            f"bytes_down = {_ADD_BYTES.format(column='bytes_down')}, close_code = ? WHERE id = ?",
            (at, up, up, down, down, event.get("close_code"), sid),
        )
    keep = _pick(event, "duration_s", "close_code", "close_reason")
    _audit_event(store, conn, who, "closed", event, now, bytes_up=up, bytes_down=down, **keep, note=event.get("detail"))


def _refused(store: Store, conn: Any, who: Principal, event: dict[str, Any], now: float) -> None:
    keep = _pick(event, "code", "reason", "status", "client", "path")
    _audit_event(store, conn, who, "refused", event, now, **keep)


_EVENT_HANDLERS = {"opened": _opened, "closed": _closed, "refused": _refused}


@contextlib.contextmanager
def _refusals() -> Iterator[None]:
    """The CA's refusals (broker.enrollment) as the API's errors."""
    try:
        yield
    except Refusal as refusal:
        raise ApiError(refusal.status, refusal.code, refusal.message) from None


def _check_ca(pem: str | None) -> None:
    """A target's CA must load now, not fail every console later with 4501. The word
    ``"broker"`` is the broker's own CA: kept as it is in the token, the proxy holds the CA."""
    if pem is None or pem == BROKER_CA:
        return
    try:
        ssl.create_default_context(cadata=pem)
    except (ssl.SSLError, ValueError, TypeError):  # TypeError: text that is not ASCII (schemathesis found it)
        raise ApiError(400, "bad_request", "tls.ca is not a PEM CA certificate") from None
