"""Consoles looked up in libvirt at mint time (issue 17 item 2), against a real libvirtd.

libvirtd runs in the foreground under the test (tests/libvirtd.py), its domains are TCG QEMUs
booting the picture guest of tests/qemu.py; the broker and the proxy are real processes. A
console is minted by domain name (or UUID), and must open where the domain runs *now*: after a
restart on another port, and with the password set *now* (an old token's password opens nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import libvirt
import pytest
import rfbframes
from brokerproc import BrokerProcess, BrokerState, healthy_proxies, start_broker, start_linked_proxy, wait_for
from libvirtd import Libvirtd, domain_xml, libvirtd_available, start_libvirtd
from proxyproc import ProxyProcess, free_port
from qemu import write_boot_floppy
from rfbclient import Console
from test_qemu_console import cell_is, closed_with, painted
from tornado.websocket import WebSocketClosedError

from broker import hypervisors
from broker.auth import Principal
from broker.client import BrokerError
from broker.hypervisors import Hypervisor, HypervisorError
from broker.service import ApiError, Broker, BrokerConfig, init_state_dir
from broker.store import StoreUnavailable

HUNG_TIMEOUT = 3.0  # the broker's --hypervisor-timeout in these tests
TARGET_AUTH_FAILED = (4501, "target_auth_failed")


@pytest.fixture(scope="module")
def daemon() -> Iterator[Libvirtd]:
    if not libvirtd_available():
        pytest.fail("libvirtd is not installed: run scripts/setup.sh (tests never skip real parts)")
    started = start_libvirtd()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def conn(daemon: Libvirtd) -> Iterator[Any]:
    connection = daemon.connect()
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def floppy(daemon: Libvirtd) -> Path:
    return write_boot_floppy(daemon.root / "files" / "boot.img")


@pytest.fixture(scope="module")
def hung_listener() -> Iterator[socket.socket]:
    """A server that accepts libvirt's connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener


@pytest.fixture(scope="module")
def hung_libvirt(hung_listener: socket.socket) -> str:
    return f"qemu+tcp://127.0.0.1:{hung_listener.getsockname()[1]}/system"


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, daemon: Libvirtd, hung_libvirt: str
) -> Iterator[tuple[BrokerProcess, ProxyProcess]]:
    tmp = tmp_path_factory.mktemp("fleet")
    state = BrokerState.create(tmp / "state")
    broker = state.open()
    try:
        broker.add_hypervisor({"name": "lab", "uri": daemon.uri}, "test")
        broker.add_hypervisor({"name": "wild", "uri": daemon.uri, "address": "localhost"}, "test")
        broker.add_hypervisor({"name": "hung", "uri": hung_libvirt}, "test")
        broker.add_hypervisor({"name": "fresh", "uri": daemon.uri, "console_passwords": True}, "test")
        broker.add_hypervisor({"name": "sealed", "uri": daemon.uri, "clip": "none"}, "test")
    finally:
        broker.close()
    process = start_broker(state, "--hypervisor-timeout", str(HUNG_TIMEOUT))
    proxy = start_linked_proxy(tmp, process, "p1")
    try:
        healthy_proxies(process, 1)
        yield process, proxy
    finally:
        proxy.stop()
        process.stop()


DomainFactory = Callable[..., Any]


@pytest.fixture
def domains(conn: Any, floppy: Path) -> Iterator[DomainFactory]:
    """Start transient TCG domains; all are destroyed after the test."""
    started: list[Any] = []

    def start(name: str, *, password: str | None = "vm-pw-01", port: int | None = None, **options: Any) -> Any:
        domain = conn.createXML(
            domain_xml(name, floppy=floppy, vnc_port=port or free_port(), password=password, **options), 0
        )
        started.append(domain)
        return domain

    yield start
    for domain in started:
        # destroyed by the test already
        with contextlib.suppress(libvirt.libvirtError):
            domain.destroy()


