"""The viewer page and its static files, with the headers that keep the page to itself.

Our own files come from ``static/``; noVNC comes from ``static/node_modules/@novnc/novnc``
(installed by ``npm ci``, never committed) under ``/novnc/``, keeping ``core/`` and
``vendor/pako`` side by side so noVNC's relative imports resolve.
"""

from __future__ import annotations

import re
from typing import Any

import tornado.web

from console_proxy.config import ProxyConfig
from console_proxy.handlerlog import PathOnlyLogging
from console_proxy.httperrors import JsonErrors

NOVNC_SUBDIR = ("node_modules", "@novnc", "novnc")
MAX_STATIC_PATH = 512
"""Longest static path looked up; our files' are under 100 characters."""
_NOT_A_FILE_NAME = re.compile(r"[\x00-\x1f\x7f\\]")


def security_headers(handler: tornado.web.RequestHandler, frame_ancestors: str) -> None:
    """Only the proxy's own scripts and websocket; no referrer (the fragment holds the token)."""
    handler.set_header(
        "Content-Security-Policy",
        (
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            f"connect-src 'self'; frame-ancestors {frame_ancestors}; base-uri 'none'; form-action 'none'"
        ),
    )
    handler.set_header("Referrer-Policy", "no-referrer")
    handler.set_header("X-Content-Type-Options", "nosniff")
    handler.set_header("Cache-Control", "no-store")


class ConsolePage(JsonErrors, PathOnlyLogging, tornado.web.RequestHandler):
    """``/console``: the viewer. The token stays in the URL fragment, which browsers never send."""

    def initialize(self, config: ProxyConfig) -> None:
        self.config = config

    def get(self) -> None:
        page = self.config.static_dir / "console.html"
        try:
            body = page.read_bytes()
        except OSError:
            raise tornado.web.HTTPError(404, "the viewer page is not installed") from None
        security_headers(self, self.config.frame_ancestors)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(body)


class StaticFiles(JsonErrors, PathOnlyLogging, tornado.web.StaticFileHandler):
    """Tornado's static handler (it refuses paths outside its root) plus our headers.

    Paths no file of ours has are refused (404) before they reach the file system: a NUL (the
    ``os`` functions raise on it: once a 500), control characters, backslashes, ``.`` and ``..``
    segments (also percent-encoded: the path arrives decoded), empty segments, overlong paths.
    """

    def initialize(
        self,
        path: str,
        default_filename: str | None = None,
        *args: Any,
        frame_ancestors: str = "'none'",
        **kwargs: Any,
    ) -> None:
        """Tornado's options (more in newer versions: ``allowed_symlink_directory``) passed on."""
        super().initialize(path, default_filename, *args, **kwargs)
        self.frame_ancestors = frame_ancestors

    def parse_url_path(self, url_path: str) -> str:
        if url_path and not is_static_path(url_path):
            raise tornado.web.HTTPError(404, "no such file")
        return super().parse_url_path(url_path)

    def set_extra_headers(self, path: str) -> None:
        security_headers(self, self.frame_ancestors)


def is_static_path(url_path: str) -> bool:
    """A relative path of plain segments: what every file we serve has, and nothing else."""
    return (
        len(url_path) <= MAX_STATIC_PATH
        and not _NOT_A_FILE_NAME.search(url_path)
        and all(part not in ("", ".", "..") for part in url_path.split("/"))
    )


def page_routes(config: ProxyConfig) -> list[Any]:
    static = config.static_dir
    options = {"frame_ancestors": config.frame_ancestors}
    return [
        (r"/console", ConsolePage, {"config": config}),
        (r"/static/(.*)", StaticFiles, {"path": str(static), **options}),
        (r"/novnc/(.*)", StaticFiles, {"path": str(static.joinpath(*NOVNC_SUBDIR)), **options}),
    ]
