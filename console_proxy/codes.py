"""Websocket close codes: each code with its wire name and its public message, in one place.

Modelled on wsproto's ``CloseReason``: an ``IntEnum``, so a member is its number on the wire
(``struct.pack``, JSON, ``%d`` and comparisons with plain ints all see ``4501``), and it owns
what goes with that number — :attr:`Close.reason`, the stable public code the proxy sends as
the close reason and records (``target_auth_failed``), and :attr:`Close.message`, the sentence a
user reads, which the viewer shows from ``static/messages.js`` (``CLOSES``; a test keeps the two
equal). Pure: no I/O, imported by the sans-I/O cores (``rfb``, ``wsframes``) and the shells alike.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Self


class Close(IntEnum):
    """A websocket close code the proxy sends, or reports for a connection (RFC 6455 7.4)."""

    reason: str
    message: str

    # The defaults are for the type checker only: once the class is built, Enum replaces
    # ``__new__`` with the lookup by value, so ``Close(4501)`` is the member (ValueError if none).
    def __new__(cls, code: int, reason: str = "", message: str = "") -> Self:
        member = int.__new__(cls, code)
        member._value_ = code
        member.reason = reason
        member.message = message
        return member

    # RFC 6455's codes the proxy sends
    NORMAL = 1000, "normal", "The virtual machine closed the console connection."
    GOING_AWAY = 1001, "going_away", "The console service is shutting down. Open the console again to reconnect."
    PROTOCOL_ERROR = 1002, "protocol_error", "The console connection received malformed data and was closed."
    UNSUPPORTED_DATA = 1003, "unsupported_data", "The console connection received data it cannot use and was closed."
    INVALID_DATA = 1007, "invalid_data", "The console connection received text that was not valid and was closed."
    MESSAGE_TOO_BIG = (
        1009,
        "message_too_big",
        "The console connection received a message that was too large and was closed.",
    )

    # RFC 6455's codes that are only reported, never sent in a Close frame (no public message:
    # the viewer never receives them from the proxy; 1006 it works out with /token-status)
    NO_STATUS = 1005, "no_status", ""
    ABNORMAL = 1006, "abnormal_closure", ""
    TLS_HANDSHAKE = 1015, "tls_handshake", ""

    # The proxy's own codes (DESIGN: after the upgrade)
    IDLE_TIMEOUT = 4408, "idle_timeout", "The console was closed because it was idle for too long."
    SESSION_ENDED = 4410, "session_ended", "This console session was ended by an administrator."
    TARGET_UNREACHABLE = (
        4500,
        "target_unreachable",
        ("The virtual machine's console cannot be reached right now. The VM may be off or moving; try again later."),
    )
    TARGET_AUTH_FAILED = 4501, "target_auth_failed", "The virtual machine refused the console service's credentials."
    TARGET_PROTOCOL_ERROR = (
        4502,
        "target_protocol_error",
        ("The virtual machine's console answered in a way the console service does not understand."),
    )


REPORT_ONLY = frozenset((Close.NO_STATUS, Close.ABNORMAL, Close.TLS_HANDSHAKE))
"""Codes that only report what happened and are never sent in a Close frame (RFC 6455 7.4.1)."""


class Refused(StrEnum):
    """A refusal before the upgrade (and /token-status's verdict): the ``error`` code of the JSON
    answer, owning its HTTP status and the message the answer carries (the viewer shows its own
    words for each, ``REFUSALS`` in static/messages.js). The token's codes are here too:
    :class:`console_proxy.token.Reason` maps each precise reason to one of them."""

    status: int
    message: str

    # As for Close: the defaults only let the type checker accept ``Refused("token_invalid")``.
    def __new__(cls, code: str, status: int = 0, message: str = "") -> Self:
        member = str.__new__(cls, code)
        member._value_ = code
        member.status = status
        member.message = message
        return member

    TOKEN_MISSING = "token_missing", 400, "No console token was given."
    TOKEN_INVALID = "token_invalid", 401, "This console link is not valid."
    TOKEN_EXPIRED = "token_expired", 401, "This console link has expired; ask for a new one."
    TOKEN_NOT_YET_VALID = (
        "token_not_yet_valid",
        401,
        "This console link is not valid yet; check the clock or ask for a new one.",
    )
    CLIENT_IP_MISMATCH = "client_ip_mismatch", 403, "This console link was issued for another network address."
    ORIGIN_DENIED = "origin_denied", 403, "This console was opened from a page that is not allowed to use it."
    OVER_CAPACITY = "over_capacity", 503, "This console proxy is full; try again in a moment."
    DRAINING = "draining", 503, "This console proxy is shutting down; open the console again."
    BROKER_UNAVAILABLE = "broker_unavailable", 503, "Single-use links cannot be checked right now; try again shortly."
    TOKEN_USED = "token_used", 409, "This console link has already been used; ask for a new one."
    SESSION_REVOKED = "session_revoked", 410, "This console session was ended by an administrator."
    WEBSOCKET_REQUIRED = "websocket_required", 400, "This address takes a websocket connection from the console page."
    WEBSOCKET_VERSION = "websocket_version", 426, "This console proxy speaks websocket version 13 only."
