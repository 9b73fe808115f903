"""Byte-level unit tests of the sans-I/O RFB core: no sockets, no clocks, no Tornado."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import pytest
from Crypto.Cipher import DES
from hypothesis import given, settings
from hypothesis import strategies as st

from console_proxy.protocol.rfb import (
    INPUT_MESSAGE_TYPES,
    MAX_NAME_LENGTH,
    MAX_PENDING,
    Authenticated,
    ClientInitReceived,
    ClientMessageFramer,
    DownstreamHandshake,
    RfbError,
    Send,
    ServerInit,
    ServerInitReady,
    StartTls,
    TlsPolicy,
    UpstreamAction,
    UpstreamHandshake,
    vnc_auth_response,
)
from console_proxy.upstream_tls import Pin

PASSWORD = "hunter22"
CHALLENGE = bytes(range(16))
# 32 bpp, depth 24, little endian, true colour, max 255/255/255, shifts 16/8/0.
PIXEL_FORMAT = bytes([32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0])
V33, V37, V38 = b"RFB 003.003\n", b"RFB 003.007\n", b"RFB 003.008\n"


def u32(value: int) -> bytes:
    return struct.pack(">I", value)


def types(*offered: int) -> bytes:
    return bytes([len(offered), *offered])


def reason(text: bytes, length: int | None = None) -> bytes:
    return u32(len(text) if length is None else length) + text


def server_init(width: int = 800, height: int = 600, name: bytes = b"vm-1") -> bytes:
    return struct.pack(">HH", width, height) + PIXEL_FORMAT + u32(len(name)) + name


def vencrypt_subtypes(*subtypes: int) -> bytes:
    return bytes([len(subtypes)]) + b"".join(u32(s) for s in subtypes)


def upstream(password: str | None = PASSWORD, **policy: object) -> UpstreamHandshake:
    """A handshake whose policy has a CA to verify X.509 with unless ``ca_pem=None`` is given
    (a proxy CA, pinning nothing: plain types stay usable)."""
    policy = {"ca_pem": "PEM", **policy}
    return UpstreamHandshake(password=password, tls=TlsPolicy(**policy))  # type: ignore[arg-type]


def expected_response(password: str, challenge: bytes) -> bytes:
    """Independent reference: reverse bits via a lookup of the spec's rule, then DES-ECB."""
    key = password.encode()[:8].ljust(8, b"\0")
    table = [sum(((b >> i) & 1) << (7 - i) for i in range(8)) for b in range(256)]
    return DES.new(bytes(table[b] for b in key), DES.MODE_ECB).encrypt(challenge)


@dataclass
class Outcome:
    """What a driven upstream handshake did: bytes it sent, TLS requests, the end."""

    sent: bytes = b""
    tls: list[bool] = field(default_factory=list)
    authenticated: int = 0
    ready: ServerInitReady | None = None
    leftover: bytes = b""


def drive(
    handshake: UpstreamHandshake,
    phases: Sequence[Iterable[bytes]],
    *,
    shared: bool = True,
) -> Outcome:
    """Feed each phase's chunks; phase N+1 starts after the N-th StartTls (bytes 'over TLS')."""
    out = Outcome()
    phase_list = [list(p) for p in phases]
    for index, chunks in enumerate(phase_list):
        for position, chunk in enumerate(chunks):
            if out.ready is not None:
                out.leftover += b"".join(chunks[position:])
                break
            handle(handshake, handshake.feed(chunk), out, shared)
        if index + 1 < len(phase_list) and out.ready is None:
            assert len(out.tls) == index + 1, "next phase needs a StartTls first"
    return out


def handle(handshake: UpstreamHandshake, actions: list[UpstreamAction], out: Outcome, shared: bool) -> None:
    for action in actions:
        if isinstance(action, Send):
            out.sent += action.data
        elif isinstance(action, StartTls):
            out.tls.append(action.verify)
            handle(handshake, handshake.tls_started(), out, shared)
        elif isinstance(action, Authenticated):
            out.authenticated += 1
            out.sent += handshake.send_client_init(shared)
            handle(handshake, handshake.feed(b""), out, shared)  # bytes that came early
        else:
            assert isinstance(action, ServerInitReady)
            out.ready = action


def whole(*parts: bytes) -> list[list[bytes]]:
    return [[b"".join(parts)]]


def bytewise(*parts: bytes) -> list[list[bytes]]:
    data = b"".join(parts)
    return [[data[i : i + 1] for i in range(len(data))]]


# --- scripted servers ----------------------------------------------------------------------

RESPONSE = expected_response(PASSWORD, CHALLENGE)

FLOW_38_NONE = (V38 + types(1) + u32(0) + server_init(),)
FLOW_38_VNC = (V38 + types(2) + CHALLENGE + u32(0) + server_init(),)
FLOW_37_NONE = (V37 + types(1) + server_init(),)
FLOW_37_VNC = (V37 + types(2) + CHALLENGE + u32(0) + server_init(),)
FLOW_33_NONE = (V33 + u32(1) + server_init(),)
FLOW_33_VNC = (V33 + u32(2) + CHALLENGE + u32(0) + server_init(),)
FLOW_X509VNC = (
    V38 + types(19) + b"\x00\x02" + b"\x00" + vencrypt_subtypes(261) + b"\x01",
    CHALLENGE + u32(0) + server_init(),
)
FLOW_X509NONE = (
    V38 + types(19) + b"\x00\x02" + b"\x00" + vencrypt_subtypes(260) + b"\x01",
    u32(0) + server_init(),
)
FLOW_37_X509NONE = (
    V37 + types(19) + b"\x00\x02" + b"\x00" + vencrypt_subtypes(260) + b"\x01",
    u32(0) + server_init(),
)
FLOWS = {
    "3.8-none": (FLOW_38_NONE, V38 + b"\x01" + b"\x01", "none"),
    "3.8-vnc": (FLOW_38_VNC, V38 + b"\x02" + RESPONSE + b"\x01", "vnc"),
    "3.7-none": (FLOW_37_NONE, V37 + b"\x01" + b"\x01", "none"),
    "3.7-vnc": (FLOW_37_VNC, V37 + b"\x02" + RESPONSE + b"\x01", "vnc"),
    "3.3-none": (FLOW_33_NONE, V33 + b"\x01", "none"),
    "3.3-vnc": (FLOW_33_VNC, V33 + RESPONSE + b"\x01", "vnc"),
    "x509vnc": (
        FLOW_X509VNC,
        V38 + b"\x13" + b"\x00\x02" + u32(261) + RESPONSE + b"\x01",
        "vencrypt-x509vnc",
    ),
    "x509none": (
        FLOW_X509NONE,
        V38 + b"\x13" + b"\x00\x02" + u32(260) + b"\x01",
        "vencrypt-x509none",
    ),
    "3.7-x509none": (
        FLOW_37_X509NONE,
        V37 + b"\x13" + b"\x00\x02" + u32(260) + b"\x01",
        "vencrypt-x509none",
    ),
}


