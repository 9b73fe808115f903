"""What each hypervisor offered at its last handshake, so the next handshake can be pipelined.

An RFB handshake begins with two round trips whose answers a given server repeats every time:
its version line, then its list of security types. Knowing them from the last handshake with
the same ``host:port``, the proxy writes its version line and its security choice the moment the
connection is made (:meth:`console_proxy.protocol.rfb.UpstreamHandshake.opening`), and the
server finds them waiting: a console opens two hypervisor round trips sooner. The choice is made
under the session's own policy from the remembered types, and checked against what the server
then actually offers; a wrong guess costs one new connection (:class:`~console_proxy.protocol.rfb.Redial`).

A server that fails a pipelined handshake in any other way (it may read its input in lock-step
and drop what came early) is never pipelined again by this process: it is marked, not forgotten.
Only successful handshakes teach; nothing here is a secret (versions and type numbers).
The table is bounded (least recently taught first out) and lives as long as the process.
"""

from __future__ import annotations

from console_proxy.protocol.rfb import Offer

#: Targets remembered, at most (a few dozen bytes each).
LIMIT = 4096

#: What a pipelined handshake can come to (the metric's label).
OUTCOMES = ("guessed", "redialled", "refused")
#: A target marked as not to be pipelined.
_NEVER = None


class Offers:
    """``host:port`` -> the server's last :class:`Offer`, or marked never to be guessed."""

    def __init__(self, limit: int = LIMIT, *, enabled: bool = True) -> None:
        self.limit, self.enabled = limit, enabled
        self._seen: dict[tuple[str, int], Offer | None] = {}
        #: Handshakes by how their pipelining went: "guessed" (an opening was sent), "redialled"
        #: (the guess was wrong), "refused" (the server failed it and is not guessed again).
        self.outcomes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)

    def counted(self) -> dict[tuple[str, ...], float]:
        """The outcomes as the metrics render them."""
        return {(outcome,): float(count) for outcome, count in self.outcomes.items()}

    def __len__(self) -> int:
        return len(self._seen)

    def expected(self, host: str, port: int) -> Offer | None:
        """What to guess for this target: its last offer, if it may be pipelined."""
        return self._seen.get((host, port)) if self.enabled else None

    def learn(self, host: str, port: int, offer: Offer | None) -> None:
        """A handshake with this target succeeded, having seen ``offer`` (None: RFB 3.3)."""
        key = (host, port)
        if self.enabled and offer is not None and not (key in self._seen and self._seen[key] is _NEVER):
            self._put(key, offer)

    def forget(self, host: str, port: int) -> None:
        """The guess was wrong (the server changed): learn it again from the next handshake."""
        if self._seen.get((host, port), _NEVER) is not _NEVER:
            del self._seen[(host, port)]

    def never(self, host: str, port: int) -> None:
        """A pipelined handshake with this target failed: never pipeline it again."""
        self._put((host, port), _NEVER)

    def _put(self, key: tuple[str, int], value: Offer | None) -> None:
        """Store ``value`` as the newest entry, dropping the oldest beyond :attr:`limit`."""
        self._seen.pop(key, None)  # re-inserted last: the newest are kept
        self._seen[key] = value
        if len(self._seen) > self.limit:
            del self._seen[next(iter(self._seen))]
