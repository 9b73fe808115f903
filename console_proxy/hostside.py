"""What the proxy and the broker both need from the host they run on.

Listen addresses (``--listen``), the loopback test that decides where plain HTTP is allowed, the
server certificate files of ``--tls-cert``/``--tls-key`` (reloadable), and private (0600, atomically replaced)
files for keys and credentials. The broker imports these from here; ``console_proxy`` never
imports ``broker``.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
from pathlib import Path

from console_proxy import certfiles
from console_proxy.certfiles import CertificateFiles, CertificateFilesError
from console_proxy.command import CommandError

__all__ = ["is_loopback_host", "parse_listen", "tls_files", "write_private_file"]


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``; an empty host is every IPv4 address) for ``--listen``."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise CommandError(f"--listen {value!r} must be HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def tls_files(
    cert: str | None, key: str | None, use: str, *, prepare: certfiles.Prepare | None = None
) -> CertificateFiles | None:
    """``--tls-cert``/``--tls-key``, reloaded on SIGHUP (console_proxy.certfiles), or None for
    plain HTTP; ``prepare`` adds a listener's other settings to every context (client
    certificates asked)."""
    if not cert and not key:
        return None
    if not (cert and key):
        raise CommandError("--tls-cert and --tls-key go together")
    try:
        return CertificateFiles(cert, key, use, prepare=prepare)
    except CertificateFilesError as exc:
        raise CommandError(f"cannot load the TLS certificate or key: {exc}") from None


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 or ``localhost``; names are not resolved, so any other name is remote.

    Where plain HTTP is allowed: the proxy's ``--broker`` URL, the broker's listener and clients.
    """
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def write_private_file(path: str | os.PathLike[str], content: bytes) -> None:
    """Atomically replace ``path`` with ``content``, readable by the owner only.

    A crash or a full disk leaves either the old file or the new one, never half of one.
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    tmp = write_private_temporary(directory, target.name, content)
    try:
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sync_directory(directory)


def write_private_temporary(directory: Path, name: str, content: bytes) -> str:
    """``content`` in a new 0600 file beside ``name`` in ``directory``, synced; its path (the
    caller renames it into place), nothing left behind on failure."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def sync_directory(directory: Path) -> None:
    """fsync ``directory``, so renames into it survive a crash."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
