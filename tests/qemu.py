"""Real QEMU VNC servers for tests: ``qemu-system-x86_64 -accel tcg -machine none -S``.

A QEMU with no machine and stopped CPUs still runs its VNC server (RFB handshake, VeNCrypt,
ServerInit), and boots in ~0.1-0.2 s here, so each configuration gets a process of its own.

Readiness is an event, not a sleep: the test listens on a unix socket and QEMU's QMP monitor
connects to it as a client during start-up (``-qmp unix:PATH`` without ``server=on``). QEMU
opens its VNC listener before its main loop, and QMP commands are answered from the main loop,
so once ``qmp_capabilities`` is answered the VNC port accepts connections. The password is set over
QMP (``set_password``), as libvirt does, never on the command line.

A guest that paints a known picture: ``start_qemu(..., guest=write_boot_floppy(PATH))`` boots
``-machine pc`` from a floppy holding :data:`BOOT_SECTOR` (written here, 512 bytes). It sets VGA
mode 13h (320x200, 256 colours) and paints eight horizontal bands of 25 rows in colours 0..7
(band 0 black). Then each key read with ``int 16h`` fills the next 40x25 cell of band 0 (left to
right) with colour ``ASCII & 7``: 'a' paints band 1's colour, 'd' band 4's. So the picture, keys
reaching the guest and their order are all checks on pixels, with no palette table in the tests.

TLS: ``tls="anon"`` is ``-object tls-creds-anon`` (VeNCrypt TLSNone/TLSVnc only);
``tls="x509"`` is ``-object tls-creds-x509`` over a directory holding ``ca-cert.pem``,
``server-cert.pem`` and ``server-key.pem`` (QEMU's layout), with ``verify-peer`` on (QEMU's
default: a client certificate is required) or off.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

from xvnc import TestPki, stop_process

QEMU = "qemu-system-x86_64"
START_TIMEOUT = 15.0
START_ATTEMPTS = 5
VNC_BASE_PORT = 5900  # QEMU's -vnc HOST:N listens on 5900 + N
QMP_TIMEOUT = 10.0


#: The guest, hand-assembled 16-bit real mode code loaded at 0x7C00 (see the module docstring).
BOOT_CODE = bytes.fromhex(
    "B81300CD10"  # mov ax,0x0013; int 0x10        VGA mode 13h
    "B800A08EC031FF31C0FC"  # mov ax,0xA000; mov es,ax; xor di,di; xor ax,ax; cld
    "B9401FF3AAFEC03C0872F5"  # band: mov cx,8000; rep stosb; inc al; cmp al,8; jb band
    "31DB"  # xor bx,bx                       next cell of band 0
    "31C0CD162407"  # key: xor ax,ax; int 0x16; and al,7
    "89DFBA1900"  # mov di,bx; mov dx,25
    "B92800F3AA81C718014A75F4"  # row: mov cx,40; rep stosb; add di,280; dec dx; jnz row
    "83C328EBE4"
)  # add bx,40; jmp key
BOOT_SECTOR = BOOT_CODE.ljust(510, b"\x00") + b"\x55\xaa"
FLOPPY_SIZE = 1_474_560  # a 1.44 MB image, so the BIOS sees a standard floppy geometry
#: The picture as VNC shows it: QEMU's std VGA doubles mode 13h to 640x400, so a band is 50 rows
#: and a cell 80 pixels wide on the desktop.
GUEST_WIDTH, GUEST_HEIGHT, BAND_HEIGHT, CELL_WIDTH = 640, 400, 50, 80


def write_boot_floppy(path: Path) -> Path:
    """A floppy image whose boot sector is :data:`BOOT_SECTOR` (sparse past the first sector)."""
    with path.open("wb") as image:
        image.write(BOOT_SECTOR)
        image.truncate(FLOPPY_SIZE)
    return path


class QemuStartError(RuntimeError):
    """QEMU did not come up (binary missing, or every attempt failed)."""


@dataclass
class QemuVnc:
    """A running QEMU: its VNC port, its QMP connection, and how to stop it."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    qmp_sock: socket.socket
    password: str | None = None
    host: str = "127.0.0.1"
    _qmp_reader: Any = field(default=None, repr=False)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def qmp(self, command: str, **arguments: object) -> Any:
        """Run one QMP command; its ``return`` value (events in between are skipped)."""
        request: dict[str, object] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.qmp_sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            line = self._qmp_reader.readline()
            if not line:
                raise QemuStartError(f"QMP closed during {command}:\n{self.log()}")
            reply = json.loads(line)
            if "error" in reply:
                raise QemuStartError(f"QMP {command} failed: {reply['error']}")
            if "return" in reply:
                return reply["return"]

    def stop(self) -> None:
        """Quit QEMU (SIGTERM), wait, and kill if it will not go: never leave one behind."""
        self.qmp_sock.close()
        stop_process(self.process)


