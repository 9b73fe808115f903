"""The pipelined opening towards hypervisors, sans I/O: what it sends, when it must start again.

:meth:`UpstreamHandshake.opening` writes the version line and the security choice before the
server's own arrive, from what the server offered last time (:class:`Offer`). The guarantee
checked here: the bytes the proxy sends are exactly those of the ordinary handshake whenever the
guess holds, and a guess that does not hold always ends in :class:`Redial`, never in another
choice than the policy's. :class:`console_proxy.offers.Offers` is the table of what was offered.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_rfb import (
    ALL_POLICIES,
    CHALLENGE,
    PASSWORD,
    RESPONSE,
    V33,
    V37,
    V38,
    server_init,
    types,
    u32,
)

from console_proxy.offers import Offers
from console_proxy.protocol.rfb import (
    Authenticated,
    Offer,
    Redial,
    RfbError,
    Send,
    ServerInitReady,
    TlsPolicy,
    UpstreamAction,
    UpstreamHandshake,
)

VNC_ONLY = Offer((3, 8), frozenset({2}))


def handshake(
    expected: Offer | None, password: str | None = PASSWORD, *, client_init: bool | None = True, **policy: object
) -> UpstreamHandshake:
    tls = TlsPolicy(**{"ca_pem": None, **policy})  # type: ignore[arg-type]
    return UpstreamHandshake(password=password, tls=tls, client_init=client_init, expected=expected)


def sent(actions: list[UpstreamAction]) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, Send))


def test_without_an_expected_offer_nothing_is_pipelined() -> None:
    ordinary = handshake(None)
    assert ordinary.opening() == b""
    assert not ordinary.guessed
    assert sent(ordinary.feed(V38)) == V38  # the version line is answered as ever


@pytest.mark.parametrize("version", [(3, 3), (3, 7)])
def test_only_rfb_38_servers_are_guessed(version: tuple[int, int]) -> None:
    assert handshake(Offer(version, frozenset({2}))).opening() == b""


def test_vnc_auth_opening_then_the_same_handshake_two_round_trips_sooner() -> None:
    pipelined = handshake(VNC_ONLY)
    assert pipelined.opening() == V38 + b"\x02"
    assert pipelined.guessed and pipelined.guess_unheard
    assert pipelined.feed(V38 + types(2)) == []  # both answers already left
    assert pipelined.guess_unheard  # the server has not answered the choice yet
    assert pipelined.feed(CHALLENGE) == [Send(RESPONSE + b"\x01")]  # ClientInit still pipelined
    assert not pipelined.guess_unheard
    actions = pipelined.feed(u32(0) + server_init())
    assert [type(a) for a in actions] == [Authenticated, ServerInitReady]
    assert pipelined.offer == VNC_ONLY


def test_none_opening_carries_the_pipelined_client_init() -> None:
    pipelined = handshake(Offer((3, 8), frozenset({1})), password=None)
    assert pipelined.opening() == V38 + b"\x01" + b"\x01"
    assert pipelined.client_init_sent
    assert pipelined.feed(V38 + types(1)) == []
    actions = pipelined.feed(u32(0) + server_init())
    assert [type(a) for a in actions] == [Authenticated, ServerInitReady]


@pytest.mark.parametrize("line", [V33, V37])
def test_an_older_server_than_expected_means_redial(line: bytes) -> None:
    pipelined = handshake(VNC_ONLY)
    pipelined.opening()
    assert pipelined.feed(line) == [Redial()]


def test_another_choice_than_the_guess_means_redial() -> None:
    """It offered VNC Authentication last time; now only None: the 2 already sent is wrong."""
    pipelined = handshake(VNC_ONLY)
    pipelined.opening()
    assert pipelined.feed(V38 + types(1)) == [Redial()]


def test_another_list_with_the_same_choice_goes_on_and_is_what_is_learned() -> None:
    pipelined = handshake(VNC_ONLY)
    pipelined.opening()
    assert pipelined.feed(V38 + types(19, 2, 1)) == []
    assert pipelined.offer == Offer((3, 8), frozenset({19, 2, 1}))
    assert pipelined.feed(CHALLENGE) == [Send(RESPONSE + b"\x01")]


def test_the_policy_makes_the_guess_tls_required_picks_vencrypt() -> None:
    from console_proxy.upstream_tls import Pin

    pipelined = handshake(Offer((3, 8), frozenset({2, 19})), pin=Pin.REQUIRE)
    assert pipelined.opening() == V38 + bytes([19])


def test_nothing_acceptable_last_time_is_not_guessed() -> None:
    """A password-less session and a server that only offered VNC Authentication: no choice to
    make, so nothing is sent early; the server's answer refuses it the ordinary way."""
    pipelined = handshake(VNC_ONLY, password=None)
    assert pipelined.opening() == b""
    pipelined.feed(V38)
    with pytest.raises(RfbError):
        pipelined.feed(types(2))