@pytest.mark.parametrize("name", sorted(FLOWS))
@pytest.mark.parametrize("chunking", ["whole", "bytewise"])
def test_complete_flows(name: str, chunking: str) -> None:
    phases, expected_sent, security = FLOWS[name]
    split = whole if chunking == "whole" else bytewise
    chunked = [split(p)[0] for p in phases]
    handshake = upstream()
    out = drive(handshake, chunked)
    assert out.sent == expected_sent
    assert out.authenticated == 1
    assert out.ready is not None
    assert out.ready.server_init == ServerInit(800, 600, PIXEL_FORMAT, b"vm-1")
    assert out.ready.rest == b""
    assert handshake.security_type == security
    assert out.tls == ([True] if len(phases) == 2 else [])


@settings(max_examples=60, deadline=None)
@given(data=st.data(), name=st.sampled_from(sorted(FLOWS)), extra=st.binary(max_size=64))
def test_any_chunking_gives_the_same_result(data: st.DataObject, name: str, extra: bytes) -> None:
    phases, expected_sent, _ = FLOWS[name]
    phases = (*phases[:-1], phases[-1] + extra)
    chunked = []
    for phase in phases:
        cuts = sorted(data.draw(st.sets(st.integers(1, len(phase) - 1), max_size=8)))
        bounds = [0, *cuts, len(phase)]
        chunked.append([phase[a:b] for a, b in itertools.pairwise(bounds)])
    out = drive(upstream(), chunked)
    assert out.sent == expected_sent
    assert out.ready is not None
    assert out.ready.rest + out.leftover == extra


def test_rest_after_server_init_is_returned() -> None:
    update = b"\x00\x00\x00\x01" + b"pixels"
    out = drive(upstream(), whole(FLOW_38_NONE[0] + update))
    assert out.ready is not None
    assert out.ready.rest == update


def test_client_init_shared_flag() -> None:
    assert drive(upstream(), whole(*FLOW_38_NONE), shared=False).sent.endswith(b"\x01\x00")
    assert drive(upstream(), whole(*FLOW_38_NONE), shared=True).sent.endswith(b"\x01\x01")


# --- version lines -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"RFB 003.003\n", V33),
        (b"RFB 003.004\n", V33),
        (b"RFB 003.005\n", V33),
        (b"RFB 003.006\n", V33),
        (b"RFB 003.007\n", V37),
        (b"RFB 003.008\n", V38),
        (b"RFB 003.009\n", V38),
        (b"RFB 003.889\n", V38),
        (b"RFB 004.000\n", V38),
        (b"RFB 004.001\n", V38),
        (b"RFB 005.000\n", V38),
        (b"RFB 999.999\n", V38),
    ],
)
def test_server_versions(line: bytes, reply: bytes) -> None:
    handshake = upstream()
    assert handshake.feed(line) == [Send(reply)]
    assert handshake.version == (int(reply[4:7]), int(reply[8:11]))


@pytest.mark.parametrize(
    "line",
    [
        b"RFB 003.002\n",
        b"RFB 003.000\n",
        b"RFB 002.008\n",
        b"RFB 000.000\n",
        b"RFB 001.009\n",
        b"rfb 003.008\n",
        b"RFB 003.008\r",
        b"RFB 003,008\n",
        b"RFB 003.08\n\n",
        b"RFB 03.008\n\n",
        b"RFB  03.008\n",
        b"RFB +03.008\n",
        b"RFB 003.-08\n",
        b"RFB 0x3.008\n",
        b"RFB_003.008\n",
        b"RFX 003.008\n",
        b"HTTP/1.1 400",
        b"SSH-2.0-Open",
        b"\x00" * 12,
        b"\xff" * 12,
        b"RFB 003.008\x00",
        b" RFB 003.008",
    ],
)
def test_bad_server_versions(line: bytes) -> None:
    with pytest.raises(RfbError) as info:
        upstream().feed(line)
    assert info.value.code == "target_protocol_error"
    assert info.value.close_code == 4502


@given(st.binary(min_size=12, max_size=12))
def test_random_version_lines_parse_or_fail_cleanly(line: bytes) -> None:
    try:
        actions = upstream().feed(line)
    except RfbError as err:
        assert err.close_code == 4502
    else:
        assert actions[0].data in (V33, V37, V38)  # type: ignore[union-attr]
        assert line[:4] == b"RFB " and line[11:] == b"\n"


def test_version_needs_all_twelve_bytes() -> None:
    handshake = upstream()
    for byte in V38[:-1]:
        assert handshake.feed(bytes([byte])) == []
    assert handshake.feed(b"\n") == [Send(V38)]


# --- security type choice ------------------------------------------------------------------

ALL_POLICIES = {
    "default": {"ca_pem": None},
    "require": {"pin": Pin.REQUIRE},
    "ca": {"pin": Pin.CA, "ca_pem": "PEM"},
    "anon": {"allow_anonymous": True},
    "proxy_ca": {"ca_pem": "PEM"},  # --upstream-ca for a token that pins nothing: no demand for TLS
}


@pytest.mark.parametrize(
    ("offered", "password", "policy", "chosen"),
    [
        ((1,), None, "default", 1),
        ((1,), PASSWORD, "default", 1),
        ((2,), PASSWORD, "default", 2),
        ((1, 2), PASSWORD, "default", 2),
        ((2, 1), PASSWORD, "default", 2),
        ((1, 2), None, "default", 1),
        ((2, 19), PASSWORD, "default", 2),
        ((19, 2), PASSWORD, "default", 2),
        ((19, 1), None, "default", 1),
        ((19,), PASSWORD, "default", 19),
        ((19, 2), None, "default", 19),
        ((19, 2), PASSWORD, "require", 19),
        ((19, 2), PASSWORD, "ca", 19),
        ((19, 1), PASSWORD, "ca", 19),
        ((19, 2), PASSWORD, "anon", 2),
        ((19, 2), PASSWORD, "proxy_ca", 2),
        ((19, 1), None, "proxy_ca", 1),
        ((2,), PASSWORD, "proxy_ca", 2),
        ((1,), None, "proxy_ca", 1),
        ((19,), PASSWORD, "proxy_ca", 19),
        ((16, 2), PASSWORD, "default", 2),
        ((5, 6, 16, 1), None, "default", 1),
        ((30, 1, 2, 18), PASSWORD, "default", 2),
        ((1, 1, 1), None, "default", 1),
        ((*tuple(range(3, 256)), 1), None, "default", 1),
    ],
)
def test_security_choice(offered: tuple[int, ...], password: str | None, policy: str, chosen: int) -> None:
    handshake = upstream(password, **ALL_POLICIES[policy])
    handshake.feed(V38)
    actions = handshake.feed(types(*offered))
    assert actions[0] == Send(bytes([chosen]))


