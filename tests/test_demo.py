"""The README's demo command works: broker + proxy + VNC desktop + a console URL that opens."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from proxyproc import REPO, free_port, run_python
from rfbclient import Console


def demo_argv(proxy_port: int, broker_port: int) -> list[str]:
    """``scripts/demo.py`` on these ports, after the Python executable."""
    return [str(REPO / "scripts" / "demo.py"), "--port", str(proxy_port), "--broker-port", str(broker_port)]


def _read_until_url(process: subprocess.Popen[str]) -> tuple[str, list[str]]:
    seen: list[str] = []
    assert process.stdout is not None
    for line in process.stdout:
        seen.append(line)
        if "/console#token=" in line:
            return line.strip(), seen
    raise AssertionError("the demo printed no console URL:\n" + "".join(seen))


def test_demo_prints_a_working_console_url_and_stops_cleanly() -> None:
    proxy_port, broker_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, *demo_argv(proxy_port, broker_port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        url, seen = _read_until_url(process)
        assert url.startswith(f"http://127.0.0.1:{proxy_port}/console#token=")
        token = url.split("#token=", 1)[1]

        async def open_console() -> tuple[int, int, bytes]:
            console = await Console.open(f"ws://127.0.0.1:{proxy_port}/websockify", token)
            info = await console.handshake()
            console.close()
            return info.width, info.height, info.name

        assert asyncio.run(open_console()) == (1024, 768, b"Demo VM")
        work = next(
            Path(word) for line in seen for word in line.replace(")", " ").split() if "consolegate-demo-" in word
        )
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "demo stopped" in output
    assert not work.exists()


@pytest.mark.parametrize("busy", ["proxy", "broker"])
def test_a_busy_port_fails_in_one_line_and_prints_no_url(busy: str) -> None:
    """Someone else listens on the demo's port: the demo must not take their listener for its own
    child and print a URL that reaches it; it says why in one line and exits non-zero."""
    proxy_port, broker_port = free_port(), free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", proxy_port if busy == "proxy" else broker_port))
        holder.listen()
        done = run_python(*demo_argv(proxy_port, broker_port), timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "/console#token=" not in done.stdout
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith(f"demo: the {busy} exited at start: ")
    assert "Address already in use" in errors[0]
