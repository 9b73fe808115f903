"""Upstream TLS policy through a real proxy to real QEMU VNC servers (issue 13 items 3-5).

Each QEMU (tests/qemu.py) runs with no machine and stopped CPUs: its VNC server is complete
(VeNCrypt with tls-creds-anon or tls-creds-x509, VNC password set over QMP, ServerInit) and
starts in well under a second. The proxies are real processes (tests/proxyproc.py); the
browser is tests/rfbclient.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from proxyproc import ProxyProcess, start_proxy
from qemu import QemuVnc, qemu_available, start_qemu
from rfbclient import Console
from xvnc import TestPki

from console_proxy.keyring import Keyring

PASSWORD = "qemu-pw1"  # QEMU cuts VNC passwords to 8 bytes
CLIENT_CERTIFICATE_REQUIRED = "the console server requires a client certificate"
Mint = Callable[..., str]


def _require_qemu() -> None:
    if not qemu_available():
        pytest.fail("qemu-system-x86_64 is not installed: run scripts/setup.sh (tests never skip real parts)")


@pytest.fixture(scope="module")
def qemu_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., QemuVnc]]:
    _require_qemu()
    started: list[QemuVnc] = []

    def start(**options: object) -> QemuVnc:
        server = start_qemu(tmp_path_factory.mktemp("qemu"), **options)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def qemu_anon(qemu_factory: Callable[..., QemuVnc]) -> QemuVnc:
    """tls-creds-anon with a VNC password: VeNCrypt TLSVnc only (no certificate)."""
    return qemu_factory(tls="anon", password=PASSWORD)


@pytest.fixture(scope="module")
def qemu_x509(qemu_factory: Callable[..., QemuVnc], test_pki: TestPki) -> QemuVnc:
    """tls-creds-x509 with verify-peer=off and a VNC password: VeNCrypt X509Vnc."""
    return qemu_factory(tls="x509", pki=test_pki, verify_peer=False, password=PASSWORD)


@pytest.fixture(scope="module")
def anon_proxy(broker_ring: tuple[Keyring, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    process = start_proxy(tmp_path_factory.mktemp("proxy-anon"), broker_ring[1], "--allow-anonymous-tls")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def ca_proxy(
    broker_ring: tuple[Keyring, Path], tmp_path_factory: pytest.TempPathFactory, test_pki: TestPki
) -> Iterator[ProxyProcess]:
    process = start_proxy(tmp_path_factory.mktemp("proxy-ca"), broker_ring[1], "--upstream-ca", str(test_pki.ca_path))
    yield process
    process.stop()


async def _desktop(ws_url: str, token: str) -> tuple[int, int]:
    """Through the proxy to QEMU's ServerInit; the desktop size the browser was given."""
    console = await Console.open(ws_url, token)
    try:
        info = await console.handshake()
    finally:
        console.close()
    return info.width, info.height


def reaches_server_init(proxy: ProxyProcess, token: str) -> bool:
    width, height = asyncio.run(_desktop(proxy.ws_url, token))
    return width > 0 and height > 0


def closed_with(proxy: ProxyProcess, token: str, session_id: str) -> tuple[int | None, str | None, str]:
    """The websocket close (code, reason) and the detail the proxy logged for the session."""

    async def scenario() -> tuple[int | None, str | None]:
        return await (await Console.open(proxy.ws_url, token)).wait_closed()

    code, reason = asyncio.run(scenario())
    line = proxy.wait_for_log(f'"session_id":"{session_id}"', '"event":"closed"')
    return code, reason, json.loads(line[line.index("{") :])["detail"]


def _token(mint: Mint, server: QemuVnc, session_id: str, tls: dict[str, object] | None = None) -> str:
    return mint(host=server.host, port=server.port, password=server.password, tls=tls, session_id=session_id)


# --- (a) (b) anonymous TLS ----------------------------------------------------------------


@pytest.mark.parametrize("pin", ["ca", "require"])
def test_a_pinning_token_is_refused_anonymous_tls_despite_the_proxy_flag(
    anon_proxy: ProxyProcess, mint: Mint, qemu_anon: QemuVnc, test_pki: TestPki, pin: str
) -> None:
    tls: dict[str, object] = {"ca": test_pki.ca_pem} if pin == "ca" else {"require": True}
    sid = f"qemu-anon-pinned-{pin}"
    code, reason, detail = closed_with(anon_proxy, _token(mint, qemu_anon, sid, tls), sid)
    assert (code, reason) == (4501, "target_auth_failed")
    assert "offers only anonymous TLS" in detail
    assert ("pins a CA" if pin == "ca" else "requires TLS") in detail