@pytest.mark.parametrize(
    ("offered", "password", "policy"),
    [
        ((2,), None, "default"),
        ((1,), None, "require"),
        ((2,), PASSWORD, "require"),
        ((1, 2), PASSWORD, "ca"),
        ((16,), PASSWORD, "default"),
        ((5, 6, 16, 18, 30), PASSWORD, "anon"),
        ((0,), None, "default"),
        ((255,), PASSWORD, "default"),
        (tuple(range(3, 19)), PASSWORD, "default"),
    ],
)
def test_security_refused(offered: tuple[int, ...], password: str | None, policy: str) -> None:
    handshake = upstream(password, **ALL_POLICIES[policy])
    handshake.feed(V38)
    with pytest.raises(RfbError) as info:
        handshake.feed(types(*offered))
    assert info.value.code == "target_auth_failed"
    assert info.value.close_code == 4501
    plain_refused = policy in ("require", "ca") and {1, 2} & set(offered)
    assert ("offers no TLS" if plain_refused else "no acceptable security type") in str(info.value)


def test_security_list_waits_for_all_types() -> None:
    handshake = upstream()
    handshake.feed(V38)
    assert handshake.feed(b"\x03\x10\x05") == []
    assert handshake.feed(b"\x02") == [Send(b"\x02")]


def test_security_type_is_pending_until_chosen() -> None:
    handshake = upstream()
    assert handshake.security_type == "pending"
    handshake.feed(V38)
    assert handshake.security_type == "pending"
    handshake.feed(types(2))
    assert handshake.security_type == "vnc"


def test_38_none_waits_for_security_result() -> None:
    handshake = upstream()
    handshake.feed(V38)
    assert handshake.feed(types(1)) == [Send(b"\x01")]
    assert handshake.feed(u32(0)) == [Authenticated()]


def test_37_none_has_no_security_result() -> None:
    handshake = upstream()
    handshake.feed(V37)
    assert handshake.feed(types(1)) == [Send(b"\x01"), Authenticated()]


@pytest.mark.parametrize("shared", [True, False])
def test_pipelined_client_init_rides_with_the_challenge_response(shared: bool) -> None:
    handshake = UpstreamHandshake(password=PASSWORD, tls=TlsPolicy(), client_init=shared)
    handshake.feed(V38)
    assert handshake.feed(types(2)) == [Send(b"\x02")]
    assert not handshake.client_init_sent
    flag = b"\x01" if shared else b"\x00"
    assert handshake.feed(CHALLENGE) == [Send(RESPONSE + flag)]
    assert handshake.client_init_sent
    ready = handshake.feed(u32(0) + server_init())
    assert ready[0] == Authenticated() and isinstance(ready[1], ServerInitReady)
    with pytest.raises(RuntimeError):
        handshake.send_client_init(True)


@pytest.mark.parametrize(("version", "result"), [(V38, u32(0)), (V37, b"")])
def test_pipelined_client_init_rides_with_the_none_choice(version: bytes, result: bytes) -> None:
    handshake = UpstreamHandshake(password=None, tls=TlsPolicy(), client_init=True)
    handshake.feed(version)
    actions = handshake.feed(types(1))
    assert actions[0] == Send(b"\x01\x01") and handshake.client_init_sent
    actions += handshake.feed(result + server_init())
    assert Authenticated() in actions and isinstance(actions[-1], ServerInitReady)


def test_pipelined_refusal_still_reports_the_reason() -> None:
    handshake = UpstreamHandshake(password=PASSWORD, tls=TlsPolicy(), client_init=True)
    handshake.feed(V38 + types(2))
    handshake.feed(CHALLENGE)
    with pytest.raises(RfbError) as info:
        handshake.feed(u32(1) + reason(b"bad password"))
    assert info.value.close_code == 4501 and "bad password" in str(info.value)


def test_33_none_cannot_pipeline_and_says_so() -> None:
    # RFB 3.3 None: the client sends nothing before ClientInit, so it is sent the usual way
    handshake = UpstreamHandshake(password=None, tls=TlsPolicy(), client_init=True)
    handshake.feed(V33)
    assert handshake.feed(u32(1)) == [Authenticated()]
    assert not handshake.client_init_sent
    assert handshake.send_client_init(True) == b"\x01"


# --- RFB 3.3 -------------------------------------------------------------------------------


def test_33_none() -> None:
    handshake = upstream(None)
    handshake.feed(V33)
    assert handshake.feed(u32(1)) == [Authenticated()]
    assert handshake.security_type == "none"


def test_33_vnc_auth() -> None:
    handshake = upstream()
    handshake.feed(V33)
    assert handshake.feed(u32(2)) == []
    assert handshake.feed(CHALLENGE) == [Send(RESPONSE)]
    assert handshake.feed(u32(0)) == [Authenticated()]


@pytest.mark.parametrize("chosen", [3, 5, 16, 18, 19, 256, 0xFFFFFFFF])
def test_33_invalid_type(chosen: int) -> None:
    handshake = upstream()
    handshake.feed(V33)
    with pytest.raises(RfbError) as info:
        handshake.feed(u32(chosen))
    assert info.value.close_code == 4502


@pytest.mark.parametrize(
    ("chosen", "password", "policy"),
    [(1, None, "require"), (1, PASSWORD, "ca"), (2, PASSWORD, "require"), (2, None, "default")],
)
def test_33_policy_refusals(chosen: int, password: str | None, policy: str) -> None:
    handshake = upstream(password, **ALL_POLICIES[policy])
    handshake.feed(V33)
    with pytest.raises(RfbError) as info:
        handshake.feed(u32(chosen))
    assert info.value.close_code == 4501


@pytest.mark.parametrize("version", [V33, V37])
def test_pre_38_failed_result_has_no_reason(version: bytes) -> None:
    handshake = upstream()
    handshake.feed(version)
    handshake.feed(u32(2) if version == V33 else types(2))
    handshake.feed(CHALLENGE)
    with pytest.raises(RfbError) as info:
        handshake.feed(u32(1))
    assert info.value.close_code == 4501
    assert str(info.value) == "target rejected authentication"


