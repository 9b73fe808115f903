"""No line either serve command writes holds a secret, whatever a client sends (console_proxy/logguard.py).

Unit tests pin the sanitiser and the formatter; the end-to-end test drives a real broker, a plain
proxy (its front door hands odd heads to Tornado) and a TLS proxy at DEBUG with every malformed
head we could think of, each carrying the API key, the proxy credential or the whole token, then
scans everything the three processes wrote (stdout and stderr) for them.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import secrets
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from brokerproc import BrokerProcess, BrokerState, healthy_proxies, start_broker, start_linked_proxy
from proxyproc import REPO, ProxyProcess
from tornado.httputil import HTTPHeaders, HTTPInputError, HTTPServerRequest, RequestStartLine
from xvnc import TestPki

from console_proxy import logguard
from console_proxy.logguard import REDACTED, GuardedFormatter, GuardedHandler, sanitise

API_KEY = "cgk.0123456789abcdef." + secrets.token_urlsafe(32)
TOKEN = "eyJhbGciOiJkaXIiLCJlbmMiOiJBMjU2R0NNIiwia2lkIjoiZmxlZXQtMGEwYjBjMGQwZTBmIn0.." + ".".join(
    secrets.token_urlsafe(n) for n in (12, 400, 16)
)
CONTROLS = ("\r", "\x00", "\x7f", "\x01")


def _record(msg: object, *args: object, name: str = "tornado.general", exc_info: object = None) -> logging.LogRecord:
    return logging.LogRecord(name, logging.INFO, __file__, 1, msg, args, exc_info)  # type: ignore[arg-type]


def _format(record: logging.LogRecord) -> str:
    return GuardedFormatter(logguard.FORMAT).format(record)


# --- the sanitiser ---------------------------------------------------------------------------


@pytest.mark.parametrize("control", CONTROLS)
def test_tornados_invalid_header_value_loses_the_value(control: str) -> None:
    for value in (f"Bearer {API_KEY}{control}", f"binary, token.{TOKEN}{control}", f"{control}{API_KEY}"):
        error = HTTPInputError(f"Invalid header value {value!r}")
        line = _format(_record("Malformed HTTP message from %s: %s", "10.0.0.9", error))
        assert line.endswith("tornado.general Malformed HTTP message from 10.0.0.9: Invalid header value")


def test_an_unknown_tornado_reason_is_withheld_not_quoted() -> None:
    line = _format(_record("Malformed HTTP message from %s: %s", "10.0.0.9", HTTPInputError(f"odd {API_KEY}")))
    assert line.endswith(f"from 10.0.0.9: {logguard.UNKNOWN_REASON}")


@pytest.mark.parametrize(
    "text",
    [
        f"Bearer {API_KEY}",
        f"bearer\t{API_KEY}",
        f"{API_KEY!r}",
        f"'Bearer {API_KEY}\\r'",
        f"key={API_KEY}",
        f"GET /websockify?token={TOKEN} (127.0.0.1)",
        f"/console#token={TOKEN}",
        f"token.{TOKEN}",
        TOKEN,
        f"Authorization: Basic {API_KEY}",
        f"{{'Cookie': 'sid={API_KEY}'}}",
        f"sec-websocket-protocol: {TOKEN}",
        f"Invalid Host header: {API_KEY[4:]!r}",
        f"Unexpected HTTP version {API_KEY}",
        f"x\x00{API_KEY}\x7f",
        f"proxy-a.{API_KEY.rsplit('.', 1)[1]}",
        secrets.token_bytes(32).hex(),
        f"a\u2028{TOKEN}\udcff",
    ],
)
def test_secrets_are_redacted(text: str) -> None:
    safe = sanitise(text)
    for secret in (API_KEY, API_KEY.rsplit(".", 1)[1], TOKEN, *[part for part in TOKEN.split(".") if len(part) >= 16]):
        assert secret not in safe
    assert safe.isascii() and safe.isprintable()
    assert sanitise(safe) == safe  # idempotent: a second pass changes nothing


def test_every_random_secret_of_our_shapes_is_caught_alone() -> None:
    """No ``Bearer``, ``cgk.`` or ``key=`` to go by: the run's shape alone gives it away, for
    every one of many random API-key and proxy secrets (32 random bytes, base64url), hex keys
    and tokens (whose 16-byte tag alone would not look random enough)."""
    for _ in range(500):
        tag = secrets.token_urlsafe(16)
        token = f"{secrets.token_urlsafe(40)}..{secrets.token_urlsafe(12)}.{secrets.token_urlsafe(200)}.{tag}"
        assert tag not in sanitise(f"x {token} y")
        for secret in (secrets.token_urlsafe(32), secrets.token_bytes(32).hex()):
            for text in (f"x {secret} y", f"'{secret}\\x00'", f"proxy-7.{secret}", f"[{secret}]"):
                assert secret not in sanitise(text)


def test_secret_members_of_a_dict_or_json_text_are_redacted() -> None:
    text = """{'password': 'hunter\\'2', "pw": "swordfish", 'host': 'hv-3', "token" : "t0k"}"""
    assert (
        sanitise(text)
        == f"""{{'password': '{REDACTED}', "pw": "{REDACTED}", 'host': 'hv-3', "token" : "{REDACTED}"}}"""
    )


@pytest.mark.parametrize(
    "text",
    [
        "console-proxy listening on 127.0.0.1:8443 (https)",
        '{"client":"127.0.0.1","event":"closed","session_id":"AbC-d3_fGh1jK2lM","vm":"1b4e28ba-2fa1-11d2-883f-0016d3cca427"}',
        "404 GET /console (127.0.0.1) 0.4ms",
        "keyring version 3 -> 4",
        'File "/srv/venv/lib/python3.11/site-packages/tornado/http1connection.py", line 344, in _read_message',
        "proxy p1 reports public URL 'https://thief.example' but is registered as https://p1.example:8443",
        "Malformed HTTP message from 127.0.0.1: Content-Length too long",
    ],
)
def test_ordinary_lines_are_kept(text: str) -> None:
    assert sanitise(text) == text


def test_control_characters_are_escaped_so_a_line_stays_one_line() -> None:
    assert sanitise("a\r\nb\x1b[2Jc\x00") == "a\\x0d\\x0ab\\x1b[2Jc\\x00"
    assert sanitise("a\nb", multiline=True) == "a\nb"  # tracebacks keep their lines


def test_a_request_argument_is_named_by_path_and_headers_never_appear() -> None:
    headers = HTTPHeaders({"Authorization": f"Bearer {API_KEY}", "Cookie": f"k={API_KEY}", "Host": "127.0.0.1"})
    request = HTTPServerRequest(
        start_line=RequestStartLine("GET", f"/api/v1/targets?key={API_KEY}", "HTTP/1.1"), headers=headers
    )
    line = _format(
        _record(
            "Uncaught exception %s\n%r",
            f"GET /api/v1/targets?key={API_KEY} (127.0.0.1)",
            request,
            name="tornado.application",
        )
    )
    assert API_KEY not in line and "Authorization" not in line
    assert line.endswith(f"Uncaught exception GET /api/v1/targets?{REDACTED} (127.0.0.1)")
    assert "withheld" in _format(_record("headers %s, body %s", headers, API_KEY.encode()))


def test_tracebacks_are_sanitised() -> None:
    try:
        raise HTTPInputError(f"Invalid header value {('Bearer ' + API_KEY + chr(0))!r}")
    except HTTPInputError:
        line = _format(_record("failed", exc_info=sys.exc_info()))
    assert "Traceback" in line and "HTTPInputError: Invalid header value (value withheld)" in line
    assert API_KEY.rsplit(".", 1)[1] not in line


def test_stack_info_is_sanitised() -> None:
    record = _record("here")
    record.stack_info = f"Stack (most recent call last):\n  token={TOKEN}"
    assert TOKEN not in _format(record)


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError(API_KEY)

    __repr__ = __str__


@pytest.mark.parametrize(
    "record",
    [
        _record("%d items", API_KEY),
        _record("%s", _Unprintable()),
        _record(_Unprintable()),
        _record("Malformed HTTP message from %s: %s", "only one argument"),
    ],
)
def test_a_record_that_cannot_be_formatted_becomes_a_fixed_line(record: logging.LogRecord) -> None:
    line = _format(record)
    assert line.endswith(f"INFO consolegate.logguard {logguard.WITHHELD}") and API_KEY not in line


def test_a_failing_write_never_prints_the_record() -> None:
    class Flaky(io.StringIO):
        failed = False

        def write(self, text: str) -> int:
            if not self.failed:
                self.failed = True
                raise OSError("disk full")
            return super().write(text)

    handler = GuardedHandler()
    handler.setStream(Flaky())
    handler.handle(_record("Bearer %s", API_KEY))
    written = handler.stream.getvalue()
    assert logguard.WITHHELD in written and API_KEY not in written


def test_setup_guards_every_logger_and_uncaught_exceptions() -> None:
    """In a fresh interpreter, as ``serve`` runs it: root, Tornado's, asyncio's loggers, a crash."""
    script = (
        "import asyncio, logging, sys, warnings\n"
        "from console_proxy import logguard\n"
        "logguard.setup('DEBUG')\n"
        "key = sys.argv[1]\n"
        "logging.getLogger('tornado.access').info('200 GET /x?key=%s', key)\n"
        "logging.getLogger('asyncio').debug('Authorization: Bearer ' + key)\n"
        "warnings.warn('Bearer ' + key)\n"
        "import threading\n"
        "def fail(): raise ValueError('Bearer ' + key)\n"
        "thread = threading.Thread(target=fail, name='worker'); thread.start(); thread.join()\n"
        "raise RuntimeError('Bearer ' + key)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, API_KEY], capture_output=True, text=True, cwd=REPO, timeout=30, check=False
    )
    assert result.returncode == 1
    assert API_KEY.rsplit(".", 1)[1] not in result.stderr
    assert f"tornado.access 200 GET /x?{REDACTED}" in result.stderr
    assert "CRITICAL consolegate.logguard uncaught exception" in result.stderr
    assert f"RuntimeError: Bearer {REDACTED}" in result.stderr
    assert "py.warnings" in result.stderr and "uncaught exception in thread worker" in result.stderr


# --- end to end: real services, hostile heads -------------------------------------------------


@dataclass
class Fleet:
    broker: BrokerProcess
    plain: ProxyProcess
    tls: ProxyProcess
    token: str
    proxy_credential: str  # what a proxy sends after "Bearer "
    secrets: list[str]  # everything that must never be in a log

    @property
    def services(self) -> list[tuple[ProxyProcess, bool]]:
        """Each service and whether it speaks TLS."""
        return [(self.broker, False), (self.plain, False), (self.tls, True)]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, test_pki: TestPki) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("logs")
    state = BrokerState.create(tmp / "state")
    broker = start_broker(state)
    started: list[ProxyProcess] = [broker]
    try:
        started.append(start_linked_proxy(tmp, broker, "plain"))
        started.append(
            start_linked_proxy(
                tmp, broker, "tls", "--tls-cert", str(test_pki.cert_path), "--tls-key", str(test_pki.key_path)
            )
        )
        healthy_proxies(broker, 2)
        password = "vnc-" + secrets.token_urlsafe(12)
        target = broker.admin.add_target(name="vm-logs", host="127.0.0.1", port=5900, password=password)
        token = broker.issuer.mint(target["id"], user="ann")["token"]
        found = [state.admin_key, state.issuer_key, token, password]
        found += [key.rsplit(".", 1)[1] for key in (state.admin_key, state.issuer_key)]
        found += [part for part in token.split(".") if len(part) >= 16]
        credentials = [json.loads(path.read_text()) for path in state.proxies.values()]
        bearers = [f"{c['proxy_id']}.{c['secret']}" for c in credentials]
        found += [c["secret"] for c in credentials] + bearers
        yield Fleet(broker, started[1], started[2], token, bearers[0], found)
    finally:
        for process in started:
            process.stop()


