"""The viewer end to end: real proxy process, real Xvnc with real X clients, real headless Chromium,
and (for single-use links and revocation) a real broker.

Chromium is driven over the DevTools protocol (tests/browser.py). Waits are events where one
exists: CDP's load event, and the page's ``data-state`` / status text seen by a MutationObserver.
Polling with a deadline only where nothing can be awaited: Xvnc mapping a window (xwininfo), a
file written by the shell in an xterm, the canvas catching up with Xvnc's framebuffer, a
textarea's value. Every test leaves a screenshot under ``test-artifacts/viewer/``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Lock, Thread

import pytest
from brokerproc import BrokerProcess, BrokerState, healthy_proxies, start_broker, start_linked_proxy
from browser import Chromium, Page, chromium_available
from proxyproc import REPO, ProxyProcess
from xvnc import XvncServer

from console_proxy.admission import MESSAGES
from console_proxy.codes import REPORT_ONLY, Close

ARTIFACTS = REPO / "test-artifacts" / "viewer"
NOVNC = REPO / "static" / "node_modules" / "@novnc" / "novnc" / "core" / "rfb.js"
DEADLINE = 15.0

pytestmark = [
    pytest.mark.skipif(not chromium_available(), reason="Debian chromium is not installed"),
    pytest.mark.skipif(not NOVNC.exists(), reason="noVNC is not installed: run `npm ci` in static/"),
]


# --- fixtures ------------------------------------------------------------------------------------


def _browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    browser = Chromium(log_path=tmp_path_factory.mktemp("chromium") / "chromium.log")
    yield browser
    browser.close()


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)  # this run's screenshots only
    yield from _browser(tmp_path_factory)


@pytest.fixture(scope="module")
def own_chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    """A browser for another viewer module (``chromium = e2e.own_chromium`` there): one per
    module, and unlike ``chromium`` it leaves the screenshots folder as it is."""
    yield from _browser(tmp_path_factory)


@pytest.fixture
def open_page(chromium: Chromium, x_clients: object, request: pytest.FixtureRequest) -> Iterator[Callable[[], Page]]:
    """New tabs; each is screenshotted (the test's artifact) and closed after the test.

    Set up after ``x_clients`` so that the screenshots are taken before the X clients end."""
    pages: list[Page] = []

    def _open() -> Page:
        pages.append(chromium.new_page())
        return pages[-1]

    yield _open
    for number, page in enumerate(pages):
        suffix = f"-{number}" if len(pages) > 1 else ""
        page.screenshot(ARTIFACTS / f"{request.node.name}{suffix}.png")
        page.close()


@pytest.fixture
def page(open_page: Callable[[], Page]) -> Page:
    return open_page()


@pytest.fixture
def x_clients(xvnc_vncauth: XvncServer) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start X clients on the Xvnc display; all are ended after the test."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*argv: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, "DISPLAY": f":{xvnc_vncauth.display}"}
        started.append(
            subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        )
        return started[-1]

    yield start
    for process in started:
        if process.poll() is None:
            process.terminate()
            process.wait(5)


# --- helpers ---------------------------------------------------------------------------------------


def poll(check: Callable[[], object], what: str, deadline: float = DEADLINE) -> object:
    """Retry ``check`` until it returns something truthy; only where no event can be awaited."""
    end = time.monotonic() + deadline
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline}s waiting for {what}")
        time.sleep(0.05)  # poll interval, not synchronisation


def wait_viewable(server: XvncServer, title: str) -> None:
    """Until Xvnc reports the window titled ``title`` as mapped and viewable."""

    def viewable() -> bool:
        result = subprocess.run(
            ["xwininfo", "-display", f":{server.display}", "-name", title], capture_output=True, text=True, check=False
        )
        return "IsViewable" in result.stdout

    poll(viewable, f"window {title!r} to be viewable")


def line_reader(x_clients: Callable[..., subprocess.Popen[bytes]], server: XvncServer, tmp_path: Path) -> Path:
    """An xterm over the middle of the screen running a shell that writes the first line typed
    into it to a file. Without a window manager the X focus follows the pointer, which Xvnc
    starts at the screen's centre, so keys go to this window."""
    out, ready = tmp_path / "typed.txt", tmp_path / "ready"
    # After the line, the shell stays (until the test ends) so the screenshot shows what was typed.
    script = f'touch {ready}; IFS= read -r line; printf %s "$line" > {out}.part; mv {out}.part {out}; exec sleep 600'
    x_clients("xterm", "-title", "line-reader", "-geometry", "100x30+80+80", "-e", "sh", "-c", script)
    wait_viewable(server, "line-reader")
    poll(ready.exists, "the shell in the xterm to start")
    return out


def console_url(base: str, token: str) -> str:
    return f"{base}/console#token={token}"


def wait_state(page: Page, state: str, timeout: float = DEADLINE) -> str:
    """Wait for the page's state, then return the status line."""
    page.wait_for(f"document.body.dataset.state === {json.dumps(state)}", timeout)
    return page.evaluate("document.getElementById('status').textContent")


def js_messages(page: Page) -> dict[str, object]:
    """The page's own message table (static/messages.js), so tests do not copy the wording."""
    return page.evaluate("import('/static/messages.js').then(m => JSON.parse(JSON.stringify(m)))")


def canvas_pixels(page: Page) -> tuple[int, int, bytes]:
    """The noVNC canvas as RGBA bytes."""
    width, height, data = page.evaluate("""(() => {
        const canvas = document.querySelector('#screen canvas');
        const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        let binary = '';
        for (let i = 0; i < pixels.length; i += 0x8000) {
            binary += String.fromCharCode.apply(null, pixels.subarray(i, i + 0x8000));
        }
        return [canvas.width, canvas.height, btoa(binary)];
    })()""")
    return width, height, base64.b64decode(data)


def xvnc_framebuffer(server: XvncServer) -> tuple[int, int, bytes]:
    """The X screen as RGBA bytes, read from Xvnc itself with ``xwd`` (ZPixmap, 32 bits a pixel)."""
    dump = subprocess.run(
        ["xwd", "-root", "-silent", "-display", f":{server.display}"], capture_output=True, check=True
    ).stdout
    fields = struct.unpack(">25I", dump[:100])
    header_size, width, height, byte_order = fields[0], fields[4], fields[5], fields[7]
    bits_per_pixel, bytes_per_line, masks, ncolors = fields[11], fields[12], fields[14:17], fields[19]
    assert bits_per_pixel == 32, f"unexpected xwd format: {bits_per_pixel} bits per pixel"
    image = dump[header_size + 12 * ncolors :]
    order = "<" if byte_order == 0 else ">"
    shifts = [(mask & -mask).bit_length() - 1 for mask in masks]
    out = bytearray(width * height * 4)
    for y in range(height):
        row = struct.unpack_from(f"{order}{width}I", image, y * bytes_per_line)
        for x, pixel in enumerate(row):
            i = (y * width + x) * 4
            out[i : i + 4] = bytes((*((pixel & m) >> s for m, s in zip(masks, shifts, strict=True)), 255))
    return width, height, bytes(out)


def match_ratio(a: bytes, b: bytes, width: int, height: int, step: int = 3) -> float:
    """Share of sampled pixels whose colours agree within a small tolerance (lossy encodings)."""
    same = total = 0
    for y in range(0, height, step):
        for x in range(0, width, step):
            i = (y * width + x) * 4
            total += 1
            same += abs(a[i] - b[i]) + abs(a[i + 1] - b[i + 1]) + abs(a[i + 2] - b[i + 2]) <= 30
    return same / total


def distinct_colours(rgba: bytes) -> int:
    return len({rgba[i : i + 3] for i in range(0, len(rgba), 4 * 97)})


def csp_violations(page: Page) -> list[str]:
    return [entry["text"] for entry in page.log if "Content Security Policy" in entry.get("text", "")]


# --- tests -----------------------------------------------------------------------------------------


def test_console_shows_the_real_desktop(page, proxy, mint, xvnc_vncauth, x_clients) -> None:
    x_clients("xlogo", "-geometry", "220x220+40+40", "-fg", "navy", "-bg", "gold")
    x_clients("xclock", "-geometry", "160x160+600+40", "-update", "3600")
    wait_viewable(xvnc_vncauth, "xlogo")
    wait_viewable(xvnc_vncauth, "xclock")
    token = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password, desktop_name="Web VM e2e")

    page.goto(console_url(proxy.base, token))
    status = wait_state(page, "connected")

    assert "Connected to Web VM e2e" in status
    assert page.evaluate("document.title") == "Web VM e2e"
    assert page.evaluate("location.hash") == ""
    assert token not in page.evaluate("location.href")
    assert token not in page.evaluate("JSON.stringify(history.state)")
    assert page.evaluate("document.getElementById('view-only').hidden") is True
    assert page.evaluate("document.activeElement.tagName") == "CANVAS"  # keyboard goes to the console

    # The canvas must show what Xvnc has in its framebuffer: pixels, not a DOM flag.
    def canvas_matches_xvnc() -> float:
        width, height, canvas = canvas_pixels(page)
        x_width, x_height, screen = xvnc_framebuffer(xvnc_vncauth)
        assert (width, height) == (x_width, x_height) == xvnc_vncauth.geometry
        ratio = match_ratio(canvas, screen, width, height)
        return ratio if ratio >= 0.99 else 0.0

    poll(canvas_matches_xvnc, "the canvas to show Xvnc's framebuffer")
    _, _, canvas = canvas_pixels(page)
    assert distinct_colours(canvas) >= 4, "the desktop should not be blank"
    gold = canvas[(100 * 800 + 45) * 4 : (100 * 800 + 45) * 4 + 3]  # inside xlogo, left of the logo
    assert gold == bytes((255, 215, 0)), f"xlogo's background should be gold, got {tuple(gold)}"

    page.screenshot(ARTIFACTS / "desktop-connected.png")
    assert csp_violations(page) == []
    assert not [e for e in page.log if e.get("source") == "exception"], page.log
    assert not [e for e in page.log if e.get("level") == "error"], page.log  # e.g. a 404 for a resource


