"""RFC 7239 ``Forwarded``: who the browser is, and which host and scheme it asked for.

The standard spelling of X-Forwarded-For/-Host/-Proto, e.g.
``Forwarded: for="[2001:db8::1]:4711";host=consoles.example.com:8443;proto=https``. Like
X-Forwarded-For it is believed only as far as trusted proxies vouch for it: read from the
right, each element counts only if the hop that added it (the connection's peer, then each
``for=`` in turn) is a ``--trusted-proxy``, so a client cannot choose its address or host by
sending the header itself. A header that does not parse is believed not at all. When a trusted
peer sends a usable ``Forwarded``, it replaces the X-Forwarded-* headers (see
:func:`console_proxy.upgrade.request_view`).

Pure functions over header text, bounded by ``MAX_LENGTH``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from console_proxy import origin
from console_proxy.origin import Network

#: Longest header read; a longer one is ignored (a few hops fit in far less).
MAX_LENGTH = 2048
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_PAIR = re.compile(rf"\s*({_TOKEN.pattern})=(?:({_TOKEN.pattern})|{_QUOTED.pattern})\s*")
_ESCAPE = re.compile(r"\\(.)")


@dataclass(frozen=True)
class Said:
    """What trusted proxies said: the client's address, and the host and scheme if given."""

    client: str
    host: str | None
    proto: str | None


def parse(value: str) -> list[dict[str, str]] | None:
    """The header's elements (hop by hop, left to right) as lower-case parameter names to
    values, unquoted; None if any of it is malformed or a parameter repeats in an element."""
    if len(value) > MAX_LENGTH:
        return None
    elements: list[dict[str, str]] = []
    element: dict[str, str] = {}
    at = 0
    while True:
        match = _PAIR.match(value, at)
        if match is None:
            return None
        name = match.group(1).lower()
        if name in element:
            return None
        token, quoted = match.group(2), match.group(3)
        element[name] = token if token is not None else _ESCAPE.sub(r"\1", quoted)
        at = match.end()
        if at == len(value):
            elements.append(element)
            return elements
        if value[at] == ",":
            elements.append(element)
            element = {}
        elif value[at] != ";":
            return None
        at += 1


def node_address(node: str | None) -> str | None:
    """The IP address of a ``for=`` node: ``192.0.2.1``, ``192.0.2.1:80``, ``[2001:db8::1]``,
    ``[2001:db8::1]:4711``; None for ``unknown``, obfuscated names (``_hidden``) and junk."""
    if not node:
        return None
    if node.startswith("["):
        address, bracket, rest = node[1:].partition("]")
        if not bracket or (rest and not _port(rest)):
            return None
        return address if ":" in address and origin.is_address(address) else None
    address, _, port = node.partition(":")
    if port and not _port(":" + port):
        return None
    return address if "." in address and origin.is_address(address) else None


def _port(text: str) -> bool:
    """``:port`` (a number, or an obfuscated ``_name`` per RFC 7239 6.3)."""
    port = text[1:]
    return text.startswith(":") and ((port.isdigit() and len(port) <= 5) or bool(re.fullmatch(r"_[\w.-]+", port)))


def believed(peer: str, value: str | None, trusted: Sequence[Network]) -> Said | None:
    """What ``Forwarded`` says as far as trusted proxies vouch for it; None if the peer is not
    trusted or the header is absent or malformed (then X-Forwarded-* apply as before).

    Walking from the right, each trusted hop's element is taken: its ``host``/``proto`` (the
    outermost trusted hop that gives one wins: it faced the browser) and its ``for`` as the next
    hop, stopping at the first hop not trusted or a ``for`` that is not an address.
    """
    if not value or not origin.is_trusted(peer, trusted):
        return None
    elements = parse(value)
    if elements is None:
        return None
    current, host, proto = peer, None, None
    for element in reversed(elements):
        if not origin.is_trusted(current, trusted):
            break
        host = element.get("host", host)
        proto = element.get("proto", proto)
        hop = node_address(element.get("for"))
        if hop is None:
            break
        current = hop
    return Said(origin.client_address(current, None, ()), host, proto.lower() if proto else None)
