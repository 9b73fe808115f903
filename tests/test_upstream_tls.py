"""The upstream TLS policy (token claim x proxy flags) and the client-certificate classifier."""

from __future__ import annotations

import shutil
import ssl
from pathlib import Path
from typing import Any

import pytest

from console_proxy.proxycerts import ProxyCertificates
from console_proxy.token import TlsClaim
from console_proxy.upstream_tls import (
    CertificateRequestWatch,
    ClientCertificateError,
    NoCaError,
    Pin,
    TlsPolicy,
    client_context,
    is_client_certificate_refusal,
    policy_for,
)

TOKEN_CA = "TOKEN CA PEM"
PROXY_CA = "PROXY CA PEM"


def policy(tls: dict[str, Any] | None, *, upstream_ca: str | None = None, anon: bool = False) -> TlsPolicy:
    """The policy for a ``tls`` claim spelt as on the wire."""
    return policy_for(TlsClaim.from_wire(tls), "vm.example", upstream_ca_pem=upstream_ca, allow_anonymous_tls=anon)


@pytest.mark.parametrize("upstream_ca", [None, PROXY_CA])
@pytest.mark.parametrize("anon", [False, True])
@pytest.mark.parametrize("token_anon", [False, True])
def test_a_pinned_ca_is_never_loosened(upstream_ca: str | None, anon: bool, token_anon: bool) -> None:
    """Issue 13 item 3: --allow-anonymous-tls (or the token's own allow_anon) never applies to a
    token that pins a CA, and the token's CA wins over the proxy's."""
    claim = {"ca": TOKEN_CA, "allow_anon": token_anon}
    assert policy(claim, upstream_ca=upstream_ca, anon=anon) == TlsPolicy(Pin.CA, TOKEN_CA, "vm.example", False)


@pytest.mark.parametrize("upstream_ca", [None, PROXY_CA])
def test_require_is_not_loosened_by_the_proxy(upstream_ca: str | None) -> None:
    got = policy({"require": True}, upstream_ca=upstream_ca, anon=True)
    assert got == TlsPolicy(Pin.REQUIRE, upstream_ca, "vm.example", allow_anonymous=False)
    assert got.tls_required


def test_require_with_the_tokens_own_allow_anon() -> None:
    """What ``console-broker mint --tls-anon`` writes: the broker's explicit word for this target."""
    got = policy({"require": True, "allow_anon": True})
    assert (got.pin, got.allow_anonymous, got.tls_required) == (Pin.REQUIRE, True, True)


@pytest.mark.parametrize("tls", [None, {}, {"sni": "other.example"}, {"require": False}])
def test_an_unpinned_token_takes_the_proxy_defaults(tls: dict[str, object] | None) -> None:
    """Issue 13 item 5: --upstream-ca only verifies; it is no demand for TLS."""
    got = policy(tls, upstream_ca=PROXY_CA, anon=True)
    assert (got.pin, got.ca_pem, got.allow_anonymous, got.tls_required) == (Pin.NOTHING, PROXY_CA, True, False)
    assert not policy(tls).allow_anonymous and not policy(tls).can_verify


def test_an_unpinned_token_may_allow_anonymous_itself() -> None:
    assert policy({"allow_anon": True}).allow_anonymous


def test_server_name_is_the_sni_claim_else_the_host() -> None:
    assert policy({"ca": TOKEN_CA, "sni": "cert.example"}).server_name == "cert.example"
    assert policy({"require": True}).server_name == "vm.example"
    assert policy(None).server_name == "vm.example"


def test_an_empty_ca_claim_pins_nothing() -> None:
    assert policy({"ca": ""}, upstream_ca=PROXY_CA).pin is Pin.NOTHING


@pytest.mark.parametrize("fields", [{"pin": Pin.CA}, {"pin": Pin.CA, "ca_pem": "x", "allow_anonymous": True}])
def test_a_ca_policy_cannot_be_built_loose(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        TlsPolicy(**fields)  # type: ignore[arg-type]


def test_refusal_texts_name_the_rule() -> None:
    assert "pins a CA" in TlsPolicy(Pin.CA, "x").anonymous_refusal()
    assert "requires TLS" in TlsPolicy(Pin.REQUIRE).anonymous_refusal()
    assert "--allow-anonymous-tls" in TlsPolicy().anonymous_refusal()


def test_client_contexts() -> None:
    with pytest.raises(NoCaError):
        client_context(TlsPolicy(), verify=True)
    anonymous = client_context(TlsPolicy(allow_anonymous=True), verify=False)
    assert anonymous.verify_mode is ssl.CERT_NONE and anonymous.maximum_version is ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ValueError)):
        client_context(TlsPolicy(Pin.CA, "not a PEM"), verify=True)


