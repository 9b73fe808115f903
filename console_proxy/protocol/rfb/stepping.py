"""The loop both RFB handshakes share: feed bytes, run the state table, bound what piles up.

The handshakes differ only in their states and steps; how a step is picked, when the run stops
and where the pile-up cap is checked are one rule, kept here so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from console_proxy.protocol.buffer import Buffer
from console_proxy.protocol.rfb.errors import RfbError

__all__ = ["feed_bounded", "run_steps"]

HandshakeT = TypeVar("HandshakeT")
ActionT = TypeVar("ActionT")


def run_steps(
    handshake: HandshakeT,
    next_step: Callable[[], Callable[[HandshakeT], list[ActionT] | None] | None],
) -> list[ActionT]:
    """Step through states while enough bytes are buffered for the next one.

    ``next_step`` is asked again after every step because a step moves the state. The run ends
    at a state with no step (waiting on the caller, or done) or at a step that returns None
    (not all of its bytes arrived yet, nothing consumed).
    """
    actions: list[ActionT] = []
    while (step := next_step()) is not None:
        produced = step(handshake)
        if produced is None:
            return actions
        actions.extend(produced)
    return actions


def feed_bounded(buf: Buffer, data: bytes, run: Callable[[], list[ActionT]]) -> list[ActionT]:
    """Buffer ``data``, run the steps, then refuse a peer whose unconsumed bytes exceed the cap.

    The cap is checked after the run so that only what no step could consume counts against it.
    """
    buf.append(data)
    actions = run()
    if buf.exceeds_limit():
        raise RfbError.protocol("peer sent more data than the handshake allows")
    return actions
