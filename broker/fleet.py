"""The proxy fleet as the broker sees it: health and which proxy gets the next console.

Pure functions over rows read from the store, so assignment is tested without a network.
A proxy is *healthy* when its last heartbeat is at most three heartbeat intervals old; a console
goes to the healthy, non-draining proxy with room and the lowest load, where load counts the
sessions the proxy reported plus the consoles assigned to it since that report (so a burst of
mints between two heartbeats spreads over the fleet instead of piling onto one proxy). Removed
proxies never reach this module (the service reads only live rows).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

HEALTHY_INTERVALS = 3


@dataclass(frozen=True)
class ProxyView:
    id: str
    public_url: str
    sessions: int
    capacity: int
    draining: bool
    last_seen: float | None
    pending: int = 0
    keyring_version: int = 0  # the version it reported in its last heartbeat

    def healthy(self, now: float, interval: float) -> bool:
        return self.last_seen is not None and now - self.last_seen <= HEALTHY_INTERVALS * interval

    @property
    def load(self) -> float:
        return (self.sessions + self.pending) / self.capacity if self.capacity > 0 else float("inf")


def holds_minting_keys(proxy: ProxyView, ring_version: int, floor: int, previous_usable: bool) -> bool:
    """Whether the proxy can open a console the broker mints now, by the keyring it reported.

    * the current version: yes;
    * no keyring reported (0): it was just sent the whole current one; yes, unless ``floor``;
    * one rotation behind: the broker mints with the previous keys, if they are still usable for
      the console's lifetime (``previous_usable``) and no ``floor`` excludes them;
    * two or more behind (it holds neither generation) or ahead (the broker's keyring was
      replaced): no, until its next heartbeat reports the current version.

    ``floor``: after a proxy's removal the keys were rotated away from it, and no proxy still on
    older ones is served (that would mean minting with keys the removed proxy holds)."""
    version = proxy.keyring_version
    if version == 0:
        return floor == 0
    if one_rotation_behind(proxy, ring_version):
        return previous_usable and version >= floor
    return version == ring_version


def one_rotation_behind(proxy: ProxyView, ring_version: int) -> bool:
    """Minted for with the previous keys. Not a fresh proxy (0): it holds the whole current keyring."""
    return proxy.keyring_version != 0 and proxy.keyring_version == ring_version - 1


def choose(
    proxies: Iterable[ProxyView],
    now: float,
    interval: float,
    *,
    ring_version: int = 0,
    floor: int = 0,
    previous_usable: bool = False,
) -> ProxyView | None:
    """The proxy for the next console, or None when no proxy can take one."""
    candidates = [
        p
        for p in proxies
        if p.healthy(now, interval)
        and not p.draining
        and p.sessions + p.pending < p.capacity
        and holds_minting_keys(p, ring_version, floor, previous_usable)
    ]
    if not candidates:
        return None
    return min(candidates, key=lambda p: (p.load, p.id))


def websocket_url(public_url: str) -> str:
    """``http(s)://host/prefix`` → ``ws(s)://host/prefix/websockify``."""
    base = public_url.rstrip("/")
    if base.startswith("https://"):
        base = "wss://" + base[len("https://") :]
    elif base.startswith("http://"):
        base = "ws://" + base[len("http://") :]
    return base + "/websockify"
