"""The console page by keyboard and screen reader (issue 19 point 6), read from Chromium's own
accessibility tree (CDP ``Accessibility.getFullAXTree``): what a screen reader is given, not what
the DOM attributes say. Real proxy, real Xvnc, real headless Chromium; the keys the VM receives
are read in the VM with ``xev``.
"""

from __future__ import annotations

import time
from typing import Any

import test_viewer_e2e as e2e
from browser import Page
from test_viewer_e2e import (
    ARTIFACTS,
    console_url,
    js_messages,
    key_events,
    key_logger,
    poll,
    press,
    wait_state,
)

pytestmark = e2e.pytestmark

open_page, page, x_clients = e2e.open_page, e2e.page, e2e.x_clients  # fixtures, shared

TOOLBAR = [
    "Ctrl-Alt-Del",
    "Keys",
    "Send text…",
    "Clipboard",
    "Scale to fit",
    "Resize VM to window",
    "Full screen",
    "Disconnect",
]
TOOLBAR_IDS = ["ctrl-alt-del", "keys", "send-text", "clipboard", "scale", "resize", "fullscreen", "disconnect"]
VIEW_ONLY_TOOLBAR = ["Clipboard", "Scale to fit", "Full screen", "Disconnect"]  # copy-out only
CONTROL_ROLES = {"button", "menuitem", "textbox", "application", "checkbox", "link", "combobox"}


chromium = e2e.own_chromium  # fixture: this module's own browser


# --- reading the tree -----------------------------------------------------------------------------


class AxTree:
    """The page's accessibility tree as Chromium computed it, unignored nodes only."""

    def __init__(self, page: Page) -> None:
        page.call("Accessibility.enable")
        nodes = page.call("Accessibility.getFullAXTree")["nodes"]
        self.by_id = {n["nodeId"]: n for n in nodes}
        self.nodes = [n for n in nodes if not n.get("ignored")]

    @staticmethod
    def role(node: dict[str, Any]) -> str:
        return str(node.get("role", {}).get("value", ""))

    @staticmethod
    def name(node: dict[str, Any]) -> str:
        return str(node.get("name", {}).get("value", ""))

    @staticmethod
    def prop(node: dict[str, Any], name: str) -> Any:
        return next((p["value"].get("value") for p in node.get("properties", ()) if p["name"] == name), None)

    def with_role(self, role: str) -> list[dict[str, Any]]:
        return [n for n in self.nodes if self.role(n) == role]

    def one(self, role: str, name: str | None = None) -> dict[str, Any]:
        found = [n for n in self.with_role(role) if name is None or self.name(n) == name]
        assert len(found) == 1, (role, name, [self.name(n) for n in self.with_role(role)])
        return found[0]

    def text(self, node: dict[str, Any]) -> str:
        """What a screen reader reads inside a node: its StaticText descendants."""
        if self.role(node) == "StaticText":
            return self.name(node)
        return "".join(self.text(self.by_id[c]) for c in node.get("childIds", ()) if c in self.by_id)

    def controls(self) -> list[tuple[str, str]]:
        """(role, name) of everything a user can operate, in document order."""
        return [(self.role(n), self.name(n)) for n in self.nodes if self.role(n) in CONTROL_ROLES]

    def focusable_without_name(self) -> list[str]:
        return [
            self.role(n)
            for n in self.nodes
            if self.prop(n, "focusable") and not self.name(n) and self.role(n) != "RootWebArea"
        ]


def status_text(page: Page) -> str:
    tree = AxTree(page)
    return tree.text(tree.one("status"))


def connect(page: Page, proxy: Any, mint: Any, server: Any, **claims: Any) -> None:
    common = {"host": "127.0.0.1", "port": server.port, "password": server.password, "desktop_name": "A11y VM"}
    page.goto(console_url(proxy.base, mint(**{**common, **claims})))
    wait_state(page, "connected")


def to_toolbar(page: Page) -> None:
    """Ctrl+Alt+Shift, pressed one after another and held together, as fingers do (CDP modifiers:
    Alt 1, Ctrl 2, Shift 8)."""
    down = ((2, "Control", "ControlLeft", 17), (3, "Alt", "AltLeft", 18), (11, "Shift", "ShiftLeft", 16))
    up = ((3, "Shift", "ShiftLeft", 16), (2, "Alt", "AltLeft", 18), (0, "Control", "ControlLeft", 17))
    for type_, keys in (("rawKeyDown", down), ("keyUp", up)):
        for modifiers, key, code, vk in keys:
            page.call(
                "Input.dispatchKeyEvent",
                {"type": type_, "modifiers": modifiers, "key": key, "code": code, "windowsVirtualKeyCode": vk},
            )


def focused(page: Page) -> str:
    return str(page.evaluate("document.activeElement.id || document.activeElement.tagName"))


# --- tests ------------------------------------------------------------------------------------------


def test_every_control_is_named_and_the_status_is_a_live_region(page, proxy, mint, xvnc_vncauth) -> None:
    connect(page, proxy, mint, xvnc_vncauth)
    tree = AxTree(page)

    assert tree.controls() == [("application", "Virtual machine screen"), *(("button", n) for n in TOOLBAR)]
    assert tree.focusable_without_name() == []
    status = tree.one("status")
    assert (tree.prop(status, "live"), tree.prop(status, "atomic")) == ("polite", True)
    assert tree.text(status) == "Connected to A11y VM"
    assert tree.name(tree.one("navigation")) == "Console controls"
    keys = tree.one("button", "Keys")
    assert (tree.prop(keys, "hasPopup"), tree.prop(keys, "expanded")) == ("menu", False)
    assert tree.prop(tree.one("button", "Scale to fit"), "pressed") == "true"
    assert tree.prop(tree.one("button", "Resize VM to window"), "pressed") == "false"
    screen = tree.one("application")
    assert tree.prop(screen, "focused") is True  # the keyboard goes to the VM once connected
    assert "Ctrl+Alt+Shift" in screen["description"]["value"]
    assert tree.prop(screen, "roledescription") == "remote screen"

    # the scale toggle keeps its name; only its state changes
    page.click("#scale")
    page.wait_for("document.getElementById('scale').getAttribute('aria-pressed') === 'false'")
    assert AxTree(page).prop(AxTree(page).one("button", "Scale to fit"), "pressed") == "false"


