"""Start a working consolegate demo on this machine and print a console URL.

What runs: a TigerVNC Xvnc desktop with an xterm on it (the "VM"), a proxy keyring, and one
console-proxy. Everything lives in a fresh temporary directory; Ctrl-C stops every process this
script started, and nothing else.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_display() -> int:
    for display in range(20, 100):
        if not Path(f"/tmp/.X11-unix/X{display}").exists() and not Path(f"/tmp/.X{display}-lock").exists():
            return display
    raise SystemExit("demo: no free X display number")


def wait_for_port(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                if port and sock:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"demo: nothing listens on port {port}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address the proxy listens on")
    parser.add_argument("--port", type=int, default=6080, help="proxy port")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="consolegate-demo-"))
    children: list[subprocess.Popen[bytes]] = []

    def start(command: list[str], log: str, **kwargs: object) -> subprocess.Popen[bytes]:
        handle = (work / log).open("wb")
        child = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, **kwargs)  # type: ignore[call-overload]
        children.append(child)
        return child

    try:
        display, vnc_port = free_display(), free_port()
        password = "demo" + os.urandom(2).hex()
        (work / "vnc.pass").write_text(password + "\n")
        with (work / "vnc.pass").open("rb") as plain, (work / "vnc.obf").open("wb") as obf:
            subprocess.run(["vncpasswd", "-f"], stdin=plain, stdout=obf, check=True)
        start(["Xvnc", f":{display}", "-rfbport", str(vnc_port), "-interface", "127.0.0.1", "-localhost",
               "-SecurityTypes", "VncAuth", "-PasswordFile", str(work / "vnc.obf"), "-geometry", "1024x768",
               "-desktop", "consolegate demo VM"], "xvnc.log")
        wait_for_port(vnc_port, time.monotonic() + 15)
        start(["xterm", "-geometry", "100x30+40+40", "-e", "sh", "-c",
               "echo 'consolegate demo: this xterm runs inside the VNC desktop'; exec sh"],
              "xterm.log", env={**os.environ, "DISPLAY": f":{display}"})
        broker = [str(BIN / "console-broker")]
        subprocess.run([*broker, "keys", "init", "--keyring", str(work / "broker-keyring.json")], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run([*broker, "keys", "export-proxy", "--keyring", str(work / "broker-keyring.json"),
                        "--out", str(work / "proxy-keyring.json")], check=True, stdout=subprocess.DEVNULL)
        public = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '') else args.host}:{args.port}"
        start([str(BIN / "console-proxy"), "serve", "--listen", f"{args.host}:{args.port}", "--keyring",
               str(work / "proxy-keyring.json"), "--public-url", public], "proxy.log")
        wait_for_port(args.port, time.monotonic() + 15)
        mint = [*broker, "token", "mint", "--keyring", str(work / "broker-keyring.json"), "--host", "127.0.0.1",
                "--port", str(vnc_port), "--password-file", str(work / "vnc.pass"), "--ttl", "3600",
                "--vm", "demo-vm", "--desktop-name", "Demo VM"]
        token = subprocess.run(mint, check=True, capture_output=True, text=True).stdout.strip()
        print(f"\nconsolegate demo is running (files and logs in {work})\n")
        print(f"  console URL:  {public}/console#token={token}\n")
        print("  mint another: " + " ".join(mint) + " | sed 's|^|" + public + "/console#token=|'\n")
        print("Press Ctrl-C to stop.")
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    except KeyboardInterrupt:
        pass
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
        shutil.rmtree(work, ignore_errors=True)
        print("demo stopped")
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    raise SystemExit(main())