def qemu_available() -> bool:
    return shutil.which(QEMU) is not None


def write_x509_dir(directory: Path, pki: TestPki) -> Path:
    """QEMU's tls-creds-x509 layout for ``pki``'s server certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(pki.ca_path, directory / "ca-cert.pem")
    shutil.copyfile(pki.cert_path, directory / "server-cert.pem")
    shutil.copyfile(pki.key_path, directory / "server-key.pem")
    (directory / "server-key.pem").chmod(0o600)
    return directory


def _free_vnc_port() -> int:
    """A free port QEMU can be given as a display number (5900 + N); it may still lose a race."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port > VNC_BASE_PORT:
            return port


def _command(
    port: int,
    qmp_path: Path,
    tls: str | None,
    x509_dir: Path | None,
    verify_peer: bool,
    password: bool,
    guest: Path | None,
) -> list[str]:
    vnc = f"127.0.0.1:{port - VNC_BASE_PORT}"
    machine = (
        ["-machine", "none"]
        if guest is None
        else [
            "-machine",
            "pc",
            "-m",
            "16",
            "-vga",
            "std",
            "-boot",
            "a",
            "-drive",
            f"format=raw,file={guest},if=floppy,readonly=on",
        ]
    )
    command = [QEMU, "-accel", "tcg", *machine, "-nodefaults", "-S", "-display", "none", "-qmp", f"unix:{qmp_path}"]
    if tls == "anon":
        command += ["-object", "tls-creds-anon,id=tls0,endpoint=server"]
    elif tls == "x509":
        assert x509_dir is not None
        peer = "on" if verify_peer else "off"
        command += ["-object", f"tls-creds-x509,id=tls0,dir={x509_dir},endpoint=server,verify-peer={peer}"]
    if tls is not None:
        vnc += ",tls-creds=tls0"
    if password:
        vnc += ",password=on"
    return [*command, "-vnc", vnc]


def _await_qmp(listener: socket.socket, process: subprocess.Popen[bytes]) -> socket.socket | None:
    """QEMU's QMP connection once its greeting arrived; None if QEMU exited first."""
    deadline = time.monotonic() + START_TIMEOUT
    listener.settimeout(0.2)  # the accept wakes on QEMU's connect; the timeout only checks it lives
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return None
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        conn.settimeout(QMP_TIMEOUT)
        return conn
    return None


def start_qemu(
    tmp_path: Path,
    *,
    tls: Literal["anon", "x509"] | None = None,
    pki: TestPki | None = None,
    verify_peer: bool = False,
    password: str | None = None,
    guest: Path | None = None,
) -> QemuVnc:
    """Start QEMU serving VNC on a free loopback port; return it once VNC accepts connections.

    With ``guest`` (a floppy image) the machine is a PC that boots it; its CPUs start once the
    password is set, so no viewer ever sees the guest before its VNC is locked."""
    if not qemu_available():
        raise QemuStartError(f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    tmp_path.mkdir(parents=True, exist_ok=True)
    x509_dir = write_x509_dir(tmp_path / "x509", pki) if tls == "x509" and pki is not None else None
    failures: list[str] = []
    for attempt in range(START_ATTEMPTS):
        port = _free_vnc_port()
        qmp_path = tmp_path / f"qmp-{attempt}.sock"
        log_path = tmp_path / f"qemu-{attempt}.log"
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(str(qmp_path))
            listener.listen(1)
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    _command(port, qmp_path, tls, x509_dir, verify_peer, password is not None, guest),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ},
                )
            conn = _await_qmp(listener, process)
        qmp_path.unlink(missing_ok=True)
        if conn is None:
            if process.poll() is None:
                process.kill()
            process.wait()
            failures.append(f"port {port}: {log_path.read_text(errors='replace')[-500:]}")
            continue
        server = QemuVnc(process, port, log_path, conn, password, _qmp_reader=conn.makefile("rb"))
        try:
            greeting = json.loads(server._qmp_reader.readline() or b"{}")
            if "QMP" not in greeting:
                raise QemuStartError(f"no QMP greeting: {greeting}")
            server.qmp("qmp_capabilities")
            if password is not None:
                server.qmp("set_password", protocol="vnc", password=password)
            if guest is not None:
                server.qmp("cont")
        except BaseException:
            server.stop()
            raise
        return server
    raise QemuStartError("QEMU did not start:\n" + "\n".join(failures))
