"""Certificate files reloaded without a restart (SIGHUP), on the proxy's wss listener and the
broker's HTTPS, with real processes.

Each test starts a server on copies of a certificate from one CA, swaps the files for a
certificate from another CA and sends SIGHUP. The client trusts both CAs, so what tells the two
certificates apart is the fingerprint of the one the TLS handshake shows: a new connection must
show the new one while a console opened before keeps relaying. Files that are garbage, or a key
that is not the certificate's, keep the old certificate in service with one warning line.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import ssl
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from brokerproc import BrokerState, start_broker
from proxyproc import ProxyProcess
from rfbclient import Console
from tornado.httpclient import HTTPClient, HTTPRequest
from tornado.websocket import websocket_connect
from xvnc import TestPki, XvncServer, make_test_pki

from console_proxy.metrics import CERTIFICATE_EXPIRY

TIMEOUT = 10.0
WARNING = "not reloaded"


@pytest.fixture
def two_pkis(tmp_path: Path) -> tuple[TestPki, TestPki]:
    return make_test_pki(tmp_path / "first"), make_test_pki(tmp_path / "second", common_name="second CA")


@pytest.fixture
def live(tmp_path: Path, two_pkis: tuple[TestPki, TestPki]) -> tuple[Path, Path]:
    """The files the server is given: copies of the first certificate, replaced by the tests."""
    (tmp_path / "live").mkdir()
    cert, key = tmp_path / "live" / "cert.pem", tmp_path / "live" / "key.pem"
    install(cert, key, two_pkis[0].cert_path, two_pkis[0].key_path)
    return cert, key


@pytest.fixture
def trust_both(two_pkis: tuple[TestPki, TestPki]) -> ssl.SSLContext:
    """A verifying client (chain and 127.0.0.1) that accepts either CA."""
    return ssl.create_default_context(cadata=two_pkis[0].ca_pem + two_pkis[1].ca_pem)


def install(cert: Path, key: Path, new_cert: Path | bytes, new_key: Path | bytes) -> None:
    """Replace the files the way an operator (or certbot) does: written aside, then renamed."""
    for target, source in ((cert, new_cert), (key, new_key)):
        aside = target.with_suffix(".new")
        aside.write_bytes(source if isinstance(source, bytes) else source.read_bytes())
        aside.chmod(0o600)
        os.replace(aside, target)


def pem_fingerprint(path: Path) -> str:
    """As the logs show it: ``openssl x509 -fingerprint -sha256``'s ``AB:CD:…``."""
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(path.read_text())).digest().hex(":").upper()


def served_fingerprint(port: int, context: ssl.SSLContext) -> str:
    """The SHA-256 of the certificate a new verified TLS connection to 127.0.0.1:port is shown."""

    async def handshake() -> str:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        await writer.wait_closed()
        return hashlib.sha256(der).digest().hex(":").upper()

    return asyncio.run(asyncio.wait_for(handshake(), TIMEOUT))


def expiry_metric(base: str, context: ssl.SSLContext, use: str) -> float:
    body = HTTPClient().fetch(HTTPRequest(f"{base}/metrics", ssl_options=context)).body.decode()
    line = next(line for line in body.splitlines() if line.startswith(f'{CERTIFICATE_EXPIRY}{{use="{use}"}}'))
    return float(line.rsplit(" ", 1)[1])


def cert_expiry(path: Path) -> float:
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc.timestamp()


def reload_and_wait(process: ProxyProcess, needle: str) -> str:
    """SIGHUP, then the new log line with ``needle`` that says how the reload went."""
    before = process.count_log(needle)
    process.signal(signal.SIGHUP)
    return process.wait_for_count(needle, before + 1)


FULL_REQUEST = struct.pack(">BBHHHH", 3, 0, 0, 0, 64, 64)


async def open_console(port: int, tok: str, context: ssl.SSLContext) -> Console:
    request = HTTPRequest(
        f"wss://127.0.0.1:{port}/websockify",
        headers={"Sec-WebSocket-Protocol": f"binary, token.{tok}"},
        ssl_options=context,
        request_timeout=TIMEOUT,
    )
    console = Console(await websocket_connect(request))
    await console.handshake()
    return console


async def relays(console: Console) -> bool:
    """One framebuffer update asked for and its header received: the session still relays."""
    await console.send(FULL_REQUEST)
    while (kind := (await console.read(1))[0]) != 0:
        assert kind in (2, 3), kind
        if kind == 3:
            await console.read(struct.unpack(">3xI", await console.read(7))[0])
    await console.read(3)
    return True


def test_sighup_gives_new_wss_connections_the_new_certificate_and_keeps_open_sessions(
    proxy_factory: Callable[..., ProxyProcess],
    live: tuple[Path, Path],
    two_pkis: tuple[TestPki, TestPki],
    trust_both: ssl.SSLContext,
    mint: Callable[..., str],
    xvnc_none: XvncServer,
) -> None:
    cert, key = live
    first, second = two_pkis
    proxy = proxy_factory("--tls-cert", str(cert), "--tls-key", str(key))
    base = f"https://127.0.0.1:{proxy.port}"
    assert served_fingerprint(proxy.port, trust_both) == pem_fingerprint(first.cert_path)
    assert expiry_metric(base, trust_both, "wss") == cert_expiry(first.cert_path)
    tok = mint(host="127.0.0.1", port=xvnc_none.port, vm="reload")

    async def scenario() -> tuple[str, bool, bool]:
        console = await open_console(proxy.port, tok, trust_both)
        assert await relays(console)
        install(cert, key, second.cert_path, second.key_path)
        line = await asyncio.to_thread(reload_and_wait, proxy, "reloaded:")
        still = await relays(console)  # the session opened on the old certificate
        fresh = await open_console(proxy.port, tok, trust_both)
        fresh_relays = await relays(fresh)
        console.close()
        fresh.close()
        return line, still, fresh_relays

    line, still, fresh_relays = asyncio.run(asyncio.wait_for(scenario(), 3 * TIMEOUT))
    assert "TLS certificate for wss reloaded: SHA256 " + pem_fingerprint(second.cert_path) in line
    assert still and fresh_relays
    assert served_fingerprint(proxy.port, trust_both) == pem_fingerprint(second.cert_path)
    assert expiry_metric(base, trust_both, "wss") == cert_expiry(second.cert_path)


