"""The viewer in Chromium against a real QEMU guest (issue 17 item 1): page, proxy and guest all real.

The guest (tests/qemu.py ``BOOT_SECTOR``) paints eight bands of colours 0..7 and, for each key it
reads, the next cell of the black top band in colour ``ASCII & 7`` ('a' band 1's colour, 'd' band
4's). Its VNC asks for a password, set over QMP as libvirt sets it; the token carries it.

What the page shows is read from the noVNC canvas's 2D context. noVNC scales with CSS only, so the
canvas's own pixels are the framebuffer at QEMU's coordinates (mode 13h doubled to 640x400). What
the guest did is read back independently over a second RFB connection through the proxy
(tests/rfbframes.py), so a key counts only once the guest itself painted it.

Waits: the page's ``data-state`` (a MutationObserver, tests/browser.py); canvas pixels change with
no DOM event, so they are polled with a deadline; RFB updates are awaited.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import rfbframes
import test_viewer_e2e as e2e
from browser import Chromium, Page
from proxyproc import REPO, ProxyProcess
from qemu import (
    BAND_HEIGHT,
    CELL_WIDTH,
    GUEST_HEIGHT,
    GUEST_WIDTH,
    QemuVnc,
    qemu_available,
    start_qemu,
    write_boot_floppy,
)
from rfbclient import Console
from rfbframes import Screen
from test_viewer_e2e import canvas_pixels, console_url, csp_violations, poll, wait_state

ARTIFACTS = REPO / "test-artifacts" / "qemu-viewer"
PASSWORD = "guest-pw"  # QEMU cuts VNC passwords to 8 bytes
Mint = Callable[..., str]
Colour = tuple[int, int, int]

pytestmark = e2e.pytestmark


# --- fixtures ------------------------------------------------------------------------------------


chromium = e2e.own_chromium  # fixture: this module's own browser


@pytest.fixture(scope="module")
def boot_floppy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_boot_floppy(tmp_path_factory.mktemp("guest") / "boot.img")


@pytest.fixture
def guest(tmp_path: Path, boot_floppy: Path) -> Iterator[QemuVnc]:
    """A freshly booted guest of its own (keys change its picture) whose VNC asks for a password."""
    if not qemu_available():
        pytest.fail("qemu-system-x86_64 is not installed: run scripts/setup.sh (tests never skip real parts)")
    with start_qemu(tmp_path / "qemu", guest=boot_floppy, password=PASSWORD) as server:
        yield server


@pytest.fixture
def page(chromium: Chromium, guest: QemuVnc, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A new tab, screenshotted (the test's artifact) and closed after the test.

    Set up after ``guest`` so that the screenshot is taken while the guest still runs."""
    tab = chromium.new_page()
    yield tab
    tab.screenshot(ARTIFACTS / f"{request.node.name}.png")
    tab.close()


# --- helpers ---------------------------------------------------------------------------------------


def guest_token(mint: Mint, server: QemuVnc, **claims: object) -> str:
    return mint(host=server.host, port=server.port, password=server.password, **claims)


def band_point(band: int) -> tuple[int, int]:
    """A pixel well inside band ``band``, right of any cell the keys paint."""
    return GUEST_WIDTH - 1, band * BAND_HEIGHT + BAND_HEIGHT // 2


def canvas_colours(page: Page, points: list[tuple[int, int]]) -> list[Colour] | None:
    """The canvas's colours at framebuffer coordinates; None until it has the guest's size."""
    answer = page.evaluate(f"""(() => {{
        const canvas = document.querySelector('#screen canvas');
        if (!canvas || canvas.width !== {GUEST_WIDTH} || canvas.height !== {GUEST_HEIGHT}) return null;
        const context = canvas.getContext('2d');
        return {json.dumps(points)}.map(([x, y]) => Array.from(context.getImageData(x, y, 1, 1).data.slice(0, 3)));
    }})()""")
    return None if answer is None else [tuple(colour) for colour in answer]  # type: ignore[misc]


def canvas_bands(page: Page) -> list[Colour] | None:
    """The eight band colours on the canvas once they are eight distinct colours, else None."""
    colours = canvas_colours(page, [band_point(band) for band in range(8)])
    return colours if colours is not None and len(set(colours)) == 8 else None