# --- failure reasons -----------------------------------------------------------------------


def refused_38(handshake: UpstreamHandshake) -> None:
    handshake.feed(V38)
    handshake.feed(b"\x00")


def failed_result_38(handshake: UpstreamHandshake) -> None:
    handshake.feed(V38 + types(2) + CHALLENGE)
    handshake.feed(u32(1))


def refused_33(handshake: UpstreamHandshake) -> None:
    handshake.feed(V33)
    handshake.feed(u32(0))


FAILURES = {
    "3.8 zero count": (refused_38, "target refused the connection"),
    "3.8 SecurityResult": (failed_result_38, "target rejected authentication"),
    "3.3 type 0": (refused_33, "target refused the connection"),
}


@pytest.mark.parametrize("where", sorted(FAILURES))
@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (b"Too many security failures", "Too many security failures"),
        (b"Authentication failed", "Authentication failed"),
        (b"", ""),
        (b"bad\r\n\x1b[31mred\x00", "bad???[31mred?"),
        (b"\xff\xfe caf\xc3\xa9", "\ufffd\ufffd caf\u00e9"),
    ],
)
def test_failure_reason(where: str, text: bytes, shown: str) -> None:
    start, prefix = FAILURES[where]
    handshake = upstream()
    start(handshake)
    with pytest.raises(RfbError) as info:
        handshake.feed(reason(text))
    assert info.value.code == "target_auth_failed"
    assert info.value.close_code == 4501
    assert str(info.value) == (f"{prefix}: {shown}" if shown else prefix)


@pytest.mark.parametrize("where", sorted(FAILURES))
@pytest.mark.parametrize("length", [1025, 4096, 1 << 20, 0xFFFFFFFF])
def test_huge_reason_is_cut_without_waiting(where: str, length: int) -> None:
    """A reason announced above 1 KiB fails at once with what has arrived (cut at 1 KiB)."""
    start, _ = FAILURES[where]
    for arrived, shown in ((b"x" * 10, "x" * 10), (b"x" * 2000, "x" * 1024)):
        handshake = upstream()
        start(handshake)
        with pytest.raises(RfbError) as info:
            handshake.feed(u32(length) + arrived)
        assert info.value.close_code == 4501
        assert str(info.value).endswith(": " + shown)


@pytest.mark.parametrize("where", sorted(FAILURES))
def test_reason_waits_for_declared_short_length(where: str) -> None:
    start, _ = FAILURES[where]
    handshake = upstream()
    start(handshake)
    assert handshake.feed(u32(5) + b"abc") == []
    with pytest.raises(RfbError, match=r"abcde$"):
        handshake.feed(b"de")


@settings(max_examples=50)
@given(password=st.text(max_size=40).map("SECRET-".__add__), text=st.binary(max_size=2000))
def test_errors_never_show_the_password(password: str, text: bytes) -> None:
    handshake = upstream(password)
    handshake.feed(V38 + types(2) + CHALLENGE)
    with pytest.raises(RfbError) as info:
        handshake.feed(u32(1) + reason(text))
    assert password not in repr(handshake)
    if password not in text.decode("utf-8", "replace"):
        assert password not in str(info.value)
        assert password not in repr(info.value)
    assert len(str(info.value)) <= 1024 + 40


# --- VNC Authentication --------------------------------------------------------------------


@pytest.mark.parametrize(
    "password", ["", "a", "hunter22", "12345678", "123456789abc", "p\u00e4ss", "\u20ac\u20ac\u20ac"]
)
@pytest.mark.parametrize("challenge", [bytes(16), bytes(range(16)), b"\xff" * 16])
def test_vnc_auth_response_matches_reference(password: str, challenge: bytes) -> None:
    assert vnc_auth_response(password, challenge) == expected_response(password, challenge)


def test_vnc_auth_response_known_values() -> None:
    # The key for "password" after bit reversal is 0e 86 ce ce ee f6 4e 26.
    key = bytes.fromhex("0e86ceceeef64e26")
    assert vnc_auth_response("password", CHALLENGE) == DES.new(key, DES.MODE_ECB).encrypt(CHALLENGE)
    assert vnc_auth_response("password", bytes(16)).hex() == "ff97502e9422f089ff97502e9422f089"


def test_vnc_auth_uses_first_eight_bytes() -> None:
    assert vnc_auth_response("12345678", CHALLENGE) == vnc_auth_response("12345678xyz", CHALLENGE)
    assert vnc_auth_response("1234567", CHALLENGE) != vnc_auth_response("12345678", CHALLENGE)


@pytest.mark.parametrize("size", [0, 8, 15, 17, 32])
def test_vnc_auth_rejects_bad_challenge(size: int) -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        vnc_auth_response(PASSWORD, bytes(size))


def test_challenge_cipher_is_injectable() -> None:
    calls: list[tuple[str, bytes]] = []

    def cipher(password: str, challenge: bytes) -> bytes:
        calls.append((password, challenge))
        return b"R" * 16

    handshake = UpstreamHandshake(password="pw", tls=TlsPolicy(), challenge_cipher=cipher)
    handshake.feed(V38 + types(2))
    assert handshake.feed(CHALLENGE) == [Send(b"R" * 16)]
    assert calls == [("pw", CHALLENGE)]


def test_challenge_waits_for_sixteen_bytes() -> None:
    handshake = upstream()
    handshake.feed(V38 + types(2))
    assert handshake.feed(CHALLENGE[:15]) == []
    assert handshake.feed(CHALLENGE[15:]) == [Send(RESPONSE)]


@pytest.mark.parametrize("result", [1, 2, 0xFFFFFFFF])
def test_38_failed_result_reads_reason(result: int) -> None:
    handshake = upstream()
    handshake.feed(V38 + types(2) + CHALLENGE)
    with pytest.raises(RfbError, match="target rejected authentication: nope"):
        handshake.feed(u32(result) + reason(b"nope"))


# --- VeNCrypt ------------------------------------------------------------------------------

CA: dict[str, object] = {"pin": Pin.CA, "ca_pem": "PEM"}


def at_vencrypt(password: str | None = PASSWORD, **policy: object) -> UpstreamHandshake:
    handshake = upstream(password, **policy)
    handshake.feed(V38)
    assert handshake.feed(types(19)) == [Send(b"\x13")]
    return handshake


@pytest.mark.parametrize("minor", [2, 3, 9, 255])
def test_vencrypt_version_answered_with_02(minor: int) -> None:
    assert at_vencrypt().feed(bytes([0, minor])) == [Send(b"\x00\x02")]


