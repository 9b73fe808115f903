"""Byte-level unit tests of the sans-I/O RFC 6455 codec: no sockets, no clocks, no Tornado handler."""

from __future__ import annotations

import importlib.util
import itertools
import os
import random
import struct
import sys
from collections.abc import Iterable, Sequence
from types import ModuleType
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tornado.httputil import HTTPHeaders

from console_proxy.protocol import wsframes
from console_proxy.protocol.wsframes import (
    MAX_CONTROL,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Close,
    Event,
    FrameReader,
    Ping,
    Pong,
    UpgradeError,
    WsError,
    accept_value,
    binary_header,
    check_upgrade,
    close_frame,
    frame,
)

MASK = b"\x37\xfa\x21\x3d"
KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 1.3
MAX = 1 << 20
Length = Literal["auto", "16", "64"]


# --- helpers ---------------------------------------------------------------------------------


def apply_mask(mask: bytes, data: bytes) -> bytes:
    """Reference masking, byte by byte (RFC 6455 5.3), independent of the codec's."""
    return bytes(map(int.__xor__, data, itertools.cycle(mask)))


def client_header(
    size: int,
    opcode: int = OP_BINARY,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = MASK,
    length: Length = "auto",
) -> bytes:
    """A client frame header declaring ``size``; ``mask=None`` sends it unmasked."""
    b0 = (0x80 if fin else 0) | (rsv & 0x7) << 4 | opcode
    bit = 0x80 if mask is not None else 0
    if length == "64" or (length == "auto" and size >= 65536):
        head = struct.pack("!BBQ", b0, bit | 127, size)
    elif length == "16" or (length == "auto" and size >= 126):
        head = struct.pack("!BBH", b0, bit | 126, size)
    else:
        head = bytes((b0, bit | size))
    return head + (mask or b"")


def client_frame(
    payload: bytes = b"",
    opcode: int = OP_BINARY,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = MASK,
    random_mask: bool = False,
    length: Length = "auto",
) -> bytes:
    """One client frame as a browser would send it (masked), or broken as asked."""
    if random_mask:
        mask = os.urandom(4)
    header = client_header(len(payload), opcode, fin=fin, rsv=rsv, mask=mask, length=length)
    return header + (apply_mask(mask, payload) if mask is not None else payload)


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


def server_frame(data: bytes) -> tuple[bool, int, bytes]:
    """Parse one whole unmasked server frame: (fin, opcode, payload); nothing may trail it."""
    b0, b1 = data[0], data[1]
    assert not b1 & 0x80, "server frames are never masked"
    assert not b0 & 0x70
    size, at = b1 & 0x7F, 2
    if size == 126:
        (size,), at = struct.unpack_from("!H", data, 2), 4
    elif size == 127:
        (size,), at = struct.unpack_from("!Q", data, 2), 10
    assert len(data) == at + size
    return bool(b0 & 0x80), b0 & 0x0F, data[at:]


def feed_all(reader: FrameReader, chunks: Iterable[bytes]) -> list[Event]:
    return [event for chunk in chunks for event in reader.feed(chunk)]


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def refused(data: bytes, code: int, *, max_frame: int = MAX, before: Sequence[bytes] = ()) -> WsError:
    """Feed ``before`` (must pass), then ``data`` (must raise ``code``); the reader is then dead."""
    reader = FrameReader(max_frame)
    feed_all(reader, before)
    with pytest.raises(WsError) as caught:
        reader.feed(data)
    assert caught.value.code == code
    assert bytes(reader._buf) == b""
    assert reader.feed(client_frame(b"after")) == []
    assert reader.feed(client_frame(b"", OP_PING)) == []
    return caught.value


def upgrade_headers(**changes: str | None) -> dict[str, str]:
    """A browser's upgrade request headers; a change of None removes the header."""
    headers = {
        "Host": "proxy.example:8443",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": KEY,
        "Origin": "https://console.example",
    }
    for name, value in changes.items():
        name = name.replace("_", "-")
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value
    return headers


# --- the upgrade -----------------------------------------------------------------------------


def test_valid_upgrade_returns_the_key() -> None:
    assert check_upgrade(upgrade_headers()) == KEY