def test_typed_keys_reach_the_vm(page, proxy, mint, xvnc_vncauth, x_clients, tmp_path) -> None:
    typed = line_reader(x_clients, xvnc_vncauth, tmp_path)
    token = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password)
    page.goto(console_url(proxy.base, token))
    wait_state(page, "connected")
    page.wait_for("document.activeElement && document.activeElement.tagName === 'CANVAS'")

    page.type("hello\n")

    poll(typed.exists, "the xterm's shell to write the typed line")
    assert typed.read_text() == "hello"


def test_send_text_types_the_clipboard_into_the_vm(
    page, chromium, proxy, mint, xvnc_vncauth, x_clients, tmp_path
) -> None:
    typed = line_reader(x_clients, xvnc_vncauth, tmp_path)
    chromium.call(
        "Browser.grantPermissions",
        {"origin": proxy.base, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]},
    )
    token = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password)
    page.goto(console_url(proxy.base, token))
    wait_state(page, "connected")
    page.evaluate("navigator.clipboard.writeText('Pasted Text 42\\n')")

    page.evaluate("document.getElementById('send-text').click()")
    # A textarea's value is a property, not DOM, so no MutationObserver sees it: poll.
    poll(
        lambda: page.evaluate("document.getElementById('text-input').value") == "Pasted Text 42\n",
        "the text box to be filled from the clipboard",
    )
    page.evaluate("document.getElementById('text-send').click()")

    poll(typed.exists, "the xterm's shell to write the typed line")
    assert typed.read_text() == "Pasted Text 42"
    assert page.evaluate("document.getElementById('text-dialog').open") is False
    assert page.evaluate("document.activeElement.tagName") == "CANVAS"  # back to the console


