"""Tornado's private attributes that console_proxy.tornado_compat relies on, pinned on real objects.

A Tornado upgrade that renames one, changes its type or stops calling it fails here with a
message naming the attribute, instead of a console open (or a log line with a token) failing
somewhere else. See ``console_proxy/tornado_compat.py`` before raising Tornado's bound in
``setup.cfg``.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
import tornado
import tornado.web
from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine
from tornado.iostream import IOStream

from console_proxy import tornado_compat
from console_proxy.handlerlog import PathOnlyLogging

UPGRADE = (
    f"Tornado {tornado.version} changed an internal that console_proxy/tornado_compat.py relies "
    f"on (checked against {tornado_compat.CHECKED_AGAINST})"
)


def _private(obj: object, name: str, expected: type) -> object:
    assert hasattr(obj, name), f"{UPGRADE}: {type(obj).__name__}.{name} is gone"
    value = getattr(obj, name)
    assert isinstance(value, expected), (
        f"{UPGRADE}: {type(obj).__name__}.{name} is a {type(value).__name__}, not a {expected.__name__}"
    )
    return value


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    yield ours, theirs
    ours.close()
    theirs.close()


def test_the_installed_tornado_is_within_the_checked_bound() -> None:
    assert tornado.version_info[:2] >= (6, 3), f"Tornado {tornado.version} is older than setup.cfg allows"
    assert tornado.version_info[:2] < (6, 7), f"{UPGRADE}: re-check tornado_compat, then raise the bound"


def test_iostream_read_buffer_is_a_bytearray_with_a_size(pair: tuple[socket.socket, socket.socket]) -> None:
    async def scenario() -> None:
        stream = IOStream(pair[0])
        try:
            _private(stream, tornado_compat.READ_BUFFER, bytearray)
            _private(stream, tornado_compat.READ_BUFFER_SIZE, int)
            assert not hasattr(stream, "_read_buffer_pos"), f"{UPGRADE}: IOStream has a _read_buffer_pos again"
        finally:
            stream.close()

    asyncio.run(scenario())


def test_preloaded_bytes_are_read_first_then_the_sockets(pair: tuple[socket.socket, socket.socket]) -> None:
    """What the front door does: bytes put in the buffer come out of Tornado's reads, in order."""

    async def scenario() -> bytes:
        stream = IOStream(pair[0])
        try:
            tornado_compat.preload_read_buffer(stream, b"GET / HTTP/1.1\r\n")
            pair[1].sendall(b"Host: x\r\n\r\n")
            return await asyncio.wait_for(stream.read_until(b"\r\n\r\n"), 10)
        finally:
            stream.close()

    assert asyncio.run(scenario()) == b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", (
        f"{UPGRADE}: bytes put in IOStream._read_buffer are not what Tornado reads first"
    )


def _handler(cls: type[tornado.web.RequestHandler]) -> tornado.web.RequestHandler:
    request = HTTPServerRequest(
        start_line=RequestStartLine("GET", "/path?token=secret", "HTTP/1.1"),
        headers=HTTPHeaders({"Host": "127.0.0.1"}),
        connection=mock.Mock(),
    )
    return cls(tornado.web.Application(), request)


def test_request_handler_reason_is_the_phrase_set_status_chose() -> None:
    handler = _handler(tornado.web.RequestHandler)
    handler.set_status(404)
    assert _private(handler, tornado_compat.REASON, str) == "Not Found"
    handler.set_status(418, "a teapot")
    assert tornado_compat.response_reason(handler) == "a teapot", (
        f"{UPGRADE}: RequestHandler._reason is not the reason set_status was given"
    )


def test_request_summary_is_still_what_tornado_logs_a_request_by() -> None:
    """PathOnlyLogging overrides it; a rename would put ``?token=`` back in Tornado's log lines."""
    name = tornado_compat.REQUEST_SUMMARY
    assert callable(getattr(tornado.web.RequestHandler, name, None)), f"{UPGRADE}: RequestHandler.{name} is gone"
    for caller in (tornado.web.RequestHandler.log_exception, tornado.web.Application.log_request):
        assert f".{name}()" in inspect.getsource(caller), f"{UPGRADE}: {caller.__qualname__} no longer calls {name}"

    class Handler(PathOnlyLogging, tornado.web.RequestHandler):
        pass

    summary = getattr(_handler(Handler), name)()
    assert "/path" in summary
    assert "secret" not in summary


def test_no_module_but_tornado_compat_reads_these_internals() -> None:
    """The wall holds: a new use of one of these internals goes through tornado_compat."""
    repo = Path(__file__).resolve().parent.parent
    names = (tornado_compat.READ_BUFFER, tornado_compat.READ_BUFFER_SIZE, tornado_compat.REASON, "_read_buffer_pos")
    alternatives = "|".join(names)
    pattern = re.compile(rf"\.({alternatives})\b|\"({alternatives})\"")
    offenders = [
        f"{path.relative_to(repo)}:{number}"
        for package in ("console_proxy", "broker")
        for path in sorted((repo / package).rglob("*.py"))
        if path.name != "tornado_compat.py"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, f"Tornado internals read outside console_proxy/tornado_compat.py: {offenders}"