@pytest.mark.parametrize("version", [b"\x00\x00", b"\x00\x01", b"\x01\x00", b"\x02\x02"])
def test_vencrypt_bad_versions(version: bytes) -> None:
    with pytest.raises(RfbError) as info:
        at_vencrypt().feed(version)
    assert info.value.close_code == 4502


@pytest.mark.parametrize("ack", [1, 2, 255])
def test_vencrypt_version_not_acknowledged(ack: int) -> None:
    with pytest.raises(RfbError) as info:
        at_vencrypt().feed(b"\x00\x02" + bytes([ack]))
    assert info.value.close_code == 4502


@pytest.mark.parametrize(
    ("offered", "password", "policy", "chosen", "verify"),
    [
        ((261,), PASSWORD, CA, 261, True),
        ((260,), PASSWORD, CA, 260, True),
        ((260, 261), PASSWORD, CA, 261, True),
        ((261, 260), None, CA, 260, True),
        ((256, 257, 258, 259, 260, 261, 262), PASSWORD, CA, 261, True),
        ((257, 258, 260), PASSWORD, CA, 260, True),
        ((261,), PASSWORD, {"ca_pem": "PEM"}, 261, True),  # the proxy's --upstream-ca verifies
        ((258, 261), PASSWORD, {"ca_pem": "PEM", "allow_anonymous": True}, 261, True),
        ((257, 260), PASSWORD, {"ca_pem": "PEM", "allow_anonymous": True}, 260, True),
        ((257, 260), PASSWORD, {"ca_pem": None, "allow_anonymous": True}, 257, False),  # X.509 unverifiable
        ((257, 258), PASSWORD, {"allow_anonymous": True}, 258, False),
        ((257, 258), None, {"allow_anonymous": True}, 257, False),
        ((258,), PASSWORD, {"allow_anonymous": True, "pin": Pin.REQUIRE}, 258, False),  # the token's allow_anon
        ((257,), None, {"allow_anonymous": True}, 257, False),
        ((2, 261), PASSWORD, CA, 261, True),
    ],
)
def test_vencrypt_subtype_choice(
    offered: tuple[int, ...],
    password: str | None,
    policy: dict[str, object],
    chosen: int,
    verify: bool,
) -> None:
    handshake = at_vencrypt(password, **policy)
    handshake.feed(b"\x00\x02\x00")
    assert handshake.feed(vencrypt_subtypes(*offered)) == [Send(u32(chosen))]
    assert handshake.feed(b"\x01") == [StartTls(verify=verify)]


@pytest.mark.parametrize(
    ("offered", "password", "policy"),
    [
        ((), PASSWORD, {}),
        ((256,), PASSWORD, CA),
        ((259, 262), PASSWORD, CA),
        ((257, 258), PASSWORD, {}),
        ((257, 258), PASSWORD, CA),
        ((257, 258), PASSWORD, {"pin": Pin.REQUIRE, "ca_pem": "PEM"}),
        ((258,), None, {"allow_anonymous": True}),
        ((261,), None, CA),
        ((260, 261), PASSWORD, {"ca_pem": None}),
        ((1, 2, 19), PASSWORD, {}),
        ((0xFFFFFFFF,), PASSWORD, {"allow_anonymous": True}),
    ],
)
def test_vencrypt_subtype_refused(offered: tuple[int, ...], password: str | None, policy: dict[str, object]) -> None:
    handshake = at_vencrypt(password, **policy)
    handshake.feed(b"\x00\x02\x00")
    with pytest.raises(RfbError) as info:
        handshake.feed(vencrypt_subtypes(*offered))
    assert info.value.close_code == 4501


@pytest.mark.parametrize(
    ("offered", "policy", "says"),
    [
        ((257, 258), CA, "offers only anonymous TLS (no certificate); this console's token pins a CA"),
        ((258,), {"pin": Pin.REQUIRE}, "offers only anonymous TLS (no certificate); this console's token requires TLS"),
        ((257,), {}, "offers only anonymous TLS (no certificate); anonymous TLS is not allowed"),
        ((260, 261), {"ca_pem": None}, "offers X.509 TLS but no CA is configured to verify it"),
        ((256, 259), CA, "no acceptable VeNCrypt subtype offered"),
    ],
)
def test_vencrypt_refusal_says_why(offered: tuple[int, ...], policy: dict[str, object], says: str) -> None:
    handshake = at_vencrypt(PASSWORD, **policy)
    handshake.feed(b"\x00\x02\x00")
    with pytest.raises(RfbError) as info:
        handshake.feed(vencrypt_subtypes(*offered))
    assert info.value.close_code == 4501 and says in str(info.value)
    assert str(sorted(offered)) in str(info.value)


def test_vencrypt_subtypes_wait_for_whole_list() -> None:
    handshake = at_vencrypt()
    handshake.feed(b"\x00\x02\x00")
    data = vencrypt_subtypes(257, 260, 261)
    assert handshake.feed(data[:-1]) == []
    assert handshake.feed(data[-1:]) == [Send(u32(261))]


@pytest.mark.parametrize("accept", [0, 2, 255])
def test_vencrypt_subtype_not_accepted(accept: int) -> None:
    handshake = at_vencrypt()
    handshake.feed(b"\x00\x02\x00" + vencrypt_subtypes(261))
    with pytest.raises(RfbError) as info:
        handshake.feed(bytes([accept]))
    assert info.value.close_code == 4501


def test_plaintext_after_accept_is_refused() -> None:
    handshake = at_vencrypt()
    handshake.feed(b"\x00\x02\x00" + vencrypt_subtypes(261))
    with pytest.raises(RfbError, match="plaintext where TLS was due"):
        handshake.feed(b"\x01" + CHALLENGE)


def test_feed_while_awaiting_tls_is_refused() -> None:
    handshake = at_vencrypt()
    handshake.feed(b"\x00\x02\x00" + vencrypt_subtypes(261))
    assert handshake.feed(b"\x01") == [StartTls(verify=True)]
    assert handshake.feed(b"") == []
    with pytest.raises(RfbError, match="plaintext"):
        handshake.feed(b"\x16\x03\x01")


def test_x509vnc_after_tls() -> None:
    handshake = at_vencrypt()
    handshake.feed(b"\x00\x02\x00" + vencrypt_subtypes(261) + b"\x01")
    assert handshake.tls_started() == []
    assert handshake.feed(CHALLENGE) == [Send(RESPONSE)]
    assert handshake.feed(u32(0)) == [Authenticated()]


