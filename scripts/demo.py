"""Start a working consolegate demo on this machine and print a console URL.

What runs: a TigerVNC Xvnc desktop with an xterm on it (the "VM"), a broker with its state
directory, one console-proxy registered with the broker, the desktop registered as a target, and
one console minted through the broker's API. Everything lives in a fresh temporary directory;
Ctrl-C stops every process this script started, and nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))

from broker.client import BrokerClient, BrokerError  # noqa: E402 (after the sys.path line above)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_display() -> int:
    for display in range(20, 100):
        if not Path(f"/tmp/.X11-unix/X{display}").exists() and not Path(f"/tmp/.X{display}-lock").exists():
            return display
    raise SystemExit("demo: no free X display number")


def wait_until(what: str, check: Callable[[], object], deadline: float) -> None:
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise SystemExit(f"demo: {what} did not come up; see the logs")


class ChildFailed(Exception):
    """A process the demo started died or never came up: the one line to show."""


def last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class Demo:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.children: list[subprocess.Popen[bytes]] = []

    def start(self, command: list[str], log: str, env: dict[str, str] | None = None) -> None:
        with (self.work / log).open("wb") as handle:
            self.children.append(
                subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            )

    def wait_ready(self, what: str, log: str, ready_line: str, timeout: float = 30) -> None:
        """Wait for the last child started to log ``ready_line`` (it has bound its port: a port
        already held by someone else must not pass for ours), failing at once if it exits."""
        child, path = self.children[-1], self.work / log
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if child.poll() is not None:
                raise ChildFailed(f"{what} exited at start: {last_line(path)}")
            if ready_line in path.read_text(errors="replace"):
                return
            time.sleep(0.1)
        raise ChildFailed(f"{what} did not come up within {timeout:.0f} s: {last_line(path)}")

    def check_alive(self) -> None:
        """Every child still running: checked right before a URL is printed."""
        for child in self.children:
            if child.poll() is not None:
                raise ChildFailed(
                    f"{Path(str(child.args[0])).name} exited (status {child.returncode}); see the logs in {self.work}"
                )

    def run(self, *command: str) -> str:
        return subprocess.run(command, check=True, capture_output=True, text=True).stdout

    def stop(self) -> None:
        for child in reversed(self.children):
            if child.poll() is None:
                child.terminate()
        for child in self.children:
            try:
                child.wait(35)
            except subprocess.TimeoutExpired:
                child.kill()


def start_desktop(demo: Demo) -> tuple[int, str]:
    display, port = free_display(), free_port()
    password = "demo" + os.urandom(2).hex()
    (demo.work / "vnc.pass").write_text(password + "\n")
    os.chmod(demo.work / "vnc.pass", 0o600)
    with (demo.work / "vnc.pass").open("rb") as plain, (demo.work / "vnc.obf").open("wb") as obf:
        subprocess.run(["vncpasswd", "-f"], stdin=plain, stdout=obf, check=True)
    demo.start(
        [
            "Xvnc",
            f":{display}",
            "-rfbport",
            str(port),
            "-interface",
            "127.0.0.1",
            "-localhost",
            "-SecurityTypes",
            "VncAuth",
            "-PasswordFile",
            str(demo.work / "vnc.obf"),
            "-geometry",
            "1024x768",
            "-desktop",
            "consolegate demo VM",
        ],
        "xvnc.log",
    )
    wait_until("the VNC desktop", lambda: demo.check_alive() or listening(port), time.monotonic() + 20)
    demo.start(
        [
            "xterm",
            "-geometry",
            "100x30+40+40",
            "-e",
            "sh",
            "-c",
            "echo 'consolegate demo: this xterm runs inside the VM console'; exec sh",
        ],
        "xterm.log",
        env={**os.environ, "DISPLAY": f":{display}"},
    )
    return port, str(demo.work / "vnc.pass")


def wait_for_stop() -> None:
    """Block until Ctrl-C or SIGTERM. (Children run in their own sessions, so a terminal's
    Ctrl-C reaches only this script, which then stops them in order.)"""
    stop: list[int] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda number, _frame: stop.append(number))
    while not stop:
        signal.pause()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address the proxy listens on")
    parser.add_argument("--port", type=int, default=6080, help="proxy port")
    parser.add_argument("--broker-port", type=int, default=8080, help="broker API port")
    parser.add_argument("--public-url", help="URL browsers use for the proxy (default http://127.0.0.1:PORT)")
    args = parser.parse_args()
    demo = Demo(Path(tempfile.mkdtemp(prefix="consolegate-demo-")))
    state, broker_cli = demo.work / "state", str(BIN / "console-broker")
    broker_url = f"http://127.0.0.1:{args.broker_port}"
    public = args.public_url or f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '') else args.host}:{args.port}"
    # The proxy pins the Host to the public URL's (DNS rebinding); the default one is 127.0.0.1,
    # and a browser pointed at localhost instead should work too.
    also_localhost = [] if args.public_url else ["--allowed-origin", f"http://localhost:{args.port}"]
    try:
        vnc_port, password_file = start_desktop(demo)
        demo.run(broker_cli, "init", "--state-dir", str(state))
        api_key = demo.run(
            broker_cli, "apikey", "create", "demo-admin", "--role", "admin", "--state-dir", str(state)
        ).split()[-1]
        (demo.work / "api.key").write_text(api_key + "\n")
        os.chmod(demo.work / "api.key", 0o600)
        demo.run(
            broker_cli,
            "proxy",
            "add",
            "demo-proxy",
            "--public-url",
            public,
            "--out",
            str(demo.work / "proxy-credential.json"),
            "--state-dir",
            str(state),
        )
        demo.run(
            broker_cli,
            "targets",
            "add",
            "--id",
            "demo-vm",
            "--name",
            "Demo VM",
            "--host",
            "127.0.0.1",
            "--port",
            str(vnc_port),
            "--password-file",
            password_file,
            "--state-dir",
            str(state),
        )
        demo.start(
            [broker_cli, "serve", "--state-dir", str(state), "--listen", f"127.0.0.1:{args.broker_port}"], "broker.log"
        )
        demo.wait_ready("the broker", "broker.log", "console-broker listening")
        demo.start(
            [
                str(BIN / "console-proxy"),
                "serve",
                "--listen",
                f"{args.host}:{args.port}",
                "--broker",
                broker_url,
                "--proxy-credential",
                str(demo.work / "proxy-credential.json"),
                "--public-url",
                public,
                *also_localhost,
            ],
            "proxy.log",
        )
        demo.wait_ready("the proxy", "proxy.log", "console-proxy listening")
        client = BrokerClient(broker_url, api_key)
        wait_until("the proxy", lambda: any(p.get("healthy") for p in client.proxies()), time.monotonic() + 30)
        demo.check_alive()
        console = client.mint("demo-vm", user="demo", ttl=600, single_use=True)
        another = (
            f'curl -s -H "Authorization: Bearer $(cat {shlex.quote(str(demo.work / "api.key"))})" '
            f"-d '{json.dumps({'target_id': 'demo-vm'})}' {broker_url}/api/v1/consoles"
        )
        print(f"\nconsolegate demo is running (state, keys and logs in {demo.work})\n")
        print(f"  console URL (single use, valid 10 minutes):\n    {console['url']}\n")
        print(f"  mint another console:\n    {another}\n")
        print(f"  audit trail:\n    {broker_cli} audit tail --state-dir {state}\n")
        if os.geteuid() == 0:
            print("  note: the demo runs as root, so the console's xterm is a root shell on this machine.\n")
        print("Press Ctrl-C to stop.", flush=True)
        wait_for_stop()
    except (BrokerError, subprocess.CalledProcessError, ChildFailed) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    finally:
        demo.stop()
        shutil.rmtree(demo.work, ignore_errors=True)
        print("demo stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
