"""Running it as an operator: JSON logs through the guard, process and build figures on both
/metrics, ``python -m``, and ``--listen`` repeated, dual-stack, or unable to bind. Real processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from brokerproc import BrokerState, start_broker
from proxyproc import REPO, free_port, run_python, start_proxy

from console_proxy import __version__

ENV = {**os.environ, "PYTHONPATH": str(REPO)}
SECRET = "Zq7xK2mP9vL4nR8tW1yB6cD3fH5jQ0sA"


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return answer.read().decode()


def metric(text: str, name: str) -> float:
    return float(next(line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(name + " ")))


# --- logs -------------------------------------------------------------------------------------


def test_json_logs_are_one_object_per_line_and_still_guarded(tmp_path: Path, broker_ring) -> None:
    proxy = start_proxy(tmp_path, broker_ring[1], "--log-format", "json")
    try:
        with pytest.raises(urllib.error.HTTPError):
            fetch(f"{proxy.base}/no-such-page?token={SECRET}")
        proxy.wait_for_log("no-such-page")
    finally:
        proxy.stop()
    lines = [line for line in proxy.log_text().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line, the start and the stop included
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    assert any(e["message"].startswith("console-proxy listening on") for e in entries)
    assert SECRET not in proxy.log_text()
    assert any(e["message"] == "404 GET /no-such-page (127.0.0.1)" for e in entries)


def test_json_formatter_keeps_tracebacks_sanitised_and_withholds_on_failure() -> None:
    import logging

    from console_proxy.logguard import WITHHELD, JsonGuardedFormatter

    formatter = JsonGuardedFormatter()
    try:
        raise ValueError(f"Authorization: Bearer {SECRET}")
    except ValueError:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed for %s", ("x\ny",), sys.exc_info())
    entry = json.loads(formatter.format(record))
    assert entry["message"] == "failed for x\\x0ay" and SECRET not in entry["exception"]

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError(SECRET)

    bad = logging.LogRecord("t", logging.INFO, __file__, 1, "%s", (Unprintable(),), None)
    assert json.loads(formatter.format(bad))["message"] == WITHHELD


# --- metrics ----------------------------------------------------------------------------------


def _check_process_metrics(text: str, component: str, started_before: float) -> None:
    assert f'consolegate_build_info{{component="{component}",version="{__version__}"}} 1' in text
    assert metric(text, "process_resident_memory_bytes") > 1 << 20
    assert metric(text, "process_open_fds") >= 3
    assert metric(text, "process_cpu_seconds_total") > 0
    assert started_before - 2 <= metric(text, "process_start_time_seconds") <= time.time()


def test_both_servers_show_process_figures_and_build_info(tmp_path: Path, broker_ring) -> None:
    before = time.time()
    proxy = start_proxy(tmp_path, broker_ring[1])
    broker = start_broker(BrokerState.create(tmp_path / "state"))
    try:
        _check_process_metrics(fetch(f"{proxy.base}/metrics"), "proxy", before)
        _check_process_metrics(fetch(f"{broker.base}/metrics"), "broker", before)
    finally:
        proxy.stop()
        broker.stop()


# --- python -m --------------------------------------------------------------------------------


@pytest.mark.parametrize(("module", "prog"), [("console_proxy", "console-proxy"), ("broker", "console-broker")])
def test_python_dash_m_runs_the_command(module: str, prog: str) -> None:
    done = run_python("-m", module, "serve", "--help")
    assert done.returncode == 0 and done.stdout.startswith(f"usage: {prog} serve")


# --- listeners --------------------------------------------------------------------------------


def _answers(family: socket.AddressFamily, host: str, port: int) -> bool:
    with socket.socket(family) as sock:
        sock.settimeout(10)
        sock.connect((host, port))
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return sock.recv(64).startswith(b"HTTP/1.1 200")


def test_listen_repeats_and_brackets_ipv6(tmp_path: Path, broker_ring) -> None:
    other = free_port()
    proxy = start_proxy(tmp_path, broker_ring[1], "--listen", f"[::1]:{other}")
    try:
        line = proxy.wait_for_log("console-proxy listening")
        assert f"127.0.0.1:{proxy.port}, [::1]:{other}" in line
        assert _answers(socket.AF_INET, "127.0.0.1", proxy.port)
        assert _answers(socket.AF_INET6, "::1", other)
    finally:
        proxy.stop()


def test_listen_on_all_ipv6_is_dual_stack(tmp_path: Path, broker_ring) -> None:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "console_proxy",
        "serve",
        "--listen",
        f"[::]:{port}",
        "--keyring",
        str(broker_ring[1]),
    ]
    process = subprocess.Popen(command, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout is not None
        assert f"listening on [::]:{port}" in next(line for line in process.stdout if "listening" in line)
        assert _answers(socket.AF_INET6, "::1", port)
        assert _answers(socket.AF_INET, "127.0.0.1", port)
    finally:
        process.terminate()
        process.wait(20)


def test_a_listen_that_cannot_bind_starts_nothing(tmp_path: Path) -> None:
    """The second address is taken: one line, exit 1, the first address released, and the broker
    never heard from this proxy (it binds before its first heartbeat)."""
    state = BrokerState.create(tmp_path / "state")
    broker = start_broker(state)
    first = free_port()
    credential = state.add_proxy("p1", f"http://127.0.0.1:{first}")
    try:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            busy = taken.getsockname()[1]
            done = run_python(
                "-m",
                "console_proxy",
                "serve",
                "--listen",
                f"127.0.0.1:{first}",
                "--listen",
                f"127.0.0.1:{busy}",
                "--broker",
                broker.base,
                "--proxy-credential",
                str(credential),
            )
        assert done.returncode == 1
        assert done.stderr.strip().splitlines() == [
            f"console-proxy: error: cannot listen on 127.0.0.1:{busy}: Address already in use"
        ]
        with socket.socket() as again:
            again.bind(("127.0.0.1", first))
        assert [p["last_seen"] for p in broker.admin.proxies()] == [None]
    finally:
        broker.stop()


@pytest.mark.parametrize("value", ["nowhere", "127.0.0.1:99999", "no.such.host.invalid:80"])
def test_a_bad_listen_is_one_line(tmp_path: Path, broker_ring, value: str) -> None:
    done = run_python("-m", "console_proxy", "serve", "--listen", value, "--keyring", str(broker_ring[1]))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("console-proxy: error: ") and "listen" in lines[0]
