"""A real ``console-proxy serve`` process for tests: started on a free loopback port, logs kept.

Readiness is an event, not a sleep: the proxy logs "listening" once its socket is bound, and a
reader thread tees every line it writes (stdout and stderr, merged) to a file (for the
no-secrets-in-logs scan) and wakes the test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_python(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python ARGV`` from the checkout (``-m console_proxy.cli …``, a script), run to its end:
    exit code, stdout and stderr as text; the checkout on PYTHONPATH, so the tree under test runs."""
    return subprocess.run(
        [sys.executable, *argv],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=timeout,
    )


def serve_linked(broker_url: str, credential: Path, *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``console-proxy serve`` linked to a broker by URL and credential, run to its end: for the
    tests of what makes it refuse to start (exit code and the one stderr line)."""
    listen = f"127.0.0.1:{free_port()}"
    return run_python(
        "-m",
        "console_proxy.cli",
        "serve",
        "--listen",
        listen,
        "--broker",
        broker_url,
        "--proxy-credential",
        str(credential),
        timeout=timeout,
    )


@dataclass
class ProxyProcess:
    process: subprocess.Popen[str]
    port: int
    log_path: Path
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)
    exited: threading.Event = field(default_factory=threading.Event)
    ready_line: str = "console-proxy listening"
    _changed: threading.Condition = field(default_factory=threading.Condition)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/websockify"

    def log_text(self) -> str:
        with self._changed:
            return "".join(self.lines)

    def wait_for_log(self, needle: str, *more: str, timeout: float = 10.0) -> str:
        """The first log line containing ``needle`` (and every one of ``more``), waiting for it."""

        def found() -> str | None:
            return next((line for line in self.lines if needle in line and all(m in line for m in more)), None)

        with self._changed:
            if not self._changed.wait_for(lambda: found() is not None or self.exited.is_set(), timeout):
                raise AssertionError(f"no log line with {needle!r} within {timeout}s")
            line = found()
        if line is None:
            raise AssertionError(f"proxy exited before logging {needle!r}:\n{self.log_text()}")
        return line

    def count_log(self, needle: str) -> int:
        with self._changed:
            return sum(needle in line for line in self.lines)

    def wait_for_count(self, needle: str, count: int, timeout: float = 10.0) -> str:
        """The ``count``-th log line containing ``needle``, waiting for it (for a line that a
        signal makes the process write again)."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.count_log(needle) >= count or self.exited.is_set(), timeout):
                raise AssertionError(f"fewer than {count} log lines with {needle!r} within {timeout}s")
            found = [line for line in self.lines if needle in line]
        if len(found) < count:
            raise AssertionError(f"process exited before logging {needle!r}:\n{self.log_text()}")
        return found[count - 1]

    def _pump(self) -> None:
        assert self.process.stdout is not None  # stdout and stderr, merged
        with self.log_path.open("a", encoding="utf-8") as sink:
            for line in self.process.stdout:
                sink.write(line)
                sink.flush()
                with self._changed:
                    self.lines.append(line)
                    self._changed.notify_all()
                if self.ready_line in line:
                    self.ready.set()
        self.exited.set()
        self.ready.set()
        with self._changed:
            self._changed.notify_all()

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_proxy(
    tmp_path: Path, keyring_path: Path | None, *extra: str, log_level: str = "DEBUG", port: int | None = None
) -> ProxyProcess:
    """Start ``console-proxy serve`` from this checkout; returns once it listens.

    ``keyring_path`` None starts it without ``--keyring`` (pass ``--broker …`` in ``extra``);
    ``port`` fixes the port (when the caller must know it first, e.g. for ``--public-url``).
    """
    for _ in range(5 if port is None else 1):
        port_now = port or free_port()
        log_path = tmp_path / f"proxy-{port_now}.log"
        keyring_args = ["--keyring", str(keyring_path)] if keyring_path is not None else []
        command = [
            sys.executable,
            "-m",
            "console_proxy.cli",
            "serve",
            "--listen",
            f"127.0.0.1:{port_now}",
            *keyring_args,
            "--log-level",
            log_level,
            *extra,
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env
        )
        proxy = ProxyProcess(process, port_now, log_path)
        threading.Thread(target=proxy._pump, daemon=True).start()
        if not proxy.ready.wait(START_TIMEOUT):
            proxy.stop()
            raise AssertionError(f"proxy did not start:\n{proxy.log_text()}")
        if not proxy.exited.is_set():
            return proxy
        if "cannot listen" not in proxy.log_text():
            raise AssertionError(f"proxy exited at start:\n{proxy.log_text()}")
    raise AssertionError("no free port for the proxy after 5 attempts")
