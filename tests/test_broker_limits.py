"""The broker fails closed at its edges: oversized bodies and plain http off this host.

- A body over ``broker.api.MAX_BODY`` gets DESIGN's JSON 413 (``body_too_large``) with the usual
  headers, and ``Connection: close``: a declared ``Content-Length`` is refused from the headers
  alone (these tests never send the body, so an answer proves it was not awaited), a chunked
  body as soon as it grows past the limit. Nothing is stored or audited; the broker serves on.
- ``console-broker serve`` refuses a non-loopback ``--listen`` without TLS (before binding, so no
  real external interface is needed) unless ``--allow-insecure-http``, which logs a warning.
- ``BrokerClient`` refuses plain http to a non-loopback host unless ``allow_insecure=True``.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokerproc import BrokerProcess, BrokerState, start_broker
from proxyproc import REPO, free_port

from broker.api import MAX_BODY
from broker.client import BrokerClient, InsecureBrokerURL

TIMEOUT = 10.0
"""Seconds to wait for an answer: the broker that waits for the body never gives one."""


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    process = start_broker(BrokerState.create(tmp_path_factory.mktemp("broker-limits") / "state"))
    yield process
    process.stop()


def _head(broker: BrokerProcess, framing: str) -> bytes:
    return (
        f"POST /api/v1/targets HTTP/1.1\r\nHost: 127.0.0.1:{broker.port}\r\n"
        f"Authorization: Bearer {broker.state.admin_key}\r\nContent-Type: application/json\r\n"
        f"{framing}\r\n\r\n"
    ).encode()


def _exchange(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``data``, read until the broker closes the connection: (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        answer = bytearray()
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = bytes(answer).partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _assert_413(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status == 413
    assert json.loads(body) == {"error": "body_too_large", "message": f"request bodies are limited to {MAX_BODY} bytes"}
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["connection"] == "close"


def _counts(broker: BrokerProcess) -> tuple[int, int]:
    return len(broker.admin.targets()), len(broker.admin.audit())


@pytest.mark.parametrize("declared", [MAX_BODY + 1, 10 << 20])  # below and above Tornado's old 1 MiB limit
def test_declared_oversized_body_is_refused_before_it_is_read(broker: BrokerProcess, declared: int) -> None:
    before = _counts(broker)
    _assert_413(*_exchange(broker.port, _head(broker, f"Content-Length: {declared}")))  # no body sent
    assert _counts(broker) == before  # nothing stored or audited
    assert broker.admin.request("GET", "/targets")[0] == 200  # and the next request is served


def test_a_repeated_oversized_length_is_refused_before_the_body_too(broker: BrokerProcess) -> None:
    """Tornado accepts equal repeated values ("N, N") as one length: so must the early check."""
    declared = 10 << 20
    _assert_413(*_exchange(broker.port, _head(broker, f"Content-Length: {declared}, {declared}")))


def test_a_length_of_thousands_of_digits_is_413_not_a_crash(broker: BrokerProcess) -> None:
    """int() refuses strings over 4300 digits; the early check must not ask it to."""
    _assert_413(*_exchange(broker.port, _head(broker, "Content-Length: " + "1" * 5000)))


def test_a_superscript_length_is_a_plain_400_not_a_crash(broker: BrokerProcess) -> None:
    """Headers are latin-1: "¹" is a digit to str.isdigit but not to int(); it must not reach it."""
    data = _head(broker, "Content-Length: 1").replace(b"Content-Length: 1", b"Content-Length: \xb9")
    status, _, body = _exchange(broker.port, data)
    assert status == 400 and b"internal_error" not in body
    assert broker.admin.request("GET", "/targets")[0] == 200


def test_oversized_body_to_an_unknown_path_is_413_too(broker: BrokerProcess) -> None:
    data = _head(broker, f"Content-Length: {10 << 20}").replace(b"/api/v1/targets", b"/api/v1/nope")
    _assert_413(*_exchange(broker.port, data))


def test_chunked_body_is_refused_once_it_grows_past_the_limit(broker: BrokerProcess) -> None:
    small = json.dumps({"id": "chunked-ok", "name": "n", "host": "10.0.0.9", "port": 5901}).encode()
    status, _, body = _exchange(
        broker.port,
        _head(broker, "Transfer-Encoding: chunked\r\nConnection: close")
        + _chunk(small[:10])
        + _chunk(small[10:])
        + b"0\r\n\r\n",
    )
    assert (status, json.loads(body)["id"]) == (201, "chunked-ok")  # chunked bodies under the limit work

    before = _counts(broker)
    many_small = b"".join(_chunk(b"x" * 4096) for _ in range(MAX_BODY // 4096 + 4))  # never terminated
    _assert_413(*_exchange(broker.port, _head(broker, "Transfer-Encoding: chunked") + many_small))
    one_huge = b"%x\r\n" % (4 << 20) + b"x" * (MAX_BODY + 4096)  # announces 4 MiB, sends a little
    _assert_413(*_exchange(broker.port, _head(broker, "Transfer-Encoding: chunked") + one_huge))
    assert _counts(broker) == before
    assert broker.admin.request("GET", "/targets")[0] == 200


def _serve(state: BrokerState, listen: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", "serve", "--state-dir", str(state.root), "--listen", listen, *extra],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "[::]", "broker.example"])
def test_serve_refuses_plain_http_on_a_non_loopback_address(tmp_path: Path, host: str) -> None:
    result = _serve(BrokerState.create(tmp_path / "state"), f"{host}:{free_port()}")
    assert result.returncode == 1
    expected = (
        f"console-broker: error: refusing to serve plain http on non-loopback address {host.strip('[]')!r}: "
        "give --tls-cert and --tls-key, or --allow-insecure-http"
    )
    assert result.stderr.strip().splitlines() == [expected]


def test_serve_on_a_non_loopback_address_with_the_override_warns(tmp_path: Path) -> None:
    state = BrokerState.create(tmp_path / "state")
    port = free_port()
    broker = start_broker(state, "--listen", f"0.0.0.0:{port}", "--allow-insecure-http", port=port)  # last wins
    try:
        warning = broker.wait_for_log("--allow-insecure-http")
        assert " WARNING " in warning and "0.0.0.0" in warning
        assert broker.admin.targets() == []  # serving, reached through loopback
    finally:
        broker.stop()
    assert state.admin_key not in broker.log_text() and state.admin_key.split(".")[-1] not in broker.log_text()


@pytest.mark.parametrize(
    "url",
    [
        "http://192.0.2.10:8700",
        "http://broker.example",
        "HTTP://10.1.2.3",
        "http://0.0.0.0:8700",
        "http://[2001:db8::1]:8700",
        "ftp://127.0.0.1/",
        "https://",
        "127.0.0.1:8700",
    ],
)
def test_client_refuses_plain_http_to_a_remote_host(url: str) -> None:
    with pytest.raises(InsecureBrokerURL) as info:
        BrokerClient(url, "cgk.id.secret-key")
    assert "secret-key" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8700",
        "http://127.9.8.7",
        "http://[::1]:8700",
        "http://localhost:8700",
        "https://broker.example",
        "https://192.0.2.10:8443",
    ],
)
def test_client_accepts_https_and_loopback_http(url: str) -> None:
    assert BrokerClient(url, "k", allow_insecure=False).base == url.rstrip("/") + "/api/v1"


def test_client_allows_remote_plain_http_only_when_told() -> None:
    assert BrokerClient("http://192.0.2.10:8700", "k", allow_insecure=True).base == "http://192.0.2.10:8700/api/v1"
    with pytest.raises(InsecureBrokerURL):
        BrokerClient("ftp://192.0.2.10", "k", allow_insecure=True)  # the override is for http only


def test_audit_tail_refuses_a_remote_plain_http_broker_in_one_line(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("cgk.id.do-not-show-me")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "broker.cli",
            "audit",
            "tail",
            "--broker",
            "http://192.0.2.10:8700",
            "--api-key-file",
            str(key),
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("console-broker: error: refusing plain http to the broker at '192.0.2.10'")
    assert len(result.stderr.strip().splitlines()) == 1 and "do-not-show-me" not in result.stderr