@pytest.mark.parametrize(
    ("upgrade", "connection"),
    [
        ("websocket", "Upgrade"),
        ("WebSocket", "upgrade"),
        (" WEBSOCKET ", "UPGRADE"),
        ("websocket", "keep-alive, Upgrade"),
        ("websocket", "Upgrade, keep-alive"),
        ("websocket", "keep-alive,upgrade"),
        ("websocket", "keep-alive ,  Upgrade  , close"),
    ],
)
def test_upgrade_and_connection_are_matched_as_tokens(upgrade: str, connection: str) -> None:
    """Firefox sends "keep-alive, Upgrade"; header values are case-insensitive tokens."""
    assert check_upgrade(upgrade_headers(Upgrade=upgrade, Connection=connection)) == KEY


def test_key_is_returned_stripped() -> None:
    assert check_upgrade(upgrade_headers(Sec_WebSocket_Key=f"  {KEY} ")) == KEY


def test_tornado_headers_are_case_insensitive() -> None:
    """The proxy passes Tornado's HTTPHeaders, whose lookups ignore case."""
    headers = HTTPHeaders()
    for name, value in upgrade_headers().items():
        headers.add(name.lower(), value)
    assert check_upgrade(headers) == KEY


@pytest.mark.parametrize(
    "changes",
    [
        {"Upgrade": None},
        {"Upgrade": ""},
        {"Upgrade": "h2c"},
        {"Upgrade": "websocket2"},
        {"Upgrade": "websocket, h2c"},
        {"Connection": None},
        {"Connection": ""},
        {"Connection": "keep-alive"},
        {"Connection": "upgrades"},
        {"Connection": "keep-alive Upgrade"},
        {"Upgrade": None, "Connection": None, "Sec_WebSocket_Version": None, "Sec_WebSocket_Key": None},
        {"Upgrade": "h2c", "Sec_WebSocket_Version": "8"},
    ],
    ids=repr,
)
def test_not_a_websocket_request(changes: dict[str, str | None]) -> None:
    """A plain GET (or another upgrade) is a 400, checked before the version."""
    with pytest.raises(UpgradeError) as caught:
        check_upgrade(upgrade_headers(**changes))
    assert (caught.value.status, caught.value.code) == (400, "websocket_required")


@pytest.mark.parametrize("version", [None, "", "8", "12", "14", "13, 8", "thirteen"])
def test_wrong_version_is_426(version: str | None) -> None:
    """426 tells the client to retry with a version we speak (RFC 6455 4.4)."""
    with pytest.raises(UpgradeError) as caught:
        check_upgrade(upgrade_headers(Sec_WebSocket_Version=version))
    assert (caught.value.status, caught.value.code) == (426, "websocket_version")


@pytest.mark.parametrize(
    "key",
    [
        None,
        "",
        "not base64 at all!!",
        "dGhlIHNhbXBsZSBub25jZQ",  # 16 bytes, padding missing
        "dGhlIHNhbXBsZSBub25j",  # 15 bytes
        "dGhlIHNhbXBsZSBub25jZQ==dGhl",  # 16 bytes and then some
        "AAAAAAAAAAAAAAAAAAAAAAA=",  # 17 bytes
        "dGhlIHNhbXBs ZSBub25jZQ==",  # a space inside
        "dGhlIHNhbXBsZSBub25jZQ=\u00e9",  # not ASCII
    ],
)
def test_bad_key_is_400(key: str | None) -> None:
    with pytest.raises(UpgradeError) as caught:
        check_upgrade(upgrade_headers(Sec_WebSocket_Key=key))
    assert (caught.value.status, caught.value.code) == (400, "websocket_required")


def test_accept_value_rfc_example() -> None:
    """The worked example of RFC 6455 1.3, and it is base64 of a SHA-1 (28 characters)."""
    assert accept_value(KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert len(accept_value("AAAAAAAAAAAAAAAAAAAAAA==")) == 28


# --- server frames ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "header"),
    [
        (0, b"\x82\x00"),
        (1, b"\x82\x01"),
        (125, b"\x82\x7d"),
        (126, b"\x82\x7e\x00\x7e"),
        (65535, b"\x82\x7e\xff\xff"),
        (65536, b"\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
        (2**32 + 5, b"\x82\x7f\x00\x00\x00\x01\x00\x00\x00\x05"),
    ],
)
def test_binary_header_length_encodings(size: int, header: bytes) -> None:
    """7-bit up to 125, 16-bit up to 65535, 64-bit beyond: always the shortest form."""
    assert binary_header(size) == header


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536])
def test_frame_is_header_plus_payload(size: int) -> None:
    """binary_header exists so a large payload need not be copied; it must agree with frame."""
    payload = random.Random(size).randbytes(size)
    assert frame(OP_BINARY, payload) == binary_header(size) + payload
    assert server_frame(frame(OP_BINARY, payload)) == (True, OP_BINARY, payload)


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_control_frames(opcode: int) -> None:
    assert frame(opcode, b"hi") == bytes((0x80 | opcode, 2)) + b"hi"


