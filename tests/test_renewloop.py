"""The one renewal loop (console_proxy.renewloop) that the proxy's certificate renewal and the
broker's ``serve --tls-auto`` both run: the schedule, the backoff, the early wake-ups.

The schedule and the backoff run on a fake clock whose sleeps pass at once (each one recorded);
the wake-ups run on the real :class:`Alarm`, with a renewal due in an hour, and are awaited as
events: a test that fails hangs until its guard, it never measures a time.
"""

from __future__ import annotations

import asyncio

import pytest

from console_proxy.renewloop import RETRY, Alarm, RenewLoop, next_pause, pauses, renew_at

GUARD = 30.0
"""How long a test waits for what must happen at once before it fails (not a time it asserts)."""
LIFETIME = 60.0
START = 1_000_000.0


class FakeTime(Alarm):
    """A clock and an alarm whose sleeps pass at once: each is recorded and moves the clock on."""

    def __init__(self) -> None:
        super().__init__()
        self.now = START
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)  # a real suspension point, as the real alarm has


class Certificate:
    """What a caller of the loop keeps: when its certificate was issued, and a renewal that fails
    as often as told before it succeeds (the old certificate kept meanwhile)."""

    def __init__(self, time: FakeTime, failures: list[int] | None = None, renewals: int = 1) -> None:
        self.time, self.issued = time, time.now
        self.failures = list(failures or [])  # failures before each successful renewal, in turn
        self.renewals = renewals  # the loop is stopped after this many
        self.tries: list[float] = []
        self.renewed: list[float] = []
        self.failed: list[tuple[str, float]] = []
        self.loop = RenewLoop(self.renew, self.due, self.on_failure, now=time.clock, alarm=time)

    def due(self) -> float:
        return renew_at(self.issued, self.issued + LIFETIME)

    async def renew(self) -> None:
        self.tries.append(self.time.now)
        if self.failures and self.failures[0] > 0:
            self.failures[0] -= 1
            raise OSError("the CA is unreachable")
        if self.failures:
            self.failures.pop(0)
        self.issued = self.time.now
        self.renewed.append(self.time.now)
        if len(self.renewed) == self.renewals:
            self.loop.stop()

    def on_failure(self, exc: Exception, pause: float) -> None:
        self.failed.append((str(exc), pause))


def run(loop: RenewLoop) -> None:
    asyncio.run(asyncio.wait_for(loop.run(), GUARD))


def test_renewal_comes_at_two_thirds_of_each_life() -> None:
    time = FakeTime()
    certificate = Certificate(time, renewals=3)
    run(certificate.loop)
    assert time.sleeps == [40.0, 40.0, 40.0]
    assert certificate.renewed == certificate.tries == [START + 40, START + 80, START + 120]
    assert certificate.failed == []


def test_a_renewal_already_due_comes_at_once() -> None:
    time = FakeTime()
    certificate = Certificate(time)
    certificate.issued = START - 3600  # expired an hour ago
    run(certificate.loop)
    assert time.sleeps == [0.0] and certificate.renewed == [START]


def test_failures_back_off_doubling_to_the_longest_and_a_success_starts_over() -> None:
    time = FakeTime()
    certificate = Certificate(time, failures=[8, 2], renewals=2)
    run(certificate.loop)
    first = [5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0]
    assert [pause for _, pause in certificate.failed] == [*first, 5.0, 10.0]  # each told its coming pause
    assert {message for message, _ in certificate.failed} == {"the CA is unreachable"}
    assert time.sleeps == [40.0, *first, 40.0, 5.0, 10.0]  # back on the schedule of the new certificate
    assert len(certificate.tries) == 12 and len(certificate.renewed) == 2


def test_the_backoff_follows_the_retry_given() -> None:
    time = FakeTime()
    certificate = Certificate(time, failures=[4])
    certificate.loop.retry = (1.0, 6.0)
    run(certificate.loop)
    assert [pause for _, pause in certificate.failed] == [1.0, 2.0, 4.0, 6.0]