def opens(proxy: ProxyProcess, minted: dict[str, Any]) -> bool:
    """The minted console reaches the guest's picture through the proxy."""

    async def scenario() -> bool:
        console = await Console.open(proxy.ws_url, minted["token"])
        try:
            await console.handshake()
            screen = await rfbframes.start(console)
            return painted(await rfbframes.wait_until(console, screen, painted))
        finally:
            console.close()

    return asyncio.run(scenario())


def refused(call: Callable[[], object]) -> tuple[int, str, str]:
    with pytest.raises(BrokerError) as caught:
        call()
    return caught.value.status, caught.value.code, caught.value.message


def vnc_port(domain: Any) -> int:
    return hypervisors.vnc_from_xml(domain.XMLDesc(0), Hypervisor("x", "test:///default", None), "d").port


# --- minted by domain, opened through the proxy ---------------------------------------------


def test_a_console_minted_by_domain_name_opens_through_the_proxy(fleet, domains) -> None:
    broker, proxy = fleet
    domain = domains("web1")
    assert opens(proxy, broker.issuer.mint_domain("lab", "web1", user="alice"))
    assert opens(proxy, broker.issuer.mint_domain("lab", domain.UUIDString()))
    minted = [e for e in broker.admin.audit(0, type_="minted") if e["detail"].get("vm") == "lab/web1"]
    assert minted and minted[0]["detail"]["target_id"] is None


def test_a_hypervisors_clip_default_reaches_its_consoles_and_a_mint_cannot_widen_it(fleet, domains) -> None:
    """clip=none: the proxy frames QEMU's server messages (to drop cut text) and the console
    still shows the guest's picture; asking for a direction the hypervisor forbids is 403."""
    broker, proxy = fleet
    domains("sealed1")
    assert opens(proxy, broker.issuer.mint_domain("sealed", "sealed1"))
    minted = [e for e in broker.admin.audit(0, type_="minted") if e["detail"].get("vm") == "sealed/sealed1"]
    assert [e["detail"]["clip"] for e in minted] == ["none"]
    status, code, message = refused(lambda: broker.issuer.mint_domain("sealed", "sealed1", clip="in"))
    assert (status, code) == (403, "clip_not_allowed") and "'none'" in message


def test_a_domain_restarted_on_another_port_still_gets_a_working_console(fleet, domains) -> None:
    broker, proxy = fleet
    first = domains("moving")
    old_port = vnc_port(first)
    assert opens(proxy, broker.issuer.mint_domain("lab", "moving"))
    first.destroy()
    second = domains("moving", port=next(p for p in iter(free_port, None) if p != old_port))
    assert vnc_port(second) != old_port
    assert opens(proxy, broker.issuer.mint_domain("lab", "moving"))


def test_a_password_changed_live_invalidates_old_tokens(fleet, domains) -> None:
    broker, proxy = fleet
    domain = domains("rekeyed", password="before01")
    port = vnc_port(domain)
    old = broker.issuer.mint_domain("lab", "rekeyed", single_use=False)
    assert opens(proxy, old)
    graphics = f"<graphics type='vnc' port='{port}' autoport='no' listen='127.0.0.1' passwd='after-02'/>"
    domain.updateDeviceFlags(graphics, libvirt.VIR_DOMAIN_AFFECT_LIVE)  # what virsh update-device --live does
    code, reason, _ = closed_with(proxy, old["token"], old["session_id"])
    assert (code, reason) == TARGET_AUTH_FAILED
    assert opens(proxy, broker.issuer.mint_domain("lab", "rekeyed"))


def test_a_domain_listening_on_every_address_is_reached_at_the_registered_address(fleet, domains) -> None:
    broker, proxy = fleet
    domains("wildcard", listen="0.0.0.0")
    assert opens(proxy, broker.issuer.mint_domain("wild", "wildcard"))


# --- per-console passwords (--console-passwords) -------------------------------------------


def vnc_secret(domain: Any) -> tuple[str | None, str | None]:
    """The domain's VNC password and its passwdValidTo, as libvirt holds them now."""
    graphics = ElementTree.fromstring(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE)).find("./devices/graphics")
    assert graphics is not None
    return graphics.get("passwd"), graphics.get("passwdValidTo")