def test_close_frame_without_code_is_empty() -> None:
    assert close_frame(None) == b"\x88\x00"
    assert close_frame(None, "ignored without a code") == b"\x88\x00"


@pytest.mark.parametrize(
    ("code", "reason", "payload"),
    [
        (1000, "", b"\x03\xe8"),
        (1009, "too big", b"\x03\xf1too big"),
        (4001, "d\u00e9j\u00e0", b"\x0f\xa1" + "d\u00e9j\u00e0".encode()),
    ],
)
def test_close_frame_code_and_reason(code: int, reason: str, payload: bytes) -> None:
    assert close_frame(code, reason) == bytes((0x88, len(payload))) + payload


@pytest.mark.parametrize(
    "reason",
    [
        "x" * 124,
        "\u00e9" * 100,  # 2-byte characters: 123 is odd, so the cut must drop to 122
        "\u20ac" * 50,  # 3-byte
        "\U0001f642" * 40,  # 4-byte
        "a" + "\U0001f642" * 40,
        "ok " + "\u00e9\u20ac\U0001f642" * 30,
    ],
)
def test_long_close_reason_is_cut_on_a_character(reason: str) -> None:
    """A control payload is at most 125 bytes; the cut reason must still be valid UTF-8."""
    fin, opcode, payload = server_frame(close_frame(1011, reason))
    assert (fin, opcode) == (True, OP_CLOSE)
    assert len(payload) <= MAX_CONTROL
    assert payload[:2] == b"\x03\xf3"
    kept = payload[2:].decode("utf-8")
    assert reason.startswith(kept)
    assert len(payload) > MAX_CONTROL - 4, "no more was cut than one character"


def test_close_reason_that_fits_is_kept_whole() -> None:
    reason = "r" * (MAX_CONTROL - 2)
    assert server_frame(close_frame(1000, reason))[2] == b"\x03\xe8" + reason.encode()


@settings(max_examples=60, deadline=None)
@given(
    code=st.sampled_from([1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 4999]),
    reason=st.text(max_size=80),
)
def test_close_frame_round_trips_through_the_reader(code: int, reason: str) -> None:
    """What we send, masked as a client would, is what the reader accepts as a close."""
    _, _, payload = server_frame(close_frame(code, reason))
    [event] = FrameReader(MAX).feed(client_frame(payload, OP_CLOSE))
    assert isinstance(event, Close)
    assert event.code == code
    assert reason.startswith(event.reason)
    assert len(event.reason.encode()) <= MAX_CONTROL - 2


# --- reading client frames -------------------------------------------------------------------


def test_one_binary_frame() -> None:
    assert FrameReader(MAX).feed(client_frame(b"hello")) == [b"hello"]


@pytest.mark.parametrize("size", [1, 125, 126, 65535, 65536, 100_000])
def test_each_length_encoding_is_read(size: int) -> None:
    payload = random.Random(size).randbytes(size)
    reader = FrameReader(MAX)
    assert reader.feed(client_frame(payload, random_mask=True)) == [payload]
    assert bytes(reader._buf) == b""


@pytest.mark.parametrize("length", ["16", "64"])
def test_longer_length_encoding_than_needed_is_read(length: Length) -> None:
    """Lenient on non-minimal lengths: a browser never sends them, and they cost nothing."""
    assert FrameReader(MAX).feed(client_frame(b"abc", length=length)) == [b"abc"]


def test_several_frames_in_one_chunk_in_order() -> None:
    data = (
        client_frame(b"one")
        + client_frame(b"p", OP_PING)
        + client_frame(b"two", random_mask=True)
        + client_frame(b"", OP_PONG)
        + client_frame(b"x" * 300)
    )
    assert FrameReader(MAX).feed(data) == [b"one", Ping(b"p"), b"two", Pong(b""), b"x" * 300]


