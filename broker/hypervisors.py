"""Where a libvirt domain's VNC console is now: asked of libvirt at mint time.

VNC ports and passwords change when a VM restarts or migrates, so a console for
``{"hypervisor": NAME, "domain": NAME-or-UUID}`` is looked up when it is minted, never stored.

Pure core: :func:`vnc_from_xml` reads the domain's secure XML (``VIR_DOMAIN_XML_SECURE``, which
holds the VNC ``passwd``) into a :class:`VncConsole`. Thin shell: :func:`lookup` opens the
connection, finds the domain and reads its XML with libvirt-python (imported here, lazily: it is
the optional ``[libvirt]`` extra). libvirt calls block, some for as long as TCP takes to give up,
so :func:`lookup_async` runs them in a small thread pool, never on the event loop, and stops
waiting at a deadline (503 ``hypervisor_unavailable``); a hung call holds one pool thread until
libvirt gives up, and a full pool makes further lookups time out the same way.

What the broker does on the hypervisor: it reads (connect, look the domain up, its state, its
XML). It writes only for a hypervisor registered with per-console passwords
(:attr:`Hypervisor.console_passwords`): then each mint sets the domain's VNC password, live, with
``passwdValidTo`` (QEMU's ``expire_password``) at the console's ``exp`` — a fresh random password
when no console is outstanding, else the current one with its validity set to the latest ``exp``
(QEMU holds one VNC password, and every outstanding token must still open). So a password
carried by a token opens nothing once the last console minted with it has expired; VNC checks
passwords only when a viewer connects, so open sessions stay open.

Which consoles are outstanding is the database's answer (the committed sessions rows of every
replica), never this process's memory, and the read-rekey-commit of one domain runs under a
database lock per (hypervisor, domain UUID) (:meth:`broker.store.Store.console_lock`): two
replicas minting for one domain at once cannot each set a fresh password. This module only
applies what it is told (:func:`rekey`); the broker's service holds the lock and reads the rows.
"""

from __future__ import annotations

import asyncio
import calendar
import ipaddress
import secrets
import string
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit
from xml.etree import ElementTree

