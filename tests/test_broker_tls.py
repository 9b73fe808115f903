"""Broker traffic carries the fleet keys: HTTPS with a verified certificate, or plain http to this host only."""

from __future__ import annotations

import asyncio
from pathlib import Path

from brokerproc import BrokerState, start_broker
from proxyproc import free_port, serve_linked, start_proxy
from rfbclient import Console

from broker.client import BrokerClient


def test_proxy_links_to_an_https_broker_it_verifies(tmp_path: Path, test_pki, xvnc_vncauth) -> None:
    state = BrokerState.create(tmp_path / "state")
    broker = start_broker(state, "--tls-cert", str(test_pki.cert_path), "--tls-key", str(test_pki.key_path))
    port = free_port()
    credential = state.add_proxy("tls-proxy", f"http://127.0.0.1:{port}")
    proxy = start_proxy(
        tmp_path,
        None,
        "--broker",
        f"https://127.0.0.1:{broker.port}",
        "--broker-ca",
        str(test_pki.ca_path),
        "--proxy-credential",
        str(credential),
        "--heartbeat-interval",
        "0.5",
        "--public-url",
        f"http://127.0.0.1:{port}",
        port=port,
    )
    try:
        assert "(https," in broker.wait_for_log("console-broker listening")
        admin = BrokerClient(f"https://127.0.0.1:{broker.port}", state.admin_key, ca_file=str(test_pki.ca_path))
        target = admin.add_target(
            name="tls-vm", host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password
        )
        console = BrokerClient(
            f"https://127.0.0.1:{broker.port}", state.issuer_key, ca_file=str(test_pki.ca_path)
        ).mint(target["id"])

        async def scenario() -> bytes:
            viewer = await Console.open(proxy.ws_url, console["token"])  # single use: redeemed over HTTPS
            info = await viewer.handshake()
            viewer.close()
            return info.name

        assert asyncio.run(scenario()) == b"tls-vm"
    finally:
        proxy.stop()
        broker.stop()


def test_proxy_refuses_a_broker_certificate_it_cannot_verify(tmp_path: Path, test_pki) -> None:
    state = BrokerState.create(tmp_path / "state")
    broker = start_broker(state, "--tls-cert", str(test_pki.cert_path), "--tls-key", str(test_pki.key_path))
    credential = state.add_proxy("unsure", "http://127.0.0.1:1")
    try:
        # no --broker-ca: the system CAs do not know the test CA
        result = serve_linked(f"https://127.0.0.1:{broker.port}", credential, timeout=30)
    finally:
        broker.stop()
    assert result.returncode == 1
    assert "console-proxy: error: cannot start: no keyring from the broker" in result.stderr
    assert "Traceback" not in result.stderr


def test_proxy_refuses_plain_http_to_a_remote_broker(tmp_path: Path) -> None:
    credential = tmp_path / "cred.json"
    credential.write_text('{"proxy_id": "p", "secret": "s"}')
    result = serve_linked("http://192.0.2.10:8080", credential, timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "console-proxy: error: --broker 'http://192.0.2.10:8080' must be an https:// URL (plain http only to this host)"
    ]
