"""Console sessions through a real proxy process to a real Xvnc: security types, codes, limits."""

from __future__ import annotations

import asyncio
import os
import subprocess

import pytest
from proxyproc import free_port
from rfbclient import Console


def _run(coro):
    return asyncio.run(coro)


async def _open_and_handshake(url: str, tok: str, **kwargs) -> tuple[Console, object]:
    console = await Console.open(url, tok, **kwargs)
    return console, await console.handshake()


def test_security_none_target(proxy, mint, xvnc_none) -> None:
    async def scenario():
        console, info = await _open_and_handshake(proxy.ws_url, mint(host="127.0.0.1", port=xvnc_none.port))
        console.close()
        return info

    info = _run(scenario())
    assert (info.width, info.height, info.name) == (800, 600, xvnc_none.desktop_name.encode())


def test_token_in_query_string_and_subprotocol_never_echoed(proxy, mint, xvnc_vncauth) -> None:
    tok = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password)

    async def scenario():
        console, info = await _open_and_handshake(proxy.ws_url, tok, via="query")
        selected = console.ws.selected_subprotocol
        console.close()
        console2, _ = await _open_and_handshake(proxy.ws_url, tok)
        selected2 = console2.ws.selected_subprotocol
        headers = dict(console2.ws.headers.get_all())
        console2.close()
        return info, selected, selected2, headers

    info, selected, selected2, headers = _run(scenario())
    assert info.width == 800 and selected == "binary" and selected2 == "binary"
    assert tok not in str(headers)


def test_vencrypt_x509vnc_with_the_tokens_ca(proxy, mint, xvnc_x509, test_pki) -> None:
    tok = mint(
        host="127.0.0.1",
        port=xvnc_x509.port,
        password=xvnc_x509.password,
        tls={"ca": test_pki.ca_pem, "require": True},
        desktop_name="TLS VM",
    )

    async def scenario():
        console, info = await _open_and_handshake(proxy.ws_url, tok)
        await console.request_update()
        first = await console.read(1)
        console.close()
        return info, first

    info, first = _run(scenario())
    assert info.name == b"TLS VM" and first == b"\x00"
    line = proxy.wait_for_log('"security":"vencrypt-x509vnc"')
    assert '"event":"opened"' in line


def test_vencrypt_with_an_unrelated_ca_is_refused_4501(proxy, mint, xvnc_x509, other_pki) -> None:
    tok = mint(
        host="127.0.0.1",
        port=xvnc_x509.port,
        password=xvnc_x509.password,
        tls={"ca": other_pki.ca_pem, "require": True},
    )

    async def scenario():
        console = await Console.open(proxy.ws_url, tok)
        return await console.wait_closed()

    code, reason = _run(scenario())
    assert (code, reason) == (4501, "target_auth_failed")


def test_wrong_password_is_4501(proxy, mint, xvnc_vncauth) -> None:
    tok = mint(host="127.0.0.1", port=xvnc_vncauth.port, password="wrong-pw")

    async def scenario():
        return await (await Console.open(proxy.ws_url, tok)).wait_closed()

    assert _run(scenario()) == (4501, "target_auth_failed")


def test_nothing_listening_is_4500(proxy, mint) -> None:
    tok = mint(host="127.0.0.1", port=free_port())

    async def scenario():
        return await (await Console.open(proxy.ws_url, tok)).wait_closed()

    assert _run(scenario()) == (4500, "target_unreachable")


def test_text_frames_are_refused(proxy, mint, xvnc_vncauth) -> None:
    tok = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password)

    async def scenario():
        console, _ = await _open_and_handshake(proxy.ws_url, tok)
        await console.ws.write_message("hello")
        return await console.wait_closed()

    assert _run(scenario())[0] == 1003


def test_unknown_client_message_type_is_4502(proxy, mint, xvnc_vncauth) -> None:
    tok = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password)

    async def scenario():
        console, _ = await _open_and_handshake(proxy.ws_url, tok)
        await console.send(b"\x77" + b"\x00" * 7)
        return await console.wait_closed()

    assert _run(scenario()) == (4502, "target_protocol_error")