def test_all_zero_mask_and_payload_masking() -> None:
    """The mask really is applied: with an all-zero key the wire bytes are the payload."""
    assert FrameReader(MAX).feed(client_frame(b"plain", mask=b"\0\0\0\0")) == [b"plain"]
    wire = client_header(4, mask=b"\xff\x00\xff\x00") + b"\xff\xff\x00\x00"
    assert FrameReader(MAX).feed(wire) == [b"\x00\xff\xff\x00"]


STREAM = (
    client_frame(b"a")
    + client_frame(b"b" * 126)
    + client_frame(b"c" * 200, length="64")
    + client_frame(b"frag-", fin=False)
    + client_frame(b"ping", OP_PING)
    + client_frame(b"ment", OP_CONTINUATION)
    + client_frame(b"", OP_PONG)
    + client_frame(close_payload(1000, b"bye"), OP_CLOSE)
)
STREAM_EVENTS: list[Event] = [
    b"a",
    b"b" * 126,
    b"c" * 200,
    b"frag-",
    Ping(b"ping"),
    b"ment",
    Pong(b""),
    Close(1000, "bye"),
]


def test_stream_whole() -> None:
    assert FrameReader(MAX).feed(STREAM) == STREAM_EVENTS


def test_stream_byte_by_byte() -> None:
    """A frame's event appears once its last byte arrives, never a partial payload."""
    reader = FrameReader(MAX)
    assert feed_all(reader, (STREAM[i : i + 1] for i in range(len(STREAM)))) == STREAM_EVENTS


def test_stream_in_two_pieces_at_every_offset() -> None:
    for cut in range(len(STREAM) + 1):
        assert feed_all(FrameReader(MAX), split_at(STREAM, [cut])) == STREAM_EVENTS, cut


def test_empty_chunks_change_nothing() -> None:
    reader = FrameReader(MAX)
    assert reader.feed(b"") == []
    head, rest = STREAM[:3], STREAM[3:]
    assert reader.feed(head) == []
    assert reader.feed(b"") == []
    assert reader.feed(rest) == STREAM_EVENTS


def test_incomplete_frame_is_buffered() -> None:
    data = client_frame(b"x" * 1000)
    reader = FrameReader(MAX)
    assert reader.feed(data[:-1]) == []
    assert bytes(reader._buf) == data[:-1]
    assert reader.feed(data[-1:]) == [b"x" * 1000]
    assert bytes(reader._buf) == b""


def test_empty_binary_frame_yields_nothing() -> None:
    assert FrameReader(MAX).feed(client_frame(b"")) == []


def test_fragmented_message_is_passed_on_per_fragment() -> None:
    """The proxy streams bytes: fragments are never held back for reassembly."""
    reader = FrameReader(MAX)
    assert reader.feed(client_frame(b"ab", fin=False)) == [b"ab"]
    assert reader.feed(client_frame(b"cd", OP_CONTINUATION, fin=False)) == [b"cd"]
    assert reader.feed(client_frame(b"", OP_CONTINUATION, fin=False)) == []
    assert reader.feed(client_frame(b"ef", OP_CONTINUATION)) == [b"ef"]
    assert reader.feed(client_frame(b"next")) == [b"next"], "a new message after the final fragment"


def test_fragmented_message_starting_empty() -> None:
    data = client_frame(b"", fin=False) + client_frame(b"", OP_CONTINUATION) + client_frame(b"z")
    assert FrameReader(MAX).feed(data) == [b"z"]


def test_control_frames_between_fragments() -> None:
    """RFC 6455 5.4: control frames may be injected in the middle of a fragmented message."""
    data = (
        client_frame(b"ab", fin=False)
        + client_frame(b"p", OP_PING)
        + client_frame(b"q", OP_PONG)
        + client_frame(b"cd", OP_CONTINUATION)
    )
    assert FrameReader(MAX).feed(data) == [b"ab", Ping(b"p"), Pong(b"q"), b"cd"]


def test_close_between_fragments() -> None:
    data = client_frame(b"ab", fin=False) + client_frame(close_payload(1001), OP_CLOSE)
    assert FrameReader(MAX).feed(data) == [b"ab", Close(1001, "")]


