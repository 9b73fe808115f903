"""Fail fast while the database is unreachable, and notice by itself when it is back.

The broker's handlers call the database on the event loop. Once PostgreSQL is gone, every call
that asks the pool for a connection would wait the pool's whole timeout: ten requests queued
behind each other would hold the loop (and the last client) for ten timeouts. So the first
call that finds the server gone opens the circuit (:meth:`Outage.begin`): from then on calls
fail at once (:class:`DatabaseDown`, answered 503 ``storage_unavailable``), while one
background thread probes the server with a fresh connection a few times a second. The first
probe that succeeds runs ``recovered`` (the engine replaces its pool, whose own reconnection
backs off exponentially and would keep the broker down for tens of seconds after the server is
back), then closes the circuit. Pure threading: no driver import, so it is tested on its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("consolegate.broker")

PROBE_INTERVAL = 0.25
"""Seconds between two probes while the database is down."""


class DatabaseDown(Exception):
    """The database was found unreachable and has not answered a probe since: fail now."""


class Outage:
    """The circuit: closed (calls go through) or open (calls fail at once, a thread probes).

    ``probe`` raises while the database cannot be used; ``recovered`` runs (in the probe thread)
    once it can, before calls go through again."""

    def __init__(
        self, what: str, probe: Callable[[], None], recovered: Callable[[], None], interval: float = PROBE_INTERVAL
    ) -> None:
        self.what, self.probe, self.recovered, self.interval = what, probe, recovered, interval
        self._lock = threading.Lock()
        self._since: float | None = None
        self._closing = threading.Event()
        self._up = threading.Event()
        self._up.set()

    @property
    def down(self) -> bool:
        return self._since is not None

    def check(self) -> None:
        """Raise :class:`DatabaseDown` while the circuit is open."""
        if self._since is not None:
            raise DatabaseDown(f"the database {self.what} is unreachable (for {time.monotonic() - self._since:.1f} s)")

    def wait_up(self, timeout: float) -> bool:
        """Block until the circuit is closed (the database answers again); False on timeout."""
        return self._up.wait(timeout)

    def begin(self, reason: BaseException | str) -> None:
        """The database was just found gone: open the circuit and start probing (once)."""
        with self._lock:
            if self._since is not None or self._closing.is_set():
                return
            self._since = time.monotonic()
            self._up.clear()
        log.warning(
            "the database %s is unreachable (%s): answering 503 storage_unavailable until it is back",
            self.what,
            one_line(reason),
        )
        threading.Thread(target=self._watch, name="consolegate-db-probe", daemon=True).start()

    def close(self) -> None:
        """Stop probing (the engine is closing)."""
        self._closing.set()

    def _watch(self) -> None:
        while not self._closing.wait(self.interval):
            try:
                self.probe()
                self.recovered()
            except Exception as exc:
                log.debug("database probe failed: %s", one_line(exc))
                continue
            with self._lock:
                since, self._since = self._since, None
                self._up.set()
            log.warning(
                "the database %s answers again after %.1f s", self.what, time.monotonic() - (since or time.monotonic())
            )
            return


def one_line(reason: BaseException | str) -> str:
    """The first line of an error (or reason) for a log line or message; its type when it has no text."""
    lines = str(reason).strip().splitlines()
    return lines[0] if lines else type(reason).__name__