# --- a server that wants a client certificate ----------------------------------------------


def _ssl_error(reason: str, kind: type[ssl.SSLError] = ssl.SSLError) -> ssl.SSLError:
    error = kind(1, f"[SSL: {reason}] alert")
    error.reason = reason  # what OpenSSL fills in
    return error


@pytest.mark.parametrize(
    ("error", "requested", "quiet", "verdict"),
    [
        (_ssl_error("TLSV13_ALERT_CERTIFICATE_REQUIRED"), False, False, True),  # says so outright
        (None, True, True, True),  # QEMU verify-peer=on: handshake done, then end of stream
        (ConnectionResetError(), True, True, True),
        (_ssl_error("UNEXPECTED_EOF_WHILE_READING", ssl.SSLEOFError), True, True, True),
        (_ssl_error("SSLV3_ALERT_HANDSHAKE_FAILURE"), True, True, True),  # TLS 1.2 servers
        (_ssl_error("SSLV3_ALERT_BAD_CERTIFICATE"), True, True, True),
        (_ssl_error("SSLV3_ALERT_HANDSHAKE_FAILURE"), False, True, False),  # no certificate asked for
        (None, False, True, False),  # an ordinary hang-up
        (None, True, False, False),  # it spoke RFB first: whatever ended it, not the certificate
        (_ssl_error("DECRYPTION_FAILED_OR_BAD_RECORD_MAC"), True, True, False),
    ],
)
def test_client_certificate_refusal(error: BaseException | None, requested: bool, quiet: bool, verdict: bool) -> None:
    assert is_client_certificate_refusal(error, requested=requested, quiet=quiet) is verdict


def test_certificate_request_watch_sees_the_message_and_stops() -> None:
    context = client_context(TlsPolicy(allow_anonymous=True), verify=False)
    watch = CertificateRequestWatch(context)
    watch._message(None, "read", None, 22, 2, b"")  # ServerHello
    watch._message(None, "write", None, 22, 13, b"")  # (a client never sends one; not counted)
    assert not watch.requested
    watch._message(None, "read", None, 22, 13, b"")
    assert watch.requested
    watch.stop()
    assert context._msg_callback is None  # type: ignore[attr-defined]


# --- tls.ca "broker": the CA and the client certificate from the proxy's state dir ---------


def _own(tmp_path: Path, *, matching: bool = True) -> ProxyCertificates:
    """A state dir as enrollment leaves it (a CA, a leaf and its key), or with another key."""
    from xvnc import make_test_pki

    pki = make_test_pki(tmp_path / "pki")
    (tmp_path / "state").mkdir()
    own = ProxyCertificates(tmp_path / "state")
    shutil.copy(pki.ca_path, own.ca_path)
    shutil.copy(pki.cert_path, own.cert_path)
    shutil.copy(pki.key_path if matching else make_test_pki(tmp_path / "other").key_path, own.key_path)
    return own


@pytest.mark.parametrize("anon", [False, True])
def test_broker_pins_the_ca_the_proxy_holds_and_presents_its_certificate(tmp_path: Path, anon: bool) -> None:
    own = _own(tmp_path)
    got = policy_for(
        TlsClaim(ca="broker", allow_anonymous=True), "hv", upstream_ca_pem=PROXY_CA, allow_anonymous_tls=anon, own=own
    )
    assert got.pin is Pin.CA and got.ca_pem == own.ca_path.read_text() and not got.allow_anonymous
    assert got.client_certificate == (str(own.cert_path), str(own.key_path))
    assert client_context(got, True).verify_mode == ssl.CERT_REQUIRED


def test_broker_without_the_ca_is_unverifiable_never_anonymous(tmp_path: Path) -> None:
    for own in (None, ProxyCertificates(tmp_path / "empty")):
        got = policy_for(TlsClaim(ca="broker"), "hv", upstream_ca_pem=PROXY_CA, allow_anonymous_tls=True, own=own)
        assert (got.pin, got.ca_pem, got.can_verify, got.allow_anonymous) == (Pin.CA, None, False, False)
        assert "holds none" in got.no_ca_refusal()
        with pytest.raises(NoCaError, match="holds none"):
            client_context(got, True)


def test_a_client_key_not_matching_its_certificate_is_refused_clearly(tmp_path: Path) -> None:
    own = _own(tmp_path, matching=False)
    got = policy_for(TlsClaim(ca="broker"), "hv", upstream_ca_pem=None, allow_anonymous_tls=False, own=own)
    with pytest.raises(ClientCertificateError, match=r"client certificate .* is not usable") as refused:
        client_context(got, True)
    assert "PRIVATE" not in str(refused.value)