def hostile_heads(key: str, token: str, proxy_credential: str) -> list[bytes]:
    """Every malformed head and request shape we could think of, each carrying a secret."""
    values = [
        ("Authorization", f"Bearer {key}"),
        ("Authorization", f"Bearer {proxy_credential}"),
        ("Sec-WebSocket-Protocol", f"binary, token.{token}"),
        ("Cookie", f"session={key}"),
        ("Host", token),
        ("Origin", f"http://{key}"),
        ("X-Forwarded-For", key),
        ("X-Real-IP", proxy_credential),
    ]
    ws = (
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
        "dGhlIHNhbXBsZSBub25jZQ==\r\n"
    )
    heads: list[str] = []
    for path in ("/websockify", "/api/v1/consoles"):
        for name, value in values:
            host = "" if name == "Host" else "Host: 127.0.0.1\r\n"
            for control in CONTROLS:
                for bad in (f"{value}{control}", f"{control}{value}", f"{value[:9]}{control}{value[9:]}"):
                    heads.append(f"GET {path} HTTP/1.1\r\n{host}{ws}{name}: {bad}\r\n\r\n")
            heads.append(f"GET {path} HTTP/1.1\r\n{host}{ws}{name}: {value}\r\n{name}: {value}x\r\n\r\n")
            heads.append(f"GET {path} HTTP/1.1\r\n{host}{ws}{name}: {value}\r\n continued {value}\r\n\r\n")
    heads += [
        f"GET /websockify?token={token} HTTP/1.1\r\nHost: {key}/\r\n\r\n",
        f"GET /websockify?token={token} HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n",
        f"GET /websockify?token={token} HTTP/1.1{key}\r\nHost: 127.0.0.1\r\n\r\n",
        f"GET /websockify?token={token}\x00 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        f"GET /a b?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        f"{key} /api/v1/targets HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        f"GET /api/v1/targets?api_key={key}&token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        f"GET /nowhere?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        f"GET /api/v1/targets HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}x\r\nConnection: close\r\n\r\n",
        f"GET /api/v1/targets HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: {key}\r\n\r\n",
        f"GET /api/v1/targets HTTP/1.1\r\n{key}\r\n\r\n",
        f"GET /api/v1/targets HTTP/1.1\r\n{key}\x00: v\r\n\r\n",
        f"GET /websockify HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: {'a' * 9000}\r\n"
        f"Authorization: Bearer {key}\x00\r\n\r\n",
        f"GET /websockify HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {key * 1700}\r\n\r\n",
        f"POST /api/v1/consoles HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5, {key}\r\n\r\n",
        f"POST /api/v1/consoles HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {key}\r\n\r\n",
        f"POST /api/v1/consoles HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: {key}\r\n\r\n",
        f"POST /api/v1/consoles HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n{key}\r\n\r\n",
        (
            f"POST /api/v1/consoles HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Encoding: {key}\r\nContent-Type: "
            f"application/x-www-form-urlencoded\r\nContent-Length: {len(key)}\r\nConnection: close\r\n\r\n{key}"
        ),
        (
            f"POST /api/v1/consoles HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nContent-Type: "
            f'application/json\r\nContent-Length: {len(key) + 9}\r\nConnection: close\r\n\r\n{{"k": "{key}"}}'
        ),
        (
            f"POST /websockify?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(token)}\r\n"
            f"Connection: close\r\n\r\n{token}"
        ),
    ]
    raw = [head.encode("latin-1") for head in heads]
    raw.append(
        b"GET /websockify HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \xff\xfe"
        + key.encode()
        + b"\xc3\r\n\r\n"
    )
    raw.append(b"GET /websockify?token=" + token.encode() + b"\xff HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    raw.append(f"GET /websockify HTTP/1.1\nHost: 127.0.0.1\nAuthorization: Bearer {key}\x00\n\n".encode())  # bare LF
    return raw


def pipelined_heads(key: str, token: str) -> list[bytes]:
    """A good request, then a malformed one on the same connection: the service answers the first,
    logs the second and closes."""
    good = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    return [
        f"{good}GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\x7f\r\n\r\n".encode(),
        f"{good}GET /websockify?token={token} HTTP/1.1\r\nHost: {token}\x00\r\n\r\n".encode(),
    ]


async def _send(port: int, tls: ssl.SSLContext | None, data: bytes, until_close: bool = False) -> None:
    """Send one head and wait for the answer's first bytes (or the close): the service logs what
    it refuses before it answers, so its line is written once this returns."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
    try:
        writer.write(data)
        await writer.drain()
        await asyncio.wait_for(reader.read() if until_close else reader.read(1), 10.0)
    except (TimeoutError, OSError, ssl.SSLError):
        pass  # a reset or a service that keeps listening: either way the head was delivered
    finally:
        writer.close()


def _client_tls() -> ssl.SSLContext:
    """A client that sends its bytes over TLS to anyone: what it sends is the test."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


async def _drive(services: list[tuple[ProxyProcess, bool]], heads: list[bytes], until_close: bool = False) -> None:
    client, limit = _client_tls(), asyncio.Semaphore(64)

    async def one(port: int, tls: ssl.SSLContext | None, data: bytes) -> None:
        async with limit:
            await _send(port, tls, data, until_close)

    await asyncio.gather(
        *(one(service.port, client if tls else None, head) for service, tls in services for head in heads)
    )


def test_no_hostile_head_puts_a_secret_in_any_log(fleet: Fleet) -> None:
    asyncio.run(
        _drive(fleet.services, hostile_heads(fleet.broker.state.issuer_key, fleet.token, fleet.proxy_credential))
    )
    asyncio.run(_drive(fleet.services, pipelined_heads(fleet.broker.state.issuer_key, fleet.token), until_close=True))
    # a last request after every hostile one was answered: each service still serves, and its log is complete
    last = b"GET /healthz?after-the-hostile-heads HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    asyncio.run(_drive(fleet.services, [last]))
    for service, _ in fleet.services:
        service.wait_for_log("200 GET /healthz (127.0.0.1)")
        assert service.process.poll() is None, "a service died"
        log = service.log_text()
        assert "DEBUG" in log and "Malformed HTTP message from 127.0.0.1: Invalid header value" in log
        for secret in fleet.secrets:
            assert secret not in log, f"a secret reached the log of the service on port {service.port}"
        assert all(line.isascii() and line.rstrip("\n").isprintable() for line in log.splitlines(keepends=True))
