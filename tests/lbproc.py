"""Real nginx and HAProxy processes for tests, run from the example configs in ``contrib/``.

Each runs in the foreground from a temp dir (``nginx -p DIR -c FILE -g 'daemon off;'``,
``haproxy -db -f FILE``), never as a system service, and is stopped after the test. The
example configs are used as written; only their addresses are filled in (:func:`fill`, which
fails if a placeholder went missing, so the examples cannot drift from what is tested).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from xvnc import stop_process

REPO = Path(__file__).resolve().parent.parent
NGINX_EXAMPLE = REPO / "contrib" / "nginx" / "consolegate.conf"
HAPROXY_EXAMPLE = REPO / "contrib" / "haproxy" / "consolegate.cfg"
START_TIMEOUT = 10.0


def fill(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert old in text, f"the example config no longer has {old!r}"
        text = text.replace(old, new)
    return text


def _wait_listening(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    """Until ``port`` accepts a connection (the server bound it), or the process died."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"exited at start ({process.returncode}):\n{log.read_text(errors='replace')}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)  # polling for the bind: nothing to await from another process
    raise AssertionError(f"not listening on {port} within {START_TIMEOUT}s:\n{log.read_text(errors='replace')}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    stop_process(process, timeout=10)


def require(binary: str) -> str:
    found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin")
    if found is None:
        pytest.skip(f"{binary} is not installed (scripts/setup.sh installs it)")
    return found


@contextmanager
def nginx(directory: Path, port: int, upstream_port: int) -> Iterator[subprocess.Popen[bytes]]:
    """The example site on 127.0.0.1:``port``, passing to a proxy on ``upstream_port``."""
    binary = require("nginx")
    site = fill(
        NGINX_EXAMPLE.read_text(),
        {
            "listen 80;": f"listen 127.0.0.1:{port};",
            "server 127.0.0.1:8080;": f"server 127.0.0.1:{upstream_port};",
        },
    )
    (directory / "consolegate.conf").write_text(site)
    log = directory / "error.log"
    # The main file a distribution ships, reduced to what the site needs; temp paths in DIR.
    (directory / "nginx.conf").write_text(f"""
pid {directory}/nginx.pid;
error_log {log} info;
events {{ worker_connections 256; }}
http {{
    access_log {directory}/access.log;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    include {directory}/consolegate.conf;
}}
""")
    process = subprocess.Popen(
        [binary, "-p", str(directory), "-c", str(directory / "nginx.conf"), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
    )
    try:
        _wait_listening(port, process, log)
        yield process
    finally:
        _stop(process)


@contextmanager
def haproxy(directory: Path, port: int, upstream_port: int, *, version: int = 2) -> Iterator[subprocess.Popen[bytes]]:
    """The example balancer on 127.0.0.1:``port`` (TCP mode), sending PROXY ``version`` 1 or 2."""
    binary = require("haproxy")
    config = HAPROXY_EXAMPLE.read_text()
    if version == 1:
        config = fill(config, {" send-proxy-v2 ": " send-proxy "})
    path = directory / "haproxy.cfg"
    path.write_text(config)
    log = directory / "haproxy.log"
    env = {**os.environ, "CONSOLEGATE_BIND": f"127.0.0.1:{port}", "CONSOLEGATE_PROXY1": f"127.0.0.1:{upstream_port}"}
    process = subprocess.Popen(
        [binary, "-db", "-f", str(path)], stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env, cwd=directory
    )
    try:
        _wait_listening(port, process, log)
        yield process
    finally:
        _stop(process)
