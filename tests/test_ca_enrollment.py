"""Proxies and the broker's CA, with real processes over real TLS: enrollment with a one-time
join token that pins the CA, mutual TLS from proxy to broker, renewal with no restart, and
revocation (``ca revoke``, ``proxy remove``) from the next request on."""

from __future__ import annotations

import asyncio
import json
import ssl
import stat
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from brokerproc import BrokerProcess, BrokerState, healthy_proxies, start_broker, wait_for
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from proxyproc import free_port, run_python, start_proxy

from broker import ca, hostcerts
from broker.cli import main as broker_main
from broker.client import BrokerClient
from console_proxy import identity
from console_proxy.identity import Identity

FILES = ("ca-cert.pem", "proxy-cert.pem", "proxy-key.pem", "proxy.json")


def https_files(state: BrokerState, directory: Path) -> tuple[Path, Path]:
    """The broker's HTTPS certificate for 127.0.0.1, from its own CA (what --tls-auto will do)."""
    broker = state.open()
    try:
        cert, key = hostcerts.new_leaf(
            broker,
            common_name="127.0.0.1",
            names=["127.0.0.1"],
            client_auth=False,
            server_auth=True,
            lifetime=3600,
            now=time.time(),
        )
    finally:
        broker.close()
    directory.mkdir(exist_ok=True)
    (directory / "broker-cert.pem").write_text(ca.cert_pem(cert))
    (directory / "broker-key.pem").write_bytes(ca.key_pem(key))
    return directory / "broker-cert.pem", directory / "broker-key.pem"


class HttpsBroker(BrokerProcess):
    """A broker serving HTTPS with a certificate of its own CA; its clients verify it."""

    ca_file: Path

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def client(self, key: str | None = None) -> BrokerClient:
        return BrokerClient(self.base, key, ca_file=str(self.ca_file))


def start_https_broker(state: BrokerState, *extra: str) -> tuple[HttpsBroker, str]:
    directory = state.root.parent / f"tls-{state.root.name}"
    cert, key = https_files(state, directory)
    broker = start_broker(state, "--tls-cert", str(cert), "--tls-key", str(key), *extra)
    broker.__class__ = HttpsBroker
    assert isinstance(broker, HttpsBroker)
    broker.ca_file = directory / "ca.pem"
    opened = state.open()
    try:
        broker.ca_file.write_text(ca.cert_pem(opened.ca.certificate()))
    finally:
        opened.close()
    return broker, broker.base


def add_proxy(state: BrokerState, name: str, public_url: str, capsys: pytest.CaptureFixture[str]) -> str:
    """``console-broker proxy add`` without --out: its join token, the last line printed."""
    capsys.readouterr()
    args = ["proxy", "add", name, "--public-url", public_url, "--state-dir", str(state.root)]
    assert broker_main([*args, *(["--database", state.database] if state.database else [])]) == 0
    return capsys.readouterr().out.strip().splitlines()[-1]