def test_oversized_websocket_message_is_refused(proxy_factory, mint, xvnc_vncauth) -> None:
    small = proxy_factory("--max-message-size", "4096")
    tok = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password)

    async def scenario():
        console, _ = await _open_and_handshake(small.ws_url, tok)
        await console.send(b"\x03" + b"\x00" * 9 + b"\x00" * 8000)
        return await console.wait_closed()

    assert _run(scenario())[0] == 1009


def test_idle_timeout_is_4408(proxy_factory, mint, xvnc_vncauth) -> None:
    idle = proxy_factory("--idle-timeout", "1")
    tok = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password)

    async def scenario():
        console, _ = await _open_and_handshake(idle.ws_url, tok)
        return await console.wait_closed()

    assert _run(scenario()) == (4408, "idle_timeout")


def test_hard_end_at_expiry_is_4410(proxy_factory, mint, xvnc_vncauth) -> None:
    ending = proxy_factory("--end-at-expiry", "--skew", "0")
    tok = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password, ttl=2)

    async def scenario():
        console, _ = await _open_and_handshake(ending.ws_url, tok)
        return await console.wait_closed()

    assert _run(scenario()) == (4410, "session_ended")


def _pointer(display: int) -> tuple[int, int]:
    out = subprocess.run(
        ["xdotool", "getmouselocation", "--shell"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "DISPLAY": f":{display}"},
    ).stdout
    values = dict(line.split("=", 1) for line in out.split())
    return int(values["X"]), int(values["Y"])


async def _move_pointer(url: str, tok: str, x: int, y: int) -> None:
    """Send a pointer event, then an update request whose answer proves Xvnc processed both."""
    console, _ = await _open_and_handshake(url, tok)
    await console.pointer(x, y)
    await console.request_update(incremental=False)
    assert await console.read(1) == b"\x00"
    console.close()


@pytest.mark.parametrize("view_only", [True, False])
def test_view_only_drops_pointer_input_on_the_real_server(proxy, mint, xvnc_vncauth, view_only: bool) -> None:
    start = _pointer(xvnc_vncauth.display)
    target = (start[0] + 37) % 700 + 10, (start[1] + 23) % 500 + 10
    tok = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password, view_only=view_only)
    _run(_move_pointer(proxy.ws_url, tok, *target))
    assert _pointer(xvnc_vncauth.display) == (start if view_only else target)


def test_desktop_name_from_the_token_replaces_the_servers(proxy, mint, xvnc_vncauth) -> None:
    tok = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password, desktop_name="Ünïcode VM")

    async def scenario():
        console, info = await _open_and_handshake(proxy.ws_url, tok)
        console.close()
        return info

    assert _run(scenario()).name == "Ünïcode VM".encode()


def test_an_unusable_ca_in_the_token_ends_the_session_4501(proxy, mint, xvnc_x509) -> None:
    tok = mint(
        host="127.0.0.1",
        port=xvnc_x509.port,
        password=xvnc_x509.password,
        tls={"ca": "-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n", "require": True},
    )

    async def scenario():
        return await (await Console.open(proxy.ws_url, tok)).wait_closed()

    assert _run(scenario()) == (4501, "target_auth_failed")


def test_update_requests_alone_do_not_keep_a_console_open(proxy_factory, mint, xvnc_vncauth) -> None:
    """noVNC keeps asking for updates while the screen changes; only a person's input counts."""
    idle = proxy_factory("--idle-timeout", "1")
    tok = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password)

    async def scenario() -> tuple[int, int | None]:
        console, _ = await _open_and_handshake(idle.ws_url, tok)
        closed = asyncio.ensure_future(console.wait_closed())
        sent = 0
        while not closed.done() and sent < 200:
            await console.request_update(incremental=True)
            sent += 1
            await asyncio.wait([closed], timeout=0.1)  # pace the requests like a viewer would
        return sent, (await closed)[0]

    sent, code = _run(scenario())
    assert code == 4408 and sent >= 5
