"""The clipboard policy's pure parts: claim parsing, SetEncodings filtering, the server framer,
the client framer's size limit and the per-session gate. Streams are cut at every possible
place (hypothesis), since TCP delivers them in arbitrary chunks."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from console_proxy.protocol import clipboard, rfb
from console_proxy.protocol.clipboard import ClipboardGate, Encoding, ServerMessageFramer, parse_clip

EXT_CLIP = 0xC0A1E5CE - (1 << 32)
TIGHT = 7
HEXTILE = 5


def rect(x: int, y: int, w: int, h: int, encoding: int, payload: bytes = b"") -> bytes:
    return struct.pack(">HHHHi", x, y, w, h, encoding) + payload


def update(*rects: bytes, count: int | None = None) -> bytes:
    return struct.pack(">BxH", 0, len(rects) if count is None else count) + b"".join(rects)


def server_cut(text: bytes, *, extended: bool = False) -> bytes:
    return struct.pack(">Bxxxi", 3, -len(text) if extended else len(text)) + text


def client_cut(text: bytes, *, extended: bool = False) -> bytes:
    return struct.pack(">Bxxxi", 6, -len(text) if extended else len(text)) + text


def set_encodings(*encodings: int) -> bytes:
    return struct.pack(">BxH", 2, len(encodings)) + b"".join(struct.pack(">i", e) for e in encodings)


def encodings_of(message: bytes) -> list[int]:
    count = struct.unpack_from(">H", message, 2)[0]
    return [struct.unpack_from(">i", message, 4 + 4 * i)[0] for i in range(count)]


def set_pixel_format(bpp: int) -> bytes:
    return bytes([0, 0, 0, 0, bpp, 24, 0, 1]) + bytes(12)


# --- the claim ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "allow_in", "allow_out"),
    [(None, True, True), ("both", True, True), ("in", True, False), ("out", False, True), ("none", False, False)],
)
def test_clip_values(value: str | None, allow_in: bool, allow_out: bool) -> None:
    policy = parse_clip(value)
    assert (policy.allow_in, policy.allow_out) == (allow_in, allow_out)
    assert policy.name == (value or "both")


@pytest.mark.parametrize("value", ["", "BOTH", "all", "in,out", "read"])
def test_unknown_clip_values_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="clip"):
        parse_clip(value)


# --- SetEncodings ------------------------------------------------------------------------------

NOVNC = [1, TIGHT, -260, 16, 21, HEXTILE, 2, 6, 0, -26, -254, -223, -224, -258, -261, -308, -309, -312]
NOVNC += [-313, -307, EXT_CLIP, -316, 0x574D5664, -239]


def test_both_leaves_set_encodings_untouched() -> None:
    message = set_encodings(*NOVNC)
    assert clipboard.filter_set_encodings(message, parse_clip("both")) is message


def test_out_only_strips_the_extended_clipboard() -> None:
    kept = encodings_of(clipboard.filter_set_encodings(set_encodings(*NOVNC), parse_clip("out")))
    assert kept == [e for e in NOVNC if e != EXT_CLIP]


@pytest.mark.parametrize("value", ["in", "none"])
def test_without_out_only_frameable_encodings_remain_in_order(value: str) -> None:
    kept = encodings_of(clipboard.filter_set_encodings(set_encodings(*NOVNC), parse_clip(value)))
    assert kept == [1, 16, 6, 0, -26, -254, -223, -224, -258, -261, -308, -309, -312, -313, -307, -239]


# --- the server framer -------------------------------------------------------------------------


def _server_messages(bpp: int) -> st.SearchStrategy[tuple[bytes, bool]]:
    """(message, kept): every message type and rectangle encoding the framer must pass on."""
    size = st.integers(0, 9)
    text = st.binary(max_size=40)
    raw = st.builds(lambda w, h, b: rect(0, 0, w, h, 0, b"\x11" * (w * h * bpp // 8)), size, size, st.just(0))
    prefixed = st.builds(
        lambda enc, data: rect(1, 1, 4, 4, enc, struct.pack(">I", len(data)) + data), st.sampled_from([6, 16]), text
    )
    cursor = st.builds(lambda w, h: rect(2, 2, w, h, -239, b"\x22" * (w * h * bpp // 8 + (w + 7) // 8 * h)), size, size)
    x_cursor = st.builds(
        lambda w, h: rect(2, 2, w, h, -240, b"\x33" * (6 + 2 * ((w + 7) // 8) * h if w * h else 0)), size, size
    )
    screens = st.builds(
        lambda n: rect(0, 0, 640, 480, -308, bytes([n, 0, 0, 0]) + b"\x44" * (16 * n)), st.integers(0, 3)
    )
    fixed = st.sampled_from(
        [
            rect(0, 0, 1, 1, 1, b"\x00\x01\x00\x02"),
            rect(0, 0, 800, 600, -223),
            rect(0, 0, 0, 0, -258),
            rect(0, 0, 0, 0, -257),
            rect(0, 0, 0, 0, -261, b"\x07"),
        ]
    )
    name = st.builds(lambda data: rect(0, 0, 0, 0, -307, struct.pack(">I", len(data)) + data), text)
    rects = st.lists(st.one_of(raw, prefixed, cursor, x_cursor, screens, fixed, name), max_size=4)
    updates = st.builds(lambda rs: (update(*rs), True), rects)
    last_rect = st.builds(lambda rs: (update(*rs, rect(0, 0, 0, 0, -224), count=0xFFFF), True), rects)
    others = st.sampled_from(
        [
            (b"\x02", True),
            (b"\x96", True),
            (b"\xfa\x00\x01\x02", True),
            (struct.pack(">BxHH", 1, 0, 2) + b"\x01" * 12, True),
            (struct.pack(">BxxxIB", 248, 0x80000000, 3) + b"abc", True),
        ]
    )
    cuts = st.builds(lambda t, ext: (server_cut(t, extended=ext), False), text, st.booleans())
    return st.one_of(updates, last_rect, others, cuts)


@st.composite
def _stream(draw: st.DrawFn) -> tuple[int, list[tuple[bytes, bool]], list[int]]:
    bpp = draw(st.sampled_from([8, 16, 32]))
    messages = draw(st.lists(_server_messages(bpp), max_size=8))
    whole = b"".join(m for m, _ in messages)
    cuts = sorted(draw(st.lists(st.integers(0, len(whole)), max_size=6)))
    return bpp, messages, cuts


@settings(max_examples=300, deadline=None)
@given(_stream())
def test_the_server_framer_drops_cut_text_and_passes_everything_else_in_any_chunking(
    case: tuple[int, list[tuple[bytes, bool]], list[int]],
) -> None:
    bpp, messages, cuts = case
    whole = b"".join(m for m, _ in messages)
    framer = ServerMessageFramer(bpp)
    out = b""
    for start, end in zip([0, *cuts], [*cuts, len(whole)], strict=True):
        out += framer.feed(whole[start:end])
    assert out == b"".join(m for m, kept in messages if kept)
    assert framer.dropped == sum(1 for _, kept in messages if not kept)


def test_a_huge_cut_text_is_skipped_without_being_buffered() -> None:
    framer = ServerMessageFramer(32)
    assert framer.feed(struct.pack(">Bxxxi", 3, 1 << 30)) == b""
    for _ in range(64):
        assert framer.feed(b"\x00" * 65536) == b""
    assert framer._head == b""
    assert framer.dropped == 1


def test_pixel_format_changes_the_raw_length() -> None:
    framer = ServerMessageFramer(32)
    framer.set_bits_per_pixel(8)
    message = update(rect(0, 0, 2, 2, 0, b"\x01" * 4)) + b"\x02"
    assert framer.feed(message) == message


@pytest.mark.parametrize(
    "message",
    [
        b"\x04",  # an unknown server message type
        b"\xff\x01\x00\x00",  # QEMU audio: never asked for (stripped)
        update(rect(0, 0, 8, 8, TIGHT, b"\x00")),
        update(rect(0, 0, 8, 8, HEXTILE, b"\x00")),
        update(rect(0, 0, 0, 0, EXT_CLIP)),
        update(rect(0, 0, 0, 0, -307, struct.pack(">I", 1 << 20))),
    ],
    ids=["unknown type", "qemu audio", "tight", "hextile", "extended clipboard", "huge name"],
)
def test_what_cannot_be_framed_ends_the_session(message: bytes) -> None:
    with pytest.raises(rfb.RfbError) as info:
        ServerMessageFramer(32).feed(message)
    assert info.value.code == "target_protocol_error"


# --- the client framer's size limit ------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 40), st.lists(st.integers(0, 200), max_size=5))
def test_oversized_client_cut_text_is_reported_once_and_the_stream_goes_on(size: int, cuts: list[int]) -> None:
    stream = client_cut(b"x" * size) + b"\x05\x00\x00\x01\x00\x02" + client_cut(b"ok")
    framer = rfb.ClientMessageFramer(max_message=64, max_cut_text=16)
    messages: list[tuple[int, bytes]] = []
    points = sorted(c for c in cuts if c <= len(stream))
    for start, end in zip([0, *points], [*points, len(stream)], strict=True):
        messages += framer.feed(stream[start:end])
    first = [rfb.DROPPED_CUT_TEXT] if size > 16 else [(6, client_cut(b"x" * size))]
    assert messages == [*first, (5, b"\x05\x00\x00\x01\x00\x02"), (6, client_cut(b"ok"))]


def test_a_cut_text_above_the_websocket_limit_is_dropped_not_refused() -> None:
    framer = rfb.ClientMessageFramer(max_message=1 << 20, max_cut_text=1 << 20)
    assert framer.feed(struct.pack(">Bxxxi", 6, 100 << 20)) == [rfb.DROPPED_CUT_TEXT]
    for _ in range(100):
        assert framer.feed(b"y" * (1 << 20)) == []
    key = b"\x04\x01\x00\x00\x00\x00\x00\x61"
    assert framer.feed(key) == [(4, key)]


def test_a_cut_text_within_its_limit_but_above_the_message_limit_is_dropped_not_refused() -> None:
    framer = rfb.ClientMessageFramer(max_message=64, max_cut_text=1024)
    assert framer.feed(client_cut(b"z" * 60)) == [rfb.DROPPED_CUT_TEXT]
    with pytest.raises(rfb.RfbError):  # other messages above the limit are still refused
        framer.feed(struct.pack(">BxH", 2, 100))


# --- the gate ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "classic_kept", "extended_kept"),
    [("both", True, True), ("in", True, False), ("out", False, False), ("none", False, False)],
)
def test_the_gate_drops_client_cut_text_by_policy(value: str, classic_kept: bool, extended_kept: bool) -> None:
    gate = ClipboardGate(parse_clip(value))
    key = (4, b"\x04\x01\x00\x00\x00\x00\x00\x61")
    classic, extended = (6, client_cut(b"hello")), (6, client_cut(b"\x10\x00\x00\x01", extended=True))
    kept = gate.from_browser([classic, key, extended])
    assert kept == [m for m, keep in ((classic, classic_kept), (key, True), (extended, extended_kept)) if keep]
    dropped = 2 - classic_kept - extended_kept
    assert gate.dropped == ({("in", "policy"): dropped} if dropped else {})


def test_the_gate_counts_oversized_cut_text_whatever_the_policy() -> None:
    gate = ClipboardGate(parse_clip(None))
    assert gate.from_browser([rfb.DROPPED_CUT_TEXT]) == []
    assert gate.dropped == {("in", "too_large"): 1}


@pytest.mark.parametrize("value", ["both", "out"])
def test_with_out_allowed_the_server_stream_is_not_framed(value: str) -> None:
    gate = ClipboardGate(parse_clip(value))
    gate.opened(32)
    assert not gate.frames_server


def test_without_out_the_gate_frames_the_server_and_follows_the_pixel_format() -> None:
    gate = ClipboardGate(parse_clip("in"))
    gate.opened(32)
    assert gate.frames_server
    pixel_format = (0, set_pixel_format(16))
    encodings = (2, set_encodings(TIGHT, 16, EXT_CLIP, 0))
    kept = gate.from_browser([pixel_format, encodings])
    assert kept == [pixel_format, (2, set_encodings(16, 0))]
    raw = update(rect(0, 0, 3, 1, Encoding.RAW, b"\x01\x02" * 3))
    assert gate.from_server(raw + server_cut(b"secret") + b"\x02") == raw + b"\x02"
    assert gate.dropped == {("out", "policy"): 1}


def test_a_pixel_format_rfb_forbids_ends_the_session() -> None:
    gate = ClipboardGate(parse_clip("none"))
    gate.opened(32)
    with pytest.raises(rfb.RfbError):
        gate.from_browser([(0, set_pixel_format(24))])
