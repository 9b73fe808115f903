"""A small driver for the system's headless Chromium over the DevTools protocol (CDP).

Nothing is downloaded: ``/usr/bin/chromium`` is started with NOTES' headless flags, a fresh
profile and ``--remote-debugging-port=0``; the DevTools websocket address is read from its
"DevTools listening on ws://…" line, and CDP is spoken over one Tornado websocket with
flattened target sessions (one per page).

Tests are synchronous; the websocket lives on an asyncio loop in a background thread and every
call waits on it with a timeout. Waiting is event driven: a CDP event (``Page.loadEventFired``),
or a page-side MutationObserver for DOM conditions (:meth:`Page.wait_for`). Nothing sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from tornado.websocket import WebSocketClientConnection, websocket_connect

CHROMIUM = "/usr/bin/chromium"
HEADLESS_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
START_TIMEOUT = 30.0
CALL_TIMEOUT = 30.0


class CdpError(RuntimeError):
    """A CDP command answered with an error, or a page-side expression threw."""


def chromium_available() -> bool:
    return Path(CHROMIUM).exists()


class Chromium:
    """One headless Chromium process and one DevTools connection to it."""

    def __init__(self, *, log_path: Path | None = None) -> None:
        self.profile = Path(tempfile.mkdtemp(prefix="consolegate-chromium-"))
        self.log_path = log_path or self.profile / "chromium.log"
        self.process = subprocess.Popen(
            [CHROMIUM, *HEADLESS_FLAGS, "--remote-debugging-port=0", f"--user-data-dir={self.profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._devtools_url: Future[str] = Future()
        threading.Thread(target=self._pump_stderr, daemon=True).start()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._listeners: dict[str, list[Callable[[str, dict[str, Any]], None]]] = {}
        self._conn: WebSocketClientConnection | None = None
        try:
            url = self._devtools_url.result(START_TIMEOUT)
            self._run(self._connect(url))
        except BaseException:
            self.close()
            raise

    def _pump_stderr(self) -> None:
        """Find the DevTools address, and keep draining stderr to a log so Chromium never blocks."""
        assert self.process.stderr is not None
        with self.log_path.open("a", encoding="utf-8") as log:
            for line in self.process.stderr:
                log.write(line)
                log.flush()
                if "DevTools listening on " in line and not self._devtools_url.done():
                    self._devtools_url.set_result(line.split("DevTools listening on ", 1)[1].strip())
        if not self._devtools_url.done():
            self._devtools_url.set_exception(RuntimeError(f"chromium exited: {self.log_path.read_text()[-2000:]}"))

    def _run(self, coro: Any, timeout: float = CALL_TIMEOUT) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _connect(self, url: str) -> None:
        self._conn = await websocket_connect(url, max_message_size=512 * 1024 * 1024)
        asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self._conn is not None
        while (raw := await self._conn.read_message()) is not None:
            message = json.loads(raw)
            if "id" in message:
                future = self._pending.pop(message["id"], None)
                if future is not None and not future.done():
                    future.set_result(message)
                continue
            session = message.get("sessionId", "")
            for listener in list(self._listeners.get(session, ())):
                listener(message["method"], message.get("params", {}))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(CdpError("the DevTools connection closed"))

    async def _call(self, method: str, params: dict[str, Any] | None, session: str | None) -> dict[str, Any]:
        assert self._conn is not None
        ident = next(self._ids)
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        future = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        await self._conn.write_message(json.dumps(message))
        answer = await future
        if "error" in answer:
            raise CdpError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session: str | None = None,
        timeout: float = CALL_TIMEOUT,
    ) -> dict[str, Any]:
        return self._run(self._call(method, params, session), timeout)

    def listen(self, session: str, listener: Callable[[str, dict[str, Any]], None]) -> None:
        """Call ``listener(method, params)`` for each event of a session (on the loop's thread)."""
        self.loop.call_soon_threadsafe(lambda: self._listeners.setdefault(session, []).append(listener))

    def new_page(self, width: int = 1024, height: int = 768) -> Page:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, target, session)
        for method in ("Page.enable", "Runtime.enable", "Log.enable"):
            page.call(method)
        page.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        # Headless windows are never "focused"; without this, key events reach no element.
        page.call("Emulation.setFocusEmulationEnabled", {"enabled": True})
        return page

    def close(self) -> None:
        if self._conn is not None:
            self.loop.call_soon_threadsafe(self._conn.close)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.loop.call_soon_threadsafe(self.loop.stop)
        shutil.rmtree(self.profile, ignore_errors=True)


# Key name -> (key, code, windowsVirtualKeyCode, text) for Input.dispatchKeyEvent.
SPECIAL_KEYS = {"\n": ("Enter", "Enter", 13, "\r")}


