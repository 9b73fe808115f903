"""The VM's clipboard, set and read with ``xclip`` in the Xvnc session: shared by the clipboard
tests on the wire (test_proxy_clipboard) and in the viewer (test_viewer_clipboard)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

#: How long one xclip may take before the test fails instead of hanging (it answers at once).
XCLIP_TIMEOUT = 20.0
#: Skip marker for a module that needs xclip.
needs_xclip = pytest.mark.skipif(shutil.which("xclip") is None, reason="xclip is not installed (scripts/setup.sh)")


def set_vm_clipboard(display: int, text: str, *, timeout: float = XCLIP_TIMEOUT) -> None:
    """Own the VM's CLIPBOARD with ``text`` (xclip stays in the background to serve it)."""
    subprocess.run(
        ["xclip", "-selection", "clipboard", "-i"],
        input=text.encode(),
        env={**os.environ, "DISPLAY": f":{display}"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
        timeout=timeout,
    )


#: How long one read of the VM's clipboard may take. When a viewer owns it, Xvnc answers a read
#: by asking that viewer for the text (the extended clipboard's request, then provide); once in
#: a CI run of 2,534 tests that request went unanswered and the read hung for good. A new read
#: asks again, so the callers' polls read again after this, within their own deadline.
READ_TIMEOUT = 4.0


def vm_clipboard(display: int, *, timeout: float = READ_TIMEOUT) -> str:
    """What the VM's CLIPBOARD holds now ('' when nothing owns it, or no answer came in time)."""
    try:
        result = subprocess.run(
            ["xclip", "-selection", "clipboard", "-o"],
            env={**os.environ, "DISPLAY": f":{display}"},
            capture_output=True,
            check=False,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return ""
    return result.stdout.decode(errors="replace")