def test_ping_and_pong() -> None:
    reader = FrameReader(MAX)
    assert reader.feed(client_frame(b"", OP_PING)) == [Ping(b"")]
    assert reader.feed(client_frame(b"k" * MAX_CONTROL, OP_PING)) == [Ping(b"k" * MAX_CONTROL)]
    assert reader.feed(client_frame(b"beat", OP_PONG)) == [Pong(b"beat")]


def test_close_with_code_and_reason_ends_the_reader() -> None:
    """After a close nothing more is read, even bytes in the same chunk."""
    reader = FrameReader(MAX)
    data = client_frame(b"last") + client_frame(close_payload(1000, "fin \u00e9".encode()), OP_CLOSE)
    assert reader.feed(data + client_frame(b"ignored")) == [b"last", Close(1000, "fin \u00e9")]
    assert bytes(reader._buf) == b""
    assert reader.feed(client_frame(b"more")) == []
    assert reader.feed(b"\x00garbage that would be an error") == []


def test_empty_close() -> None:
    reader = FrameReader(MAX)
    assert reader.feed(client_frame(b"", OP_CLOSE)) == [Close(None, "")]
    assert reader.feed(client_frame(b"more")) == []


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999])
def test_close_codes_a_peer_may_send(code: int) -> None:
    assert FrameReader(MAX).feed(client_frame(close_payload(code), OP_CLOSE)) == [Close(code, "")]


def test_frame_of_exactly_max_frame_is_read() -> None:
    reader = FrameReader(4096)
    assert reader.feed(client_frame(b"m" * 4096)) == [b"m" * 4096]


def test_control_frames_are_not_limited_by_max_frame() -> None:
    """max_frame bounds data frames; a control frame is bounded by 125 bytes regardless."""
    reader = FrameReader(16)
    assert reader.feed(client_frame(b"p" * MAX_CONTROL, OP_PING)) == [Ping(b"p" * MAX_CONTROL)]


def test_fallback_mask_matches_tornado() -> None:
    """Without tornado's C extension the pure-Python mask must give the same bytes."""
    spec = importlib.util.spec_from_file_location("wsframes_fallback", wsframes.__file__)
    assert spec is not None and spec.loader is not None
    fallback: ModuleType = importlib.util.module_from_spec(spec)
    saved = sys.modules.get("tornado.speedups")
    sys.modules["tornado.speedups"] = None  # type: ignore[assignment]  # makes the import fail
    sys.modules[spec.name] = fallback  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(fallback)
    finally:
        del sys.modules[spec.name]
        if saved is None:
            del sys.modules["tornado.speedups"]
        else:
            sys.modules["tornado.speedups"] = saved
    assert fallback._mask is not wsframes._mask
    rng = random.Random(6455)
    for size in (1, 2, 3, 4, 5, 7, 8, 9, 125, 126, 1000):
        mask, data = rng.randbytes(4), rng.randbytes(size)
        assert fallback._mask(mask, data) == wsframes._mask(mask, data) == apply_mask(mask, data)
    data = b"\x00\x00" + b"lead" + b"\x00"  # leading and trailing zero bytes survive int conversion
    assert fallback._mask(b"\0\0\0\0", data) == data
    events = fallback.FrameReader(MAX).feed(STREAM)  # the copy's own event classes: compare reprs
    assert [repr(e) for e in events] == [repr(e) for e in STREAM_EVENTS]


# --- protocol errors -------------------------------------------------------------------------


@pytest.mark.parametrize("rsv", [1, 2, 4, 7])
def test_reserved_bits(rsv: int) -> None:
    """No extension is negotiated, so RSV1-3 must be zero (RFC 6455 5.2)."""
    refused(client_frame(b"x", rsv=rsv), 1002)


@pytest.mark.parametrize("opcode", [OP_BINARY, OP_PING, OP_CLOSE])
def test_reserved_bits_seen_from_the_first_two_bytes(opcode: int) -> None:
    refused(client_header(10, opcode, rsv=4)[:2], 1002)


def test_unmasked_client_frame() -> None:
    """Clients must mask (RFC 6455 5.1); detected from the first two bytes."""
    refused(client_frame(b"x", mask=None), 1002)
    refused(client_header(100_000, mask=None)[:2], 1002)


@pytest.mark.parametrize("fin", [True, False])
def test_text_refused_from_the_header_alone(fin: bool) -> None:
    """RFB is binary; a text frame is refused before its payload is awaited."""
    refused(client_header(100, OP_TEXT, fin=fin)[:2], 1003)
    refused(client_header(100_000, OP_TEXT, fin=fin)[:10], 1003)
    refused(client_frame(b"text", OP_TEXT), 1003)