def test_scale_and_full_screen_buttons(page, proxy, mint, xvnc_vncauth) -> None:
    token = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password)
    page.goto(console_url(proxy.base, token))
    wait_state(page, "connected")
    width = "document.querySelector('#screen canvas').getBoundingClientRect().width"
    assert page.evaluate(width) > 900  # 800 px scaled up to the 1024 px wide window

    page.click("#scale")
    page.wait_for(f"{width} === 800")  # noVNC sets the canvas's style: a DOM change
    assert page.evaluate("document.getElementById('scale').getAttribute('aria-pressed')") == "false"
    assert page.evaluate("document.activeElement.tagName") == "CANVAS"

    page.click("#fullscreen")
    page.wait_for("document.getElementById('fullscreen').textContent === 'Exit full screen'")
    assert page.evaluate("document.fullscreenElement === document.documentElement")


def test_new_link_in_the_same_tab_starts_over(page, proxy, mint, xvnc_vncauth) -> None:
    common = {"host": "127.0.0.1", "port": xvnc_vncauth.port, "password": xvnc_vncauth.password}
    page.goto(console_url(proxy.base, mint(now=time.time() - 3600, ttl=60, **common)))
    wait_state(page, "ended")
    # Only the fragment differs: the browser does not load the page again by itself.
    page.goto(console_url(proxy.base, mint(desktop_name="Second link", **common)))
    assert "Connected to Second link" in wait_state(page, "connected")
    assert page.evaluate("location.hash") == ""