def handshake_refusal(proxy: ProxyProcess, token: str) -> tuple[int | None, str | None] | None:
    """Open a console with ``token``: None if the handshake reached the desktop, else the close
    (code, reason) the proxy ended it with."""

    async def scenario() -> tuple[int | None, str | None] | None:
        console = await Console.open(proxy.ws_url, token)
        try:
            await console.handshake()
            return None
        except (ConnectionError, AssertionError, WebSocketClosedError):
            return (console.ws.close_code, console.ws.close_reason)
        finally:
            console.close()

    return asyncio.run(scenario())


def accepted(proxy: ProxyProcess, token: str) -> bool:
    """True if the token reaches the desktop, False if the VNC server refused its password."""
    return handshake_refusal(proxy, token) != TARGET_AUTH_FAILED


def test_console_passwords_are_fresh_shared_while_outstanding_and_expire(fleet, domains, proxy, mint) -> None:
    broker, fleet_proxy = fleet
    domain = domains("guarded", password="initial1")
    port = vnc_port(domain)

    def direct(password: str) -> str:  # a token of our own carrying exactly this password
        return mint(host="127.0.0.1", port=port, password=password, ttl=300)

    first = broker.issuer.mint_domain("fresh", "guarded", ttl=3, single_use=False)
    password, valid_to = vnc_secret(domain)
    assert password not in (None, "initial1") and len(password) == 8 and valid_to
    assert not accepted(proxy, direct("initial1"))  # the password set before opens nothing now
    second = broker.issuer.mint_domain("fresh", "guarded", ttl=1)
    assert vnc_secret(domain) == (password, valid_to)  # shared while the first is outstanding
    assert opens(fleet_proxy, second)

    async def keep_open() -> tuple[Console, rfbframes.Screen]:
        console = await Console.open(fleet_proxy.ws_url, first["token"])
        await console.handshake()
        return console, await rfbframes.start(console)

    async def scenario() -> None:
        console, screen = await keep_open()
        await rfbframes.wait_until(console, screen, painted)
        # QEMU expires the password at the first console's exp: polled, as no event announces it
        await asyncio.to_thread(
            wait_for, lambda: not accepted(proxy, direct(password)), 15.0, 0.25, "the per-console password to expire"
        )
        await rfbframes.key(console, ord("a"))  # the session opened before the expiry still works
        await rfbframes.wait_until(console, screen, cell_is(0, 1))
        console.close()

    asyncio.run(scenario())
    assert time.time() >= first["expires_at"] - 1  # it expired with the console, not before
    third = broker.issuer.mint_domain("fresh", "guarded")
    assert vnc_secret(domain)[0] != password
    assert opens(fleet_proxy, third)
    for log in (broker.log_text(), fleet_proxy.log_text()):  # no password the broker set is logged
        assert password not in log and vnc_secret(domain)[0] not in log


def test_a_domain_console_is_shared_by_looking_it_up_again(fleet, domains) -> None:
    """POST /sessions/{id}/viewers for a libvirt session: the domain is looked up again (its
    port and password are never stored); with per-console passwords the owner's token still
    opens after the share's lookup, since the password is kept while a console is outstanding."""
    broker, proxy = fleet
    domains("shared1")
    owner = broker.issuer.mint_domain("fresh", "shared1", ttl=120, single_use=False)
    viewer = broker.issuer.share(owner["session_id"], user="bob")
    assert viewer["expires_at"] <= owner["expires_at"]
    assert opens(proxy, viewer) and opens(proxy, owner)
    minted = next(e for e in broker.admin.audit(0, type_="minted") if e["session_id"] == viewer["session_id"])
    assert (minted["detail"]["vm"], minted["detail"]["view_only"]) == ("fresh/shared1", True)
    assert minted["detail"]["parent_session_id"] == owner["session_id"]


# --- refusals -------------------------------------------------------------------------------


def test_an_unknown_domain_is_404(fleet) -> None:
    broker, _ = fleet
    assert refused(lambda: broker.issuer.mint_domain("lab", "no-such-vm")) == (
        404,
        "domain_not_found",
        "hypervisor 'lab' has no domain 'no-such-vm'",
    )