@pytest.mark.parametrize("fin", [True, False])
def test_continuation_without_a_message(fin: bool) -> None:
    refused(client_frame(b"x", OP_CONTINUATION, fin=fin), 1002)


def test_continuation_after_the_final_fragment() -> None:
    message = client_frame(b"a", fin=False) + client_frame(b"b", OP_CONTINUATION)
    refused(client_frame(b"x", OP_CONTINUATION), 1002, before=[message])


@pytest.mark.parametrize("fin", [True, False])
def test_new_message_inside_a_fragmented_one(fin: bool) -> None:
    refused(client_frame(b"x", fin=fin), 1002, before=[client_frame(b"a", fin=False)])


def test_text_inside_a_fragmented_binary_message() -> None:
    refused(client_frame(b"x", OP_TEXT), 1003, before=[client_frame(b"a", fin=False)])


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7])
def test_unknown_data_opcode(opcode: int) -> None:
    refused(client_frame(b"x", opcode), 1002)
    refused(client_header(10, opcode)[:2], 1002)


@pytest.mark.parametrize("opcode", [0xB, 0xC, 0xD, 0xE, 0xF])
def test_unknown_control_opcode(opcode: int) -> None:
    refused(client_frame(b"x", opcode), 1002)
    refused(client_frame(b"", opcode), 1002)


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_fragmented_control_frame(opcode: int) -> None:
    refused(client_frame(b"", opcode, fin=False), 1002)


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
@pytest.mark.parametrize("size", [126, 65536])
def test_oversized_control_frame(opcode: int, size: int) -> None:
    """Control payloads are at most 125 bytes; refused from the header."""
    refused(client_header(size, opcode), 1002)


def test_control_frame_of_125_bytes_with_long_length_form() -> None:
    """The size, not the length encoding, is what limits a control frame."""
    assert FrameReader(MAX).feed(client_frame(b"p" * 125, OP_PING, length="16")) == [Ping(b"p" * 125)]


def test_frame_over_max_frame_refused_from_the_header() -> None:
    """A 10 MB frame is refused from its 10 header bytes: nothing of it is ever buffered."""
    header = client_header(10 * 1024 * 1024)
    assert len(header) == 14
    refused(header[:10], 1009, max_frame=4096)
    refused(header, 1009, max_frame=4096)
    refused(client_header(4097), 1009, max_frame=4096)
    refused(client_header(2**64 - 1), 1009, max_frame=4096)


def test_continuation_over_max_frame() -> None:
    refused(client_header(5000, OP_CONTINUATION), 1009, max_frame=4096, before=[client_frame(b"a", fin=False)])


def test_header_split_before_the_limit_is_known() -> None:
    """A 64-bit length arriving in pieces: wait for all eight bytes, then refuse."""
    header = client_header(10 * 1024 * 1024)
    reader = FrameReader(4096)
    for i in range(9):
        assert reader.feed(header[i : i + 1]) == []
    with pytest.raises(WsError) as caught:
        reader.feed(header[9:10])
    assert caught.value.code == 1009


def test_one_byte_close_payload() -> None:
    refused(client_frame(b"\x03", OP_CLOSE), 1002)


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1012, 1015, 1016, 2000, 2999, 5000, 65535])
def test_close_codes_a_peer_may_not_send(code: int) -> None:
    """1005 and 1006 are for reports only; below 1000 and 5000+ are not codes (RFC 6455 7.4)."""
    refused(client_frame(close_payload(code, b"why"), OP_CLOSE), 1002)


@pytest.mark.parametrize("reason", [b"\xff", b"caf\xc3", b"\xed\xa0\x80", b"\xc0\x80"])
def test_close_reason_not_utf8(reason: bytes) -> None:
    refused(client_frame(close_payload(1000, reason), OP_CLOSE), 1007)


def test_error_after_good_frames_in_earlier_chunks() -> None:
    """Frames already returned stay returned; the error ends the reader."""
    reader = FrameReader(MAX)
    assert reader.feed(client_frame(b"fine")) == [b"fine"]
    with pytest.raises(WsError):
        reader.feed(client_frame(b"t", OP_TEXT))
    assert reader.feed(client_frame(b"fine")) == []


