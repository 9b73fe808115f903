"""The clipboard in the viewer, by policy: real proxy, real Xvnc (``xclip`` in its session sets
and reads the VM's clipboard), real headless Chromium with noVNC.

Copy-out: text the VM copies shows in the page's clipboard panel, and reaches the user's
clipboard through the Clipboard API, for ``out``/``both``; for ``in``/``none`` a page with
``both`` on the same VM witnesses the copy, and the page under test shows nothing (Xvnc sends
cut text to every client in the same step; the proxy dropped this page's). Paste-in: text sent
from the panel is on the VM's clipboard for ``in``/``both``; for ``out``/``none`` the panel
offers no way to send.
"""

from __future__ import annotations

import secrets

import pytest
import test_viewer_e2e as e2e
from test_viewer_e2e import console_url, poll, wait_state
from vmclipboard import needs_xclip, set_vm_clipboard, vm_clipboard

# the viewer tests' fixtures (pages screenshotted, X clients ended)
open_page, page, x_clients = e2e.open_page, e2e.page, e2e.x_clients


chromium = e2e.own_chromium  # fixture: this module's own browser


pytestmark = [
    *e2e.pytestmark,
    needs_xclip,
]

IO_TIMEOUT = 15.0


def visible(page, element_id: str) -> bool:
    """Not hidden by the page (the panel around it may be closed)."""
    return page.evaluate(f"!document.getElementById('{element_id}').hidden")


def open_console(page, proxy, mint, xvnc, clip: str | None) -> None:
    page.goto(console_url(proxy.base, mint(host="127.0.0.1", port=xvnc.port, password=xvnc.password, clip=clip)))
    wait_state(page, "connected")


def panel_text(page) -> str:
    return page.evaluate("document.getElementById('clip-from-vm').value")


@pytest.mark.parametrize("clip", ["both", "out"])
def test_copy_out_shows_in_the_page_and_reaches_the_users_clipboard(
    page, chromium, proxy, mint, xvnc_vncauth, clip
) -> None:
    chromium.call(
        "Browser.grantPermissions",
        {"origin": proxy.base, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]},
    )
    open_console(page, proxy, mint, xvnc_vncauth, clip)
    assert visible(page, "clipboard") and visible(page, "clip-out-section")
    assert visible(page, "clip-in-section") is (clip == "both")
    text = f"copied-{clip}-" + secrets.token_hex(4)
    set_vm_clipboard(xvnc_vncauth.display, text)
    poll(lambda: panel_text(page) == text, "the VM's copy to show in the clipboard panel")
    status = page.evaluate("document.getElementById('clip-out-status').textContent")
    assert status.startswith("Copied"), status
    assert page.evaluate("navigator.clipboard.readText()") == text


@pytest.mark.parametrize("clip", ["in", "none"])
def test_copy_out_is_not_shown_when_the_policy_forbids_it(
    open_page, proxy, mint, xvnc_vncauth, x_clients, clip
) -> None:
    page, witness = open_page(), open_page()
    open_console(page, proxy, mint, xvnc_vncauth, clip)
    open_console(witness, proxy, mint, xvnc_vncauth, "both")
    assert not visible(page, "clip-out-section")
    assert visible(page, "clipboard") is (clip == "in")
    text = f"secret-{clip}-" + secrets.token_hex(4)
    set_vm_clipboard(xvnc_vncauth.display, text)
    poll(lambda: panel_text(witness) == text, "the witness page to receive the VM's copy")
    assert panel_text(page) == ""
    assert text not in page.evaluate("document.body.innerText")


@pytest.mark.parametrize("clip", ["both", "in"])
def test_paste_in_from_the_panel_reaches_the_vms_clipboard(page, proxy, mint, xvnc_vncauth, clip) -> None:
    open_console(page, proxy, mint, xvnc_vncauth, clip)
    set_vm_clipboard(xvnc_vncauth.display, "before-" + secrets.token_hex(4))
    page.click("#clipboard")
    assert page.evaluate("document.getElementById('clipboard').getAttribute('aria-expanded')") == "true"
    assert page.evaluate("document.activeElement.id") == ("clip-from-vm" if clip == "both" else "clip-to-vm")
    text = f"pasted-{clip}-" + secrets.token_hex(4)
    page.evaluate(f"document.getElementById('clip-to-vm').value = '{text}'")
    page.click("#clip-send")
    poll(lambda: vm_clipboard(xvnc_vncauth.display) == text, "the VM's clipboard to hold the sent text")
    page.click("#clip-close")
    assert page.evaluate("document.getElementById('clipboard-panel').hidden") is True


@pytest.mark.parametrize("clip", ["out", "none"])
def test_paste_in_is_not_offered_when_the_policy_forbids_it(page, proxy, mint, xvnc_vncauth, clip) -> None:
    open_console(page, proxy, mint, xvnc_vncauth, clip)
    assert not visible(page, "clip-in-section")
    assert visible(page, "clipboard") is (clip == "out")


def test_a_view_only_console_offers_copy_out_only(page, proxy, mint, xvnc_vncauth) -> None:
    token = mint(host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password, view_only=True)
    page.goto(console_url(proxy.base, token))
    wait_state(page, "connected")
    assert visible(page, "clip-out-section") and not visible(page, "clip-in-section")


def test_the_clipboard_controls_have_accessible_names(page, proxy, mint, xvnc_vncauth) -> None:
    open_console(page, proxy, mint, xvnc_vncauth, "both")
    page.click("#clipboard")
    names = {}
    for element_id in ("clipboard", "clip-from-vm", "clip-copy", "clip-to-vm", "clip-send", "clip-close"):
        node = page.call("DOM.getDocument")["root"]
        found = page.call("DOM.querySelector", {"nodeId": node["nodeId"], "selector": f"#{element_id}"})
        tree = page.call("Accessibility.getPartialAXTree", {"nodeId": found["nodeId"], "fetchRelatives": False})
        names[element_id] = tree["nodes"][0]["name"]["value"]
    assert names == {
        "clipboard": "Clipboard",
        "clip-from-vm": "Last text copied in the virtual machine:",
        "clip-copy": "Copy to my clipboard",
        "clip-to-vm": "Text to put on the virtual machine's clipboard:",
        "clip-send": "Send to the virtual machine",
        "clip-close": "Close",
    }


def test_text_above_the_proxys_limit_is_not_sent_and_the_page_says_why(page, proxy_factory, mint, xvnc_vncauth) -> None:
    small = proxy_factory("--max-cut-text", "2048")
    open_console(page, small, mint, xvnc_vncauth, "in")
    before = "before-" + secrets.token_hex(4)
    set_vm_clipboard(xvnc_vncauth.display, before)
    page.click("#clipboard")
    page.evaluate("document.getElementById('clip-to-vm').value = 'é'.repeat(1025)")  # 2050 bytes of UTF-8
    page.click("#clip-send")
    status = page.evaluate("document.getElementById('clip-in-status').textContent")
    assert status == "The text is too long for the virtual machine's clipboard (at most 2 KiB)."
    page.evaluate("document.getElementById('clip-to-vm').value = 'fits'")
    page.click("#clip-send")
    poll(lambda: vm_clipboard(xvnc_vncauth.display) == "fits", "the VM's clipboard to hold the text that fits")
