"""One guard on every log line the serve commands write: no header value, query, body or secret.

Our own code logs paths, never values; Tornado and asyncio do not. Tornado logs a header value it
cannot parse with ``%r`` ("Malformed HTTP message from 10.0.0.9: Invalid header value 'Bearer
cgk.…\\r'"), names requests by their URI (with ``?token=``), puts the whole request (headers
included) in its uncaught-exception line, and exception texts carry the same values into
tracebacks. So ``setup`` puts one formatter on the root handler that every record goes through
(``tornado.*``, ``asyncio``, ``consolegate.*``, warnings and uncaught exceptions alike):

* Tornado's known messages are rewritten (:data:`_REWRITES`): the peer stays, the offending value
  goes; a malformed request is named by one of Tornado's fixed reasons or a fixed fallback.
* Arguments that are requests, headers or bytes are summarised before formatting.
* The formatted text, the traceback and the stack are sanitised by :func:`sanitise`: control
  characters escaped, credentials after ``Bearer``/``Basic``, ``cgk.`` keys, credential headers,
  query strings and ``name=value`` secrets redacted, and token-shaped runs (long, mixed-class
  base64url, alone or as a segment of a dotted token) replaced.
* Fail closed: a record that cannot be formatted or sanitised becomes a fixed line, and a handler
  error never prints the record (the logging module's default does, message and arguments).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TextIO

from tornado.httputil import HTTPHeaders, HTTPServerRequest

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
#: ``--log-format``: text lines (FORMAT), or one JSON object per line (:class:`JsonGuardedFormatter`).
FORMATS = ("text", "json")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
REDACTED = "[redacted]"
#: Longest message and traceback kept; a longer one is cut (after redaction) so one request
#: cannot flood the log.
MAX_MESSAGE = 4096
MAX_TRACEBACK = 16384
#: What stands for a record that could not be made safe.
WITHHELD = "a log record was withheld: it could not be made safe to write"

log = logging.getLogger("consolegate.logguard")

# --- the pure sanitiser -----------------------------------------------------------------------

_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
#: Tornado's fixed reasons for a malformed message; the value it appends after one is dropped.
TORNADO_REASONS = (
    "Invalid header name",
    "Invalid header value",
    "header line cannot start with whitespace",
    "no colon in header line",
    "Missing Host header",
    "Invalid Host header",
    "Multiple host headers not allowed",
    "Invalid query string",
    "Unsupported Content-Encoding",
    "Invalid x-www-form-urlencoded body",
    "Invalid content type",
    "multipart boundary not found",
    "Invalid multipart/form-data",
    "multipart/form-data has too many parts",
    "multipart/form-data missing headers",
    "multipart/form-data part header too large",
    "multipart/form-data missing name",
    "multipart/form-data parsing is disabled",
    "Malformed HTTP request line",
    "Malformed HTTP headers",
    "Malformed HTTP version",
    "Unexpected HTTP version",
    "Multiple unequal Content-Lengths",
    "Only integer Content-Length is allowed",
    "Content-Length too long",
    "invalid chunk size",
    "improperly terminated chunked request",
    "chunked body too large",
    "improperly terminated chunk",
    "Body too long",
    "invalid gzip data",
    "decompressed body too large",
    "Message with both Transfer-Encoding and Content-Length",
    "Unsupported Transfer-Encoding",
)
UNKNOWN_REASON = "unreadable request (details withheld)"
#: The reasons Tornado follows with the value it refused (in messages and exception texts).
VALUED_REASONS = (
    "Invalid header name",
    "Invalid header value",
    "Invalid Host header",
    "Multiple host headers not allowed",
    "Invalid query string",
    "Unsupported Content-Encoding",
    "Invalid x-www-form-urlencoded body",
    "Invalid multipart/form-data",
    "Malformed HTTP headers",
    "Malformed HTTP version",
    "Unexpected HTTP version",
    "Multiple unequal Content-Lengths",
    "Only integer Content-Length is allowed",
    "invalid gzip data",
    "Unsupported Transfer-Encoding",
    "Invalid cookie signature",
    "Expired cookie",
    "Tampered cookie",
    "possible tampering",
)
_VALUE_AFTER_REASON = re.compile("(" + "|".join(re.escape(r) for r in VALUED_REASONS) + r")[^\n]+")
_CREDENTIAL_HEADER = re.compile(
    r"""(?i)(["']?)\b(authorization|proxy-authorization|cookie|set-cookie|sec-websocket-protocol|sec-websocket-key|"""
    r"""x-api-key|x-auth-token)\1\s*[:=]\s*("[^"\n]*"?|'[^'\n]*'?|[^\n]*)"""
)
_AUTH_SCHEME = re.compile(r"(?i)\b(bearer|basic|digest|negotiate)(?:\s|\\t|\\x09)+\S+")
_API_KEY = re.compile(r"\bcgk\.\S+")
_JOIN_TOKEN = re.compile(r"\bcgj1\.\S+")
_ASSIGNED = re.compile(
    r"(?i)\b(token|access_token|api_?key|key|secret|password|passwd|pw|credential|auth|"
    r"authorization|sig|signature)=[^\s&'\"<>]*"
)
_KEYED = re.compile(
    r"""(?i)(["'])(token|access_token|api_?key|key|secret|password|passwd|pw|credential|"""
    r"""authorization|cookie)\1(\s*:\s*)(["'])(?:\\.|(?!\4)[^\\])*\4?"""
)
_QUERY = re.compile(r"(?<=[\w/%.~\-])\?[^\s'\"<>]*")
_FRAGMENT = re.compile(r"#token[=.][^\s'\"<>]*")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_RUN = re.compile(r"[A-Za-z0-9_\-\\]+(?:\.[A-Za-z0-9_\-\\]*)*")


def _token_shaped(segment: str) -> bool:
    """A secret-looking run: random base64url (or hex) is long and mixes character classes;
    identifiers, paths and words are shorter or single-class (``snake_case``, ``hostname-7``).
    Our secrets are 43 base64url characters (API keys, proxy credentials), 64 hex digits, or a
    token whose long segments are base64url: all caught. A canonical UUID (a VM's id) is kept."""
    if len(segment) < 20 or _UUID.fullmatch(segment):
        return False
    classes = any(c.islower() for c in segment) + any(c.isupper() for c in segment) + any(c.isdigit() for c in segment)
    return classes >= 3 or (len(segment) >= 32 and classes >= 2)


def _redact_run(match: re.Match[str]) -> str:
    run = match.group()
    return REDACTED if any(_token_shaped(segment) for segment in run.split(".")) else run


def _redact_header(match: re.Match[str]) -> str:
    """``Name: value`` with the value redacted; a quoted value keeps its quotes (a dict's repr)."""
    quote, name, value = match.groups()
    mark = value[0] if value[:1] in ("'", '"') else ""
    return f"{quote}{name}{quote}: {mark}{REDACTED}{mark if value.endswith(mark) and len(value) > 1 else ''}"


def escape_unprintable(text: str, *, keep_newlines: bool = False) -> str:
    """Control characters, DEL, non-ASCII and lone surrogates as ``\\xNN``/``\\uNNNN``: a log
    line stays one line, in ASCII, and cannot carry terminal escapes or fail to encode."""

    def escaped(match: re.Match[str]) -> str:
        char = match.group()
        if keep_newlines and char == "\n":
            return char
        code = ord(char)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"

    return _UNPRINTABLE.sub(escaped, text)


def sanitise(text: str, *, multiline: bool = False, limit: int = MAX_MESSAGE) -> str:
    """``text`` with nothing secret left (see the module's docstring); pure and idempotent."""
    text = escape_unprintable(text, keep_newlines=multiline)
    text = _VALUE_AFTER_REASON.sub(lambda m: f"{m.group(1)} (value withheld)", text)
    text = _CREDENTIAL_HEADER.sub(_redact_header, text)
    text = _AUTH_SCHEME.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    text = _API_KEY.sub(f"cgk.{REDACTED}", text)
    text = _JOIN_TOKEN.sub(f"cgj1.{REDACTED}", text)
    text = _ASSIGNED.sub(lambda m: f"{m.group(1)}={REDACTED}", text)
    text = _KEYED.sub(
        lambda m: f"{m.group(1)}{m.group(2)}{m.group(1)}{m.group(3)}{m.group(4)}{REDACTED}{m.group(4)}", text
    )
    text = _FRAGMENT.sub(f"#{REDACTED}", text)
    text = _QUERY.sub(f"?{REDACTED}", text)
    text = _RUN.sub(_redact_run, text)
    return text if len(text) <= limit else text[:limit] + " [cut]"


def tornado_reason(error: object) -> str:
    """The fixed part of a Tornado HTTPInputError's text, never the value it quotes."""
    text = str(error)
    for reason in TORNADO_REASONS:
        if text.startswith(reason):
            return reason
    return UNKNOWN_REASON


def _summary(request: HTTPServerRequest) -> str:
    return f"{request.method} {request.path} ({request.remote_ip})"


def safe_argument(value: object) -> object:
    """Requests by method, path and peer; headers and bytes by size only."""
    if isinstance(value, HTTPServerRequest):
        return _summary(value)
    if isinstance(value, HTTPHeaders):
        return "[headers withheld]"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"[{len(value)} bytes withheld]"
    return value


# --- Tornado's own messages that carry a value ------------------------------------------------

Rewrite = Callable[[tuple[Any, ...]], tuple[str, tuple[Any, ...]]]
_REWRITES: dict[tuple[str, str], Rewrite] = {
    ("tornado.general", "Malformed HTTP message from %s: %s"): lambda args: (
        "Malformed HTTP message from %s: %s",
        (args[0], tornado_reason(args[1])),
    ),
    ("tornado.application", "Uncaught exception %s\n%r"): lambda args: ("Uncaught exception %s", (args[0],)),
    ("tornado.general", "Invalid cookie signature %r"): lambda args: ("Invalid cookie signature", ()),
    ("tornado.general", "Expired cookie %r"): lambda args: ("Expired cookie", ()),
    ("tornado.general", "Cookie timestamp in future; possible tampering %r"): lambda args: (
        "Cookie timestamp in future; possible tampering",
        (),
    ),
    ("tornado.general", "Tampered cookie %r"): lambda args: ("Tampered cookie", ()),
}


def safe_message(record: logging.LogRecord) -> str:
    """The record's message, rewritten if it is a known one, then sanitised."""
    msg, args = record.msg, record.args
    if isinstance(args, tuple):
        rewrite = _REWRITES.get((record.name, msg)) if isinstance(msg, str) else None
        if rewrite is not None:
            msg, args = rewrite(args)
        args = tuple(safe_argument(a) for a in args)
    elif isinstance(args, dict):
        args = {k: safe_argument(v) for k, v in args.items()}
    text = str(msg)
    if args:
        text = text % args
    return sanitise(text)


# --- the shell: formatter, handler, hooks -----------------------------------------------------


class GuardedFormatter(logging.Formatter):
    """Formats a sanitised copy of each record; never the raw one, never an exception."""

    def format(self, record: logging.LogRecord) -> str:
        try:
            safe = logging.makeLogRecord(record.__dict__)
            safe.msg, safe.args = safe_message(record), None
            safe.name = sanitise(str(record.name), limit=200)
            safe.exc_info, safe.exc_text = None, None
            if record.exc_info:
                safe.exc_text = self.formatException(record.exc_info)
            if record.stack_info:
                safe.stack_info = sanitise(str(record.stack_info), multiline=True, limit=MAX_TRACEBACK)
            return self.render(safe)
        except Exception:
            return self.withheld(record)

    def render(self, safe: logging.LogRecord) -> str:
        """The line for a record already made safe (message, name, traceback and stack sanitised)."""
        return super().format(safe)

    def formatException(self, ei: Any) -> str:
        return sanitise(super().formatException(ei), multiline=True, limit=MAX_TRACEBACK)

    def withheld(self, record: logging.LogRecord | None) -> str:
        """The fixed line that stands for a record; only the level survives, and only a known one."""
        level = record.levelname if record is not None and record.levelname in _LEVELS else "ERROR"
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        return f"{stamp},000 {level} {log.name} {WITHHELD}"


_LEVELS = frozenset({"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"})


class JsonGuardedFormatter(GuardedFormatter):
    """The same guard, one JSON object per line: ``time`` (ISO 8601, UTC), ``level``, ``logger``,
    ``message``, and ``exception``/``stack`` when present. Only :meth:`render` differs: every field
    is taken from the record after sanitising, and ``json.dumps`` (ASCII) adds no character a
    reader could mistake for a new line; a withheld record is a JSON line too."""

    def render(self, safe: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _iso(safe.created),
            "level": safe.levelname,
            "logger": safe.name,
            "message": safe.msg,
        }
        if safe.exc_text:
            entry["exception"] = safe.exc_text
        if safe.stack_info:
            entry["stack"] = safe.stack_info
        return json.dumps(entry, ensure_ascii=True)

    def withheld(self, record: logging.LogRecord | None) -> str:
        level = record.levelname if record is not None and record.levelname in _LEVELS else "ERROR"
        return json.dumps({"time": _iso(time.time()), "level": level, "logger": log.name, "message": WITHHELD})


def _iso(created: float) -> str:
    return datetime.fromtimestamp(created, tz=UTC).isoformat(timespec="milliseconds")


class GuardedHandler(logging.StreamHandler[TextIO]):
    """stderr, through :class:`GuardedFormatter`; a write that fails is reported by a fixed line,
    never by the logging module's default, which prints the record's message and arguments."""

    def __init__(self, log_format: str = "text") -> None:
        super().__init__(sys.stderr)
        self.setFormatter(JsonGuardedFormatter() if log_format == "json" else GuardedFormatter(FORMAT))

    def handleError(self, record: logging.LogRecord) -> None:
        try:
            formatter = self.formatter if isinstance(self.formatter, GuardedFormatter) else GuardedFormatter()
            self.stream.write(formatter.withheld(record) + self.terminator)
            self.flush()
        except Exception:
            pass


def add_options(parser: argparse.ArgumentParser) -> None:
    """``--log-level`` and ``--log-format`` of a serving command (the proxy's, the broker's): the
    two values :func:`setup` takes, offered the same way by both."""
    parser.add_argument("--log-level", default="INFO", choices=list(LEVELS))
    parser.add_argument(
        "--log-format",
        default="text",
        choices=FORMATS,
        help="text lines, or one JSON object per line (default: %(default)s)",
    )


def setup(level: str | int, log_format: str = "text") -> None:
    """Make the guarded handler the only root handler, at ``level``, and route what Python would
    print itself (uncaught exceptions in any thread, unraisable ones, warnings) through it.
    The first statement of each ``serve``: nothing may log before it."""
    logging.raiseExceptions = False
    logging.basicConfig(level=level, handlers=[GuardedHandler(log_format)], force=True)
    logging.captureWarnings(True)
    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook
    sys.unraisablehook = _unraisablehook


def _excepthook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    log.critical("uncaught exception", exc_info=(kind, value, tb))


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    value = args.exc_value  # None only for a hook called by hand; the type alone is then logged
    log.error(
        "uncaught exception in thread %s",
        args.thread.name if args.thread else "?",
        exc_info=(args.exc_type, value, args.exc_traceback) if value is not None else None,
    )


def _unraisablehook(unraisable: Any) -> None:
    value = unraisable.exc_value
    log.error(
        "unraisable exception%s",
        f": {unraisable.err_msg}" if unraisable.err_msg else "",
        exc_info=(unraisable.exc_type, value, unraisable.exc_traceback) if value is not None else None,
    )
