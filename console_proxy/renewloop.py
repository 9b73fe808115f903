"""The one loop that keeps a certificate renewed: the proxy's own (:mod:`console_proxy.renewal`)
and the broker's HTTPS one (``broker.tlsauto``, ``serve --tls-auto``).

The schedule: renew at two thirds of the life (:func:`renew_at`); a failure keeps the current
certificate in service (the caller's ``renew`` raises and changes nothing) and is retried after a
pause doubling from :data:`RETRY` [0] to [1] seconds; a success goes back to the schedule. The
caller logs, the loop only calls it back with the exception and the coming pause.

Every sleep is an :class:`Alarm`: :meth:`RenewLoop.wake` (renew now: an operator's signal, a test)
and :meth:`RenewLoop.stop` (shutdown) end it at once. Stopping is a flag as well as a ring, not
only ``task.cancel()``: a cancel can be lost (Python 3.11's ``asyncio.wait_for`` swallows one that
comes as the wait it guards ends, and a renewal awaits library code), and a loop that lost it
would go back to sleep for a whole pause while its process shuts down. A ring that comes while the
loop is awake is kept for its next sleep, and the flag is read after every step, so the loop ends
whichever step the stop came in. The sleep itself is ``asyncio.timeout``, which loses no cancel.

No I/O, and the clock is injected: tests run the schedule with a fake clock and a fake alarm.
Never imports ``broker`` (the broker takes this from here).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from console_proxy import clock

RETRY = (5.0, 300.0)
"""First and longest pause between failed renewals (doubling in between)."""
RENEW_AT = 2 / 3
"""Share of a certificate's life after which it is renewed."""


def renew_at(not_before: float, not_after: float) -> float:
    """When a certificate valid from ``not_before`` to ``not_after`` is renewed."""
    return not_before + RENEW_AT * (not_after - not_before)


def next_pause(pause: float, longest: float) -> float:
    """The pause after a failed try that followed ``pause``: twice it, at most ``longest``."""
    return min(pause * 2, longest)


def pauses(first: float, longest: float) -> list[float]:
    """The pauses between failed tries from ``first`` until they stay at ``longest`` (for logs)."""
    schedule = [first]
    while schedule[-1] < longest:
        schedule.append(next_pause(schedule[-1], longest))
    return schedule


class Alarm:
    """A sleep that :meth:`ring` ends early; a ring while nobody sleeps ends the next sleep at once."""

    def __init__(self) -> None:
        self._rung = asyncio.Event()

    def ring(self) -> None:
        self._rung.set()

    async def sleep(self, seconds: float) -> None:
        """Return after ``seconds``, or as soon as rung (then the ring is used up)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._rung.wait()
        self._rung.clear()


class RenewLoop:
    """Calls ``renew`` when ``due()`` (a wall-clock time) comes, and again, backing off, until it
    succeeds; ``failed(exc, pause)`` hears of each failure and the pause before the next try."""

    def __init__(
        self,
        renew: Callable[[], Awaitable[object]],
        due: Callable[[], float],
        failed: Callable[[Exception, float], None],
        *,
        retry: tuple[float, float] = RETRY,
        now: Callable[[], float] = clock.now,
        alarm: Alarm | None = None,
    ) -> None:
        self.renew, self.due, self.failed, self.retry, self.now = renew, due, failed, retry, now
        self.alarm = alarm or Alarm()
        self.stopping = False

    def wake(self) -> None:
        """Renew now rather than when due (or retry now rather than after the pause)."""
        self.alarm.ring()

    def stop(self) -> None:
        """End :meth:`run` at its next step, ending its sleep if it sleeps."""
        self.stopping = True
        self.alarm.ring()

    async def run(self) -> None:
        """Until stopped (or cancelled): sleep until due, then renew, retrying until it succeeds."""
        while not self.stopping:
            await self.alarm.sleep(max(0.0, self.due() - self.now()))
            await self._until_renewed()

    async def _until_renewed(self) -> None:
        pause = self.retry[0]
        while not self.stopping:
            try:
                await self.renew()
                return
            except Exception as exc:  # the loop must outlive any failure: the old certificate serves
                self.failed(exc, pause)
            await self.alarm.sleep(pause)
            pause = next_pause(pause, self.retry[1])