def test_x509none_failed_result_has_reason() -> None:
    handshake = at_vencrypt()
    handshake.feed(b"\x00\x02\x00" + vencrypt_subtypes(260) + b"\x01")
    handshake.tls_started()
    with pytest.raises(RfbError, match="rejected authentication: go away"):
        handshake.feed(u32(1) + reason(b"go away"))


def test_tls_started_out_of_order() -> None:
    with pytest.raises(RuntimeError):
        upstream().tls_started()
    handshake = at_vencrypt()
    handshake.feed(b"\x00\x02\x00" + vencrypt_subtypes(261) + b"\x01")
    handshake.tls_started()
    with pytest.raises(RuntimeError):
        handshake.tls_started()


# --- ServerInit ----------------------------------------------------------------------------


def at_server_init() -> UpstreamHandshake:
    handshake = upstream()
    assert handshake.feed(V38 + types(1) + u32(0))[-1] == Authenticated()
    assert handshake.send_client_init(True) == b"\x01"
    return handshake


@pytest.mark.parametrize("size", [0, 1, 100, 1024])
def test_server_init_names_kept(size: int) -> None:
    name = bytes(i % 251 for i in range(size))
    actions = at_server_init().feed(server_init(name=name))
    assert actions == [ServerInitReady(ServerInit(800, 600, PIXEL_FORMAT, name), b"")]


@pytest.mark.parametrize("size", [1025, 5000, MAX_NAME_LENGTH])
def test_long_names_are_cut_and_skipped(size: int) -> None:
    handshake = at_server_init()
    data = server_init(name=b"n" * size) + b"REST"
    assert handshake.feed(data[:-6]) == []
    assert handshake.feed(data[-6:-5]) == []  # the last byte of the name is still due
    (ready,) = handshake.feed(data[-5:])
    assert isinstance(ready, ServerInitReady)
    assert ready.server_init.name == b"n" * 1024
    assert ready.rest == b"REST"


@pytest.mark.parametrize("size", [MAX_NAME_LENGTH + 1, 1 << 20, 0xFFFFFFFF])
def test_oversized_names_are_refused_at_once(size: int) -> None:
    with pytest.raises(RfbError) as info:
        at_server_init().feed(struct.pack(">HH", 800, 600) + PIXEL_FORMAT + u32(size))
    assert info.value.close_code == 4502


@pytest.mark.parametrize("bpp", [0, 1, 4, 7, 15, 24, 33, 64, 255])
def test_bad_bits_per_pixel(bpp: int) -> None:
    data = server_init()
    with pytest.raises(RfbError, match="bits-per-pixel"):
        at_server_init().feed(data[:4] + bytes([bpp]) + data[5:])


@pytest.mark.parametrize("bpp", [8, 16, 32])
def test_good_bits_per_pixel(bpp: int) -> None:
    data = server_init()
    (ready,) = at_server_init().feed(data[:4] + bytes([bpp]) + data[5:])
    assert isinstance(ready, ServerInitReady)


@pytest.mark.parametrize(("width", "height"), [(0, 0), (1, 1), (800, 600), (65535, 65535)])
def test_server_init_sizes(width: int, height: int) -> None:
    (ready,) = at_server_init().feed(server_init(width, height))
    assert isinstance(ready, ServerInitReady)
    assert (ready.server_init.width, ready.server_init.height) == (width, height)


@pytest.mark.parametrize("name", [b"", b"vm-1", "\u00e9t\u00e9 \U0001f5a5".encode(), b"x" * 1024])
def test_server_init_encode_roundtrip(name: bytes) -> None:
    init = ServerInit(1024, 768, PIXEL_FORMAT, name)
    assert init.encode() == server_init(1024, 768, name)
    assert init.encode(b"other") == server_init(1024, 768, b"other")


def test_server_init_encode_cuts_long_names() -> None:
    init = ServerInit(1, 2, PIXEL_FORMAT, b"x")
    assert init.encode(b"y" * 5000) == server_init(1, 2, b"y" * 1024)


def test_send_client_init_before_authenticated() -> None:
    with pytest.raises(RuntimeError):
        upstream().send_client_init(True)


def test_feed_after_done() -> None:
    handshake = at_server_init()
    handshake.feed(server_init())
    with pytest.raises(RuntimeError):
        handshake.feed(b"x")


def test_bytes_before_client_init_are_kept() -> None:
    handshake = upstream()
    handshake.feed(V38 + types(1) + u32(0))
    assert handshake.feed(server_init()[:10]) == []
    handshake.send_client_init(False)
    (ready,) = handshake.feed(server_init()[10:])
    assert isinstance(ready, ServerInitReady)


def test_flood_while_waiting_is_refused() -> None:
    handshake = upstream()
    handshake.feed(V38 + types(1) + u32(0))
    handshake.feed(b"x" * MAX_PENDING)
    with pytest.raises(RfbError, match="more data than the handshake allows"):
        handshake.feed(b"x")


def test_repr_hides_password() -> None:
    handshake = upstream("sekrit-pw")
    assert "sekrit-pw" not in repr(handshake)
    assert "pending" in repr(handshake)


# --- errors --------------------------------------------------------------------------------


def test_error_codes() -> None:
    assert RfbError.auth_failed("m").close_code == 4501
    assert RfbError.protocol("m").close_code == 4502
    assert RfbError("target_auth_failed", "m").code == "target_auth_failed"
    assert str(RfbError.protocol("hello")) == "hello"
    with pytest.raises(ValueError):
        RfbError("nope", "m")


def test_tls_policy_requirement() -> None:
    assert not TlsPolicy().tls_required
    assert TlsPolicy(Pin.REQUIRE).tls_required
    assert TlsPolicy(Pin.CA, "x").tls_required
    assert not TlsPolicy(ca_pem="x").tls_required  # a proxy CA alone demands nothing
    assert not TlsPolicy(allow_anonymous=True).tls_required


# --- downstream ----------------------------------------------------------------------------


def test_downstream_initiate() -> None:
    assert DownstreamHandshake().initiate() == V38


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        (V38 + b"\x01" + b"\x01", [Send(b"\x01\x01" + u32(0))]),  # SecurityResult with the types
        (V37 + b"\x01" + b"\x01", [Send(b"\x01\x01")]),
        (V33 + b"\x01", [Send(u32(1))]),
        (b"RFB 003.005\n" + b"\x01", [Send(u32(1))]),
    ],
)
@pytest.mark.parametrize("chunking", ["whole", "bytewise"])
def test_downstream_versions(client: bytes, expected: list[Send], chunking: str) -> None:
    handshake = DownstreamHandshake()
    handshake.initiate()
    chunks = [client] if chunking == "whole" else [client[i : i + 1] for i in range(len(client))]
    actions = [a for chunk in chunks for a in handshake.feed(chunk)]
    assert actions == [*expected, ClientInitReceived(shared=True, rest=b"")]


