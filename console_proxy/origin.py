"""Who is asking: the Origin check against cross-site websocket hijacking, and the client address.

Browsers do not apply the same-origin policy to websockets, so without this check any page a
logged-in user visits could open a console with a link it stole (Nova's CVE-2015-0259). Headers
that a client can forge (X-Forwarded-*) count only when the direct peer is a trusted proxy.

The request's own origin is always allowed, which DNS rebinding turns against us: a page at
``evil.example`` whose name is re-pointed at the proxy's address sends ``Origin:
http://evil.example`` with ``Host: evil.example``, its own origin. With a public URL the proxy
therefore also pins the Host: only the public URL's host[:port] and the allowed origins' pass
(:meth:`OriginPolicy.host_allowed`).
Pure functions: the handlers pass in what they read off the request.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def normalize_origin(value: str | None) -> str | None:
    """``scheme://host:port`` with the host lower-cased and the default port explicit.

    None for anything that is not a plain http(s) origin: ``null``, paths, user info, bad ports.
    """
    if not value:
        return None
    return _normalize(value)


#: Longest value whose result is cached: real origins and addresses are short, and a cache
#: keyed by long attacker-chosen headers would hold megabytes before any token was checked.
CACHED_LENGTH = 256


class _CachedIfShort(Generic[T]):
    """An LRU cache for a pure function of a string, holding short strings only."""

    def __init__(self, function: Callable[[str], T], maxsize: int) -> None:
        self._function = function
        self._cached = functools.lru_cache(maxsize=maxsize)(function)
        self.cache_info = self._cached.cache_info

    def __call__(self, value: str) -> T:
        return self._cached(value) if len(value) <= CACHED_LENGTH else self._function(value)


def _cached_if_short(maxsize: int) -> Callable[[Callable[[str], T]], _CachedIfShort[T]]:
    return lambda function: _CachedIfShort(function, maxsize)


@_cached_if_short(maxsize=1024)
def _normalize(value: str) -> str | None:
    """Cached: a proxy sees the same few origins on every open (a pure function of a string)."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}:{port or DEFAULT_PORTS[parts.scheme]}"


def origin_of(scheme: str, host_header: str | None) -> str | None:
    """The origin a request was addressed to, from its scheme and Host header."""
    if not host_header:
        return None
    return normalize_origin(f"{scheme}://{host_header}")


HostPort = tuple[str, int | None]
"""A Host header's lower-case name and its port (None when the header names none)."""


def split_host(value: str | None) -> HostPort | None:
    """``name[:port]`` or ``[v6]:port`` as (lower-case name, port or None); None if it is not one."""
    return _split_host(value) if value else None


@_cached_if_short(maxsize=1024)
def _split_host(value: str) -> HostPort | None:
    try:
        parts = urlsplit(f"http://{value.strip()}")
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname or parts.username is not None or parts.path or parts.query or parts.fragment:
        return None
    return parts.hostname.lower(), port


def _pins(origins: Iterable[str]) -> frozenset[HostPort]:
    """The Host values that address these origins: ``name:port``, and bare ``name`` when the
    port is its scheme's default (browsers leave it out)."""
    pins: set[HostPort] = set()
    for entry in origins:
        parts = urlsplit(entry)  # normalised: a host and an explicit port
        name, port = parts.hostname or "", parts.port or DEFAULT_PORTS[parts.scheme]
        pins.add((name, port))
        if port == DEFAULT_PORTS[parts.scheme]:
            pins.add((name, None))
    return frozenset(pins)


@dataclass(frozen=True)
class OriginPolicy:
    """The origins allowed besides the request's own: the public URL's and explicit entries.

    ``pinned``, when not None, is the set of Host values a websocket may be addressed to
    (see the module's note on DNS rebinding); None accepts any Host.
    """

    public_origin: str | None = None
    allowed: frozenset[str] = frozenset()
    pinned: frozenset[HostPort] | None = None

    @classmethod
    def build(cls, public_url: str | None, allowed: Iterable[str], *, pin_host: bool = True) -> OriginPolicy:
        """``pin_host`` takes effect only with a public URL: without one the proxy cannot know
        which name browsers use for it."""
        entries = set()
        for entry in allowed:
            normal = normalize_origin(entry)
            if normal is None:
                raise ValueError(f"--allowed-origin {entry!r} is not an http(s) origin")
            entries.add(normal)
        public = normalize_origin(_origin_part(public_url)) if public_url else None
        if public_url and public is None:
            raise ValueError(f"--public-url {public_url!r} is not an http(s) URL")
        pinned = _pins({public, *entries}) if pin_host and public is not None else None
        return cls(public, frozenset(entries), pinned)

    def allows(self, origin_header: str | None, own_origin: str | None) -> bool:
        """A missing Origin (not a browser) passes; a present one must match exactly."""
        if origin_header is None:
            return True
        origin = normalize_origin(origin_header)
        if origin is None:
            return False
        return origin in (own_origin, self.public_origin) or origin in self.allowed

    def host_allowed(self, host: str | None) -> bool:
        """Whether a request addressed to this Host (name[:port], any case) may open a console:
        always when not pinned; else only the public URL's or an allowed origin's host[:port],
        a default port (:80, :443) written or not. A missing or malformed Host fails."""
        if self.pinned is None:
            return True
        return split_host(host) in self.pinned


def _origin_part(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """``--trusted-proxy`` values (an address or a CIDR) as networks."""
    try:
        return tuple(ipaddress.ip_network(entry.strip(), strict=False) for entry in entries)
    except ValueError as exc:
        raise ValueError(f"--trusted-proxy: {exc}") from None


def _address(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(value.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_address(value: str) -> bool:
    """Whether ``value`` is an IPv4 or IPv6 address (no port, no brackets)."""
    return _address(value) is not None


def is_trusted(peer: str, trusted: Sequence[Network]) -> bool:
    if not trusted:
        return False
    address = _address(peer)
    return address is not None and any(address in net for net in trusted)


def client_address(peer: str, forwarded_for: str | None, trusted: Sequence[Network]) -> str:
    """The browser's address: the peer, or the right-most X-Forwarded-For hop not ours.

    Walks X-Forwarded-For from the right only while each hop is a trusted proxy, so a client
    cannot choose its address by prepending entries.
    """
    current = peer
    if not forwarded_for or not is_trusted(peer, trusted):
        return _canonical(current)
    for hop in reversed([h for h in forwarded_for.split(",") if h.strip()]):
        if _address(hop) is None:
            break
        current = hop.strip()
        if not is_trusted(current, trusted):
            break
    return _canonical(current)


@_cached_if_short(maxsize=4096)
def _canonical(value: str) -> str:
    """Cached: parsing an address costs more than the rest of the lookup (pure, bounded)."""
    address = _address(value)
    return str(address) if address is not None else value


def effective_host(peer: str, host: str | None, forwarded_host: str | None, trusted: Sequence[Network]) -> str | None:
    """The Host the browser addressed: X-Forwarded-Host's first value from a trusted proxy, else Host."""
    if is_trusted(peer, trusted):
        return (forwarded_host or host or "").split(",")[0].strip() or None
    return host


def effective_origin(
    peer: str, scheme: str, host: str | None, headers: dict[str, str | None], trusted: Sequence[Network]
) -> str | None:
    """The request's own origin, honouring X-Forwarded-Proto/-Host from trusted proxies only."""
    if is_trusted(peer, trusted):
        scheme = (headers.get("X-Forwarded-Proto") or scheme).split(",")[0].strip().lower()
    return origin_of(scheme, effective_host(peer, host, headers.get("X-Forwarded-Host"), trusted))