def test_the_pauses_for_the_log_are_the_loops() -> None:
    assert RETRY == (5.0, 300.0)
    assert pauses(*RETRY) == [5, 10, 20, 40, 80, 160, 300]
    assert pauses(300, 300) == [300]
    assert next_pause(160, 300) == 300 and next_pause(300, 300) == 300


class WatchedAlarm(Alarm):
    """The real alarm, which says when the loop has gone to sleep in it."""

    def __init__(self) -> None:
        super().__init__()
        self.asleep = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        self.asleep.set()
        try:
            await super().sleep(seconds)
        finally:
            self.asleep.clear()


class Hour:
    """A renewal due in an hour on the real clock, run on a :class:`WatchedAlarm`."""

    def __init__(self, *, fail: bool = False, retry: tuple[float, float] = RETRY) -> None:
        self.alarm = WatchedAlarm()
        self.fail, self.tries = fail, 0
        self.tried = asyncio.Event()
        self.loop = RenewLoop(self.renew, self.due, lambda _exc, _pause: None, retry=retry, alarm=self.alarm)
        self.task = asyncio.get_running_loop().create_task(self.loop.run())

    def due(self) -> float:
        return self.loop.now() + 3600

    async def renew(self) -> None:
        self.tries += 1
        self.tried.set()
        await asyncio.sleep(0)  # yields, so a loop that wrongly renews again and again is seen, not hung
        if self.fail:
            raise OSError("refused")

    async def asleep(self) -> None:
        await asyncio.wait_for(self.alarm.asleep.wait(), GUARD)

    async def ended(self) -> None:
        await asyncio.wait_for(self.task, GUARD)


def test_stop_ends_the_sleep_at_once() -> None:
    async def scenario() -> int:
        hour = Hour()
        await hour.asleep()
        hour.loop.stop()
        await hour.ended()
        return hour.tries

    assert asyncio.run(scenario()) == 0  # stopped, not woken to renew


def test_wake_renews_now_then_sleeps_until_the_next_renewal_is_due() -> None:
    async def scenario() -> list[int]:
        hour = Hour()
        await hour.asleep()
        hour.loop.wake()
        await asyncio.wait_for(hour.tried.wait(), GUARD)
        await hour.asleep()  # the ring was used up: this sleep lasts until due
        tries = [hour.tries]
        await asyncio.sleep(0)
        tries.append(hour.tries)
        hour.loop.stop()
        await hour.ended()
        return tries

    assert asyncio.run(scenario()) == [1, 1]


def test_wake_during_a_backoff_pause_retries_now() -> None:
    async def scenario() -> int:
        hour = Hour(fail=True, retry=(3600.0, 3600.0))
        hour.loop.wake()  # before the first sleep: kept for it
        await asyncio.wait_for(hour.tried.wait(), GUARD)
        hour.tried.clear()
        await hour.asleep()  # the hour-long pause after the failure
        hour.loop.wake()
        await asyncio.wait_for(hour.tried.wait(), GUARD)
        hour.loop.stop()
        await hour.ended()
        return hour.tries

    assert asyncio.run(scenario()) == 2


def test_a_stop_while_renewing_ends_the_loop_instead_of_the_pause() -> None:
    """The proxy's case: a cancel lost while it renews (an HTTP call) must not leave the loop
    asleep for a whole pause (an hour here) while the proxy shuts down: the stop ends it."""

    async def scenario() -> int:
        hour = Hour(fail=True, retry=(3600.0, 3600.0))
        original = hour.renew

        async def renew_then_stop() -> None:
            hour.loop.stop()  # arrives while the loop is awake
            await original()

        hour.loop.renew = renew_then_stop
        hour.loop.wake()
        await hour.ended()
        return hour.tries

    assert asyncio.run(scenario()) == 1


def test_a_cancel_ends_the_sleeping_loop() -> None:
    """The broker's serve cancels the task at shutdown."""

    async def scenario() -> asyncio.Task[None]:
        hour = Hour()
        await hour.asleep()
        hour.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await hour.ended()
        return hour.task

    assert asyncio.run(scenario()).cancelled()
