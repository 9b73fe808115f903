"""The viewer as served by a real proxy: headers, content types, and nothing from outside the proxy."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.error
import urllib.request
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import pytest
from proxyproc import REPO

STATIC = REPO / "static"
NOVNC = STATIC / "node_modules" / "@novnc" / "novnc"
needs_novnc = pytest.mark.skipif(
    not (NOVNC / "core" / "rfb.js").exists(), reason="noVNC is not installed: run `npm ci` in static/"
)

# Statements at the start of a line (so comments do not count): `import X from "…"`,
# `import {…\n…} from "…"`, `export {…} from "…"`, `import "…"`; and `import("…")` anywhere.
IMPORT = re.compile(
    r"""^\s*(?:import|export)\b[^;'"]*?\bfrom\s*['"]([^'"]+)['"]"""
    r"""|^\s*import\s*['"]([^'"]+)['"]|\bimport\(\s*['"]([^'"]+)['"]""",
    re.MULTILINE,
)


def fetch(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def csp(headers: dict[str, str]) -> dict[str, str]:
    """The Content-Security-Policy header as {directive: sources}."""
    policy = {}
    for part in headers["Content-Security-Policy"].split(";"):
        name, _, value = part.strip().partition(" ")
        policy[name] = value.strip()
    return policy


def test_console_page_headers(proxy) -> None:
    status, headers, _ = fetch(f"{proxy.base}/console")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    policy = csp(headers)
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == "'self'"
    assert policy["connect-src"] == "'self'"  # the page's /token-status and its own websocket
    assert policy["style-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"  # default: nobody may frame the console
    assert "unsafe" not in headers["Content-Security-Policy"]
    assert headers["Referrer-Policy"] == "no-referrer"
    assert headers["Cache-Control"] == "no-store"
    assert headers["X-Content-Type-Options"] == "nosniff"


def test_frame_ancestors_is_configurable(proxy_factory) -> None:
    own = proxy_factory("--frame-ancestors", "https://portal.example.com")
    _, headers, _ = fetch(f"{own.base}/console")
    assert csp(headers)["frame-ancestors"] == "https://portal.example.com"
    assert csp(headers)["script-src"] == "'self'"


@needs_novnc
@pytest.mark.parametrize(
    "path, kind",
    [
        ("/static/console.js", "javascript"),
        ("/static/messages.js", "javascript"),
        ("/static/console.css", "text/css"),
        ("/novnc/core/rfb.js", "javascript"),
        ("/novnc/vendor/pako/lib/zlib/inflate.js", "javascript"),
    ],
)
def test_static_files_have_headers_and_types(proxy, path, kind) -> None:
    status, headers, _ = fetch(proxy.base + path)
    assert status == 200
    assert kind in headers["Content-Type"]  # module scripts need a JavaScript MIME type
    assert headers["Cache-Control"] == "no-store"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert csp(headers)["script-src"] == "'self'"


class _PageResources(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if "style" in values or any(name.startswith("on") for name in values):
            self.inline.append(f"<{tag}> with an inline style or handler")
        if tag == "style" or (tag == "script" and not values.get("src")):
            self.inline.append(f"inline <{tag}>")
        for name in ("src", "href"):
            if values.get(name):
                self.urls.append(values[name] or "")


def test_page_has_nothing_inline_and_nothing_from_elsewhere() -> None:
    parser = _PageResources()
    parser.feed((STATIC / "console.html").read_text())
    assert parser.inline == []
    # relative to the page, so the viewer works under a path prefix (contrib/nginx, test_nginx.py)
    assert parser.urls and all(url.startswith("static/") for url in parser.urls), parser.urls
    css = (STATIC / "console.css").read_text()
    assert "url(" not in css and "@import" not in css and "@font-face" not in css  # system fonts only


@needs_novnc
def test_every_module_the_page_loads_comes_from_the_proxy(proxy) -> None:
    """Follow every import from console.js: all on the proxy, all served (works offline)."""
    start = f"{proxy.base}/static/console.js"
    seen, todo = set(), [start]
    while todo:
        url = todo.pop()
        if url in seen:
            continue
        seen.add(url)
        assert urlsplit(url).netloc == urlsplit(proxy.base).netloc, f"{url} is not on the proxy"
        status, _, body = fetch(url)
        assert status == 200, url
        for match in IMPORT.finditer(body.decode()):
            todo.append(urljoin(url, next(group for group in match.groups() if group)))
    assert f"{proxy.base}/novnc/core/rfb.js" in seen
    assert any("/novnc/vendor/pako/" in url for url in seen)  # noVNC's relative layout kept


def test_static_files_do_not_escape_their_roots(proxy) -> None:
    for path in (
        "/static/../console_proxy/token.py",
        "/novnc/../../../console_proxy/token.py",
        "/static/%2e%2e/console_proxy/token.py",
        "/novnc//etc/passwd",
    ):
        status, _, body = fetch(proxy.base + path)
        assert status in (403, 404), path
        assert b"def verify" not in body and b"root:" not in body


def test_novnc_is_pinned_and_not_committed() -> None:
    package = json.loads((STATIC / "package.json").read_text())
    lock = json.loads((STATIC / "package-lock.json").read_text())
    assert package["dependencies"] == {"@novnc/novnc": "1.7.0"}
    locked = lock["packages"]["node_modules/@novnc/novnc"]
    assert locked["version"] == "1.7.0" and locked["integrity"].startswith("sha512-")
    tracked = subprocess.run(
        ["git", "ls-files", "static/node_modules"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert tracked == ""
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "static/node_modules/@novnc/novnc/core/rfb.js"], cwd=REPO, check=False
    )
    assert ignored.returncode == 0


def test_our_scripts_name_no_url_from_the_site_root() -> None:
    """No string in our scripts starts at the site root (``"/websockify"``): behind a reverse
    proxy under ``/prefix/`` it would miss the proxy. URLs are built from the page's location."""
    for name in ("console.js", "messages.js"):
        text = (STATIC / name).read_text()
        assert not re.search(r"""["'`]/(?!/)""", text), name
