"""A real QEMU guest through a real proxy (issue 17 item 1): what a browser sees and sends.

The guest (tests/qemu.py ``BOOT_SECTOR``) boots ``-machine pc`` under TCG in well under a second
and paints eight bands of colours 0..7; each key it reads paints the next cell of the black top
band in colour ``ASCII & 7``, so 'a' paints band 1's colour and 'd' band 4's. Every check is on
pixels the browser stand-in (tests/rfbclient.py + tests/rfbframes.py) read through the proxy.
Passwords are set over QMP, as libvirt sets them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import rfbframes
from proxyproc import ProxyProcess
from qemu import BAND_HEIGHT, CELL_WIDTH, GUEST_WIDTH, QemuVnc, qemu_available, start_qemu, write_boot_floppy
from rfbclient import Console
from rfbframes import DirectConsole, Screen

PASSWORD = "guest-pw"  # QEMU cuts VNC passwords to 8 bytes
TARGET_AUTH_FAILED = (4501, "target_auth_failed")
XT_SCANCODE_B = 0x30
Mint = Callable[..., str]


@pytest.fixture(scope="module")
def boot_floppy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_boot_floppy(tmp_path_factory.mktemp("guest") / "boot.img")


@pytest.fixture(scope="module")
def guest_factory(tmp_path_factory: pytest.TempPathFactory, boot_floppy: Path) -> Iterator[Callable[..., QemuVnc]]:
    if not qemu_available():
        pytest.fail("qemu-system-x86_64 is not installed: run scripts/setup.sh (tests never skip real parts)")
    started: list[QemuVnc] = []

    def start(**options: object) -> QemuVnc:
        server = start_qemu(tmp_path_factory.mktemp("qemu"), guest=boot_floppy, **options)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def guest(guest_factory: Callable[..., QemuVnc]) -> QemuVnc:
    """A freshly booted guest of its own (keys typed into it change its picture), security None."""
    return guest_factory()


@pytest.fixture(scope="module")
def locked_guest(guest_factory: Callable[..., QemuVnc]) -> QemuVnc:
    """A guest whose VNC server asks for a password (VNC authentication)."""
    return guest_factory(password=PASSWORD)


# --- reading the picture --------------------------------------------------------------------


def band_colour(screen: Screen, band: int) -> tuple[int, int, int]:
    return screen.pixel(GUEST_WIDTH - 1, band * BAND_HEIGHT + BAND_HEIGHT // 2)


def cell_colours(screen: Screen, cell: int) -> set[tuple[int, int, int]]:
    return screen.colours(cell * CELL_WIDTH, 0, (cell + 1) * CELL_WIDTH, BAND_HEIGHT)


def painted(screen: Screen) -> bool:
    """The guest's picture is up: the desktop is the guest's and its eight bands are distinct."""
    return screen.width == GUEST_WIDTH and len({band_colour(screen, band) for band in range(8)}) == 8


def cell_is(cell: int, band: int) -> Callable[[Screen], bool]:
    """The key typed at position ``cell`` painted it exactly in band ``band``'s colour."""
    return lambda screen: painted(screen) and cell_colours(screen, cell) == {band_colour(screen, band)}


async def through_proxy(proxy: ProxyProcess, token: str, *, extended_keys: bool = False) -> tuple[Console, Screen]:
    console = await Console.open(proxy.ws_url, token)
    await console.handshake()
    return console, await rfbframes.start(console, extended_keys=extended_keys)


def run(scenario: Awaitable[object]) -> object:
    return asyncio.run(scenario)  # type: ignore[arg-type]


def guest_token(mint: Mint, server: QemuVnc, session_id: str, **claims: object) -> str:
    options: dict[str, object] = {"password": server.password, **claims}
    return mint(host=server.host, port=server.port, session_id=session_id, **options)