def enroll(base: str, token: str, state_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``console-proxy enroll`` as a real process."""
    return run_python(
        "-m",
        "console_proxy.cli",
        "enroll",
        "--broker",
        base,
        "--join-token",
        token,
        "--state-dir",
        str(state_dir),
        *extra,
    )


def client_context(cert_pem: bytes, key_pem: bytes, ca_pem: bytes, tmp: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca_pem.decode())
    (tmp / "c.pem").write_bytes(cert_pem)
    (tmp / "k.pem").write_bytes(key_pem)
    context.load_cert_chain(tmp / "c.pem", tmp / "k.pem")
    return context


def call(base: str, path: str, context: ssl.SSLContext, body: Any = None, bearer: str | None = None) -> tuple[int, Any]:
    """One API request with ``context``'s client certificate; (status, JSON answer)."""
    request = urllib.request.Request(
        base + "/api/v1" + path,
        data=json.dumps(body).encode() if body is not None else None,
        method="POST" if body is not None else "GET",
        headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {bearer}"} if bearer else {})},
    )
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def heartbeat(proxy_id: str) -> dict[str, Any]:
    return {"proxy_id": proxy_id, "public_url": None, "sessions": 0, "capacity": 1, "draining": False, "version": 0}


def enrolled_in_process(state: BrokerState, name: str, directory: Path, *, issued_ago: float = 0.0) -> Identity:
    """An enrolled state dir made in-process (the CLI path is tested on its own), its certificate
    issued ``issued_ago`` seconds in the past with the broker's lifetime for it."""
    broker = state.open()
    try:
        token = broker.new_join_token(name, "test")
        key = identity.new_key()
        answer = broker.enrollment.enroll(
            token,
            identity.make_csr(key, name).decode(),
            lifetime=60 if issued_ago else 3600,
            now=time.time() - issued_ago,
        )
    finally:
        broker.close()
    done = Identity(directory, name, (), answer["ca"].encode(), answer["certificate"].encode(), identity.key_pem(key))
    done.save()
    return done


@pytest.fixture
def https_broker(tmp_path: Path) -> Any:
    state = BrokerState.create(tmp_path / "state")
    broker, base = start_https_broker(state)
    yield state, broker, base
    broker.stop()


def test_enroll_then_serve_over_mutual_tls(
    https_broker: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state, broker, base = https_broker
    port = free_port()
    token = add_proxy(state, "edge-1", f"http://127.0.0.1:{port}", capsys)
    assert token.startswith("cgj1.")
    done = enroll(base, token, tmp_path / "proxy-state")
    assert done.returncode == 0, done.stderr
    assert "enrolled proxy edge-1" in done.stdout
    for name in FILES:
        assert stat.S_IMODE((tmp_path / "proxy-state" / name).stat().st_mode) == 0o600
    meta = json.loads((tmp_path / "proxy-state" / "proxy.json").read_text())
    assert meta == {"proxy_id": "edge-1", "brokers": [base]}
    cert = x509.load_pem_x509_certificate((tmp_path / "proxy-state" / "proxy-cert.pem").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "edge-1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    life = cert.not_valid_after_utc.timestamp() - cert.not_valid_before_utc.timestamp() - ca.BACKDATE
    assert abs(life - 7 * 86400) < 5  # the default --cert-lifetime

    again = enroll(base, token, tmp_path / "again")  # one use only
    assert again.returncode == 1 and "join_token_used" in again.stderr
    assert not (tmp_path / "again").exists()

    proxy = start_proxy(
        tmp_path,
        None,
        "--state-dir",
        str(tmp_path / "proxy-state"),
        "--public-url",
        f"http://127.0.0.1:{port}",
        "--heartbeat-interval",
        "0.5",
        port=port,
    )
    try:
        healthy_proxies(broker, 1)  # heartbeats over mutual TLS: no bearer credential exists for it
    finally:
        proxy.stop()
    audit = broker.admin.audit(0, "cert_issued")
    assert [e["detail"]["proxy_id"] for e in audit] == ["edge-1"]
    assert audit[0]["detail"]["serial"] == ca.serial_hex(cert.serial_number)
    assert token not in broker.log_text() and token.split(".", 1)[1] not in proxy.log_text()


def test_enroll_refuses_a_broker_whose_ca_is_not_the_pinned_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ours = BrokerState.create(tmp_path / "ours")
    theirs = BrokerState.create(tmp_path / "theirs")
    token = add_proxy(ours, "edge", "http://127.0.0.1:1", capsys)
    add_proxy(theirs, "edge", "http://127.0.0.1:1", capsys)
    impostor, base = start_https_broker(theirs)
    try:
        done = enroll(base, token, tmp_path / "d")
        assert done.returncode == 1 and "refusing the broker" in done.stderr and "nothing was sent" in done.stderr
        assert not (tmp_path / "d").exists()
        log = impostor.log_text()
        assert "GET /api/v1/ca" in log and "/proxy/enroll" not in log  # the token never left the proxy
    finally:
        impostor.stop()
    plain = start_broker(theirs)  # plain http on loopback: the same pin, the same refusal
    try:
        done = enroll(plain.base, token, tmp_path / "d")
        assert done.returncode == 1 and "refusing the broker" in done.stderr
        assert "/proxy/enroll" not in plain.log_text()
    finally:
        plain.stop()


def test_bad_join_tokens_are_refused_each_with_its_code(
    https_broker: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state, _, base = https_broker
    token = add_proxy(state, "edge", "http://127.0.0.1:1", capsys)
    malformed = enroll(base, "cgj1.not-json", tmp_path / "d")
    assert malformed.returncode == 1 and "join_token_malformed" in malformed.stderr
    opened = state.open()
    try:
        with opened.store.transaction() as conn:
            conn.execute("UPDATE join_tokens SET expires_at = 0")
    finally:
        opened.close()
    expired = enroll(base, token, tmp_path / "d")
    assert expired.returncode == 1 and "join_token_expired" in expired.stderr
    forged = token[:-6] + ("A" if token[-6] != "A" else "B") + token[-5:]
    status, answer = call(base, "/proxy/enroll", _anonymous(base, state), {"join_token": forged, "csr": _csr("edge")})
    assert status in (400, 401) and answer["error"] in ("join_token_invalid", "join_token_malformed")
    assert not (tmp_path / "d").exists()


def _anonymous(base: str, state: BrokerState) -> ssl.SSLContext:
    opened = state.open()
    try:
        return ssl.create_default_context(cadata=ca.cert_pem(opened.ca.certificate()))
    finally:
        opened.close()


def _csr(cn: str, *, dns: tuple[str, ...] = (), curve: ec.EllipticCurve | None = None) -> str:
    key = ec.generate_private_key(curve or ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    if dns:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def test_bad_csrs_are_refused_and_do_not_spend_the_token(https_broker: Any, capsys: pytest.CaptureFixture[str]) -> None:
    state, broker, base = https_broker
    token = add_proxy(state, "edge", "https://edge.example.com:8443", capsys)
    context = _anonymous(base, state)
    for csr, status, code in (
        (_csr("edge", curve=ec.SECP384R1()), 400, "csr_key_not_p256"),
        (_csr("edge", dns=("evil.example.net",)), 403, "csr_names"),
        (_csr("other-proxy"), 403, "csr_names"),
        ("-----BEGIN CERTIFICATE REQUEST-----\n" + "A" * 9000 + "\n", 400, "csr_too_large"),
        ("garbage", 400, "csr_malformed"),
    ):
        answer = call(base, "/proxy/enroll", context, {"join_token": token, "csr": csr})
        assert answer[0] == status and answer[1]["error"] == code, answer
    status, issued = call(
        base, "/proxy/enroll", context, {"join_token": token, "csr": _csr("edge", dns=("EDGE.example.com",))}
    )
    assert status == 200, issued
    cert = x509.load_pem_x509_certificate(issued["certificate"].encode())
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    ) == ["edge.example.com"]
    assert broker.admin.audit(0, "cert_issued")[0]["detail"]["serial"] == issued["serial"]
    assert " 500 " not in broker.log_text()


def test_mutual_tls_bearer_require_mtls_other_ca_expired_and_revoked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = BrokerState.create(tmp_path / "state")
    bearer_file = state.add_proxy("old", "http://127.0.0.1:1")
    bearer = json.loads(bearer_file.read_text())
    add_proxy(state, "edge", "http://127.0.0.1:2", capsys)
    edge = enrolled_in_process(state, "edge", tmp_path / "edge")
    broker, base = start_https_broker(state)
    try:
        mtls = client_context(edge.cert_pem, edge.key_pem, edge.ca_pem, tmp_path)
        assert call(base, "/proxy/heartbeat", mtls, heartbeat("edge"))[0] == 200
        anonymous = ssl.create_default_context(cadata=edge.ca_pem.decode())
        token = f"{bearer['proxy_id']}.{bearer['secret']}"
        assert call(base, "/proxy/heartbeat", anonymous, heartbeat("old"), bearer=token)[0] == 200  # upgrades
        status, answer = call(base, "/proxy/renew", anonymous, {"csr": _csr("old")}, bearer=token)
        assert (status, answer["error"]) == (403, "mtls_required")

        # another CA's certificate, or an expired one of ours: refused in the handshake
        other = ca.create_ca(time.time())
        key = ca.new_key()
        foreign = ca.issue(
            *other,
            key.public_key(),
            common_name="edge",
            client_auth=True,
            server_auth=False,
            lifetime=600,
            now=time.time(),
        )
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            call(
                base,
                "/proxy/heartbeat",
                client_context(ca.cert_pem(foreign).encode(), ca.key_pem(key), edge.ca_pem, tmp_path),
                heartbeat("edge"),
            )
        old = enrolled_in_process(state, "edge", tmp_path / "expired", issued_ago=3600)
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            call(
                base,
                "/proxy/heartbeat",
                client_context(old.cert_pem, old.key_pem, old.ca_pem, tmp_path),
                heartbeat("edge"),
            )

        # ca revoke SERIAL: refused from the next request on
        serial = ca.serial_hex(edge.certificate.serial_number)
        capsys.readouterr()
        assert broker_main(["ca", "revoke", serial.upper(), "--state-dir", str(state.root)]) == 0
        assert f"revoked certificate {serial}" in capsys.readouterr().out
        status, answer = call(base, "/proxy/heartbeat", mtls, heartbeat("edge"))
        assert (status, answer["error"]) == (401, "certificate_revoked")
        assert broker_main(["ca", "revoke", serial, "--state-dir", str(state.root)]) == 1
        assert "revoked already" in capsys.readouterr().err
        assert broker_main(["ca", "revoke", "zz", "--state-dir", str(state.root)]) == 1
        revoked = broker.admin.audit(0, "cert_revoked")
        assert [(e["detail"]["serial"], e["actor"]) for e in revoked] == [(serial, "cli")]
    finally:
        broker.stop()

    strict, base = start_https_broker(state, "--require-mtls")
    try:
        status, answer = call(base, "/proxy/heartbeat", anonymous, heartbeat("old"), bearer=token)
        assert (status, answer["error"]) == (401, "mtls_required")
        fresh = enrolled_in_process(state, "edge", tmp_path / "fresh")
        fresh_context = client_context(fresh.cert_pem, fresh.key_pem, fresh.ca_pem, tmp_path)
        assert call(base, "/proxy/heartbeat", fresh_context, heartbeat("edge"))[0] == 200
        # proxy remove: its certificates are revoked with it (audited), refused from the next request
        assert broker_main(["proxy", "remove", "edge", "--state-dir", str(state.root)]) == 0
        status, answer = call(base, "/proxy/heartbeat", fresh_context, heartbeat("edge"))
        assert (status, answer["error"]) == (401, "certificate_revoked")
        reasons = [e["detail"].get("reason") for e in strict.admin.audit(0, "cert_revoked")]
        assert reasons.count("proxy_removed") >= 1
        assert " 500 " not in strict.log_text() and "Traceback" not in strict.log_text()
    finally:
        strict.stop()


def test_renewal_at_two_thirds_with_no_restart_and_no_session_dropped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], xvnc_vncauth: Any
) -> None:
    state = BrokerState.create(tmp_path / "state")
    port = free_port()
    add_proxy(state, "edge", f"http://127.0.0.1:{port}", capsys)
    first = enrolled_in_process(state, "edge", tmp_path / "edge", issued_ago=30)  # lifetime 60: renew at 40
    broker, base = start_https_broker(state, "--cert-lifetime", "60")
    proxy = start_proxy(
        tmp_path,
        None,
        "--state-dir",
        str(tmp_path / "edge"),
        "--broker",
        base,
        "--public-url",
        f"http://127.0.0.1:{port}",
        "--heartbeat-interval",
        "0.5",
        port=port,
    )
    try:
        healthy_proxies(broker, 1)
        target = broker.admin.add_target(
            name="renew-vm", host="127.0.0.1", port=xvnc_vncauth.port, password=xvnc_vncauth.password
        )
        console = broker.issuer.mint(target["id"], ttl=300, single_use=False)

        async def session() -> bytes:
            from rfbclient import Console

            viewer = await Console.open(proxy.ws_url, console["token"])
            await viewer.handshake()
            line = await asyncio.to_thread(proxy.wait_for_log, "certificate renewed", timeout=40)
            assert "next renewal in" in line
            await viewer.request_update(incremental=False)
            update = await viewer.read(4)  # the session opened before the renewal still answers
            viewer.close()
            return update

        assert asyncio.run(session())[0] == 0  # FramebufferUpdate
        renewed = Identity.load(tmp_path / "edge")
        assert renewed.certificate.serial_number != first.certificate.serial_number
        assert renewed.key_pem != first.key_pem
        assert abs(ca.lifetime_of(renewed.certificate) - 60) < 2
        for name in ("proxy-cert.pem", "proxy-key.pem"):
            assert stat.S_IMODE((tmp_path / "edge" / name).stat().st_mode) == 0o600
        # the new certificate is the one presented from now on
        serial = ca.serial_hex(renewed.certificate.serial_number)
        wait_for(
            lambda: any(e["detail"]["serial"] == serial for e in broker.admin.audit(0, "cert_renewed")), what="audit"
        )
        assert (
            broker_main(
                ["ca", "revoke", ca.serial_hex(first.certificate.serial_number), "--state-dir", str(state.root)]
            )
            == 0
        )
        mark = len(broker.log_text())
        wait_for(lambda: "POST /api/v1/proxy/heartbeat" in broker.log_text()[mark:], what="a heartbeat after")
        assert "401 POST /api/v1/proxy/heartbeat" not in broker.log_text()[mark:]
        assert proxy.process.poll() is None
    finally:
        proxy.stop()
        broker.stop()


def test_revocation_reaches_every_replica_on_postgresql(
    pg_cluster: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = pg_cluster.new_database()
    state = BrokerState.create(tmp_path / "a", database=database)
    add_proxy(state, "edge", "http://127.0.0.1:1", capsys)
    first = enrolled_in_process(state, "edge", tmp_path / "first")
    second = enrolled_in_process(state, "edge", tmp_path / "second")
    a, base_a = start_https_broker(state)
    b, base_b = start_https_broker(state.replica(tmp_path / "b"))
    try:
        contexts = [client_context(i.cert_pem, i.key_pem, i.ca_pem, tmp_path) for i in (first, second)]
        for base in (base_a, base_b):
            assert [call(base, "/proxy/heartbeat", c, heartbeat("edge"))[0] for c in contexts] == [200, 200]
        cli = ["--state-dir", str(state.root), "--database", database]
        assert broker_main(["ca", "revoke", ca.serial_hex(first.certificate.serial_number), *cli]) == 0
        for base in (base_b, base_a):  # the replica that did not revoke refuses it first
            status, answer = call(base, "/proxy/heartbeat", contexts[0], heartbeat("edge"))
            assert (status, answer["error"]) == (401, "certificate_revoked")
            assert call(base, "/proxy/heartbeat", contexts[1], heartbeat("edge"))[0] == 200
        assert broker_main(["proxy", "remove", "edge", *cli]) == 0
        for base in (base_b, base_a):
            status, answer = call(base, "/proxy/heartbeat", contexts[1], heartbeat("edge"))
            assert (status, answer["error"]) == (401, "certificate_revoked")
        events = b.admin.audit(0, "cert_revoked")
        assert [e["detail"]["serial"] for e in events] == [
            ca.serial_hex(first.certificate.serial_number),
            ca.serial_hex(second.certificate.serial_number),
        ]
        assert len(a.admin.audit(0, "cert_issued")) == 2
        assert pg_cluster.password not in a.log_text() + b.log_text()
    finally:
        a.stop()
        b.stop()


def test_a_failed_renewal_warns_with_its_retry_schedule_and_keeps_serving(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = BrokerState.create(tmp_path / "state")
    port = free_port()
    add_proxy(state, "edge", f"http://127.0.0.1:{port}", capsys)
    assert broker_main(["keys", "export-proxy", "--state-dir", str(state.root), "--out", str(tmp_path / "ring")]) == 0
    edge = enrolled_in_process(state, "edge", tmp_path / "edge", issued_ago=45)  # due for renewal at once
    broker, base = start_https_broker(state)
    assert (
        broker_main(["ca", "revoke", ca.serial_hex(edge.certificate.serial_number), "--state-dir", str(state.root)])
        == 0
    )
    proxy = start_proxy(
        tmp_path,
        tmp_path / "ring",  # serves from the exported keyring while the broker refuses it
        "--state-dir",
        str(tmp_path / "edge"),
        "--broker",
        base,
        "--public-url",
        f"http://127.0.0.1:{port}",
        port=port,
    )
    try:
        line = proxy.wait_for_log("certificate renewal failed")
        assert "HTTP 401 certificate_revoked" in line and "next try in 5 s" in line and "300 s" in line
        assert (tmp_path / "edge" / "proxy-cert.pem").read_bytes() == edge.cert_pem  # nothing replaced
        assert proxy.process.poll() is None
        assert urllib.request.urlopen(proxy.base + "/healthz", timeout=5).status == 200
    finally:
        proxy.stop()
        broker.stop()


def test_serve_refuses_an_expired_identity_and_a_missing_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = BrokerState.create(tmp_path / "state")
    add_proxy(state, "edge", "http://127.0.0.1:1", capsys)
    enrolled_in_process(state, "edge", tmp_path / "edge", issued_ago=3600)
    for directory, message in (
        (tmp_path / "edge", "console-broker proxy join-token edge"),
        (tmp_path / "nothing", "run console-proxy enroll"),
    ):
        done = run_python(
            "-m", "console_proxy.cli", "serve", "--listen", f"127.0.0.1:{free_port()}", "--state-dir", str(directory)
        )
        assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr


def test_renewal_hooks_get_the_new_identity_and_a_refused_renewal_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tornado.httpclient import HTTPClientError

    from console_proxy.brokerlink import BrokerLink

    state = BrokerState.create(tmp_path / "state")
    add_proxy(state, "edge", "http://127.0.0.1:1", capsys)
    first = enrolled_in_process(state, "edge", tmp_path / "edge")
    broker, base = start_https_broker(state)

    async def scenario() -> tuple[list[Identity], Identity, BaseException]:
        link = BrokerLink(base, first)
        assert link.renewal is not None
        seen: list[Identity] = []
        link.renewal.hooks.append(seen.append)
        before = link.ssl_context
        renewed = await link.renewal.renew()
        assert link.ssl_context is not before and link.credential is renewed
        serial = ca.serial_hex(renewed.certificate.serial_number)
        assert broker_main(["ca", "revoke", serial, "--state-dir", str(state.root)]) == 0
        with pytest.raises(HTTPClientError) as refused:
            await link.renewal.renew()
        return seen, renewed, refused.value

    try:
        seen, renewed, refused = asyncio.run(scenario())
        assert seen == [renewed] and renewed.certificate.serial_number != first.certificate.serial_number
        assert refused.code == 401
        on_disk = Identity.load(tmp_path / "edge")
        assert (on_disk.cert_pem, on_disk.key_pem) == (renewed.cert_pem, renewed.key_pem)  # the refusal changed nothing
        assert not [p for p in (tmp_path / "edge").iterdir() if p.name.startswith(".")]  # no temporary left
    finally:
        broker.stop()
