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
import json
import os
import re
import shutil
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread

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


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)  # this run's screenshots only
    browser = Chromium(log_path=tmp_path_factory.mktemp("chromium") / "chromium.log")
    yield browser
    browser.close()


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
        started.append(subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
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
        result = subprocess.run(["xwininfo", "-display", f":{server.display}", "-name", title],
                                capture_output=True, text=True, check=False)
        return "IsViewable" in result.stdout
    poll(viewable, f"window {title!r} to be viewable")


def line_reader(x_clients: Callable[..., subprocess.Popen[bytes]], server: XvncServer, tmp_path: Path) -> Path:
    """An xterm over the middle of the screen running a shell that writes the first line typed
    into it to a file. Without a window manager the X focus follows the pointer, which Xvnc
    starts at the screen's centre, so keys go to this window."""
    out, ready = tmp_path / "typed.txt", tmp_path / "ready"
    # After the line, the shell stays (until the test ends) so the screenshot shows what was typed.
    script = (f'touch {ready}; IFS= read -r line; printf %s "$line" > {out}.part; mv {out}.part {out}; '
              'exec sleep 600')
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
    dump = subprocess.run(["xwd", "-root", "-silent", "-display", f":{server.display}"],
                          capture_output=True, check=True).stdout
    fields = struct.unpack(">25I", dump[:100])
    header_size, width, height, byte_order = fields[0], fields[4], fields[5], fields[7]
    bits_per_pixel, bytes_per_line, masks, ncolors = fields[11], fields[12], fields[14:17], fields[19]
    assert bits_per_pixel == 32, f"unexpected xwd format: {bits_per_pixel} bits per pixel"
    image = dump[header_size + 12 * ncolors:]
    order = "<" if byte_order == 0 else ">"
    shifts = [(mask & -mask).bit_length() - 1 for mask in masks]
    out = bytearray(width * height * 4)
    for y in range(height):
        row = struct.unpack_from(f"{order}{width}I", image, y * bytes_per_line)
        for x, pixel in enumerate(row):
            i = (y * width + x) * 4
            out[i:i + 4] = bytes((*((pixel & m) >> s for m, s in zip(masks, shifts, strict=True)), 255))
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
    return len({rgba[i:i + 3] for i in range(0, len(rgba), 4 * 97)})


def csp_violations(page: Page) -> list[str]:
    return [entry["text"] for entry in page.log if "Content Security Policy" in entry.get("text", "")]


# --- tests -----------------------------------------------------------------------------------------


def test_console_shows_the_real_desktop(page, proxy, mint, xvnc_vncauth, x_clients) -> None:
    x_clients("xlogo", "-geometry", "220x220+40+40", "-fg", "navy", "-bg", "gold")
    x_clients("xclock", "-geometry", "160x160+600+40", "-update", "3600")
    wait_viewable(xvnc_vncauth, "xlogo")
    wait_viewable(xvnc_vncauth, "xclock")
    token = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password,
                 desktop_name="Web VM e2e")

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
    gold = canvas[(100 * 800 + 45) * 4:(100 * 800 + 45) * 4 + 3]  # inside xlogo, left of the logo
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


def test_send_text_types_the_clipboard_into_the_vm(page, chromium, proxy, mint, xvnc_vncauth, x_clients,
                                                   tmp_path) -> None:
    typed = line_reader(x_clients, xvnc_vncauth, tmp_path)
    chromium.call("Browser.grantPermissions", {"origin": proxy.base,
                                               "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    token = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password)
    page.goto(console_url(proxy.base, token))
    wait_state(page, "connected")
    page.evaluate("navigator.clipboard.writeText('Pasted Text 42\\n')")

    page.evaluate("document.getElementById('send-text').click()")
    # A textarea's value is a property, not DOM, so no MutationObserver sees it: poll.
    poll(lambda: page.evaluate("document.getElementById('text-input').value") == "Pasted Text 42\n",
         "the text box to be filled from the clipboard")
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
    token = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password,
                 now=time.time() - 3600, ttl=60)
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
        _Portal.page = f'<!DOCTYPE html><title>portal</title><iframe src="{url}" width="900" height="700"></iframe>'.encode()
        return f"http://127.0.0.1:{server.server_address[1]}/"
    yield frame
    server.shutdown()
    server.server_close()


def test_portal_may_embed_the_console_with_frame_ancestors(page, proxy_factory, mint, xvnc_vncauth, portal) -> None:
    # The portal's origin is only known once it listens, so start it first and name it.
    portal_url = portal("about:blank")
    portal_origin = portal_url.rstrip("/")
    own = proxy_factory("--frame-ancestors", portal_origin, "--drain-grace", "0")
    token = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password,
                 desktop_name="Embedded VM")
    portal(console_url(own.base, token))

    page.goto(portal_url)
    frame = page.frame_context(f"{own.base}/console")
    page.wait_for("document.body && document.body.dataset.state === 'connected'", context=frame)
    assert "Connected to Embedded VM" in page.evaluate("document.getElementById('status').textContent",
                                                       context=frame)
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
    target = broker.admin.add_target(name="once-vm", host="127.0.0.1", port=xvnc_vncauth.port,
                                     password=xvnc_vncauth.password)
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
    target = broker.admin.add_target(name="revoke-vm", host="127.0.0.1", port=xvnc_vncauth.port,
                                     password=xvnc_vncauth.password)
    console = broker.issuer.mint(target["id"], desktop_name="Revoked VM")
    page.goto(console["url"])
    assert "Connected to Revoked VM" in wait_state(page, "connected")

    broker.admin.revoke(console["session_id"])

    status = wait_state(page, "ended")  # 4410 within one heartbeat
    assert status == js_messages(page)["CLOSES"]["4410"]
    assert "administrator" in status