def test_view_only_shows_badge_and_drops_input(open_page, proxy, mint, xvnc_vncauth, x_clients, tmp_path) -> None:
    typed = line_reader(x_clients, xvnc_vncauth, tmp_path)
    common = {"host": "127.0.0.1", "port": xvnc_vncauth.port, "password": xvnc_vncauth.password}

    viewer = open_page()
    viewer.goto(console_url(proxy.base, mint(view_only=True, **common)))
    status = wait_state(viewer, "connected")
    assert "view only" in status
    assert viewer.evaluate("getComputedStyle(document.getElementById('view-only')).display") != "none"
    assert viewer.evaluate("document.getElementById('view-only').textContent") == "View only"
    assert viewer.evaluate("document.getElementById('ctrl-alt-del').disabled") is True
    assert viewer.evaluate("document.getElementById('send-text').disabled") is True
    viewer.type("secret\n")

    # The xterm reads one line: if "secret" had got through, the file would hold it.
    operator = open_page()
    operator.goto(console_url(proxy.base, mint(**common)))
    wait_state(operator, "connected")
    operator.wait_for("document.activeElement && document.activeElement.tagName === 'CANVAS'")
    operator.type("ok\n")

    poll(typed.exists, "the xterm's shell to write the typed line")
    assert typed.read_text() == "ok"


def test_expired_link_says_so(page, proxy, mint, xvnc_vncauth) -> None:
    token = mint(
        host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password, now=time.time() - 3600, ttl=60
    )
    page.goto(console_url(proxy.base, token))
    status = wait_state(page, "ended")
    assert status == js_messages(page)["REFUSALS"]["token_expired"]
    assert "expired" in status
    assert page.evaluate("location.hash") == ""


def test_missing_token_says_so(page, proxy) -> None:
    page.goto(f"{proxy.base}/console")
    status = wait_state(page, "ended")
    assert status == js_messages(page)["REFUSALS"]["token_missing"]


def test_vm_refusing_credentials_says_so(page, proxy, mint, xvnc_vncauth) -> None:
    token = mint(host="127.0.0.1", port=xvnc_vncauth.port, password="wrong-pw")
    page.goto(console_url(proxy.base, token))
    status = wait_state(page, "ended")
    assert status == js_messages(page)["CLOSES"]["4501"]
    assert "refused" in status and "1006" not in status


def test_unreachable_console_says_so(page, proxy, mint) -> None:
    from proxyproc import free_port

    token = mint(host="127.0.0.1", port=free_port())  # nothing listens there
    page.goto(console_url(proxy.base, token))
    status = wait_state(page, "ended")
    assert status == js_messages(page)["CLOSES"]["4500"]


def test_proxy_shutdown_says_so(page, proxy_factory, mint, xvnc_vncauth) -> None:
    own = proxy_factory("--drain-grace", "0")
    token = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password)
    page.goto(console_url(own.base, token))
    wait_state(page, "connected")
    own.stop()
    status = wait_state(page, "ended")
    assert status == js_messages(page)["CLOSES"]["1001"]


def test_idle_timeout_says_so(page, proxy_factory, mint, xvnc_vncauth) -> None:
    own = proxy_factory("--idle-timeout", "1")
    token = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password)
    page.goto(console_url(own.base, token))
    wait_state(page, "connected")
    status = wait_state(page, "ended")  # no input for a second: the proxy closes with 4408
    assert status == js_messages(page)["CLOSES"]["4408"]
    assert "idle" in status


