"""A strict, partial HTTP/1.1 request-head parser and response writer, sans I/O.

The proxy's front door (:mod:`console_proxy.frontdoor`) serves console upgrades itself and hands
every other request to Tornado. This module decides which is which: :func:`parse_head` returns
a :class:`Head` only for a plain, well-formed head — exactly one request line ``METHOD
/target HTTP/1.1``, ``name: value`` lines with token names, a single plain Host, no body — and None for
anything else, which then goes to Tornado untouched. It never has to be lenient: whatever it
declines still gets a complete HTTP server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qs

#: The end of a request head as Tornado recognises it (bare LF allowed); only CRLF CRLF is ours.
HEAD_END = re.compile(rb"\r?\n\r?\n")
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
#: The whole head in one match: ``METHOD /target HTTP/1.1``, then ``name:value`` lines whose
#: names are tokens and whose values hold no control character but tab.
_HEAD = re.compile(rf"{_TOKEN} /[\x21-\x7e]* HTTP/1\.1(?:\r\n{_TOKEN}:[\t\x20-\x7e\x80-\xff]*)*")
#: What Tornado turns into spaces in argument values.
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f]")
#: A plain Host: a name or address, or a bracketed IPv6 literal, and an optional port. Stricter
#: than RFC 3986's reg-name on purpose: anything else is Tornado's to judge.
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-_~]+)(:[0-9]{1,5})?")


class Headers(dict[str, str]):
    """Header fields by lower-cased name; repeated fields joined with commas (RFC 9110 5.3).
    Filled with lower-case names; looked up in any case."""

    # dict.get's overloads promise the default's type back; this one narrows it to str | None,
    # which mypy reports as an incompatible override: the case-insensitive lookup is the point.
    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return dict.get(self, name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return dict.__getitem__(self, name.lower())

    def __contains__(self, name: object) -> bool:
        return dict.__contains__(self, name.lower() if isinstance(name, str) else name)


@dataclass(frozen=True, slots=True)
class Head:
    method: str
    path: str
    query: str
    headers: Headers

    def query_argument(self, name: str) -> str | None:
        """The last value of a query argument as Tornado's ``get_query_argument`` gives it:
        percent-decoded, control characters as spaces, stripped. Bytes that are not UTF-8 (a
        400 from Tornado) decode with replacement characters, which no token survives."""
        values = parse_qs(self.query, keep_blank_values=True, encoding="latin-1").get(name)
        if not values:
            return None
        text = values[-1].encode("latin-1").decode("utf-8", errors="replace")
        return _CONTROL.sub(" ", text).strip()


def parse_head(raw: bytes) -> Head | None:
    """The head (without its final CRLF CRLF) if plain and well-formed, else None."""
    text = raw.decode("latin-1")
    if not _HEAD.fullmatch(text):
        return None  # also obs-fold (a leading space), bare CR or LF, NUL and other controls
    lines = text.split("\r\n")
    method, target, _version = lines[0].split(" ")
    headers = Headers()
    for line in lines[1:]:
        name, _, value = line.partition(":")
        key, value = name.lower(), value.strip(" \t")
        if key in headers:
            if key == "host":
                return None  # two Hosts: Tornado answers 400 (RFC 9112 3.2)
            value = f"{headers[key]},{value}"
        headers[key] = value
    if not _HOST.fullmatch(headers.get("host") or "") or "content-length" in headers or "transfer-encoding" in headers:
        return None
    path, _, query = target.partition("?")
    return Head(method, path, query, headers)


def response(status: int, fields: list[tuple[str, str]], body: bytes = b"") -> bytes:
    """A complete response that closes the connection; ``fields`` are the caller's own."""
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        *(f"{k}: {v}" for k, v in fields),
        f"Content-Length: {len(body)}",
        "Connection: close",
        "",
        "",
    ]
    return "\r\n".join(lines).encode("latin-1") + body
