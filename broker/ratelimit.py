"""Failed authentication, throttled per client address: a token bucket per (kind, address).

API keys and proxy secrets are 256-bit random values, so guessing one is hopeless; what this
bounds is the cost of trying (an HMAC and a database read per attempt) and the noise in the
logs, and it makes a guessing client visible (one ``auth_throttled`` audit event per episode).

The rules, in the order the API applies them:

* The bucket is consulted *before* the credential is examined: a throttled address is answered
  429 even when it presents a correct key, so a guesser learns nothing while throttled. Another
  address, or the other kind of credential from the same address, is unaffected.
* Each failed authentication takes one token; a bucket holds ``burst`` tokens and gains one
  every ``refill`` seconds. A success neither takes nor returns one (it does not reset the count:
  an attacker holding one valid key could otherwise guess others at full speed).
* An address is its IPv4 address, or its IPv6 /64 (one host usually holds a whole /64).
* Memory is bounded: at most ``max_entries`` buckets, the least recently failed evicted first
  (a bucket untouched the longest is also the fullest, refilling since).

Sans-I/O: every call takes ``now`` (seconds, any monotonic origin); the shell passes its clock and
does the answering, auditing and counting.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from dataclasses import dataclass

KINDS = ("apikey", "proxy")
"""Credential kinds with separate buckets: the admin/issuer API keys and the proxies' secrets."""
DEFAULT_BURST = 10
DEFAULT_REFILL = 6.0
MAX_ENTRIES = 10_000
IPV6_PREFIX = 64


def client_key(address: str) -> str:
    """The bucket's address: IPv4 as is (also when IPv4-mapped), IPv6 as its /64, else the text."""
    try:
        parsed = ipaddress.ip_address(address.strip())
    except ValueError:
        return address  # not an address (a Unix socket): one bucket per text, still bounded
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{parsed}/{IPV6_PREFIX}", strict=False))
    return str(parsed)


@dataclass
class _Bucket:
    tokens: float
    updated: float
    episode: bool = False
    """A 429 was answered since the bucket was last full: the episode's audit event is written."""


@dataclass(frozen=True)
class Verdict:
    """Throttled or not; ``retry_after`` whole seconds until one attempt is allowed again;
    ``first`` when this is the episode's first refusal (the one to audit)."""

    throttled: bool
    retry_after: int = 0
    first: bool = False


ALLOWED = Verdict(False)


class AuthThrottle:
    """Token buckets for failed authentication, keyed by credential kind and client address."""

    def __init__(
        self, burst: int = DEFAULT_BURST, refill: float = DEFAULT_REFILL, max_entries: int = MAX_ENTRIES
    ) -> None:
        if burst < 1 or not refill > 0 or math.isinf(refill) or max_entries < 1:
            raise ValueError("the burst must be at least 1 and the refill a positive number of seconds")
        self.burst, self.refill, self.max_entries = burst, refill, max_entries
        self._buckets: OrderedDict[tuple[str, str], _Bucket] = OrderedDict()

    def entries(self) -> int:
        """Buckets held (at most ``max_entries``)."""
        return len(self._buckets)

    def check(self, kind: str, address: str, now: float) -> Verdict:
        """Before the credential is looked at: may this address try one now?"""
        key = (kind, client_key(address))
        bucket = self._buckets.get(key)
        if bucket is None:
            return ALLOWED
        self._refill(bucket, now)
        if bucket.tokens >= 1:
            return ALLOWED
        first, bucket.episode = not bucket.episode, True
        return Verdict(True, max(1, math.ceil((1 - bucket.tokens) * self.refill)), first)

    def failed(self, kind: str, address: str, now: float) -> None:
        """A credential from this address was wrong: take one token (the bucket is made full)."""
        key = (kind, client_key(address))
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
            self._evict()
        else:
            self._refill(bucket, now)
            self._buckets.move_to_end(key)
        bucket.tokens = max(0.0, bucket.tokens - 1)

    def _refill(self, bucket: _Bucket, now: float) -> None:
        elapsed = max(0.0, now - bucket.updated)  # a clock going back never drains a bucket
        bucket.tokens = min(float(self.burst), bucket.tokens + elapsed / self.refill)
        bucket.updated = max(bucket.updated, now)
        if bucket.tokens >= self.burst:
            bucket.episode = False

    def _evict(self) -> None:
        while len(self._buckets) > self.max_entries:
            self._buckets.popitem(last=False)