# --- properties ------------------------------------------------------------------------------

SMALL = st.binary(max_size=300)
MASKS = st.binary(min_size=4, max_size=4)
# Large payloads from a seed: drawing 70 kB byte by byte would make each example slow.
LARGE = st.builds(
    lambda size, seed: random.Random(seed).randbytes(size), st.integers(60_000, 70_000), st.integers(0, 2**32)
)


@st.composite
def binary_frames(draw: st.DrawFn) -> tuple[bytes, list[bytes], list[Ping]]:
    """A stream of masked binary messages, some fragmented, with pings between frames."""
    payloads = draw(st.lists(SMALL, max_size=12))
    for _ in range(draw(st.integers(0, 2))):
        payloads.insert(draw(st.integers(0, len(payloads))), draw(LARGE))
    wire, pings, fragmented = b"", [], False
    for payload in payloads:
        fin = draw(st.booleans())
        lengths: list[Length] = ["auto", "64"] if len(payload) >= 65536 else ["auto", "16", "64"]
        mask = draw(MASKS)
        opcode = OP_CONTINUATION if fragmented else OP_BINARY
        wire += client_frame(payload, opcode, fin=fin, mask=mask, length=draw(st.sampled_from(lengths)))
        fragmented = not fin
        if draw(st.integers(0, 4)) == 0:
            ping = Ping(draw(st.binary(max_size=MAX_CONTROL)))
            wire += client_frame(ping.payload, OP_PING, mask=mask)
            pings.append(ping)
    return wire, payloads, pings


def chunked(data: st.DataObject, wire: bytes, max_cuts: int = 30) -> list[bytes]:
    if len(wire) < 2:
        return [wire]
    return split_at(wire, data.draw(st.sets(st.integers(1, len(wire) - 1), max_size=max_cuts)))


@settings(max_examples=50, deadline=None)
@given(stream=binary_frames(), data=st.data())
def test_binary_stream_survives_any_chunking(
    stream: tuple[bytes, list[bytes], list[Ping]], data: st.DataObject
) -> None:
    """Whatever the framing and however TCP cuts it, the bytes out are the bytes sent."""
    wire, payloads, pings = stream
    reader = FrameReader(70_000)
    events = feed_all(reader, chunked(data, wire))
    assert all(event for event in events if isinstance(event, bytes)), "no empty data events"
    assert b"".join(e for e in events if isinstance(e, bytes)) == b"".join(payloads)
    assert [e for e in events if isinstance(e, Ping)] == pings
    assert bytes(reader._buf) == b""


def noise_pieces() -> st.SearchStrategy[bytes]:
    """Random bytes, plus valid and near-valid frames so parsing gets past the first header."""
    return st.one_of(
        st.binary(max_size=40),
        st.builds(
            lambda payload, opcode, fin, mask: client_frame(payload, opcode, fin=fin, mask=mask),
            st.binary(max_size=200),
            st.sampled_from([OP_CONTINUATION, OP_BINARY, OP_PING, OP_PONG, OP_CLOSE, OP_TEXT, 3, 0xB]),
            st.booleans(),
            MASKS,
        ),
        st.builds(lambda size, mask: client_header(size, mask=mask), st.integers(0, 2**64 - 1), MASKS),
    )


@settings(max_examples=150, deadline=None)
@given(
    pieces=st.lists(noise_pieces(), max_size=10),
    max_frame=st.sampled_from([MAX_CONTROL, 126, 300, 4096]),
    data=st.data(),
)
def test_noise_gives_events_or_ws_error_and_bounded_buffer(
    pieces: list[bytes], max_frame: int, data: st.DataObject
) -> None:
    """Hostile input never escapes as anything but WsError, and never buffers more than a frame."""
    reader = FrameReader(max_frame)
    closed = False
    for chunk in chunked(data, b"".join(pieces)):
        try:
            events = reader.feed(chunk)
        except WsError as error:
            assert error.code in (1002, 1003, 1007, 1009)
            assert bytes(reader._buf) == b""
            assert reader.feed(chunk) == []
            return
        finally:
            assert len(reader._buf) <= max_frame + 14
        for event in events:
            assert not closed, "nothing after a Close"
            assert isinstance(event, (bytes, Ping, Pong, Close))
            assert not isinstance(event, bytes) or event
            closed = isinstance(event, Close)