@pytest.mark.parametrize("bad", ["garbage", "truncated", "other key", "missing"])
def test_unusable_files_on_sighup_keep_the_old_certificate_with_one_warning(
    proxy_factory: Callable[..., ProxyProcess],
    live: tuple[Path, Path],
    two_pkis: tuple[TestPki, TestPki],
    trust_both: ssl.SSLContext,
    bad: str,
) -> None:
    cert, key = live
    first, second = two_pkis
    proxy = proxy_factory("--tls-cert", str(cert), "--tls-key", str(key))
    if bad == "garbage":
        install(cert, key, b"\x00not a certificate\n" * 10, second.key_path)
    elif bad == "truncated":  # a copy caught half-way
        install(cert, key, second.cert_path.read_bytes()[:300], second.key_path)
    elif bad == "other key":
        install(cert, key, second.cert_path, first.key_path)
    else:
        cert.unlink()
    line = reload_and_wait(proxy, WARNING)
    assert "TLS certificate for wss not reloaded, still serving SHA256 " + pem_fingerprint(first.cert_path) in line
    assert served_fingerprint(proxy.port, trust_both) == pem_fingerprint(first.cert_path)
    text = proxy.log_text()
    assert text.count(WARNING) == 1, text
    assert "PRIVATE KEY" not in text and "BEGIN" not in text
    for secret in (first.key_path.read_text(), second.key_path.read_text()):
        body = "".join(secret.splitlines()[1:-1])
        assert body[:40] not in text.replace("\n", "")


def test_sighup_reloads_the_brokers_https_certificate(
    tmp_path: Path, live: tuple[Path, Path], two_pkis: tuple[TestPki, TestPki], trust_both: ssl.SSLContext
) -> None:
    cert, key = live
    first, second = two_pkis
    state = BrokerState.create(tmp_path / "broker")
    broker = start_broker(state, "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        base = f"https://127.0.0.1:{broker.port}"
        assert served_fingerprint(broker.port, trust_both) == pem_fingerprint(first.cert_path)
        install(cert, key, second.cert_path, second.key_path)
        line = reload_and_wait(broker, "reloaded:")
        assert "TLS certificate for https reloaded" in line
        assert served_fingerprint(broker.port, trust_both) == pem_fingerprint(second.cert_path)
        assert expiry_metric(base, trust_both, "https") == cert_expiry(second.cert_path)
        shutil.copy(first.cert_path, key)  # a certificate where the key belongs
        assert "still serving SHA256 " + pem_fingerprint(second.cert_path) in reload_and_wait(broker, WARNING)
        assert served_fingerprint(broker.port, trust_both) == pem_fingerprint(second.cert_path)
    finally:
        broker.stop()


def test_sighup_reaches_the_tls_listener_behind_the_proxy_protocol(
    proxy_factory: Callable[..., ProxyProcess],
    live: tuple[Path, Path],
    two_pkis: tuple[TestPki, TestPki],
    trust_both: ssl.SSLContext,
) -> None:
    """With --proxy-protocol the TLS connections are accepted by console_proxy.tlsdoor, not by
    Tornado's listener: the reload must reach them too (a peer not trusted sends TLS directly)."""
    cert, key = live
    first, second = two_pkis
    proxy = proxy_factory(
        "--tls-cert", str(cert), "--tls-key", str(key), "--proxy-protocol", "--trusted-proxy", "192.0.2.0/24"
    )
    assert served_fingerprint(proxy.port, trust_both) == pem_fingerprint(first.cert_path)
    install(cert, key, second.cert_path, second.key_path)
    reload_and_wait(proxy, "reloaded:")
    assert served_fingerprint(proxy.port, trust_both) == pem_fingerprint(second.cert_path)


def test_every_reloaded_context_gets_the_listeners_other_settings(
    live: tuple[Path, Path], two_pkis: tuple[TestPki, TestPki], caplog: pytest.LogCaptureFixture
) -> None:
    """``prepare`` (e.g. asking for client certificates of a CA) is applied to the first context
    and to each reloaded one, since a connection moved to a new context takes its settings; one
    that fails keeps the old context like unusable files do."""
    from console_proxy.certfiles import CertificateFiles

    cert, key = live
    trusted = two_pkis[0].ca_pem

    def ask_client_certificates(context: ssl.SSLContext) -> None:
        context.verify_mode = ssl.CERT_OPTIONAL
        context.load_verify_locations(cadata=trusted)

    files = CertificateFiles(str(cert), str(key), "https", prepare=ask_client_certificates)
    first = files.current
    install(cert, key, two_pkis[1].cert_path, two_pkis[1].key_path)
    assert files.reload() and files.current is not first
    assert files.current.context.verify_mode == ssl.CERT_OPTIONAL
    assert files.current.context.cert_store_stats()["x509_ca"] == 1
    trusted = "not a certificate"
    assert not files.reload()
    assert files.current.context.verify_mode == ssl.CERT_OPTIONAL
    assert [r.getMessage() for r in caplog.records if "could not be applied" in r.getMessage()]