def test_an_unpinned_token_gets_anonymous_tls_with_the_proxy_flag(
    anon_proxy: ProxyProcess, mint: Mint, qemu_anon: QemuVnc
) -> None:
    assert reaches_server_init(anon_proxy, _token(mint, qemu_anon, "qemu-anon-open"))
    line = anon_proxy.wait_for_log('"session_id":"qemu-anon-open"', '"event":"opened"')
    assert '"security":"vencrypt-tlsvnc"' in line


def test_without_the_flag_anonymous_tls_is_refused(proxy: ProxyProcess, mint: Mint, qemu_anon: QemuVnc) -> None:
    code, _, detail = closed_with(proxy, _token(mint, qemu_anon, "qemu-anon-noflag"), "qemu-anon-noflag")
    assert code == 4501 and "--allow-anonymous-tls" in detail


# --- (c) X.509 without client certificates -------------------------------------------------


def test_a_pinned_ca_verifies_qemus_certificate(
    anon_proxy: ProxyProcess, mint: Mint, qemu_x509: QemuVnc, test_pki: TestPki
) -> None:
    token = _token(mint, qemu_x509, "qemu-x509-pinned", {"ca": test_pki.ca_pem})
    assert reaches_server_init(anon_proxy, token)
    line = anon_proxy.wait_for_log('"session_id":"qemu-x509-pinned"', '"event":"opened"')
    assert '"security":"vencrypt-x509vnc"' in line


def test_a_wrong_pinned_ca_is_refused(
    anon_proxy: ProxyProcess, mint: Mint, qemu_x509: QemuVnc, other_pki: TestPki
) -> None:
    sid = "qemu-x509-wrong-ca"
    code, reason, detail = closed_with(anon_proxy, _token(mint, qemu_x509, sid, {"ca": other_pki.ca_pem}), sid)
    assert (code, reason) == (4501, "target_auth_failed")
    assert detail == "the console server's certificate did not verify"


# --- (d) QEMU's default verify-peer=on -----------------------------------------------------


def test_a_server_that_requires_a_client_certificate_is_4501(
    anon_proxy: ProxyProcess, mint: Mint, qemu_factory: Callable[..., QemuVnc], test_pki: TestPki
) -> None:
    server = qemu_factory(tls="x509", pki=test_pki, verify_peer=True, password=PASSWORD)
    sid = "qemu-x509-verify-peer"
    code, reason, detail = closed_with(anon_proxy, _token(mint, server, sid, {"ca": test_pki.ca_pem}), sid)
    assert (code, reason, detail) == (4501, "target_auth_failed", CLIENT_CERTIFICATE_REQUIRED)


# --- (e) --upstream-ca is a CA bundle, not a demand for TLS --------------------------------


def test_upstream_ca_leaves_a_plain_target_usable(
    ca_proxy: ProxyProcess, mint: Mint, qemu_factory: Callable[..., QemuVnc]
) -> None:
    plain = qemu_factory(password=PASSWORD)  # VNC password set over QMP, no TLS
    assert reaches_server_init(ca_proxy, _token(mint, plain, "qemu-plain-upstream-ca"))
    line = ca_proxy.wait_for_log('"session_id":"qemu-plain-upstream-ca"', '"event":"opened"')
    assert '"security":"vnc"' in line


def test_upstream_ca_verifies_a_target_whose_token_names_no_ca(
    ca_proxy: ProxyProcess, mint: Mint, qemu_x509: QemuVnc
) -> None:
    assert reaches_server_init(ca_proxy, _token(mint, qemu_x509, "qemu-x509-upstream-ca"))
    line = ca_proxy.wait_for_log('"session_id":"qemu-x509-upstream-ca"', '"event":"opened"')
    assert '"security":"vencrypt-x509vnc"' in line


def test_require_is_what_demands_tls(ca_proxy: ProxyProcess, mint: Mint, qemu_factory: Callable[..., QemuVnc]) -> None:
    plain = qemu_factory(password=PASSWORD)
    sid = "qemu-plain-required"
    code, _, detail = closed_with(ca_proxy, _token(mint, plain, sid, {"require": True}), sid)
    assert code == 4501 and "offers no TLS" in detail and "requires TLS" in detail