LOOKUP_TIMEOUT = 10.0
"""Seconds a mint waits for libvirt before answering 503 ``hypervisor_unavailable``."""
LOOKUP_THREADS = 8
URI_SCHEMES = ("qemu", "qemu+tcp", "qemu+tls", "qemu+ssh", "qemu+unix", "qemu+libssh", "qemu+libssh2", "test")
_WILDCARDS = {ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::")}
_pool = ThreadPoolExecutor(max_workers=LOOKUP_THREADS, thread_name_prefix="libvirt")
PASSWORD_LENGTH = 8
"""QEMU compares 8 bytes of a VNC password and libvirt refuses longer ones."""
_PASSWORD_ALPHABET = string.ascii_letters + string.digits
_VALID_TO_FORMAT = "%Y-%m-%dT%H:%M:%S"  # libvirt's passwdValidTo, UTC
T = TypeVar("T")


class HypervisorError(Exception):
    """A console that cannot be looked up: the HTTP status, a stable code and a human message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def not_found(domain: str, hypervisor: str) -> HypervisorError:
    return HypervisorError(404, "domain_not_found", f"hypervisor {hypervisor!r} has no domain {domain!r}")


def unavailable(hypervisor: str, why: str) -> HypervisorError:
    return HypervisorError(503, "hypervisor_unavailable", f"hypervisor {hypervisor!r} did not answer: {why}")


@dataclass(frozen=True)
class Hypervisor:
    """A registered libvirt connection."""

    name: str
    uri: str
    address: str | None
    """Where proxies reach its VNC servers when a domain listens on a wildcard address."""
    tls: dict[str, Any] | None = None
    """The upstream VeNCrypt policy for its consoles (libvirt's vnc_tls is in qemu.conf, not the XML)."""
    console_passwords: bool = False
    """Each mint sets the domain's VNC password (see the module docstring)."""


@dataclass(frozen=True)
class VncConsole:
    host: str
    port: int
    password: str | None
    uuid: str = ""
    """The domain's UUID: what names it for the rekey lock and the sessions rows (a name or a
    UUID may be what the request said)."""


def check_uri(uri: str) -> str:
    """A libvirt URI the broker accepts (a ValueError naming what is wrong otherwise)."""
    scheme = urlsplit(uri).scheme
    if scheme not in URI_SCHEMES:
        raise ValueError(
            f"uri must be a libvirt QEMU URI ({', '.join(s + '://' for s in URI_SCHEMES)}), not {scheme or 'no scheme'}"
        )
    return uri


def _fallback_host(hypervisor: Hypervisor) -> str:
    """The host for a domain that listens on every address: the registered one, else the URI's."""
    if hypervisor.address:
        return hypervisor.address
    return urlsplit(hypervisor.uri).hostname or "127.0.0.1"


def _is_wildcard(address: str) -> bool:
    try:
        return ipaddress.ip_address(address) in _WILDCARDS
    except ValueError:
        return False


def vnc_from_xml(xml: str, hypervisor: Hypervisor, domain: str) -> VncConsole:
    """The VNC console in a running domain's secure XML (pure)."""
    root = ElementTree.fromstring(xml)
    graphics = root.findall("./devices/graphics")
    vnc = next((g for g in graphics if g.get("type") == "vnc"), None)
    if vnc is None:
        kinds = ", ".join(sorted({g.get("type") or "?" for g in graphics})) or "none"
        raise HypervisorError(409, "no_vnc_console", f"domain {domain!r} has no VNC console (graphics: {kinds})")
    listen = vnc.find("./listen")
    if listen is not None and listen.get("type") == "socket":
        raise HypervisorError(
            409,
            "no_vnc_console",
            f"domain {domain!r} serves VNC on a unix socket only; "
            "proxies need a TCP port (listen type 'address' or 'network')",
        )
    port = int(vnc.get("port") or -1)
    if not 0 < port < 65536:
        raise HypervisorError(409, "no_vnc_console", f"domain {domain!r} has no VNC port yet")
    address = (listen.get("address") if listen is not None else None) or vnc.get("listen") or ""
    host = _fallback_host(hypervisor) if not address or _is_wildcard(address) else address
    return VncConsole(host, port, vnc.get("passwd"))


def _vnc_graphics(root: ElementTree.Element, domain: str) -> ElementTree.Element:
    graphics = next((g for g in root.findall("./devices/graphics") if g.get("type") == "vnc"), None)
    if graphics is None:
        raise HypervisorError(409, "no_vnc_console", f"domain {domain!r} has no VNC console")
    return graphics


def rekeyed_graphics(xml: str, domain: str, now: float, until: float, keep: bool) -> tuple[str, str]:
    """(the graphics device to apply live, its password) valid until ``until`` (pure).

    ``keep``: committed consoles are outstanding (``until`` is then at least the latest of their
    ``exp``), so the current password is kept while it is still valid; its validity is *set* to
    ``until``, shortened too if a failed or crashed mint had stretched it further. Otherwise, or
    when the current password has expired (a restart, an admin's change), a fresh one."""
    graphics = _vnc_graphics(ElementTree.fromstring(xml), domain)
    password, valid_to = graphics.get("passwd"), graphics.get("passwdValidTo")
    current_until = calendar.timegm(time.strptime(valid_to, _VALID_TO_FORMAT)) if valid_to else None
    if not (keep and password and current_until is not None and current_until > now):
        password = "".join(secrets.choice(_PASSWORD_ALPHABET) for _ in range(PASSWORD_LENGTH))
    graphics.set("passwd", password)
    graphics.set("passwdValidTo", time.strftime(_VALID_TO_FORMAT, time.gmtime(until)))
    graphics.tail = None
    return ElementTree.tostring(graphics, encoding="unicode"), password


def _libvirt() -> Any:
    try:
        import libvirt  # the optional [libvirt] extra
    except ImportError:
        raise HypervisorError(
            503,
            "hypervisor_unavailable",
            "the broker cannot reach libvirt: libvirt-python is not installed (pip install 'consolegate[libvirt]')",
        ) from None
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are exceptions; not on stderr
    return libvirt


def _find_domain(libvirt: Any, conn: Any, hypervisor: Hypervisor, domain: str) -> Any:
    for finder in (conn.lookupByName, conn.lookupByUUIDString):
        try:
            return finder(domain)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_INVALID_ARG):
                raise
    raise not_found(domain, hypervisor.name)


def _connected(hypervisor: Hypervisor, domain: str, action: Callable[[Any, Any], T]) -> T:
    """``action(libvirt, the running domain)`` on a fresh connection, libvirt's errors mapped to
    the DESIGN codes (blocking: run it through :func:`_off_loop`)."""
    libvirt = _libvirt()
    try:
        conn = libvirt.open(hypervisor.uri)
    except libvirt.libvirtError as exc:
        raise unavailable(hypervisor.name, exc.get_error_message() or "connection failed") from None
    try:
        found = _find_domain(libvirt, conn, hypervisor, domain)
        if not found.isActive():
            raise HypervisorError(409, "domain_not_running", f"domain {domain!r} is not running")
        return action(libvirt, found)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            raise not_found(domain, hypervisor.name) from None
        if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:
            raise HypervisorError(409, "domain_not_running", f"domain {domain!r} is not running") from None
        raise unavailable(hypervisor.name, exc.get_error_message() or "libvirt error") from None
    finally:
        conn.close()


def lookup(hypervisor: Hypervisor, domain: str) -> VncConsole:
    """The domain's VNC console now, with its UUID (blocking: see :func:`lookup_async`)."""

    def read(libvirt: Any, found: Any) -> VncConsole:
        console = vnc_from_xml(found.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE), hypervisor, domain)
        return VncConsole(console.host, console.port, console.password, found.UUIDString())

    return _connected(hypervisor, domain, read)


