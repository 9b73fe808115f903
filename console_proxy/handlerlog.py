"""How the proxy's handlers name a request in Tornado's own error lines: by path only.

Tornado's default names the request with its query string, and ``?token=`` is a valid way to
pass a token, so a failing request would put the token in the log.
"""

from __future__ import annotations

import logging
from types import TracebackType

import tornado.web
from tornado.httputil import HTTPServerRequest

log = logging.getLogger("consolegate.proxy")


class PathOnlyLogging:
    """Mixin for RequestHandlers: log the path only, and never the request object."""

    request: HTTPServerRequest

    def _request_summary(self) -> str:
        """Overrides Tornado's private method of this name (:data:`tornado_compat.REQUEST_SUMMARY`,
        which the compatibility test pins): Tornado's names the request by its whole URI."""
        return f"{self.request.method} {self.request.path} ({self.request.remote_ip})"

    def log_exception(
        self, typ: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        if isinstance(value, tornado.web.HTTPError):
            log.warning("%d %s", value.status_code, self._request_summary())
        elif typ is not None and value is not None:
            log.error("uncaught exception in %s", self._request_summary(), exc_info=(typ, value, tb))
        else:  # Tornado always passes sys.exc_info() of a live exception; nothing to attach otherwise
            log.error("uncaught exception in %s", self._request_summary())


_access = logging.getLogger("tornado.access")


def access_log(status: int, method: str, path: str, peer: str, seconds: float) -> None:
    """One access line, without the query string: ``?token=`` must never reach a log line."""
    _access.info("%d %s %s (%s) %.1fms", status, method, path, peer, 1000.0 * seconds)