def test_session_time_running_out_says_so(page, proxy_factory, mint, xvnc_vncauth) -> None:
    own = proxy_factory("--end-at-expiry")
    token = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password, ttl=2)
    page.goto(console_url(own.base, token))
    wait_state(page, "connected")
    status = wait_state(page, "ended")  # 4410 at the token's expiry, told apart from a revocation
    assert status == js_messages(page)["SESSION_TIME_UP"]


def test_every_refusal_and_close_code_has_a_message(page, proxy) -> None:
    """The page's table covers every code the proxy can send (admission and relay tables)."""
    page.goto(f"{proxy.base}/console")
    table = js_messages(page)
    assert set(MESSAGES) <= set(table["REFUSALS"]), set(MESSAGES) - set(table["REFUSALS"])
    assert {str(code) for code in Close if code not in REPORT_ONLY} <= set(table["CLOSES"])
    for text in [*table["REFUSALS"].values(), *table["CLOSES"].values()]:
        assert not re.search(r"\(\d{4}\)$", text), f"a bare code is not a message: {text}"


class _Portal(BaseHTTPRequestHandler):
    """A management portal that embeds the console in an iframe."""

    page = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.end_headers()
        self.wfile.write(self.page)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def portal() -> Iterator[Callable[[str], str]]:
    """``portal(console_url)`` -> the URL of a page (another origin) that frames the console."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Portal)
    Thread(target=server.serve_forever, daemon=True).start()

    def frame(url: str) -> str:
        _Portal.page = (
            f'<!DOCTYPE html><title>portal</title><iframe src="{url}" width="900" height="700"></iframe>'.encode()
        )
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield frame
    server.shutdown()
    server.server_close()


def test_portal_may_embed_the_console_with_frame_ancestors(page, proxy_factory, mint, xvnc_vncauth, portal) -> None:
    # The portal's origin is only known once it listens, so start it first and name it.
    portal_url = portal("about:blank")
    portal_origin = portal_url.rstrip("/")
    own = proxy_factory("--frame-ancestors", portal_origin, "--drain-grace", "0")
    token = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password, desktop_name="Embedded VM")
    portal(console_url(own.base, token))

    page.goto(portal_url)
    frame = page.frame_context(f"{own.base}/console")
    page.wait_for("document.body && document.body.dataset.state === 'connected'", context=frame)
    assert "Connected to Embedded VM" in page.evaluate("document.getElementById('status').textContent", context=frame)
    page.screenshot(ARTIFACTS / "portal-embedding-connected.png")
    assert csp_violations(page) == []


def test_other_pages_may_not_embed_the_console(page, proxy, mint, xvnc_vncauth, portal) -> None:
    token = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password)
    page.goto(portal(console_url(proxy.base, token)))
    assert any("frame-ancestors" in text for text in csp_violations(page)), page.log


# --- with the broker: single-use links and revocation ------------------------------------------------


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BrokerProcess, ProxyProcess]]:
    """A real broker and one proxy linked to it (heartbeats, redemption, revocation)."""
    tmp = tmp_path_factory.mktemp("viewer-fleet")
    broker = start_broker(BrokerState.create(tmp / "state"))
    linked = start_linked_proxy(tmp, broker, "viewer-proxy")
    try:
        healthy_proxies(broker, 1)
        yield broker, linked
    finally:
        linked.stop()
        broker.stop()


def test_used_link_says_so(open_page, fleet, xvnc_vncauth) -> None:
    broker, _ = fleet
    target = broker.admin.add_target(
        name="once-vm", host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password
    )
    console = broker.issuer.mint(target["id"])  # single-use by default
    first = open_page()
    first.goto(console["url"])
    wait_state(first, "connected")

    second = open_page()
    second.goto(console["url"])
    status = wait_state(second, "ended")
    table = js_messages(second)
    # The proxy remembers the jti it redeemed, so /token-status (asked before connecting) says so.
    assert status == table["REFUSALS"]["token_used"]
    assert first.evaluate("document.body.dataset.state") == "connected"  # the first viewer is unharmed


def test_revoked_session_says_so(page, fleet, xvnc_vncauth) -> None:
    broker, _ = fleet
    target = broker.admin.add_target(
        name="revoke-vm", host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password
    )
    console = broker.issuer.mint(target["id"], desktop_name="Revoked VM")
    page.goto(console["url"])
    assert "Connected to Revoked VM" in wait_state(page, "connected")

    broker.admin.revoke(console["session_id"])

    status = wait_state(page, "ended")  # 4410 within one heartbeat
    assert status == js_messages(page)["CLOSES"]["4410"]
    assert "administrator" in status


# --- the keys menu -----------------------------------------------------------------------------------


def key_logger(x_clients: Callable[..., subprocess.Popen[bytes]], server: XvncServer, tmp_path: Path) -> Path:
    """``xev`` over the middle of the screen (where the pointer, so the X focus, is), logging every
    key event it receives to a file: what the VM's own programs see."""
    log = tmp_path / "keys.log"
    x_clients("sh", "-c", f"exec xev -event keyboard -geometry 600x400+100+100 -name key-logger > {log}")
    wait_viewable(server, "key-logger")
    return log


