"""The one receive buffer of the sans-I/O parsers (console_proxy.protocol.buffer).

Why this matters: every incremental parser relies on "not all arrived yet" consuming nothing,
and on the cap being checked against what is actually held.
"""

from __future__ import annotations

from console_proxy.protocol.buffer import Buffer


def test_take_and_peek_wait_for_all_bytes_and_consume_nothing_until_then() -> None:
    buf = Buffer()
    buf.append(b"abc")
    assert buf.take(4) is None and buf.peek(4) is None
    assert bytes(buf) == b"abc"
    buf.append(b"de")
    assert buf.peek(4) == b"abcd" and len(buf) == 5
    assert buf.take(4) == b"abcd"
    assert bytes(buf) == b"e"


def test_skip_drops_at_most_what_is_held() -> None:
    buf = Buffer()
    buf.append(b"12345")
    assert buf.skip(3) == 3 and bytes(buf) == b"45"
    assert buf.skip(10) == 2 and len(buf) == 0


def test_take_all_empties_it() -> None:
    buf = Buffer()
    buf.append(b"rest")
    assert buf.take_all() == b"rest"
    assert buf.take_all() == b"" and len(buf) == 0


def test_the_cap_counts_bytes_held_not_bytes_ever_received() -> None:
    capped = Buffer(4)
    capped.append(b"1234")
    assert not capped.exceeds_limit()
    capped.append(b"5")
    assert capped.exceeds_limit()
    capped.take(2)
    assert not capped.exceeds_limit()
    uncapped = Buffer()
    uncapped.append(b"x" * 100_000)
    assert not uncapped.exceeds_limit()
