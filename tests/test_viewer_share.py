"""A shared console in two Chromium pages (issue 19 point 5): a real broker and linked proxy, one
real Xvnc with an xterm. The owner types, viewers (``POST /sessions/{id}/viewers``) watch: a
viewer's canvas follows the owner's typing, its own key presses never reach the VM, no page's
arrival disconnects another (a viewer before the owner, one after), and revoking the owner's
session closes all three pages with the revoked message.

Fixtures and helpers are test_viewer_e2e's (one way to drive Chromium and Xvnc in the suite).
"""

from __future__ import annotations

import test_viewer_e2e as e2e
from browser import Page
from test_viewer_e2e import (
    ARTIFACTS,
    canvas_pixels,
    js_messages,
    line_reader,
    match_ratio,
    poll,
    wait_state,
    xvnc_framebuffer,
)
from xvnc import XvncServer

pytestmark = e2e.pytestmark


fleet, open_page, x_clients = e2e.fleet, e2e.open_page, e2e.x_clients  # fixtures, shared


chromium = e2e.own_chromium  # fixture: this module's own browser


def shows_the_vm(page: Page, server: XvncServer) -> bytes | None:
    """The page's canvas when it shows what Xvnc holds now (lossy encodings: 99% of the samples)."""
    width, height, canvas = canvas_pixels(page)
    _, _, screen = xvnc_framebuffer(server)
    return canvas if match_ratio(canvas, screen, width, height) >= 0.99 else None


def test_a_shared_viewer_watches_the_owner_type_and_is_revoked_with_the_session(
    open_page, fleet, xvnc_vncauth, x_clients, tmp_path
) -> None:
    broker, _ = fleet
    typed = line_reader(x_clients, xvnc_vncauth, tmp_path)
    target = broker.admin.add_target(
        name="shared-vm", host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password
    )
    console = broker.issuer.mint(target["id"], desktop_name="Shared VM", user="alice")
    early = broker.issuer.share(console["session_id"], user="carol", desktop_name="Shared VM")
    first = open_page()  # a viewer who arrives before the owner
    first.goto(early["url"])
    assert wait_state(first, "connected") == "Connected to Shared VM (view only)"
    owner = open_page()
    owner.goto(console["url"])
    assert wait_state(owner, "connected") == "Connected to Shared VM"

    shared = broker.issuer.share(console["session_id"], user="bob", desktop_name="Shared VM")
    viewer = open_page()
    viewer.goto(shared["url"])
    assert wait_state(viewer, "connected") == "Connected to Shared VM (view only)"
    # neither arrival disconnected anyone (a ClientInit with shared=0 would have)
    assert [page.evaluate("document.body.dataset.state") for page in (first, owner)] == ["connected"] * 2
    before = poll(lambda: shows_the_vm(viewer, xvnc_vncauth), "the viewer's canvas to show the VM")

    viewer.type("evil\n")  # the xterm reads one line: had this got through, the file would hold it
    owner.wait_for("document.activeElement && document.activeElement.tagName === 'CANVAS'")
    owner.type("hello\n")

    poll(typed.exists, "the xterm's shell to write the typed line")
    assert typed.read_text() == "hello"
    after = poll(
        lambda: (canvas := shows_the_vm(viewer, xvnc_vncauth)) is not None and canvas != before and canvas,
        "the viewer's canvas to show what the owner typed",
    )
    assert after != before
    viewer.screenshot(ARTIFACTS / "shared-viewer-after-typing.png")
    assert [page.evaluate("document.body.dataset.state") for page in (first, owner, viewer)] == ["connected"] * 3

    broker.admin.revoke(console["session_id"])  # the owner's session: the share goes with it

    revoked = js_messages(owner)["CLOSES"]["4410"]
    assert wait_state(owner, "ended") == revoked
    assert wait_state(viewer, "ended") == revoked
    assert wait_state(first, "ended") == revoked
    states = {s["session_id"]: s["state"] for s in broker.admin.sessions()}
    assert states[console["session_id"]] == states[shared["session_id"]] == states[early["session_id"]] == "revoked"