@pytest.mark.parametrize(("flag", "shared"), [(0, False), (1, True), (2, True), (255, True)])
def test_downstream_shared_flag(flag: int, shared: bool) -> None:
    actions = DownstreamHandshake().feed(V38 + b"\x01" + bytes([flag]))
    assert actions[-1] == ClientInitReceived(shared=shared, rest=b"")


def test_downstream_rest() -> None:
    messages = b"\x03\x00\x00\x00\x00\x00\x03\x20\x02\x58" + b"\x05\x00\x00\x01\x00\x02"
    actions = DownstreamHandshake().feed(V38 + b"\x01\x01" + messages)
    assert actions[-1] == ClientInitReceived(shared=True, rest=messages)


@pytest.mark.parametrize(
    "line",
    [
        b"RFB 003.889\n",
        b"RFB 003.006\n",
        b"RFB 003.004\n",
        b"RFB 004.000\n",
        b"RFB 003.009\n",
        b"RFB 002.000\n",
        b"RFB 003.08\n\n",
        b"GET / HTTP/1.",
        b"\x00" * 12,
    ],
)
def test_downstream_bad_versions(line: bytes) -> None:
    with pytest.raises(RfbError) as info:
        DownstreamHandshake().feed(line)
    assert info.value.close_code == 4502


@pytest.mark.parametrize("choice", [0, 2, 16, 19, 255])
@pytest.mark.parametrize("version", [V37, V38])
def test_downstream_only_none(version: bytes, choice: int) -> None:
    handshake = DownstreamHandshake()
    handshake.feed(version)
    with pytest.raises(RfbError) as info:
        handshake.feed(bytes([choice]))
    assert info.value.close_code == 4502


def test_downstream_feed_after_done() -> None:
    handshake = DownstreamHandshake()
    handshake.feed(V38 + b"\x01\x01")
    with pytest.raises(RuntimeError):
        handshake.feed(b"\x00")


def test_downstream_version_property() -> None:
    handshake = DownstreamHandshake()
    handshake.feed(V37)
    assert handshake.version == (3, 7)
    assert "SECURITY_CHOICE" in repr(handshake)


@settings(max_examples=50)
@given(
    data=st.data(),
    client=st.sampled_from([V38 + b"\x01", V37 + b"\x01", V33]),
    extra=st.binary(max_size=40),
)
def test_downstream_any_chunking(data: st.DataObject, client: bytes, extra: bytes) -> None:
    stream = client + b"\x00" + extra
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=10)))
    bounds = [0, *cuts, len(stream)]
    handshake = DownstreamHandshake()
    sent = b""
    for a, b in itertools.pairwise(bounds):
        for action in handshake.feed(stream[a:b]):
            if isinstance(action, Send):
                sent += action.data
            else:
                assert action.shared is False
                leftover = stream[b:]
                assert action.rest + leftover == extra
                assert sent in (b"\x01\x01" + u32(0), b"\x01\x01", u32(1))
                return
    pytest.fail("no ClientInitReceived")


# --- client message framer -----------------------------------------------------------------

SAMPLE_MESSAGES = {
    "SetPixelFormat": b"\x00\x00\x00\x00" + PIXEL_FORMAT,
    "SetEncodings-0": b"\x02\x00\x00\x00",
    "SetEncodings-3": b"\x02\x00\x00\x03" + struct.pack(">iii", 0, 16, -223),
    "FramebufferUpdateRequest": b"\x03\x01\x00\x00\x00\x00\x03\x20\x02\x58",
    "KeyEvent": b"\x04\x01\x00\x00\x00\x00\xff\x0d",
    "PointerEvent": b"\x05\x01\x00\x10\x00\x20",
    "ClientCutText-0": b"\x06\x00\x00\x00" + u32(0),
    "ClientCutText-5": b"\x06\x00\x00\x00" + u32(5) + b"hello",
    "ClientCutText-extended": b"\x06\x00\x00\x00" + struct.pack(">i", -8) + b"\x10\x00\x00\x01abcd",
    "EnableContinuousUpdates": b"\x96\x01\x00\x00\x00\x00\x03\x20\x02\x58",
    "ClientFence-0": b"\xf8\x00\x00\x00" + u32(0x80000000) + b"\x00",
    "ClientFence-64": b"\xf8\x00\x00\x00" + u32(3) + b"\x40" + b"f" * 64,
    "XVP": b"\xfa\x00\x01\x02",
    "SetDesktopSize-1": b"\xfb\x00\x04\x00\x03\x00\x01\x00" + b"s" * 16,
    "SetDesktopSize-3": b"\xfb\x00\x04\x00\x03\x00\x03\x00" + b"s" * 48,
    "QEMU-extended-key": b"\xff\x00\x00\x01" + u32(0x61) + u32(0x1E),
    "QEMU-audio-enable": b"\xff\x01\x00\x00",
    "QEMU-audio-disable": b"\xff\x01\x00\x01",
    "QEMU-audio-format": b"\xff\x01\x00\x02\x03\x02" + u32(44100),
}
SAMPLE_SIZES = {
    "SetPixelFormat": 20,
    "SetEncodings-0": 4,
    "SetEncodings-3": 16,
    "FramebufferUpdateRequest": 10,
    "KeyEvent": 8,
    "PointerEvent": 6,
    "ClientCutText-0": 8,
    "ClientCutText-5": 13,
    "ClientCutText-extended": 16,
    "EnableContinuousUpdates": 10,
    "ClientFence-0": 9,
    "ClientFence-64": 73,
    "XVP": 4,
    "SetDesktopSize-1": 24,
    "SetDesktopSize-3": 56,
    "QEMU-extended-key": 12,
    "QEMU-audio-enable": 4,
    "QEMU-audio-disable": 4,
    "QEMU-audio-format": 10,
}
KNOWN_TYPES = {0, 2, 3, 4, 5, 6, 150, 248, 250, 251, 255}


@pytest.mark.parametrize("name", sorted(SAMPLE_MESSAGES))
def test_framer_whole_message(name: str) -> None:
    message = SAMPLE_MESSAGES[name]
    assert len(message) == SAMPLE_SIZES[name]
    assert ClientMessageFramer().feed(message) == [(message[0], message)]


@pytest.mark.parametrize("name", sorted(SAMPLE_MESSAGES))
def test_framer_byte_by_byte(name: str) -> None:
    message = SAMPLE_MESSAGES[name]
    framer = ClientMessageFramer()
    for byte in message[:-1]:
        assert framer.feed(bytes([byte])) == []
    assert framer.feed(message[-1:]) == [(message[0], message)]
    assert framer.feed(b"") == []


