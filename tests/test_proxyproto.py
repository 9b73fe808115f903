"""The PROXY protocol parser (console_proxy.proxyproto): versions 1 and 2, bounds, and garbage.

Headers are built here from the spec's layout, not with the code under test; HAProxy's own
output is exercised end to end in test_haproxy.py.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from console_proxy import proxyproto
from console_proxy.proxyproto import ProxyHeader, ProxyProtocolError

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
BOUNDED = settings(max_examples=500, deadline=None)


def v2(
    command: int, family: int, block: bytes, *, version: int = 2, protocol: int = 1, size: int | None = None
) -> bytes:
    length = len(block) if size is None else size
    return SIG + bytes((version << 4 | command, family << 4 | protocol)) + struct.pack("!H", length) + block


def inet(src: str, dst: str, sport: int, dport: int) -> bytes:
    return ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed + struct.pack("!HH", sport, dport)


def test_v1_tcp4() -> None:
    line = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\n"
    assert proxyproto.parse(line + b"GET / HTTP/1.1\r\n") == ProxyHeader(("192.0.2.7", 56324), len(line))


def test_v1_tcp6_and_unknown() -> None:
    line = b"PROXY TCP6 2001:db8::1 2001:db8::2 4711 80\r\n"
    assert proxyproto.parse(line) == ProxyHeader(("2001:db8::1", 4711), len(line))
    unknown = b"PROXY UNKNOWN whatever follows\r\n"
    assert proxyproto.parse(unknown + b"GET") == ProxyHeader(None, len(unknown))


def test_v1_the_longest_header_fits() -> None:
    line = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
    header = proxyproto.parse(line)
    assert header == ProxyHeader(("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535), len(line))
    unknown = b"PROXY UNKNOWN " + b"x" * (proxyproto.V1_MAX - 16) + b"\r\n"  # the spec's 107 bytes
    assert proxyproto.parse(unknown) == ProxyHeader(None, proxyproto.V1_MAX)
    with pytest.raises(ProxyProtocolError):
        proxyproto.parse(b"PROXY UNKNOWN x" + unknown[14:])  # 108


@pytest.mark.parametrize(
    "partial",
    [
        b"",
        b"P",
        b"PROXY",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 563",
        SIG[:5],
        SIG,
        v2(1, 1, inet("192.0.2.7", "192.0.2.8", 1, 2))[:20],
    ],
)
def test_incomplete_headers_ask_for_more(partial: bytes) -> None:
    assert proxyproto.parse(partial) is None


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "missing"),
        (b"\x16\x03\x01\x02\x00", "missing"),  # a TLS ClientHello
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\nGET / HTTP/1.1\n" + b"x" * 60, "malformed"),  # bare LF
        (b"PROXY " + b"A" * 200, "malformed"),  # no CRLF within 107 bytes
        (b"PROXY TCP4 2001:db8::1 192.0.2.1 1 2\r\n", "malformed"),
        (b"PROXY TCP6 192.0.2.1 2001:db8::1 1 2\r\n", "malformed"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 443\r\n", "malformed"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 0443 443\r\n", "malformed"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 443\r\n", "malformed"),
        (b"PROXY TCP4 192.0.2.07 198.51.100.1 1 443\r\n", "malformed"),
        (b"PROXY TCP4 192.0.2.7  198.51.100.1 1 443\r\n", "malformed"),
        (b"PROXY TCP6 fe80::1%eth0 fe80::2 1 443\r\n", "malformed"),
        (b"PROXY UDP4 192.0.2.7 198.51.100.1 1 443\r\n", "malformed"),
        (b"PROXY TCP4 \xff.0.2.7 198.51.100.1 1 443\r\n", "malformed"),
        (v2(1, 1, inet("192.0.2.7", "192.0.2.8", 1, 2), version=1), "malformed"),
        (v2(2, 1, inet("192.0.2.7", "192.0.2.8", 1, 2)), "malformed"),  # command 2
        (v2(1, 1, b"\x00" * 11), "malformed"),  # shorter than an IPv4 block
        (v2(1, 2, b"\x00" * 35), "malformed"),  # shorter than an IPv6 block
        (v2(1, 5, b"\x00" * 12), "malformed"),  # no such family
        (v2(1, 1, b"", size=proxyproto.V2_MAX), "malformed"),  # announced longer than we read
    ],
)
def test_bad_headers_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ProxyProtocolError) as caught:
        proxyproto.parse(data)
    assert caught.value.reason == reason


def test_v2_inet_and_inet6_with_tlvs_after() -> None:
    block = inet("192.0.2.7", "192.0.2.8", 40000, 443) + b"\x04\x00\x01x"  # one TLV (NOOP)
    data = v2(1, 1, block)
    assert proxyproto.parse(data + b"GET") == ProxyHeader(("192.0.2.7", 40000), len(data))
    data6 = v2(1, 2, inet("2001:db8::1", "2001:db8::2", 4711, 80))
    assert proxyproto.parse(data6) == ProxyHeader(("2001:db8::1", 4711), len(data6))


def test_v2_local_unspec_and_unix_leave_the_peer_standing() -> None:
    local = v2(0, 0, b"")  # a balancer's own health check
    assert proxyproto.parse(local + b"GET") == ProxyHeader(None, 16)
    assert proxyproto.parse(v2(1, 0, b"")) == ProxyHeader(None, 16)
    assert proxyproto.parse(v2(1, 3, b"\x00" * 216)) == ProxyHeader(None, 16 + 216)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", None),
        (b"PRO", None),
        (b"PROXY ", True),
        (SIG[:11], None),
        (SIG, True),
        (b"GET ", False),
        (b"PROXY\r\n", False),
    ],
)
def test_announces(data: bytes, expected: bool | None) -> None:
    assert proxyproto.announces(data) is expected


@BOUNDED
@given(st.binary(max_size=300))
@example(SIG + b"\x21\x11\x00\x0c")
@example(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n")
def test_arbitrary_bytes_never_raise_anything_else(data: bytes) -> None:
    """Whatever arrives: a header, None, or the parser's own error — and a header never claims
    more bytes than arrived, nor more than the bounds."""
    try:
        header = proxyproto.parse(data)
    except ProxyProtocolError as error:
        assert error.reason in ("missing", "malformed")
        return
    if header is not None:
        assert header.length <= len(data) and header.length <= proxyproto.V2_MAX
    else:
        assert len(data) < proxyproto.V2_MAX


@BOUNDED
@given(st.sampled_from([b"PROXY ", SIG]), st.binary(max_size=300))
def test_arbitrary_bytes_after_a_signature(start: bytes, rest: bytes) -> None:
    try:
        header = proxyproto.parse(start + rest)
    except ProxyProtocolError:
        return
    assert header is None or header.length <= len(start + rest)