def key_events(log: Path) -> list[tuple[str, str, int]]:
    """(KeyPress|KeyRelease, keysym name, modifier state) for every key event xev logged."""
    pattern = re.compile(
        r"^(KeyPress|KeyRelease) event.*?\n\s+.*?state (0x[0-9a-f]+), keycode \d+ "
        r"\(keysym 0x[0-9a-f]+, (\w+)\)",
        re.MULTILINE | re.DOTALL,
    )
    return [(kind, name, int(state, 16)) for kind, state, name in pattern.findall(log.read_text())]


def press(page: Page, key: str, code: str, vk: int) -> None:
    """One key pressed and released on the page (not the VM): for the page's own controls."""
    common = {"key": key, "code": code, "windowsVirtualKeyCode": vk}
    typed = {"text": "\r"} if key == "Enter" else {}  # a button's activation comes from the typed character
    page.call("Input.dispatchKeyEvent", {"type": "keyDown", **typed, **common})
    page.call("Input.dispatchKeyEvent", {"type": "keyUp", **common})


CONTROL, MOD1 = 0x4, 0x8  # X modifier state bits: Control, Mod1 (Alt)


def test_keys_menu_sends_combinations_to_the_vm(page, proxy, mint, xvnc_vncauth, x_clients, tmp_path) -> None:
    log = key_logger(x_clients, xvnc_vncauth, tmp_path)
    token = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password)
    page.goto(console_url(proxy.base, token))
    wait_state(page, "connected")
    menu_open = "!document.getElementById('keys-menu').hidden"
    assert page.evaluate("document.getElementById('keys').getAttribute('aria-haspopup')") == "menu"

    # By keyboard: Enter on the button opens the menu on its first entry, Enter picks it.
    page.evaluate("document.getElementById('keys').focus()")
    press(page, "Enter", "Enter", 13)
    page.wait_for(menu_open)
    assert page.evaluate("document.getElementById('keys').getAttribute('aria-expanded')") == "true"
    assert page.evaluate("document.activeElement.textContent") == "Ctrl-Alt-F1"
    assert page.evaluate("document.activeElement.getAttribute('role')") == "menuitem"
    press(page, "Enter", "Enter", 13)
    page.wait_for(f"!({menu_open})")
    assert page.evaluate("document.activeElement.tagName") == "CANVAS"  # back to the console

    # Arrows move (wrapping), Escape closes and gives the focus back to the button.
    page.evaluate("document.getElementById('keys').focus()")
    press(page, "ArrowUp", "ArrowUp", 38)  # opens on the last entry
    page.wait_for(menu_open)
    assert page.evaluate("document.activeElement.textContent") == "Tab"
    press(page, "ArrowDown", "ArrowDown", 40)
    assert page.evaluate("document.activeElement.textContent") == "Ctrl-Alt-F1"
    press(page, "Escape", "Escape", 27)
    page.wait_for(f"!({menu_open})")
    assert page.evaluate("document.activeElement.id") == "keys"

    # By mouse, the rest.
    for keys in ["ctrl alt f12", "ctrl alt backspace", "alt sysrq s", "super", "escape", "tab"]:
        page.click("#keys")
        page.wait_for(menu_open)
        item = f'#keys-menu [data-keys="{keys}"]'
        page.evaluate(f"document.querySelector({json.dumps(item)}).scrollIntoView({{block: 'nearest'}})")
        page.click(item)
        page.wait_for(f"!({menu_open})")

    expected_presses = [
        "Control_L",
        "Alt_L",
        "F1",
        "Control_L",
        "Alt_L",
        "F12",
        "Control_L",
        "Alt_L",
        "BackSpace",
        "Alt_L",
        "Sys_Req",
        "s",
        "Super_L",
        "Escape",
        "Tab",
    ]

    def all_logged() -> list[tuple[str, str, int]] | None:
        events = key_events(log)
        releases = [e for e in events if e[0] == "KeyRelease" and e[1] != "Shift_L"]
        return events if len(releases) >= len(expected_presses) else None

    events = poll(all_logged, "xev to log every key")
    # Xvnc holds Shift_L around F1…F12 pressed with Ctrl+Alt: its keymap's F-keys give
    # XF86Switch_VT_n at that level, so it adds a shift level to produce the keysym it was sent.
    presses = [name for kind, name, _ in events if kind == "KeyPress" and name != "Shift_L"]
    assert presses == expected_presses, events
    # Each combination's last key arrives with its modifiers held, as a user's fingers would.
    f1 = next(state for kind, name, state in events if kind == "KeyPress" and name == "F1")
    assert f1 & CONTROL and f1 & MOD1
    backspace = next(state for kind, name, state in events if kind == "KeyPress" and name == "BackSpace")
    assert backspace & CONTROL and backspace & MOD1
    sysrq_s = next(state for kind, name, state in events if kind == "KeyPress" and name == "s")
    assert sysrq_s & MOD1
    # Nothing stays held down: every press has its release.
    assert len([e for e in events if e[0] == "KeyPress"]) == len([e for e in events if e[0] == "KeyRelease"])
    assert csp_violations(page) == []


