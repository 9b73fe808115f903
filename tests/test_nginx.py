"""Behind a real nginx, run from ``contrib/nginx/consolegate.conf`` (location /consolegate/).

- The viewer under a path prefix: the page, every file it loads and every module those import
  come through the prefix; a real Chromium opens a console through it (the websocket too).
- X-Forwarded-Host with the browser's port ($http_host): with nginx trusted, the page's origin
  is the request's own and the Host pin of ``--public-url`` holds; not trusted, refused.
- An idle console held through nginx's default ``proxy_read_timeout`` (60 s) for longer than
  that, kept by the proxy's default keepalive Pings: the one slow test (~65 s), marked ``slow``.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urljoin

import pytest
from browser import Chromium, chromium_available
from lbproc import nginx
from proxyproc import ProxyProcess, free_port
from rfbclient import Console, try_upgrade
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect
from xvnc import XvncServer

REPO = Path(__file__).resolve().parent.parent
NOVNC = REPO / "static" / "node_modules" / "@novnc" / "novnc" / "core" / "rfb.js"
PREFIX = "/consolegate/"
IMPORT = re.compile(
    r"""^\s*(?:import|export)\b[^;'"]*?\bfrom\s*['"]([^'"]+)['"]"""
    r"""|^\s*import\s*['"]([^'"]+)['"]""",
    re.MULTILINE,
)
RESOURCE = re.compile(r"""(?:src|href)="([^"]+)\"""")
#: Longer than nginx's default proxy_read_timeout (60 s), which the test must not shorten.
HOLD_IDLE = 65.0
needs_novnc = pytest.mark.skipif(not NOVNC.exists(), reason="noVNC is not installed: run `npm ci` in static/")


class Site:
    """nginx on ``port`` in front of ``proxy``, the example config's prefix."""

    def __init__(self, port: int, proxy: ProxyProcess) -> None:
        self.port, self.proxy = port, proxy
        self.base = f"http://127.0.0.1:{port}{PREFIX}"
        self.ws_url = f"ws://127.0.0.1:{port}{PREFIX}websockify"
        self.origin = f"http://127.0.0.1:{port}"


@pytest.fixture
def site_factory(proxy_factory: Callable[..., ProxyProcess], tmp_path: Path) -> Iterator[Callable[..., Site]]:
    """Start a proxy (with ``extra`` flags; ``{origin}`` is nginx's origin) and nginx before it."""
    with_nginx: list[object] = []

    def start(*extra: str) -> Site:
        port = free_port()
        proxy = proxy_factory(*(flag.format(origin=f"http://127.0.0.1:{port}") for flag in extra))
        directory = tmp_path / f"nginx-{port}"
        directory.mkdir()
        context = nginx(directory, port, proxy.port)
        context.__enter__()
        with_nginx.append(context)
        return Site(port, proxy)

    yield start
    for context in with_nginx:
        context.__exit__(None, None, None)  # type: ignore[attr-defined]


@pytest.fixture
def site(site_factory: Callable[..., Site]) -> Site:
    """As an operator sets it up: nginx trusted, and the public URL with its prefix (Host pinned)."""
    return site_factory("--trusted-proxy", "127.0.0.1", "--public-url", "{origin}" + PREFIX)


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.headers.get("Content-Type", ""), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type", ""), error.read()


@needs_novnc
def test_the_viewer_and_everything_it_loads_come_through_the_prefix(site: Site) -> None:
    status, kind, page = fetch(site.base + "console")
    assert status == 200 and kind.startswith("text/html")
    todo = [urljoin(site.base + "console", url) for url in RESOURCE.findall(page.decode())]
    assert len(todo) == 3 and all(url.startswith(site.base + "static/") for url in todo), todo
    seen: set[str] = set()
    while todo:
        url = todo.pop()
        if url in seen:
            continue
        seen.add(url)
        assert url.startswith(site.base), f"{url} is outside the prefix"
        status, _, body = fetch(url)
        assert status == 200, url
        if url.endswith(".js"):
            todo += [urljoin(url, next(g for g in m.groups() if g)) for m in IMPORT.finditer(body.decode())]
    assert site.base + "novnc/core/rfb.js" in seen and site.base + "static/messages.js" in seen


