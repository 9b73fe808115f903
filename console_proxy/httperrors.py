"""Errors as JSON, and no 500 for a request whose input slipped past the checks.

Every refusal the proxy writes itself is ``{"error": CODE, "message": TEXT}``
(:meth:`console_proxy.admission.Refusal.body`); :class:`JsonErrors` gives the errors Tornado
raises (an unknown path, a static file that is not there, a method not allowed) the same shape
instead of an HTML page.

Input is checked where it enters (strict JSON, schemas, static paths), so no request should
reach code that raises on it. Should one still, the exception is one of :data:`INPUT_ERRORS`,
and the answer is a 400 — the request is what is wrong — while the exception is still logged
with its traceback, as a bug in those checks (the tests fail on any such line).
"""

from __future__ import annotations

import json
from typing import Any

import tornado.web

from console_proxy import tornado_compat
from console_proxy.handlerlog import PathOnlyLogging

INPUT_ERRORS: tuple[type[BaseException], ...] = (UnicodeError, ValueError, OverflowError, RecursionError)
"""What a value from a request raises in code that did not expect it: a lone surrogate
(``UnicodeEncodeError``), a NUL in a path (``ValueError: embedded null byte``), a number too
large for a float (``OverflowError``), nesting too deep (``RecursionError``)."""

ERROR_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    500: "internal_error",
    503: "unavailable",
}


def error_status(status_code: int, error: BaseException | None) -> int:
    """The status to answer: 400 for an input error that escaped as a 500, else ``status_code``."""
    return 400 if status_code >= 500 and isinstance(error, INPUT_ERRORS) else status_code


def error_body(status_code: int, error: BaseException | None, reason: str) -> dict[str, str]:
    """``{"error": CODE, "message": TEXT}``; the message never quotes the request back."""
    if isinstance(error, tornado.web.HTTPError) and error.log_message and not error.args:
        message = error.log_message
    elif isinstance(error, INPUT_ERRORS) and status_code == 400:
        message = "the request holds a value the server cannot handle"
    elif status_code >= 500:
        message = "the server failed to answer; see its log"
    else:
        message = reason
    return {"error": ERROR_CODES.get(status_code, "error"), "message": message}


class JsonErrors(tornado.web.RequestHandler):
    """Mixin (first in the bases) for the proxy's handlers: Tornado's errors as JSON."""

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None, None))[1]
        status = error_status(status_code, error)
        if status != status_code:
            self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.finish(json.dumps(error_body(status, error, tornado_compat.response_reason(self))))


class NotFound(JsonErrors, PathOnlyLogging, tornado.web.RequestHandler):
    """The proxy's answer for a path it does not serve: 404 as JSON (Tornado's is HTML)."""

    def prepare(self) -> None:
        raise tornado.web.HTTPError(404, "no such endpoint")
