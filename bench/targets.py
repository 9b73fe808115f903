"""What the proxies relay to: a real TigerVNC Xvnc (VncAuth) and a tiny echo stand-in.

The Xvnc start logic mirrors tests/xvnc.py (which imports pytest at module level, so the bench
keeps its own copy): free display and port, ``-UseBlacklist=0``, ready once *this* process
serves the RFB banner, retried on collisions, always stopped.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

FIRST_DISPLAY = 140
LAST_DISPLAY = 600
START_TIMEOUT = 20.0
PASSWORD = "b3nchpw!"
GEOMETRY = (1920, 1080)
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(process: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM, ``grace`` seconds to exit, then SIGKILL: benchmarks never leave processes behind."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def _banner(port: int, timeout: float) -> bytes | None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
            data = b""
            while len(data) < 12:
                chunk = conn.recv(12 - len(data))
                if not chunk:
                    return None
                data += chunk
            return data
    except OSError:
        return None


@dataclass
class Target:
    process: subprocess.Popen[bytes]
    port: int
    password: str | None
    log_path: Path
    width: int
    height: int

    def stop(self) -> None:
        stop_process(self.process, 5)


def start_xvnc(workdir: Path, geometry: tuple[int, int] = GEOMETRY) -> Target:
    """Xvnc with VncAuth at ``geometry``, depth 24, loopback only; returns once it serves RFB."""
    if shutil.which("Xvnc") is None or shutil.which("vncpasswd") is None:
        raise RuntimeError("Xvnc/vncpasswd not installed (apt-get install tigervnc-standalone-server tigervnc-tools)")
    pwfile = workdir / "passwd"
    out = subprocess.run(["vncpasswd", "-f"], input=PASSWORD.encode() + b"\n", capture_output=True, check=True)
    pwfile.write_bytes(out.stdout)
    pwfile.chmod(0o600)
    failures = []
    for display in range(FIRST_DISPLAY, LAST_DISPLAY):
        if Path(f"/tmp/.X11-unix/X{display}").exists() or Path(f"/tmp/.X{display}-lock").exists():
            continue
        port = free_port()
        log_path = workdir / f"xvnc-{display}.log"
        cmd = [
            "Xvnc",
            f":{display}",
            "-rfbport",
            str(port),
            "-interface",
            "127.0.0.1",
            "-localhost",
            "-UseBlacklist=0",
            "-geometry",
            f"{geometry[0]}x{geometry[1]}",
            "-depth",
            "24",
            "-SecurityTypes",
            "VncAuth",
            "-PasswordFile",
            str(pwfile),
            "-desktop",
            "bench",
            "-AlwaysShared",
            "-FrameRate=1000",
            "-CompareFB=0",
        ]
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "DISPLAY": ""}
            )
        target = Target(process, port, PASSWORD, log_path, *geometry)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and process.poll() is None:
            if f"port {port}" in log_path.read_text(errors="replace"):
                banner = _banner(port, max(deadline - time.monotonic(), 0.1))
                if banner and banner.startswith(b"RFB ") and process.poll() is None:
                    return target
                break
            time.sleep(0.02)  # poll interval, bounded by the deadline
        target.stop()
        failures.append(log_path.read_text(errors="replace")[-300:])
        if len(failures) >= 6:
            break
    raise RuntimeError("Xvnc did not start:\n" + "\n".join(failures))


def start_echo(workdir: Path) -> Target:
    """bench/echo_target.py in its own process (own CPU, not the client's event loop)."""
    for _ in range(5):
        port = free_port()
        log_path = workdir / f"echo-{port}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "bench.echo_target", str(port)],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
        target = Target(process, port, None, log_path, 1024, 768)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and process.poll() is None:
            banner = _banner(port, 1.0)
            if banner == b"RFB 003.008\n":
                return target
            time.sleep(0.02)
        target.stop()
    raise RuntimeError("echo target did not start")


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="consolegate-bench-"))


def certificate(workdir: Path) -> tuple[Path, Path, ssl.SSLContext]:
    """A self-signed P-256 certificate for localhost and 127.0.0.1 (cert file, key file) and a
    client context that trusts it: the one certificate both proxies serve in the wss section."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = workdir / "bench-cert.pem", workdir / "bench-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    client = ssl.create_default_context(cafile=str(cert_path))
    return cert_path, key_path, client