def test_keys_menu_is_hidden_for_view_only(page, proxy, mint, xvnc_vncauth) -> None:
    token = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password, view_only=True)
    page.goto(console_url(proxy.base, token))
    wait_state(page, "connected")
    assert page.evaluate("document.getElementById('keys').disabled") is True
    assert page.evaluate("getComputedStyle(document.getElementById('keys')).display") == "none"
    assert page.evaluate("document.getElementById('keys-menu').hidden") is True


# --- reconnecting after a drop ---------------------------------------------------------------------


class CuttableLink:
    """A TCP relay between the browser and a proxy that can drop every connection through it at
    once: a network blip as the page sees it (the TCP connection ends with no websocket close
    frame, so the browser reports 1006). New connections are relayed again right after."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.base = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.cuts = 0
        self._open: list[socket.socket] = []
        self._lock = Lock()
        Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._open += [client, upstream]
            Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """End every relayed connection now, both ways."""
        with self._lock:
            ends, self._open = self._open, []
        self.cuts += 1
        for end in ends:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def close(self) -> None:
        self.listener.close()
        self.cut()


@pytest.fixture
def cuttable() -> Iterator[Callable[[int], CuttableLink]]:
    links: list[CuttableLink] = []

    def start(port: int) -> CuttableLink:
        links.append(CuttableLink(port))
        return links[-1]

    yield start
    for link in links:
        link.close()


def test_reusable_link_reconnects_after_a_drop(page, proxy, mint, xvnc_vncauth, x_clients, tmp_path, cuttable) -> None:
    typed = line_reader(x_clients, xvnc_vncauth, tmp_path)
    link = cuttable(proxy.port)
    token = mint(
        host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password, desktop_name="Flaky network VM"
    )
    page.goto(console_url(link.base, token))
    wait_state(page, "connected")

    link.cut()

    status = wait_state(page, "reconnecting")
    reconnecting = page.evaluate("import('/static/messages.js').then(m => m.reconnecting(1))")
    assert status == reconnecting == "Connection lost — reconnecting (attempt 1)…"
    assert "Connected to Flaky network VM" in wait_state(page, "connected")
    # The new connection is a working console: keys typed now reach the VM.
    page.wait_for("document.activeElement && document.activeElement.tagName === 'CANVAS'")
    page.type("again\n")
    poll(typed.exists, "the xterm's shell to write the typed line")
    assert typed.read_text() == "again"
    assert csp_violations(page) == []


def test_user_disconnect_does_not_reconnect(page, proxy, mint, xvnc_vncauth) -> None:
    token = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password)
    page.goto(console_url(proxy.base, token))
    wait_state(page, "connected")
    page.click("#disconnect")
    assert wait_state(page, "ended") == js_messages(page)["USER_DISCONNECTED"]


def test_single_use_link_says_it_is_spent_after_a_drop(page, fleet, xvnc_vncauth, cuttable, tmp_path) -> None:
    broker, _ = fleet
    link = cuttable(0)
    # The page's origin is the relay's: a proxy of the same fleet that allows it.
    own = start_linked_proxy(tmp_path, broker, "drop-proxy", "--allowed-origin", link.base)
    try:
        link.target_port = own.port
        target = broker.admin.add_target(
            name="drop-vm", host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password
        )
        console = broker.issuer.mint(target["id"])  # single-use by default
        page.goto(link.base + "/console" + console["url"].split("/console", 1)[1])
        wait_state(page, "connected")

        link.cut()

        status = wait_state(page, "ended")
        assert status == js_messages(page)["SINGLE_USE_SPENT"]
        assert "new link" in status
    finally:
        own.stop()


# --- remote resize -------------------------------------------------------------------------------


def x_screen_size(server: XvncServer) -> tuple[int, int]:
    """The X screen's size as the VM's programs see it (xdpyinfo)."""
    out = subprocess.run(
        ["xdpyinfo", "-display", f":{server.display}"], capture_output=True, text=True, check=True
    ).stdout
    found = re.search(r"dimensions:\s+(\d+)x(\d+) pixels", out)
    assert found, out
    return int(found[1]), int(found[2])


def test_remote_resize_follows_the_window(page, proxy, mint, xvnc_factory) -> None:
    server = xvnc_factory(security="VncAuth", password="resize-pw")  # its own: this test resizes it
    token = mint(host="127.0.0.1", port=server.port, password=server.password)
    page.goto(console_url(proxy.base, token))
    wait_state(page, "connected")
    assert x_screen_size(server) == server.geometry
    assert page.evaluate("document.getElementById('resize').getAttribute('aria-pressed')") == "false"
    screen_size = (
        "(() => { const r = document.getElementById('screen').getBoundingClientRect();"
        " return [Math.floor(r.width), Math.floor(r.height)]; })()"
    )

    page.click("#resize")
    assert page.evaluate("document.getElementById('resize').getAttribute('aria-pressed')") == "true"
    assert page.evaluate("document.activeElement.tagName") == "CANVAS"
    first = tuple(page.evaluate(screen_size))
    assert first[0] == 1024 and first != server.geometry
    poll(lambda: x_screen_size(server) == first, f"the VM's screen to become {first}")
    page.wait_for(f"document.querySelector('#screen canvas').width === {first[0]}")

    # A second window size: the VM's screen follows again.
    page.call(
        "Emulation.setDeviceMetricsOverride", {"width": 700, "height": 560, "deviceScaleFactor": 1, "mobile": False}
    )
    page.wait_for(f"{screen_size}[0] === 700")
    second = tuple(page.evaluate(screen_size))
    poll(lambda: x_screen_size(server) == second, f"the VM's screen to become {second}")
    page.wait_for(f"document.querySelector('#screen canvas').width === {second[0]}")

    # Off again: the window changes, the VM's screen stays.
    page.click("#resize")
    assert page.evaluate("document.getElementById('resize').getAttribute('aria-pressed')") == "false"
    page.call(
        "Emulation.setDeviceMetricsOverride", {"width": 1024, "height": 768, "deviceScaleFactor": 1, "mobile": False}
    )
    page.wait_for(f"{screen_size}[0] === 1024")
    assert x_screen_size(server) == second
    assert csp_violations(page) == []


def test_remote_resize_is_hidden_for_view_only(page, proxy, mint, xvnc_vncauth) -> None:
    token = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password, view_only=True)
    page.goto(console_url(proxy.base, token))
    wait_state(page, "connected")
    assert page.evaluate("document.getElementById('resize').disabled") is True
    assert page.evaluate("getComputedStyle(document.getElementById('resize')).display") == "none"