def test_the_way_out_of_the_console_and_the_tab_order(page, proxy, mint, xvnc_vncauth, x_clients, tmp_path) -> None:
    """noVNC sends Tab to the VM, so the canvas would trap the keyboard; Ctrl+Alt+Shift leaves it
    for the toolbar, releases in the VM what it had pressed there, and Shift never reaches it."""
    log = key_logger(x_clients, xvnc_vncauth, tmp_path)
    connect(page, proxy, mint, xvnc_vncauth)
    assert focused(page) == "CANVAS"

    to_toolbar(page)
    assert focused(page) == TOOLBAR_IDS[0]
    order = []
    for _ in TOOLBAR_IDS:
        press(page, "Tab", "Tab", 9)
        order.append(focused(page))
    assert order == [*TOOLBAR_IDS[1:], "CANVAS"]  # through the toolbar, then the screen

    press(page, "x", "KeyX", 88)  # back on the screen: keys reach the VM again
    poll(lambda: ("KeyPress", "x") in [(kind, name) for kind, name, _ in key_events(log)], "x to reach the VM")
    events = [(kind, name) for kind, name, _ in key_events(log)]
    assert ("KeyPress", "Control_L") in events and ("KeyPress", "Alt_L") in events
    assert events.index(("KeyRelease", "Control_L")) < events.index(("KeyPress", "x"))
    assert events.index(("KeyRelease", "Alt_L")) < events.index(("KeyPress", "x"))
    assert not [name for _, name in events if name.startswith("Shift")], events


def test_the_keys_menu_by_keyboard_in_the_tree(page, proxy, mint, xvnc_vncauth) -> None:
    connect(page, proxy, mint, xvnc_vncauth)
    to_toolbar(page)
    press(page, "Tab", "Tab", 9)
    assert focused(page) == "keys"

    press(page, "ArrowDown", "ArrowDown", 40)
    tree = AxTree(page)
    menu = tree.one("menu")
    assert tree.name(menu) == "Keys"
    items = [tree.name(n) for n in tree.with_role("menuitem")]
    assert items[0] == "Ctrl-Alt-F1" and "Ctrl-Alt-Backspace" in items and items[-3:] == ["Windows key", "Esc", "Tab"]
    assert all(items) and len(items) == 12 + 1 + 6 + 3
    assert tree.prop(tree.one("button", "Keys"), "expanded") is True
    assert tree.prop(tree.one("menuitem", "Ctrl-Alt-F1"), "focused") is True

    press(page, "Escape", "Escape", 27)
    tree = AxTree(page)
    assert tree.with_role("menu") == [] and tree.prop(tree.one("button", "Keys"), "expanded") is False
    assert focused(page) == "keys"


def test_the_send_text_dialog_is_named_and_its_box_labelled(page, proxy, mint, xvnc_vncauth) -> None:
    connect(page, proxy, mint, xvnc_vncauth)
    page.click("#send-text")
    page.wait_for("document.getElementById('text-dialog').open")
    tree = AxTree(page)
    assert tree.name(tree.one("dialog")) == "Send text"
    assert tree.one("textbox")["name"]["value"].startswith("Text to type into the virtual machine")
    assert [n for r, n in tree.controls() if r == "button"][-2:] == ["Cancel", "Type it"]
    press(page, "Escape", "Escape", 27)
    page.wait_for("!document.getElementById('text-dialog').open")


def test_a_view_only_console_offers_only_what_it_can_do(page, proxy, mint, xvnc_vncauth) -> None:
    connect(page, proxy, mint, xvnc_vncauth, view_only=True)
    tree = AxTree(page)
    assert tree.controls() == [
        ("application", "Virtual machine screen (view only)"),
        *(("button", n) for n in VIEW_ONLY_TOOLBAR),
    ]
    assert tree.text(tree.one("status")) == "Connected to A11y VM (view only)"
    assert "View only" in tree.one("application")["description"]["value"]


def test_the_live_region_says_how_the_console_ended(open_page, proxy, mint, xvnc_vncauth) -> None:
    ended = open_page()
    connect(ended, proxy, mint, xvnc_vncauth)
    ended.click("#disconnect")
    wait_state(ended, "ended")
    table = js_messages(ended)
    assert status_text(ended) == table["USER_DISCONNECTED"]
    assert AxTree(ended).focusable_without_name() == []

    expired = open_page()
    expired.goto(console_url(proxy.base, mint(host="127.0.0.1", port=xvnc_vncauth.port, now=time.time() - 3600)))
    wait_state(expired, "ended")
    assert status_text(expired) == table["REFUSALS"]["token_expired"]
    tree = AxTree(expired)
    # the clipboard button is hidden until the proxy says the policy (the token never opened)
    assert all(tree.prop(tree.one("button", name), "disabled") for name in TOOLBAR if name != "Clipboard")
    assert tree.controls().count(("button", "Clipboard")) == 0
    expired.screenshot(ARTIFACTS / "a11y-expired.png")