@pytest.mark.parametrize("kind", sorted(set(range(256)) - KNOWN_TYPES))
def test_framer_unknown_types(kind: int) -> None:
    with pytest.raises(RfbError) as info:
        ClientMessageFramer().feed(bytes([kind]) + bytes(30))
    assert info.value.close_code == 4502


def test_framer_unknown_type_after_good_message() -> None:
    framer = ClientMessageFramer()
    with pytest.raises(RfbError, match="unknown client message type 7"):
        framer.feed(SAMPLE_MESSAGES["KeyEvent"] + b"\x07")


@pytest.mark.parametrize("subtype", [2, 3, 128, 255])
def test_framer_unknown_qemu_subtype(subtype: int) -> None:
    with pytest.raises(RfbError, match="QEMU client message subtype"):
        ClientMessageFramer().feed(bytes([255, subtype]) + bytes(10))


@pytest.mark.parametrize("operation", [3, 4, 256, 65535])
def test_framer_unknown_qemu_audio_operation(operation: int) -> None:
    with pytest.raises(RfbError, match="QEMU audio operation"):
        ClientMessageFramer().feed(b"\xff\x01" + operation.to_bytes(2, "big") + bytes(8))


@pytest.mark.parametrize(
    "header",
    [
        b"\x02\x00\xff\xff",  # SetEncodings: 4 + 4 * 65535
        b"\x06\x00\x00\x00" + u32(1 << 20),
        b"\x06\x00\x00\x00" + u32(0x7FFFFFFF),
        b"\x06\x00\x00\x00" + struct.pack(">i", -(1 << 20)),
        b"\x06\x00\x00\x00" + struct.pack(">i", -(1 << 31)),
    ],
)
def test_framer_refuses_oversized_message_before_buffering(header: bytes) -> None:
    with pytest.raises(RfbError, match="exceeds"):
        ClientMessageFramer(max_message=1 << 17).feed(header)


@pytest.mark.parametrize("name", sorted(SAMPLE_MESSAGES))
def test_framer_max_message_is_inclusive(name: str) -> None:
    message = SAMPLE_MESSAGES[name]
    assert ClientMessageFramer(max_message=len(message)).feed(message) == [(message[0], message)]
    if len(message) > 1:
        with pytest.raises(RfbError):
            ClientMessageFramer(max_message=len(message) - 1).feed(message)


def test_framer_default_limit_is_one_mib() -> None:
    body = b"x" * ((1 << 20) - 8)
    message = b"\x06\x00\x00\x00" + u32(len(body)) + body
    assert ClientMessageFramer().feed(message) == [(6, message)]
    with pytest.raises(RfbError):
        ClientMessageFramer().feed(b"\x06\x00\x00\x00" + u32(len(body) + 1))


def test_framer_keeps_partial_message() -> None:
    framer = ClientMessageFramer()
    key, pointer = SAMPLE_MESSAGES["KeyEvent"], SAMPLE_MESSAGES["PointerEvent"]
    assert framer.feed(key + pointer[:3]) == [(4, key)]
    assert framer.feed(pointer[3:] + key[:1]) == [(5, pointer)]
    assert framer.feed(key[1:]) == [(4, key)]


def test_input_message_types() -> None:
    assert frozenset({4, 5, 6, 250, 251, 255}) == INPUT_MESSAGE_TYPES
    assert isinstance(INPUT_MESSAGE_TYPES, frozenset)


@st.composite
def client_messages(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(sorted(KNOWN_TYPES)))
    if kind == 2:
        n = draw(st.integers(0, 20))
        return b"\x02\x00" + n.to_bytes(2, "big") + draw(st.binary(min_size=4 * n, max_size=4 * n))
    if kind == 6:
        n = draw(st.integers(-40, 40))
        body = draw(st.binary(min_size=abs(n), max_size=abs(n)))
        return b"\x06\x00\x00\x00" + struct.pack(">i", n) + body
    if kind == 248:
        n = draw(st.integers(0, 64))
        return b"\xf8" + draw(st.binary(min_size=7, max_size=7)) + bytes([n]) + bytes(n)
    if kind == 251:
        n = draw(st.integers(0, 4))
        return b"\xfb\x00\x04\x00\x03\x00" + bytes([n, 0]) + bytes(16 * n)
    if kind == 255:
        return draw(st.sampled_from([SAMPLE_MESSAGES[k] for k in SAMPLE_MESSAGES if k.startswith("QEMU")]))
    size = {0: 20, 3: 10, 4: 8, 5: 6, 150: 10, 250: 4}[kind]
    return bytes([kind]) + draw(st.binary(min_size=size - 1, max_size=size - 1))


@settings(max_examples=150)
@given(messages=st.lists(client_messages(), max_size=25), data=st.data())
def test_framer_any_stream_any_chunking(messages: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(messages)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=30))) if len(stream) > 1 else []
    bounds = [0, *cuts, len(stream)]
    framer = ClientMessageFramer()
    out = [m for a, b in itertools.pairwise(bounds) for m in framer.feed(stream[a:b])]
    assert out == [(m[0], m) for m in messages]


@settings(max_examples=100)
@given(messages=st.lists(client_messages(), min_size=1, max_size=10))
def test_view_only_filter_keeps_non_input(messages: list[bytes]) -> None:
    framed = ClientMessageFramer().feed(b"".join(messages))
    kept = b"".join(m for kind, m in framed if kind not in INPUT_MESSAGE_TYPES)
    assert kept == b"".join(m for m in messages if m[0] not in INPUT_MESSAGE_TYPES)


@settings(max_examples=150)
@given(st.binary(max_size=200))
def test_framer_garbage_never_crashes(data: bytes) -> None:
    framer = ClientMessageFramer(max_message=4096)
    try:
        out = framer.feed(data)
    except RfbError as err:
        assert err.close_code == 4502
    else:
        assert b"".join(m for _, m in out) == data[: sum(len(m) for _, m in out)]


def test_downstream_38_sends_the_security_result_with_the_types_before_the_choice() -> None:
    """The browser finds SecurityResult waiting behind the type list (None is the only type),
    so its ClientInit follows its choice at once: a round trip fewer."""
    handshake = DownstreamHandshake()
    assert handshake.feed(V38) == [Send(b"\x01\x01" + u32(0))]
    assert handshake.feed(b"\x01") == []
    assert handshake.feed(b"\x01") == [ClientInitReceived(shared=True, rest=b"")]
