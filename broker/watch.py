"""Push to proxies: the long-poll ``GET /api/v1/proxy/watch?since=N`` and what wakes it.

N is a position in the audit sequence (one counter in the database, gap-free and in commit
order across replicas: see broker.store), so any replica answers any proxy from the database
alone. The changes a proxy acts on are audit events of :data:`WATCHED_TYPES`: a session revoked,
the keys rotated, a proxy removed.

Each broker process keeps one :class:`ChangeFeed`: the newest watched change it knows of, and
the watches waiting for a newer one. It is refreshed (one small indexed read) when

- this process commits a watched change (``Store.on_change``: the revoke's own replica answers
  without a round trip through the database),
- PostgreSQL delivers a ``NOTIFY`` (sent inside the changing transaction, so on its COMMIT) to
  this replica's :class:`PgListener`, a thread with one dedicated connection, or
- a slow poll ticks: the safety net for a listener reconnecting, and on SQLite for a change
  committed by another process (``console-broker keys rotate``, ``proxy remove``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from broker.outage import one_line
from broker.store import CHANGES_CHANNEL, StoreError

log = logging.getLogger("consolegate.broker.watch")

WATCHED_TYPES = ("revoked", "key_rotated", "proxy_removed")
WATCH_HOLD = 25.0
"""Longest a watch is held without a change before it is answered with the current position."""
WATCH_CHANGES_MAX = 500
"""Most changes one answer carries; the proxy asks again from the last one's position."""
WATCHES_PER_PROXY = 4
"""Watches one proxy credential may hold at once; a newer one answers the oldest at once."""
POLL_SQLITE = 1.0
"""Seconds between the feed's refreshes on SQLite: changes committed by another process
(``console-broker keys rotate``, ``proxy remove``) have no other way in."""
POLL_POSTGRESQL = 30.0
"""The same on PostgreSQL, a safety net only (the listener pokes the feed after every
reconnect): longer than the watch hold, so the tests' bounds show NOTIFY at work."""
LISTEN_RETRY_MAX = 10.0


class ChangeFeed:
    """The newest watched change this process knows of; watches wait for it to pass theirs.

    Lives on the event loop; :meth:`poke` may be called from any thread."""

    def __init__(self, latest: Callable[[], int]) -> None:
        self._read_latest = latest
        self.latest = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._moved = asyncio.Event()
        self._scheduled = False
        self._held: dict[str, deque[asyncio.Event]] = {}

    def bind(self) -> None:
        """Attach to the running loop and read the position (first use or ``serve``)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self.refresh()

    def poke(self) -> None:
        """Something changed: refresh soon, on the loop (coalesced); safe from any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if _running_loop() is loop:
            self._schedule()
        else:
            loop.call_soon_threadsafe(self._schedule)

    def _schedule(self) -> None:
        if not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self.refresh)

    def refresh(self) -> None:
        self._scheduled = False
        try:
            latest = self._read_latest()
        except StoreError as exc:  # unavailable now: the next poke or poll tries again
            log.debug("watch feed not refreshed: %s", exc)
            return
        if latest > self.latest:
            self.latest = latest
            self._moved.set()
            self._moved = asyncio.Event()

    async def wait(self, proxy_id: str, since: int, hold: float, gone: asyncio.Event) -> None:
        """Return once a watched change is newer than ``since``, after ``hold`` seconds, when
        the client went away (``gone``), or when this proxy opened too many newer watches."""
        self.bind()
        superseded = asyncio.Event()
        held = self._held.setdefault(proxy_id, deque())
        held.append(superseded)
        if len(held) > WATCHES_PER_PROXY:
            held.popleft().set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + hold
        try:
            while self.latest <= since and not gone.is_set() and not superseded.is_set():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return
                waits = [asyncio.ensure_future(e.wait()) for e in (self._moved, gone, superseded)]
                try:
                    await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiting in waits:
                        waiting.cancel()
        finally:
            if superseded in held:
                held.remove(superseded)
            if not held:
                self._held.pop(proxy_id, None)

    @property
    def watching(self) -> int:
        return sum(len(held) for held in self._held.values())


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class PgListener:
    """A thread holding one dedicated connection that ``LISTEN``s on the changes channel and
    pokes the feed for each notification, reconnecting with backoff when the server goes away
    (and poking once after each reconnect: notifications sent meanwhile were lost)."""

    def __init__(self, conninfo: str, on_notify: Callable[[], None], *, connect_timeout: int = 5) -> None:
        self._conninfo, self._on_notify, self._connect_timeout = conninfo, on_notify, connect_timeout
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-listener", daemon=True)
        self.listening = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        import psycopg

        delay = 0.5
        while not self._stopping.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=self._connect_timeout) as conn:
                    conn.execute(f"LISTEN {CHANGES_CHANNEL}")
                    self.listening.set()
                    log.debug("listening for changes on %s", CHANGES_CHANNEL)
                    delay = 0.5
                    self._on_notify()
                    self._drain(conn)
            except psycopg.Error as exc:
                self.listening.clear()
                log.warning("the change listener lost PostgreSQL (%s); retrying in %.1f s", one_line(exc), delay)
            self._stopping.wait(delay)
            delay = min(delay * 2, LISTEN_RETRY_MAX)

    def _drain(self, conn: Any) -> None:
        while not self._stopping.is_set():
            for _ in conn.notifies(timeout=1.0):
                self._on_notify()