def closed_with(proxy: ProxyProcess, token: str, session_id: str) -> tuple[int | None, str | None, str]:
    """The websocket close (code, reason) and the detail the proxy logged for the session."""

    async def scenario() -> tuple[int | None, str | None]:
        return await (await Console.open(proxy.ws_url, token)).wait_closed()

    code, reason = asyncio.run(scenario())
    line = proxy.wait_for_log(f'"session_id":"{session_id}"', '"event":"closed"')
    return code, reason, json.loads(line[line.index("{") :])["detail"]


def shows_the_picture(proxy: ProxyProcess, token: str) -> bool:
    async def scenario() -> bool:
        console, screen = await through_proxy(proxy, token)
        try:
            return painted(await rfbframes.wait_until(console, screen, painted))
        finally:
            console.close()

    return bool(run(scenario()))


# --- security types --------------------------------------------------------------------------


def test_security_none_shows_the_guests_picture(proxy: ProxyProcess, mint: Mint, guest: QemuVnc) -> None:
    assert shows_the_picture(proxy, guest_token(mint, guest, "guest-none"))
    line = proxy.wait_for_log('"session_id":"guest-none"', '"event":"opened"')
    assert '"security":"none"' in line


def test_the_right_vnc_password_shows_the_picture(proxy: ProxyProcess, mint: Mint, locked_guest: QemuVnc) -> None:
    assert shows_the_picture(proxy, guest_token(mint, locked_guest, "guest-vncauth"))
    line = proxy.wait_for_log('"session_id":"guest-vncauth"', '"event":"opened"')
    assert '"security":"vnc"' in line


def test_a_wrong_vnc_password_is_4501(proxy: ProxyProcess, mint: Mint, locked_guest: QemuVnc) -> None:
    token = guest_token(mint, locked_guest, "guest-wrong-pw", password="not-it!!")
    code, reason, detail = closed_with(proxy, token, "guest-wrong-pw")
    assert (code, reason) == TARGET_AUTH_FAILED
    assert detail.startswith("target rejected authentication") and PASSWORD not in detail


def test_a_token_without_a_password_is_4501(proxy: ProxyProcess, mint: Mint, locked_guest: QemuVnc) -> None:
    token = guest_token(mint, locked_guest, "guest-no-pw", password=None)
    code, reason, detail = closed_with(proxy, token, "guest-no-pw")
    assert (code, reason) == TARGET_AUTH_FAILED
    assert "password" in detail.lower()


@pytest.mark.parametrize("locked", [False, True], ids=["none", "vncauth"])
def test_qemu_takes_the_pipelined_opening(
    proxy_factory: Callable[..., ProxyProcess], mint: Mint, guest: QemuVnc, locked_guest: QemuVnc, locked: bool
) -> None:
    """The second console to a QEMU gets its version and security choice before QEMU asked
    (console_proxy/offers.py): QEMU reads them from its buffer and the picture shows. A wrong
    password after it is still the hypervisor's refusal (4501), not a pipelining failure."""
    from test_proxy_pipelining import outcomes

    proxy = proxy_factory()
    server = locked_guest if locked else guest
    for turn in range(2):
        assert shows_the_picture(proxy, guest_token(mint, server, f"guest-pipelined-{turn}"))
    assert outcomes(proxy) == {"guessed": 1, "redialled": 0, "refused": 0}
    if locked:
        token = guest_token(mint, server, "guest-pipelined-wrong", password="not-it!!")
        assert closed_with(proxy, token, "guest-pipelined-wrong")[:2] == TARGET_AUTH_FAILED
        assert outcomes(proxy) == {"guessed": 2, "redialled": 0, "refused": 0}


def test_an_expired_vnc_password_is_4501(
    proxy: ProxyProcess, mint: Mint, guest_factory: Callable[..., QemuVnc]
) -> None:
    server = guest_factory(password=PASSWORD)  # its own: QEMU keeps an expiry until 'never'
    assert shows_the_picture(proxy, guest_token(mint, server, "guest-before-expiry"))
    server.qmp("expire_password", protocol="vnc", time="now")
    code, reason, _ = closed_with(proxy, guest_token(mint, server, "guest-expired"), "guest-expired")
    assert (code, reason) == TARGET_AUTH_FAILED


# --- frames ------------------------------------------------------------------------------------


