"""Real TigerVNC Xvnc servers for tests, plus a throwaway CA for VeNCrypt X509.

Tests talk to the real thing rather than a fake: ``start_xvnc()`` launches Xvnc on a free display
and a free loopback port and returns once the RFB banner can be read (no sleeping as
synchronisation; only a short poll on connect attempts, bounded by a deadline). Collisions with
other Xvnc instances (displays, ports) are retried with new numbers.

Fixtures (tests/conftest.py imports them, so every test module can use them by name):
``xvnc_vncauth``, ``xvnc_none``, ``xvnc_x509`` (X509Vnc with a password and ``test_pki``),
all module scoped, and ``xvnc_factory`` (start any configuration, function scoped);
``other_pki`` is an unrelated CA. Servers are stopped on teardown. Test modules import this
file as ``xvnc`` (tests/ is on sys.path), and only for types or helpers, never the fixtures
again: a second import would define them twice. Every server runs with ``-UseBlacklist=0``: each connection that ends
before authenticating (the readiness probe, wrong-password tests) would otherwise count towards
Xvnc's 5-strikes blacklist ("Too many security failures").

Creating the PKI needs the ``cryptography`` package, which is a test-only dependency here.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Self

import pytest

if TYPE_CHECKING:  # cryptography is a test-only dependency, imported where it is used
    from cryptography import x509

FIRST_DISPLAY = 40
LAST_DISPLAY = 400
START_TIMEOUT = 15.0
START_ATTEMPTS = 8
GEOMETRY = (800, 600)
DESKTOP_NAME = "consolegate-test"
TEST_PASSWORD = "s3cr3tpw"  # 8 bytes: VNC passwords are cut to 8 anyway


class XvncStartError(RuntimeError):
    """Xvnc did not come up (binary missing, or every attempt collided or failed)."""


@dataclass(frozen=True)
class TestPki:
    """A throwaway CA and a server certificate for 127.0.0.1 and localhost."""

    __test__ = False  # not a test class, despite the name

    ca_pem: str
    ca_path: Path
    cert_path: Path
    key_path: Path


@dataclass
class XvncServer:
    """A running Xvnc: where to connect, what it expects, and how to stop it."""

    process: subprocess.Popen[bytes]
    display: int
    port: int
    log_path: Path
    security: str
    password: str | None = None
    pki: TestPki | None = None
    host: str = "127.0.0.1"
    geometry: tuple[int, int] = GEOMETRY
    desktop_name: str = DESKTOP_NAME

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        """Xvnc's own output, for assertion messages."""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.process)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 5) -> None:
    """Terminate, wait, and kill if it will not go: never leave a server behind (every real
    server the tests start ends this way)."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)


def xvnc_available() -> bool:
    return shutil.which("Xvnc") is not None and shutil.which("vncpasswd") is not None


def _display_in_use(display: int) -> bool:
    return Path(f"/tmp/.X11-unix/X{display}").exists() or Path(f"/tmp/.X{display}-lock").exists()


def _free_displays() -> Iterator[int]:
    for display in range(FIRST_DISPLAY, LAST_DISPLAY):
        if not _display_in_use(display):
            yield display


def _free_port() -> int:
    """A port free right now; Xvnc may still lose a race for it, which start_xvnc retries."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_password_file(directory: Path, password: str) -> Path:
    """Obfuscate a password the way Xvnc's -PasswordFile expects (``vncpasswd -f``)."""
    path = directory / "passwd"
    result = subprocess.run(["vncpasswd", "-f"], input=password.encode() + b"\n", capture_output=True, check=True)
    path.write_bytes(result.stdout)
    path.chmod(0o600)
    return path


def _xvnc_command(
    display: int,
    port: int,
    security: str,
    password_file: Path | None,
    pki: TestPki | None,
    blacklist: bool,
) -> list[str]:
    width, height = GEOMETRY
    cmd = [
        "Xvnc",
        f":{display}",
        "-rfbport",
        str(port),
        "-interface",
        "127.0.0.1",
        "-localhost",
        f"-UseBlacklist={1 if blacklist else 0}",
        "-geometry",
        f"{width}x{height}",
        "-depth",
        "24",
        "-SecurityTypes",
        security,
        "-desktop",
        DESKTOP_NAME,
    ]
    if password_file is not None:
        cmd += ["-PasswordFile", str(password_file)]
    if pki is not None:
        cmd += ["-X509Cert", str(pki.cert_path), "-X509Key", str(pki.key_path)]
    return cmd


def _banner(port: int, timeout: float) -> bytes | None:
    """The 12-byte RFB banner, or None if nothing listens (yet).

    Xvnc prints its "Listening" line and accepts connections before its main loop runs (the
    first start on a machine takes seconds), so one connection waits for the banner.
    """
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


