"""Session events: one JSON log line per open, refusal and close, and the same record for the broker.

The record is built from an allow-list of fields (session id, vm, user, client address, bytes,
duration, codes), never from the claims or the request as a whole, so the password, the token
and key material cannot reach a log line by accident.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from console_proxy.admission import Refusal
from console_proxy.relay import ConsoleSession

log = logging.getLogger("consolegate.proxy.session")
Forward = Callable[[dict[str, Any]], None]


class Events:
    """Logs each event as one JSON line and hands it to ``forward`` (the broker link), if any."""

    def __init__(self, forward: Forward | None = None) -> None:
        self.forward = forward

    def _emit(self, record: dict[str, Any], level: int = logging.INFO) -> None:
        record = {"at": round(time.time(), 3), **record}
        if log.isEnabledFor(level):
            log.log(level, json.dumps(record, sort_keys=True, separators=(",", ":")))
        if self.forward is not None:
            self.forward(record)

    @staticmethod
    def _who(session: ConsoleSession) -> dict[str, Any]:
        claims = session.claims
        return {
            "session_id": claims.sid,
            "vm": claims.target,
            "user": claims.user,
            "client": session.client_ip,
            "view_only": claims.view_only,
        }

    def _unheard(self, level: int = logging.INFO) -> bool:
        """Nobody takes the event (not logged at this level, no broker): spare building it."""
        return self.forward is None and not log.isEnabledFor(level)

    def opened(self, session: ConsoleSession) -> None:
        if self._unheard():
            return
        self._emit(
            {
                "event": "opened",
                **self._who(session),
                "security": session.security_type,
                "handshake_ms": round((session.handshake_seconds or 0) * 1000, 2),
            }
        )

    def closed(self, session: ConsoleSession) -> None:
        ending = session.ending
        assert ending is not None
        if self._unheard():
            return
        self._emit(
            {
                "event": "closed",
                **self._who(session),
                "bytes_up": session.bytes_up,
                "bytes_down": session.bytes_down,
                "duration_s": round(time.monotonic() - session.started, 3),
                "close_code": ending.code,
                "close_reason": ending.reason,
                "detail": ending.detail,
            }
        )

    def refused(self, refusal: Refusal, client_ip: str, path: str) -> None:
        claims = refusal.claims
        self._emit(
            {
                "event": "refused",
                "code": refusal.code,
                "reason": refusal.reason,
                "status": refusal.status,
                "client": client_ip,
                "path": path,
                "session_id": claims.sid if claims else None,
                "vm": claims.target if claims else None,
                "user": claims.user if claims else None,
            },
            logging.WARNING,
        )
