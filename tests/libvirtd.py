"""A real libvirtd for tests, in the foreground, with every path in a temporary directory.

Run as root, libvirtd is the system daemon: fixed paths under /run and /var/lib/libvirt, shared
by every test run on the machine. So it runs as ``nobody`` instead, which makes it a *session*
daemon whose sockets, state, logs and configuration all follow the ``XDG_*`` variables into a
directory of its own; the tests (root) connect with ``qemu:///session?socket=…``. Its
``qemu.conf`` says ``stdio_handler = "file"``: QEMU's output goes to a file, so no virtlogd is
needed (a daemonised one would become a zombie here: PID 1 does not reap). Domains are TCG
(``<domain type='qemu'>``): no KVM on the test machine.

Readiness is an event, not a poll: libvirtd sends ``READY=1`` to ``$NOTIFY_SOCKET`` (the
sd_notify protocol, which it speaks without systemd) once its sockets are bound; the fixture waits
for that datagram or for the daemon's exit, whichever comes first, then connects once (a call
that waits, if need be, until the drivers are up and the daemon serves it).
"""

from __future__ import annotations

import os
import pwd
import select
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from xvnc import stop_process

LIBVIRTD = "/usr/sbin/libvirtd"
START_TIMEOUT = 30.0
USER = "nobody"


@dataclass
class Libvirtd:
    root: Path
    process: subprocess.Popen[bytes]

    @property
    def uri(self) -> str:
        return f"qemu:///session?socket={self.root}/run/libvirt/libvirt-sock"

    def log(self) -> str:
        return (self.root / "libvirtd.log").read_text(errors="replace")

    def connect(self) -> Any:
        import libvirt

        return libvirt.open(self.uri)

    def stop(self) -> None:
        stop_process(self.process, timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


def libvirtd_available() -> bool:
    return Path(LIBVIRTD).exists()


def _environment(root: Path) -> dict[str, str]:
    return {
        "PATH": "/usr/sbin:/usr/bin:/bin",
        "HOME": str(root),
        "XDG_CONFIG_HOME": str(root / "config"),
        "XDG_RUNTIME_DIR": str(root / "run"),
        "XDG_CACHE_HOME": str(root / "cache"),
        "XDG_DATA_HOME": str(root / "data"),
    }


def _prepare(root: Path) -> None:
    """The daemon's directories, owned by the user it runs as (readable by QEMU: same user)."""
    for sub in ("config/libvirt", "run", "cache", "data", "files"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "config/libvirt/qemu.conf").write_text('stdio_handler = "file"\n')
    user = pwd.getpwnam(USER)
    for path in [root, *root.rglob("*")]:
        os.chown(path, user.pw_uid, user.pw_gid)
    root.chmod(0o755)


def start_libvirtd() -> Libvirtd:
    """A session libvirtd as ``nobody`` in a fresh directory; returns once it answers."""
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    root = Path(tempfile.mkdtemp(prefix="libvirtd-"))  # not under pytest's 0700 root-only tmp
    _prepare(root)
    user = pwd.getpwnam(USER)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = root / "notify"
    notify.bind(str(notify_path))
    os.chown(notify_path, user.pw_uid, user.pw_gid)  # the daemon (nobody) sends to it
    with notify, (root / "libvirtd.log").open("wb") as log:
        process = subprocess.Popen(
            [LIBVIRTD],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=root,
            env={**_environment(root), "NOTIFY_SOCKET": str(notify_path)},
            user=user.pw_uid,
            group=user.pw_gid,
            extra_groups=[],
        )
        daemon = Libvirtd(root, process)
        if _notified_ready(notify, process, START_TIMEOUT):
            try:
                daemon.connect().close()
                return daemon
            except libvirt.libvirtError:
                pass
    daemon.stop()
    raise AssertionError(f"libvirtd did not answer:\n{daemon.log()}")


def _notified_ready(notify: socket.socket, process: subprocess.Popen[bytes], timeout: float) -> bool:
    """Whether ``READY=1`` arrives on ``notify`` before ``process`` exits or ``timeout`` passes."""
    exited = os.pidfd_open(process.pid)
    deadline = time.monotonic() + timeout
    try:
        while True:
            readable, _, _ = select.select([notify, exited], [], [], max(0.0, deadline - time.monotonic()))
            if notify not in readable:
                return False  # the daemon exited, or the timeout passed
            if b"READY=1" in notify.recv(4096).split(b"\n"):
                return True
    finally:
        os.close(exited)


def domain_xml(
    name: str,
    *,
    floppy: Path | None,
    vnc_port: int | None,
    password: str | None,
    listen: str = "127.0.0.1",
    graphics: str = "vnc",
) -> str:
    """A TCG domain booting ``floppy`` (if any) with one graphics device."""
    disk = (
        ""
        if floppy is None
        else (
            "<disk type='file' device='floppy'><driver name='qemu' type='raw'/>"
            f"<source file={quoteattr(str(floppy))}/><target dev='fda' bus='fdc'/><readonly/></disk>"
        )
    )
    if graphics == "vnc":
        port = f"port='{vnc_port}' autoport='no'" if vnc_port else "autoport='yes'"
        secret = f" passwd={quoteattr(password)}" if password else ""
        device = f"<graphics type='vnc' {port} listen={quoteattr(listen)}{secret}/>"
    else:
        device = "<graphics type='spice' autoport='yes' listen='127.0.0.1'/>"
    return (
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>16</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='fd'/></os>"
        f"<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>{disk}{device}"
        "<video><model type='vga'/></video></devices></domain>"
    )