def test_an_unknown_hypervisor_is_404(fleet) -> None:
    broker, _ = fleet
    assert refused(lambda: broker.issuer.mint_domain("nowhere", "web1"))[:2] == (404, "hypervisor_not_found")


def test_a_defined_but_stopped_domain_is_409(fleet, conn, floppy) -> None:
    broker, _ = fleet
    domain = conn.defineXML(domain_xml("sleeping", floppy=floppy, vnc_port=None, password="x"))
    try:
        assert refused(lambda: broker.issuer.mint_domain("lab", "sleeping")) == (
            409,
            "domain_not_running",
            "domain 'sleeping' is not running",
        )
    finally:
        domain.undefine()


def test_a_spice_only_domain_is_409_no_vnc_console(fleet, domains) -> None:
    broker, _ = fleet
    domains("spicy", graphics="spice")
    status, code, message = refused(lambda: broker.issuer.mint_domain("lab", "spicy"))
    assert (status, code) == (409, "no_vnc_console") and "graphics: spice" in message


def test_a_hypervisor_that_never_answers_is_503_and_the_broker_keeps_serving(
    fleet, hung_listener: socket.socket
) -> None:
    broker, _ = fleet
    outcome: list[tuple[int, str, str]] = []
    minting = threading.Thread(target=lambda: outcome.append(refused(lambda: broker.issuer.mint_domain("hung", "x"))))
    minting.start()
    hung_listener.settimeout(HUNG_TIMEOUT * 5)
    held, _ = hung_listener.accept()  # libvirt is now waiting for an answer that never comes
    try:
        assert broker.admin.openapi()["openapi"] == "3.0.3"  # meanwhile the broker answers others
        assert minting.is_alive()
        minting.join(HUNG_TIMEOUT * 10)
    finally:
        held.close()
    assert outcome and outcome[0][:2] == (503, "hypervisor_unavailable")
    assert "hung" in outcome[0][2] and "did not answer" in outcome[0][2]


def test_target_id_and_a_domain_together_are_400(fleet) -> None:
    broker, _ = fleet
    status, code, _ = refused(
        lambda: broker.issuer.request("POST", "/consoles", {"target_id": "t", "hypervisor": "lab", "domain": "web1"})
    )
    assert (status, code) == (400, "bad_request")


# --- libvirt's built-in test driver and the pure XML reading --------------------------------


def test_the_test_driver_answers_without_a_daemon() -> None:
    """test:///default's running domain 'test' has no graphics at all: 409 no_vnc_console."""
    with pytest.raises(HypervisorError) as caught:
        hypervisors.lookup(Hypervisor("t", "test:///default", None), "test")
    assert (caught.value.status, caught.value.code) == (409, "no_vnc_console")
    with pytest.raises(HypervisorError) as missing:
        hypervisors.lookup(Hypervisor("t", "test:///default", None), "nope")
    assert missing.value.code == "domain_not_found"


def _xml(graphics: str) -> str:
    return f"<domain><devices>{graphics}</devices></domain>"


@pytest.mark.parametrize(
    ("graphics", "host"),
    [
        (
            "<graphics type='vnc' port='5901' listen='10.0.0.5'><listen type='address' address='10.0.0.5'/></graphics>",
            "10.0.0.5",
        ),
        (
            "<graphics type='vnc' port='5901' listen='0.0.0.0'><listen type='address' address='0.0.0.0'/></graphics>",
            "hv1.example",
        ),
        ("<graphics type='vnc' port='5901' listen='::'/>", "hv1.example"),
        ("<graphics type='vnc' port='5901'/>", "hv1.example"),
    ],
)
def test_wildcard_and_missing_listen_addresses_use_the_registered_one(graphics: str, host: str) -> None:
    found = hypervisors.vnc_from_xml(_xml(graphics), Hypervisor("h", "qemu+tls://hv1/system", "hv1.example"), "d")
    assert (found.host, found.port) == (host, 5901)