def _wait_ready(process: subprocess.Popen[bytes], port: int, log_path: Path) -> bool:
    """True once *this* process serves RFB on port; False if it died (e.g. port or display
    collision). The log line rules out reading another server's banner after a lost race."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        listening = f"port {port}" in log_path.read_text(errors="replace")
        remaining = max(deadline - time.monotonic(), 0.1)
        if listening and (banner := _banner(port, remaining)) is not None:
            return banner.startswith(b"RFB ") and process.poll() is None
        time.sleep(0.02)  # poll interval between connect attempts, not synchronisation
    return False


def start_xvnc(
    tmp_path: Path,
    *,
    security: str = "VncAuth",
    password: str | None = None,
    pki: TestPki | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    blacklist: bool = False,
    port: int | None = None,
) -> XvncServer:
    """Start Xvnc with ``-SecurityTypes security`` and return it once it serves RFB.

    ``password`` is required for types that include VNC auth; X509 types need ``pki`` (or
    ``cert`` and ``key``). ``blacklist=True`` keeps Xvnc's blacklist on, for tests of it.
    ``port`` serves on that port (say, where another Xvnc served before) instead of a free one.
    """
    if not xvnc_available():
        raise XvncStartError("Xvnc/vncpasswd not installed (tigervnc-standalone-server)")
    tmp_path.mkdir(parents=True, exist_ok=True)
    if cert is not None and key is not None and pki is None:
        pki = TestPki(ca_pem="", ca_path=cert, cert_path=cert, key_path=key)
    password_file = write_password_file(tmp_path, password) if password is not None else None
    failures: list[str] = []
    for attempt, display in zip(range(START_ATTEMPTS), _free_displays(), strict=False):
        serving = port or _free_port()
        log_path = tmp_path / f"xvnc-{display}-{attempt}.log"
        cmd = _xvnc_command(display, serving, security, password_file, pki, blacklist)
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "DISPLAY": ""},
            )
        server = XvncServer(process, display, serving, log_path, security, password, pki)
        if _wait_ready(process, serving, log_path):
            return server
        server.stop()
        failures.append(f":{display} port {serving}: {server.log()[-500:]}")
    raise XvncStartError("Xvnc did not start:\n" + "\n".join(failures))


# --- a throwaway PKI ---------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_test_pki(directory: Path, *, common_name: str = "consolegate test CA") -> TestPki:
    """A new CA and a server certificate for 127.0.0.1/localhost, written as PEM files.

    Two calls give two unrelated CAs, which is how tests show that verification matters.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    paths = (directory / "ca.pem", directory / "server.pem", directory / "server.key")
    paths[0].write_bytes(ca_pem)
    paths[1].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    paths[2].chmod(0o600)
    return TestPki(ca_pem.decode(), *paths)


# --- pytest fixtures ---------------------------------------------------------------------


def _require_xvnc() -> None:
    if not xvnc_available():
        pytest.fail("TigerVNC Xvnc is not installed: run scripts/setup.sh (tests never skip real parts)")


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    """A CA whose server certificate the ``xvnc_x509`` server presents."""
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def xvnc_vncauth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XvncServer]:
    """Xvnc with VNC Authentication; the password is ``server.password``."""
    _require_xvnc()
    with start_xvnc(tmp_path_factory.mktemp("xvnc-vncauth"), security="VncAuth", password=TEST_PASSWORD) as server:
        yield server


@pytest.fixture(scope="module")
def xvnc_none(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XvncServer]:
    """Xvnc with security type None (loopback only)."""
    _require_xvnc()
    with start_xvnc(tmp_path_factory.mktemp("xvnc-none"), security="None") as server:
        yield server


@pytest.fixture(scope="module")
def xvnc_x509(tmp_path_factory: pytest.TempPathFactory, test_pki: TestPki) -> Iterator[XvncServer]:
    """Xvnc with VeNCrypt X509Vnc: certificate from ``test_pki``, password ``server.password``."""
    _require_xvnc()
    with start_xvnc(
        tmp_path_factory.mktemp("xvnc-x509"),
        security="X509Vnc",
        password=TEST_PASSWORD,
        pki=test_pki,
    ) as server:
        yield server


@pytest.fixture(scope="session")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    """An unrelated CA: must not be able to vouch for the ``xvnc_x509`` server."""
    return make_test_pki(tmp_path_factory.mktemp("other-pki"), common_name="some other CA")


@pytest.fixture
def xvnc_factory(tmp_path: Path) -> Iterator[Callable[..., XvncServer]]:
    """``start(**start_xvnc_kwargs)`` for one-off configurations; all stopped on teardown."""
    _require_xvnc()
    started: list[XvncServer] = []

    def start(**kwargs: object) -> XvncServer:
        server = start_xvnc(tmp_path / f"xvnc-{len(started)}", **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
