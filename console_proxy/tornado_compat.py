"""Every use of Tornado's private attributes, each behind one small named function.

Tornado has no public way to do these few things, and its private names change without notice
(6.3 removed ``IOStream._read_buffer_pos``, which code like this once read). So they live here
only, each checked against the Tornado version named in its docstring, and
``tests/test_tornado_compat.py`` asserts on real Tornado objects that every one still exists with
the type this module expects: a Tornado upgrade that changes one fails that test by name, not a
console open somewhere else. ``setup.cfg`` bounds Tornado to the versions checked here
(``<6.7``); raise the bound only once that test passes on the new version.
"""

from __future__ import annotations

import tornado.web
from tornado.iostream import BaseIOStream

CHECKED_AGAINST = "6.6.1"
"""The Tornado version every function below was read against (its source, and the tests)."""

READ_BUFFER = "_read_buffer"
"""``BaseIOStream._read_buffer``: a ``bytearray`` of what was read from the socket and not yet
consumed (since 6.3 consumed bytes are deleted from its front; there is no start offset)."""

READ_BUFFER_SIZE = "_read_buffer_size"
"""``BaseIOStream._read_buffer_size``: an ``int``, how many bytes of ``_read_buffer`` are held."""

REASON = "_reason"
"""``RequestHandler._reason``: a ``str``, the reason phrase ``set_status`` / ``send_error`` chose."""

REQUEST_SUMMARY = "_request_summary"
"""``RequestHandler._request_summary()``: how Tornado names a request in its own log lines.

:class:`console_proxy.handlerlog.PathOnlyLogging` overrides this private method (it must keep
this name to override it) so that no Tornado log line carries the query string (a ``?token=``);
if Tornado renamed it the override would silently stop applying. Checked against Tornado 6.6.1:
``RequestHandler.log_exception`` and ``Application.log_request`` call it."""


def preload_read_buffer(stream: BaseIOStream, data: bytes) -> None:
    """Put ``data`` in ``stream``'s read buffer as if Tornado had read it from the socket.

    Needed by the front door, which reads the first bytes of a connection itself and then hands
    it to Tornado's HTTP server: the bytes must come first, and go where Tornado applies its own
    limits to all of them at once (serving them through ``read_from_fd`` would hand over one read
    chunk and strand the rest until the socket next became readable). Checked against Tornado
    6.6.1: appending to ``_read_buffer`` and setting ``_read_buffer_size`` to its length is what
    ``_read_to_buffer`` does after a socket read.
    """
    buffer: bytearray = getattr(stream, READ_BUFFER)
    buffer += data
    setattr(stream, READ_BUFFER_SIZE, len(buffer))


def response_reason(handler: tornado.web.RequestHandler) -> str:
    """The reason phrase of the response ``handler`` is writing (``"Not Found"``, or the one given).

    Needed by the JSON error bodies (proxy and broker), whose ``message`` is that phrase for a
    plain HTTP error: Tornado keeps it only in a private attribute (``get_status`` has no
    counterpart for the reason). Checked against Tornado 6.6.1: ``_reason`` is a ``str``, set by
    ``set_status``.
    """
    reason: str = getattr(handler, REASON)
    return reason
