"""Why an RFB exchange was abandoned, and how peer-supplied text is made safe to show."""

from __future__ import annotations

from console_proxy.codes import Close

__all__ = ["AUTH_FAILED", "PROTOCOL_ERROR", "TEXT_KEEP", "RfbError", "printable"]

#: Longest failure reason or desktop name we keep; the rest is dropped unread or uncounted.
TEXT_KEEP = 1024

AUTH_FAILED = Close.TARGET_AUTH_FAILED.reason
PROTOCOL_ERROR = Close.TARGET_PROTOCOL_ERROR.reason
_CLOSE_CODES = {close.reason: close for close in (Close.TARGET_AUTH_FAILED, Close.TARGET_PROTOCOL_ERROR)}


class RfbError(Exception):
    """Why a handshake or message stream was abandoned, as a public code and close code.

    ``code`` is ``target_auth_failed`` (websocket close 4501: the target refused us, or we
    refused what it offered) or ``target_protocol_error`` (4502: the peer broke the protocol).
    ``str(e)`` is safe to log and to show: it never contains the VNC password, and any text the
    server supplied is cut to 1 KiB and reduced to printable characters.
    """

    def __init__(self, code: str, message: str) -> None:
        if code not in _CLOSE_CODES:
            raise ValueError(f"unknown RFB error code {code!r}")
        super().__init__(message)
        self.code = code
        self.close_code: Close = _CLOSE_CODES[code]

    @classmethod
    def auth_failed(cls, message: str) -> RfbError:
        """The target refused to let us in, or offered nothing our policy accepts."""
        return cls(AUTH_FAILED, message)

    @classmethod
    def protocol(cls, message: str) -> RfbError:
        """The peer sent something RFB does not allow (or that we refuse to parse)."""
        return cls(PROTOCOL_ERROR, message)


def printable(raw: bytes) -> str:
    """Peer-supplied text made safe for logs and close reasons: 1 KiB, printable only."""
    text = raw[:TEXT_KEEP].decode("utf-8", "replace")
    return "".join(ch if ch.isprintable() else "?" for ch in text)