def test_opening_only_before_the_handshake_begins() -> None:
    begun = handshake(VNC_ONLY)
    begun.feed(V38[:4])
    with pytest.raises(RuntimeError):
        begun.opening()
    twice = handshake(VNC_ONLY)
    twice.opening()
    with pytest.raises(RuntimeError):
        twice.opening()


def test_a_refusal_with_a_reason_is_the_server_s_not_a_wrong_guess() -> None:
    pipelined = handshake(VNC_ONLY)
    pipelined.opening()
    with pytest.raises(RfbError, match="too many"):
        pipelined.feed(V38 + b"\x00" + u32(8) + b"too many")


TYPE_NUMBERS = st.sampled_from([1, 2, 5, 16, 19, 30])


@given(
    offered=st.lists(TYPE_NUMBERS, min_size=1, max_size=5),
    remembered=st.lists(TYPE_NUMBERS, min_size=1, max_size=5),
    password=st.sampled_from([PASSWORD, None]),
    policy=st.sampled_from(sorted(ALL_POLICIES)),
    client_init=st.sampled_from([True, False, None]),
)
def test_a_held_guess_sends_exactly_the_ordinary_bytes(
    offered: list[int], remembered: list[int], password: str | None, policy: str, client_init: bool | None
) -> None:
    """For any server offer, remembered offer, password and policy: the pipelined handshake
    either sends byte for byte what the ordinary one sends up to the security choice, or asks to
    redial; it refuses exactly when the ordinary one refuses; and a remembered offer equal to
    the real one never redials."""
    settings = {"ca_pem": None, **ALL_POLICIES[policy]}
    server = V38 + types(*offered)
    ordinary = handshake(None, password, client_init=client_init, **settings)
    pipelined = handshake(Offer((3, 8), frozenset(remembered)), password, client_init=client_init, **settings)
    early = pipelined.opening()
    try:
        expected = sent(ordinary.feed(server))
    except RfbError as refusal:
        with pytest.raises(RfbError) as caught:
            pipelined.feed(server)
        assert str(caught.value) == str(refusal)
        return
    actions = pipelined.feed(server)
    if Redial() in actions:
        assert actions == [Redial()]
        assert frozenset(remembered) != frozenset(offered)
        return
    assert early + sent(actions) == expected
    assert pipelined.client_init_sent == ordinary.client_init_sent
    assert pipelined.security_type == ordinary.security_type


# --- the table of offers ----------------------------------------------------------------


def test_offers_are_learned_forgotten_and_marked() -> None:
    offers = Offers()
    assert offers.expected("10.0.0.1", 5900) is None
    offers.learn("10.0.0.1", 5900, VNC_ONLY)
    assert offers.expected("10.0.0.1", 5900) == VNC_ONLY
    assert offers.expected("10.0.0.1", 5901) is None  # per port
    offers.forget("10.0.0.1", 5900)
    assert offers.expected("10.0.0.1", 5900) is None
    offers.learn("10.0.0.1", 5900, VNC_ONLY)
    offers.never("10.0.0.1", 5900)
    offers.learn("10.0.0.1", 5900, VNC_ONLY)  # a later success does not undo the mark
    offers.forget("10.0.0.1", 5900)  # nor does a wrong guess (there is none to make)
    assert offers.expected("10.0.0.1", 5900) is None
    offers.learn("10.0.0.2", 5900, None)  # RFB 3.3: nothing to learn
    assert offers.expected("10.0.0.2", 5900) is None


def test_offers_are_bounded_newest_kept() -> None:
    offers = Offers(limit=3)
    for port in range(5900, 5905):
        offers.learn("10.0.0.1", port, VNC_ONLY)
    assert len(offers) == 3
    assert [offers.expected("10.0.0.1", p) is not None for p in range(5900, 5905)] == [False, False, True, True, True]
    offers.learn("10.0.0.1", 5902, VNC_ONLY)  # taught again: now the newest
    offers.learn("10.0.0.1", 5910, VNC_ONLY)
    assert offers.expected("10.0.0.1", 5902) == VNC_ONLY
    assert offers.expected("10.0.0.1", 5903) is None


def test_offers_turned_off_remember_nothing() -> None:
    offers = Offers(enabled=False)
    offers.learn("10.0.0.1", 5900, VNC_ONLY)
    assert offers.expected("10.0.0.1", 5900) is None
    assert offers.counted() == {("guessed",): 0.0, ("redialled",): 0.0, ("refused",): 0.0}


@pytest.mark.parametrize("prepared", [False, True])
def test_the_des_key_schedule_built_ahead_answers_the_same(prepared: bool) -> None:
    """prepare() only moves the key schedule's cost off the step that answers the challenge."""
    ordinary = handshake(None)
    if prepared:
        ordinary.prepare()
        ordinary.prepare()  # idempotent
    ordinary.feed(V38)
    ordinary.feed(types(2))
    assert ordinary.feed(CHALLENGE) == [Send(RESPONSE + b"\x01")]
