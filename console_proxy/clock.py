"""The one place the proxy reads wall-clock time.

Cores take ``now`` as an argument; shells call :func:`now`. Tests move time with freezegun,
which patches ``time.time`` — so this must stay a call, never a cached value.
"""

from __future__ import annotations

import time


def now() -> float:
    """Seconds since the epoch."""
    return time.time()