class Page:
    """One tab: navigation, evaluation, DOM waits, key presses, screenshots, console log."""

    def __init__(self, browser: Chromium, target: str, session: str) -> None:
        self.browser, self.target, self.session = browser, target, session
        self.log: list[dict[str, Any]] = []
        """Log.entryAdded entries (CSP violations, failed loads), console calls and exceptions."""
        self._waiters: list[tuple[str, Future[dict[str, Any]]]] = []
        browser.listen(session, self._on_event)

    def _on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Log.entryAdded":
            self.log.append(params["entry"])
        elif method == "Runtime.consoleAPICalled":
            text = " ".join(str(arg.get("value", arg.get("description", ""))) for arg in params["args"])
            self.log.append({"source": "console-api", "level": params["type"], "text": text})
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text", "")
            self.log.append({"source": "exception", "level": "error", "text": text})
        for waited, future in list(self._waiters):
            if waited == method and not future.done():
                future.set_result(params)

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = CALL_TIMEOUT) -> dict[str, Any]:
        return self.browser.call(method, params, session=self.session, timeout=timeout)

    def goto(self, url: str, timeout: float = CALL_TIMEOUT) -> None:
        """Navigate and return once the load event fired (module scripts have run by then)."""
        loaded: Future[dict[str, Any]] = Future()
        self._waiters.append(("Page.loadEventFired", loaded))
        try:
            answer = self.call("Page.navigate", {"url": url})
            if answer.get("errorText"):
                raise CdpError(f"navigation to {url} failed: {answer['errorText']}")
            loaded.result(timeout)
        finally:
            self._waiters.remove(("Page.loadEventFired", loaded))

    def evaluate(self, expression: str, *, timeout: float = CALL_TIMEOUT, context: int | None = None) -> Any:
        """The JSON value of a page expression (promises are awaited)."""
        params: dict[str, Any] = {"expression": expression, "awaitPromise": True, "returnByValue": True}
        if context is not None:
            params["contextId"] = context
        answer = self.call("Runtime.evaluate", params, timeout=timeout + 5)
        if "exceptionDetails" in answer:
            details = answer["exceptionDetails"]
            raise CdpError(details.get("exception", {}).get("description") or details.get("text"))
        return answer["result"].get("value")

    def wait_for(self, predicate: str, timeout: float = 15.0, *, context: int | None = None) -> Any:
        """Wait until the JS expression ``predicate`` is truthy, re-checked on every DOM change."""
        script = f"""new Promise((resolve, reject) => {{
            const check = () => {{
                const value = ({predicate});
                if (value) {{ observer.disconnect(); clearTimeout(timer); resolve(value); }}
            }};
            const observer = new MutationObserver(check);
            observer.observe(document, {{subtree: true, childList: true, attributes: true, characterData: true}});
            const timer = setTimeout(() => {{
                observer.disconnect();
                reject(new Error("timed out after {timeout}s waiting for: " + {json.dumps(predicate)}));
            }}, {int(timeout * 1000)});
            check();
        }})"""
        return self.evaluate(script, timeout=timeout, context=context)

    def type(self, text: str) -> None:
        """Key presses to the focused element, as a keyboard would send them."""
        for char in text:
            if char in SPECIAL_KEYS:
                key, code, vk, typed = SPECIAL_KEYS[char]
            elif char.isascii() and char.isalnum():
                key, code, typed = char, ("Key" + char.upper()) if char.isalpha() else f"Digit{char}", char
                vk = ord(char.upper())
            else:
                raise ValueError(f"no key mapping for {char!r}")
            common = {"key": key, "code": code, "windowsVirtualKeyCode": vk}
            self.call("Input.dispatchKeyEvent", {"type": "keyDown", "text": typed, **common})
            self.call("Input.dispatchKeyEvent", {"type": "keyUp", **common})

    def click(self, selector: str) -> None:
        """A real (trusted) mouse click in the middle of an element, as a user gesture."""
        box = self.evaluate(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
            ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.call(
                "Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1], "button": "left", "clickCount": 1}
            )

    def screenshot(self, path: Path) -> Path:
        # A background tab produces no frames, and capturing it would wait for one forever.
        self.call("Page.bringToFront")
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def frame_context(self, url_prefix: str) -> int:
        """An isolated-world execution context in the (same-process) child frame at ``url_prefix``."""

        def frames(node: dict[str, Any]) -> list[dict[str, Any]]:
            return [node["frame"], *(f for child in node.get("childFrames", ()) for f in frames(child))]

        tree = self.call("Page.getFrameTree")["frameTree"]
        frame = next((f for f in frames(tree) if f["url"].startswith(url_prefix)), None)
        if frame is None:
            raise CdpError(f"no frame at {url_prefix}: {[f['url'] for f in frames(tree)]}")
        return self.call("Page.createIsolatedWorld", {"frameId": frame["id"]})["executionContextId"]

    def close(self) -> None:
        self.browser.call("Target.closeTarget", {"targetId": self.target})
