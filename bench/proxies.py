"""The two proxies under test, as real subprocesses on loopback ports.

- consolegate: ``python -m console_proxy.cli serve`` with a fresh proxy keyring; the bench mints
  reusable tokens with the matching broker keyring (so every open pays the full token verify).
- websockify 0.13: ``websockify 127.0.0.1:P host:port``; it forks one process per connection,
  so its CPU time is summed over its children (psutil).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.targets import REPO, free_port, stop_process
from console_proxy import keyring, token
from console_proxy.keyring import Keyring

START_TIMEOUT = 20.0


@dataclass
class Proxy:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    ring: Keyring | None = None
    _ps: psutil.Process | None = field(default=None, repr=False)

    @property
    def ps(self) -> psutil.Process:
        if self._ps is None:
            self._ps = psutil.Process(self.process.pid)
        return self._ps

    def mint(self, host: str, port: int, password: str | None, ttl: int = 3600) -> str | None:
        """A reusable token for our proxy; websockify takes none (its target is fixed)."""
        if self.ring is None:
            return None
        claims = token.new_claims(host=host, port=port, now=time.time(), ttl=ttl, password=password)
        return token.mint(claims, self.ring)

    def cpu_seconds(self) -> float:
        """User+system CPU of the proxy process and all its children, live or reaped."""
        total = 0.0
        procs = [self.ps]
        with contextlib.suppress(psutil.NoSuchProcess):
            procs += self.ps.children(recursive=True)
        for proc in procs:
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        try:  # children that already exited and were reaped (websockify: one per connection)
            times = self.ps.cpu_times()
            total += times.children_user + times.children_system
        except psutil.NoSuchProcess:
            pass
        return total

    def memory(self) -> dict[str, int]:
        """VmRSS and smaps_rollup Pss of the main process, in bytes."""
        out = {}
        pid = self.process.pid
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss"] = int(line.split()[1]) * 1024
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                out["pss"] = int(line.split()[1]) * 1024
        return out

    def stop(self) -> None:
        stop_process(self.process, 10)


def _wait_listening(process: subprocess.Popen[bytes], port: int, log_path: Path) -> bool:
    import socket

    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            time.sleep(0.02)  # poll interval until the port is bound, bounded by the deadline
    return False


def start_consolegate(workdir: Path, *extra: str) -> Proxy:
    ring = Keyring.generate(time.time())
    ring_path = workdir / f"proxy-keyring-{len(list(workdir.glob('proxy-keyring-*')))}.json"
    keyring.save(ring, ring_path, public_only=True)
    for _ in range(5):
        port = free_port()
        log_path = workdir / f"consolegate-{port}.log"
        cmd = [
            sys.executable,
            "-m",
            "console_proxy.cli",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--keyring",
            str(ring_path),
            "--log-level",
            "WARNING",
            *extra,
        ]
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                cmd,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
        proxy = Proxy("consolegate", process, port, log_path, ring)
        if _wait_listening(process, port, log_path):
            return proxy
        proxy.stop()
    raise RuntimeError(f"consolegate proxy did not start: {log_path.read_text()[-500:]}")


def websockify_command() -> list[str]:
    exe = Path(sys.executable).parent / "websockify"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("websockify")
    if found:
        return [found]
    return [sys.executable, "-m", "websockify"]


def start_websockify(workdir: Path, target_port: int, *extra: str) -> Proxy:
    for _ in range(5):
        port = free_port()
        log_path = workdir / f"websockify-{port}.log"
        cmd = [*websockify_command(), *extra, f"127.0.0.1:{port}", f"127.0.0.1:{target_port}"]
        with log_path.open("wb") as log:
            process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        proxy = Proxy("websockify", process, port, log_path)
        if _wait_listening(process, port, log_path):
            return proxy
        proxy.stop()
    raise RuntimeError(f"websockify did not start: {log_path.read_text()[-500:]}")


def version_of_websockify() -> str:
    try:
        from importlib.metadata import version

        return version("websockify")
    except Exception:
        return "unknown"