def test_without_a_registered_address_a_wildcard_uses_the_uris_host() -> None:
    found = hypervisors.vnc_from_xml(
        _xml("<graphics type='vnc' port='5902' listen='0.0.0.0'/>"),
        Hypervisor("h", "qemu+ssh://root@hv2.example/system", None),
        "d",
    )
    assert found.host == "hv2.example"


def test_a_vnc_unix_socket_is_no_vnc_console() -> None:
    graphics = "<graphics type='vnc' socket='/run/vnc.sock'><listen type='socket' socket='/run/vnc.sock'/></graphics>"
    with pytest.raises(HypervisorError, match="unix socket") as caught:
        hypervisors.vnc_from_xml(_xml(graphics), Hypervisor("h", "qemu:///system", "hv"), "d")
    assert caught.value.code == "no_vnc_console"


# --- the registry on both engines -----------------------------------------------------------


def test_hypervisors_are_added_listed_and_removed(engine: str, database: str | None, tmp_path: Path) -> None:
    init_state_dir(tmp_path / "state", database=database)
    broker = Broker(tmp_path / "state", database=database)
    try:
        added = broker.add_hypervisor(
            {"name": "hv1", "uri": "qemu+tls://hv1.example/system", "address": "10.0.0.1"}, "test"
        )
        assert added["uri"] == "qemu+tls://hv1.example/system" and added["address"] == "10.0.0.1"
        with pytest.raises(ApiError) as twice:
            broker.add_hypervisor({"name": "hv1", "uri": "qemu:///system"}, "test")
        assert twice.value.code == "hypervisor_exists"
        with pytest.raises(ApiError) as bad:
            broker.add_hypervisor({"name": "hv2", "uri": "http://example/"}, "test")
        assert bad.value.code == "bad_request" and "libvirt" in bad.value.message
        assert [h["name"] for h in broker.list_hypervisors()["hypervisors"]] == ["hv1"]
        broker.delete_hypervisor("hv1", "test")
        assert broker.list_hypervisors() == {"hypervisors": []}
        with pytest.raises(ApiError) as gone:
            broker.delete_hypervisor("hv1", "test")
        assert gone.value.code == "hypervisor_not_found"
    finally:
        broker.close()


def test_rekeying_keeps_a_valid_password_for_outstanding_consoles_and_replaces_it_otherwise() -> None:
    now = 1_800_000_000.0
    graphics = "<graphics type='vnc' port='5901' passwd='{pw}' passwdValidTo='{to}'/>"
    valid = _xml(graphics.format(pw="keepme01", to="2027-01-15T08:00:00"))  # 1_800_000_000 + 0
    device, password = hypervisors.rekeyed_graphics(valid, "d", now - 10, now + 60, True)
    assert password == "keepme01" and 'passwdValidTo="2027-01-15T08:01:00"' in device and 'port="5901"' in device
    device, password = hypervisors.rekeyed_graphics(valid, "d", now - 10, now - 5, True)
    assert password == "keepme01" and "2027-01-15T07:59:55" in device  # cut back to what committed ones need
    device, password = hypervisors.rekeyed_graphics(valid, "d", now - 10, now + 60, False)
    assert password != "keepme01" and "2027-01-15T08:01:00" in device  # nothing committed outstanding: fresh
    device, password = hypervisors.rekeyed_graphics(valid, "d", now + 1, now + 60, True)
    assert password != "keepme01" and len(password) == hypervisors.PASSWORD_LENGTH  # expired: fresh
    fresh_a = hypervisors.rekeyed_graphics(
        _xml("<graphics type='vnc' port='5901' passwd='x'/>"), "d", now, now + 9, True
    )
    fresh_b = hypervisors.rekeyed_graphics(
        _xml("<graphics type='vnc' port='5901' passwd='x'/>"), "d", now, now + 9, True
    )
    assert "x" not in (fresh_a[1], fresh_b[1]) and fresh_a[1] != fresh_b[1]  # no validity: an admin's password


# --- per-console passwords across broker replicas -------------------------------------------

RACE_ROUNDS = 5
"""Rounds of simultaneous mints; each starts with no console outstanding, so every mint of a
round would set a fresh password if two replicas could rekey the domain at once."""
MINTS_PER_REPLICA = 3
SHORT_TTL = 4