def test_token_status_through_the_prefix(site: Site, mint: Callable[..., str], xvnc_none: XvncServer) -> None:
    tok = mint(host="127.0.0.1", port=xvnc_none.port)
    status, _, body = fetch(site.base + "token-status", {"Authorization": f"Bearer {tok}", "Origin": site.origin})
    assert status == 200 and json.loads(body)["ok"] is True


def test_x_forwarded_host_with_the_port_is_the_pages_origin(
    site_factory: Callable[..., Site], mint: Callable[..., str], xvnc_none: XvncServer
) -> None:
    """nginx sends Host: consolegate_proxy (its upstream's name) and X-Forwarded-Host: the
    browser's 127.0.0.1:PORT. Trusted, that is the page's origin and the pinned host; not
    trusted, the page's origin is foreign to the proxy and the upgrade is refused."""
    trusted = site_factory("--trusted-proxy", "127.0.0.1", "--public-url", "{origin}" + PREFIX)
    untrusted = site_factory()
    tok = mint(host="127.0.0.1", port=xvnc_none.port)

    async def scenario() -> tuple[object, object]:
        console = await Console.open(trusted.ws_url, tok, origin=trusted.origin)
        info = await console.handshake()
        console.close()
        return info, await try_upgrade(untrusted.ws_url, tok, origin=untrusted.origin)

    accepted, refused = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert accepted.width == 800  # type: ignore[attr-defined]
    assert refused is not None and refused.status == 403  # type: ignore[attr-defined]
    assert refused.body["error"] == "origin_denied"  # type: ignore[attr-defined]


@needs_novnc
@pytest.mark.skipif(not chromium_available(), reason="Debian chromium is not installed")
def test_chromium_opens_a_console_through_the_prefix(
    site: Site, mint: Callable[..., str], xvnc_vncauth: XvncServer, tmp_path: Path
) -> None:
    tok = mint(
        host="127.0.0.1",
        port=xvnc_vncauth.port,
        password=xvnc_vncauth.password,
        desktop_name="Behind nginx",
        vm="nginx-prefix",
    )
    browser = Chromium(log_path=tmp_path / "chromium.log")
    try:
        page = browser.new_page()
        page.goto(f"{site.base}console#token={tok}")
        page.wait_for("document.body.dataset.state === 'connected'", 15.0)
        status = page.evaluate("document.getElementById('status').textContent")
        errors = [entry["text"] for entry in page.log if entry.get("level") == "error"]
        page.close()
    finally:
        browser.close()
    assert "Connected to Behind nginx" in status
    assert errors == []
    site.proxy.wait_for_log('"event":"opened"', '"vm":"nginx-prefix"')


@pytest.mark.slow
def test_an_idle_console_outlives_nginxs_read_timeout(
    site: Site, mint: Callable[..., str], xvnc_none: XvncServer
) -> None:
    """Held idle through nginx (default proxy_read_timeout 60 s, default --ping-interval 20 s)
    for 65 s: the browser answered the proxy's Pings, and the console still relays after."""
    tok = mint(host="127.0.0.1", port=xvnc_none.port)

    async def scenario() -> tuple[int, bytes]:
        headers = {"Sec-WebSocket-Protocol": f"binary, token.{tok}", "Origin": site.origin}
        ws = await websocket_connect(HTTPRequest(site.ws_url, headers=headers, request_timeout=10))
        pings: list[bytes] = []
        ws.on_ping = pings.append  # type: ignore[method-assign]
        console = Console(ws)
        await console.handshake()
        closed = asyncio.ensure_future(ws.read_message())  # anything now would be the end
        done, _ = await asyncio.wait({closed}, timeout=HOLD_IDLE)  # the hold is the test: idle this long
        assert not done, f"the console ended while idle: {ws.close_code} {ws.close_reason}"
        closed.cancel()
        await console.request_update()  # a full update of the 800x600 screen
        kind = await console.read(1)
        console.close()
        return len(pings), kind

    pings, kind = asyncio.run(asyncio.wait_for(scenario(), HOLD_IDLE + 20))
    assert pings >= 2  # what kept nginx from cutting it
    assert kind == b"\x00"  # FramebufferUpdate: relayed after the idle minute