def rekey(hypervisor: Hypervisor, uuid: str, until: float, keep: bool, abandoned: threading.Event) -> str:
    """Set the domain's VNC password, live, valid until ``until`` (see :func:`rekeyed_graphics`);
    the password set. Blocking; the caller holds the domain's rekey lock. ``abandoned``: the
    caller stopped waiting (and let the lock go), so a late call must not write any more."""

    def apply(libvirt: Any, found: Any) -> str:
        xml = found.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE)
        graphics, password = rekeyed_graphics(xml, uuid, time.time(), until, keep)
        if abandoned.is_set():
            raise unavailable(hypervisor.name, "no answer within the mint's deadline")
        found.updateDeviceFlags(graphics, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        return password

    return _connected(hypervisor, uuid, apply)


async def _off_loop(
    hypervisor: Hypervisor, timeout: float, call: Callable[..., T], *args: Any, abandoned: threading.Event | None = None
) -> T:
    """``call(*args)`` in the libvirt pool, given up after ``timeout`` seconds (503; then
    ``abandoned`` is set for the call still running)."""
    future = asyncio.get_running_loop().run_in_executor(_pool, call, *args)
    try:
        return await asyncio.wait_for(future, max(timeout, 0.0))
    except TimeoutError:
        if abandoned is not None:
            abandoned.set()
        raise unavailable(hypervisor.name, "no answer within the mint's deadline") from None


async def lookup_async(hypervisor: Hypervisor, domain: str, timeout: float = LOOKUP_TIMEOUT) -> VncConsole:
    """:func:`lookup` off the event loop, given up after ``timeout`` seconds (503)."""
    return await _off_loop(hypervisor, timeout, lookup, hypervisor, domain)


async def rekey_async(hypervisor: Hypervisor, uuid: str, until: float, keep: bool, timeout: float) -> str:
    """:func:`rekey` off the event loop, given up after ``timeout`` seconds (503)."""
    abandoned = threading.Event()
    return await _off_loop(hypervisor, timeout, rekey, hypervisor, uuid, until, keep, abandoned, abandoned=abandoned)