@pytest.fixture
def replicas(
    engine: str, database: str | None, tmp_path: Path, daemon: Libvirtd
) -> Iterator[tuple[BrokerProcess, BrokerProcess, ProxyProcess, BrokerState]]:
    """Two ``console-broker serve`` processes on one database (one SQLite file, or one PostgreSQL
    database), a hypervisor with per-console passwords, and a proxy linked to the first."""
    shared = database or f"sqlite:///{tmp_path / 'shared.db'}"
    state = BrokerState.create(tmp_path / "a", shared)
    broker = state.open()
    try:
        broker.add_hypervisor({"name": "fresh", "uri": daemon.uri, "console_passwords": True}, "test")
    finally:
        broker.close()
    a = start_broker(state)
    b = start_broker(state.replica(tmp_path / "b"))
    fleet_proxy = start_linked_proxy(tmp_path, a, "p1")
    try:
        healthy_proxies(a, 1)
        healthy_proxies(b, 1)
        yield a, b, fleet_proxy, state
    finally:
        fleet_proxy.stop()
        b.stop()
        a.stop()


def vnc_accepts(proxy: ProxyProcess, token: str) -> bool:
    """True once the VNC server accepted the token's password, False on 4501; anything else fails."""
    code = handshake_refusal(proxy, token)
    if code is None:
        return True
    assert code == TARGET_AUTH_FAILED, f"refused for another reason: {code}"
    return False