def canvas_cell(page: Page, cell: int) -> list[Colour] | None:
    """The colours at the corners and centre of the ``cell``-th cell of the top band."""
    x0, x1 = cell * CELL_WIDTH, (cell + 1) * CELL_WIDTH - 1
    return canvas_colours(
        page, [(x0, 0), (x1, 0), (x0, BAND_HEIGHT - 1), (x1, BAND_HEIGHT - 1), ((x0 + x1) // 2, BAND_HEIGHT // 2)]
    )


def band_colour(screen: Screen, band: int) -> Colour:
    return screen.pixel(*band_point(band))


def painted(screen: Screen) -> bool:
    return screen.width == GUEST_WIDTH and len({band_colour(screen, band) for band in range(8)}) == 8


async def guest_screen(proxy: ProxyProcess, token: str, ready: Callable[[Screen], bool]) -> Screen:
    """The guest's framebuffer as a second, independent RFB client sees it once ``ready``."""
    console = await Console.open(proxy.ws_url, token)
    try:
        await console.handshake()
        screen = await rfbframes.start(console)
        return await rfbframes.wait_until(console, screen, ready)
    finally:
        console.close()


def open_console(page: Page, proxy: ProxyProcess, token: str) -> str:
    page.goto(console_url(proxy.base, token))
    status = wait_state(page, "connected")
    page.wait_for("document.activeElement && document.activeElement.tagName === 'CANVAS'")
    return status


# --- tests -----------------------------------------------------------------------------------------


def test_the_viewer_shows_the_guests_picture(page: Page, proxy: ProxyProcess, mint: Mint, guest: QemuVnc) -> None:
    token = guest_token(mint, guest, desktop_name="QEMU guest", session_id="qemu-viewer")
    status = open_console(page, proxy, token)
    assert "Connected to QEMU guest" in status
    assert page.evaluate("document.title") == "QEMU guest"
    assert '"security":"vnc"' in proxy.wait_for_log('"session_id":"qemu-viewer"', '"event":"opened"')

    bands = poll(lambda: canvas_bands(page), "the canvas to show the guest's eight bands")
    width, height, canvas = canvas_pixels(page)
    assert (width, height) == (GUEST_WIDTH, GUEST_HEIGHT)  # the framebuffer, whatever the CSS scale

    # The same picture as QEMU serves another client: every pixel of it, not just the bands.
    seen = asyncio.run(guest_screen(proxy, guest_token(mint, guest), painted))
    assert bands == [band_colour(seen, band) for band in range(8)]
    # canvas bytes are R, G, B, A; rfbframes' are B, G, R, X (32-bit little endian, red at bit 16)
    assert [canvas[0::4], canvas[1::4], canvas[2::4]] == [seen.pixels[2::4], seen.pixels[1::4], seen.pixels[0::4]]
    assert csp_violations(page) == []
    assert not [e for e in page.log if e.get("source") == "exception"], page.log


def test_keys_typed_in_the_page_reach_the_guest(page: Page, proxy: ProxyProcess, mint: Mint, guest: QemuVnc) -> None:
    open_console(page, proxy, guest_token(mint, guest))
    bands = poll(lambda: canvas_bands(page), "the canvas to show the guest's eight bands")
    assert canvas_cell(page, 0) == [bands[0]] * 5  # nothing typed yet: the top band is still black

    page.type("ad")

    poll(
        lambda: canvas_cell(page, 0) == [bands[1]] * 5 and canvas_cell(page, 1) == [bands[4]] * 5,
        "the canvas to show cells painted for 'a' then 'd'",
    )
    assert canvas_cell(page, 2) == [bands[0]] * 5  # two keys, two cells: no key counted twice

    def typed(screen: Screen) -> bool:
        def cell(n: int) -> set[Colour]:
            return screen.colours(n * CELL_WIDTH, 0, (n + 1) * CELL_WIDTH, BAND_HEIGHT)

        return painted(screen) and cell(0) == {band_colour(screen, 1)} and cell(1) == {band_colour(screen, 4)}

    seen = asyncio.run(guest_screen(proxy, guest_token(mint, guest), typed))  # the guest itself painted them
    assert seen.colours(2 * CELL_WIDTH, 0, GUEST_WIDTH, BAND_HEIGHT) == {band_colour(seen, 0)}