def test_frames_through_the_proxy_are_pixel_identical_to_direct(
    proxy: ProxyProcess, mint: Mint, guest: QemuVnc
) -> None:
    async def scenario() -> tuple[Screen, Screen]:
        proxied, via_proxy = await through_proxy(proxy, guest_token(mint, guest, "guest-pixels"))
        direct = await DirectConsole.connect(guest.host, guest.port)
        await direct.handshake()
        straight = await rfbframes.start(direct)
        try:
            return (
                await rfbframes.wait_until(proxied, via_proxy, painted),
                await rfbframes.wait_until(direct, straight, painted),
            )
        finally:
            proxied.close()
            direct.close()

    via_proxy, straight = run(scenario())  # type: ignore[misc]
    assert (via_proxy.width, via_proxy.height) == (straight.width, straight.height)
    assert via_proxy.pixels == straight.pixels


# --- input -------------------------------------------------------------------------------------


def test_keys_reach_the_guest_in_order(proxy: ProxyProcess, mint: Mint, guest: QemuVnc) -> None:
    async def scenario() -> None:
        console, screen = await through_proxy(proxy, guest_token(mint, guest, "guest-keys"))
        await rfbframes.wait_until(console, screen, painted)
        await rfbframes.key(console, ord("a"))
        await rfbframes.key(console, ord("d"))
        await rfbframes.wait_until(console, screen, lambda s: cell_is(0, 1)(s) and cell_is(1, 4)(s))
        console.close()

    run(scenario())


def test_qemus_extended_key_event_reaches_the_guest(proxy: ProxyProcess, mint: Mint, guest: QemuVnc) -> None:
    async def scenario() -> None:
        console, screen = await through_proxy(proxy, guest_token(mint, guest, "guest-extkey"), extended_keys=True)
        await rfbframes.wait_until(console, screen, lambda s: painted(s) and s.extended_keys)
        await rfbframes.extended_key(console, ord("b"), XT_SCANCODE_B)
        await rfbframes.wait_until(console, screen, cell_is(0, 2))
        console.close()

    run(scenario())


def test_a_view_only_session_sees_the_guest_but_its_keys_never_arrive(
    proxy: ProxyProcess, mint: Mint, guest: QemuVnc
) -> None:
    async def scenario() -> None:
        viewer, seen = await through_proxy(
            proxy, guest_token(mint, guest, "guest-ro", view_only=True), extended_keys=True
        )
        await rfbframes.wait_until(viewer, seen, lambda s: painted(s) and s.extended_keys)
        await rfbframes.key(viewer, ord("d"))
        await rfbframes.extended_key(viewer, ord("d"), 0x20)
        await rfbframes.request(viewer, seen, incremental=False)  # answered after the keys were handled
        await rfbframes.read_update(viewer, seen)
        typist, _ = await through_proxy(proxy, guest_token(mint, guest, "guest-rw"))
        await rfbframes.key(typist, ord("a"))
        # the typist's key is the first the guest ever read: cell 0 blue, never the viewer's red
        await rfbframes.wait_until(viewer, seen, cell_is(0, 1))
        assert cell_colours(seen, 1) == {band_colour(seen, 0)}
        viewer.close()
        typist.close()

    run(scenario())


def test_a_power_reset_reaches_the_guest_and_the_session_survives(
    proxy: ProxyProcess, mint: Mint, guest: QemuVnc
) -> None:
    async def scenario() -> None:
        console, screen = await through_proxy(proxy, guest_token(mint, guest, "guest-reset"))
        await rfbframes.wait_until(console, screen, painted)
        await rfbframes.key(console, ord("a"))
        await rfbframes.wait_until(console, screen, cell_is(0, 1))
        guest.qmp("system_reset")  # the reboot goes through the BIOS's text mode and back
        await rfbframes.wait_until(console, screen, lambda s: painted(s) and cell_is(0, 0)(s))
        await rfbframes.key(console, ord("d"))
        await rfbframes.wait_until(console, screen, cell_is(0, 4))
        console.close()

    run(scenario())