def mint_at_once(replicas: list[BrokerProcess], domain: str, **options: Any) -> list[dict[str, Any]]:
    """One mint per entry of ``replicas``, all released by one barrier; every one must succeed."""
    start = threading.Barrier(len(replicas))
    minted: list[dict[str, Any]] = []
    failed: list[BaseException] = []

    def one(replica: BrokerProcess) -> None:
        start.wait()
        try:
            minted.append(replica.issuer.mint_domain("fresh", domain, **options))
        except BaseException as exc:
            failed.append(exc)

    threads = [threading.Thread(target=one, args=(replica,)) for replica in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failed, failed
    return minted


def test_replicas_minting_for_one_domain_at_once_give_tokens_that_all_open(replicas, domains, proxy, mint) -> None:
    a, b, fleet_proxy, _ = replicas
    domain = domains("raced", password="initial1")
    port = vnc_port(domain)

    def direct(password: str) -> str:
        return mint(host="127.0.0.1", port=port, password=password, ttl=300)

    seen: list[str] = []
    for _ in range(RACE_ROUNDS):
        minted = mint_at_once([a, b] * MINTS_PER_REPLICA, "raced", ttl=120)
        password = vnc_secret(domain)[0]
        assert password and password not in seen  # nothing was outstanding: a fresh one
        seen.append(password)
        assert [vnc_accepts(fleet_proxy, m["token"]) for m in minted] == [True] * len(minted)  # no 4501
        for m in minted:  # nothing outstanding for the next round
            b.admin.revoke(m["session_id"])
    assert not any(vnc_accepts(proxy, direct(old)) for old in seen[:-1])  # replaced passwords open nothing

    last = mint_at_once([a, b] * MINTS_PER_REPLICA, "raced", ttl=SHORT_TTL)
    password = vnc_secret(domain)[0]
    assert password is not None and password not in seen
    assert [vnc_accepts(fleet_proxy, m["token"]) for m in last] == [True] * len(last)
    wait_for(lambda: not vnc_accepts(proxy, direct(password)), 20.0, 0.25, "the round's password to expire")
    assert time.time() >= max(m["expires_at"] for m in last) - 1  # with the last console, not before


def test_a_mint_that_fails_after_the_password_was_set_extends_nothing(replicas, domains, proxy, mint) -> None:
    """The session's INSERT is rolled back (its audit row fails, in the same transaction) after
    the password was set: the validity goes back to what the committed console needs; with none
    committed, the password set is replaced by one already expired."""
    a, _, fleet_proxy, state = replicas
    domain = domains("failing", password="initial1")
    port = vnc_port(domain)
    committed = a.issuer.mint_domain("fresh", "failing", ttl=120, single_use=False)
    before = vnc_secret(domain)
    service = state.open()
    issuer = next(p for p in service.list_apikeys()["apikeys"] if p["role"] == "issuer")

    def audit_fails(*_args: Any, **_kwargs: Any) -> None:  # an error the engine's driver raises
        raise service.store.engine.unavailable_errors[0]("disk I/O error (forced by the test)")

    service.store.append_audit = audit_fails  # type: ignore[method-assign]
    body = {"hypervisor": "fresh", "domain": "failing", "ttl": 3000}
    principal = Principal(issuer["key_id"], issuer["name"], "issuer")
    try:
        with pytest.raises(StoreUnavailable):
            asyncio.run(service.create_console(principal, body))
        assert vnc_secret(domain) == before  # not stretched to the failed console's exp
        assert vnc_accepts(fleet_proxy, committed["token"])  # and the committed console still opens

        a.admin.revoke(committed["session_id"])
        with pytest.raises(StoreUnavailable):
            asyncio.run(service.create_console(principal, body))
        password, valid_to = vnc_secret(domain)
        assert password not in (None, before[0]) and valid_to
        assert time.strptime(valid_to, "%Y-%m-%dT%H:%M:%S") < time.gmtime()  # expired already
        assert not vnc_accepts(proxy, mint(host="127.0.0.1", port=port, password=password, ttl=60))
        assert not vnc_accepts(proxy, mint(host="127.0.0.1", port=port, password=before[0], ttl=60))
    finally:
        service.close()


def test_a_mint_waits_for_the_domains_rekey_lock_only_until_its_deadline(replicas, domains) -> None:
    """Another replica holds the domain's lock (here: the test): 503 hypervisor_unavailable once
    the mint's deadline has passed, and the domain's password untouched."""
    _, _, _, state = replicas
    domain = domains("locked", password="initial1")
    holder = state.open()
    service = Broker(state.root, config=BrokerConfig(hypervisor_timeout=1.0), database=state.database)
    issuer = next(p for p in service.list_apikeys()["apikeys"] if p["role"] == "issuer")
    principal = Principal(issuer["key_id"], issuer["name"], "issuer")
    try:
        with holder.store.console_lock(f"fresh/{domain.UUIDString()}", time.time(), 60) as got:
            assert got
            with pytest.raises(ApiError) as caught:
                asyncio.run(service.create_console(principal, {"hypervisor": "fresh", "domain": "locked"}))
        assert (caught.value.status, caught.value.code) == (503, "hypervisor_unavailable")
        assert "another mint" in caught.value.message
        assert vnc_secret(domain) == ("initial1", None)
    finally:
        service.close()
        holder.close()


def test_a_console_lock_has_one_holder_and_a_dead_holders_lock_is_freed(
    engine: str, database: str | None, tmp_path: Path
) -> None:
    root = init_state_dir(tmp_path / "state", database=database)
    first, second = Broker(root, database=database), Broker(root, database=database)
    try:
        with first.store.console_lock("h/one", time.time(), 60) as got:
            assert got
            with second.store.console_lock("h/one", time.time(), 60) as again:
                assert not again
            with second.store.console_lock("h/two", time.time(), 60) as other:
                assert other  # one lock per domain
        with second.store.console_lock("h/one", time.time(), 60) as after:
            assert after  # released with the block
        held = first.store.engine.try_console_lock("h/dead", time.time(), 60)  # never released
        assert held is not None
        with second.store.console_lock("h/dead", time.time(), 60) as got:
            assert not got
        if engine == "sqlite":  # its lease runs out
            with second.store.console_lock("h/dead", time.time() + 61, 60) as got:
                assert got
        else:  # PostgreSQL: the session's lock goes with its connection, once the server has seen it close

            def claimable() -> bool:
                with second.store.console_lock("h/dead", time.time(), 60) as got:
                    return got

            held[1].close()
            wait_for(claimable, 10.0, 0.05, "the closed session's advisory lock to be released")
    finally:
        first.close()
        second.close()
