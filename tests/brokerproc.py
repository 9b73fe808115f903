"""A real ``console-broker serve`` process for tests, and proxies linked to it.

Same pattern as tests/proxyproc.py: free loopback port, readiness from the "listening" log line
(an event, not a sleep), every log line teed to a file for the no-secrets scans. The state
directory is made with ``console-broker init`` semantics (service.init_state_dir) in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxyproc import REPO, START_TIMEOUT, ProxyProcess, free_port, start_proxy

from broker.client import BrokerClient
from broker.service import Broker, init_state_dir
from broker.vault import MASTER_KEY_NAME
from console_proxy import keyring

HEARTBEAT = 0.5
"""Heartbeat interval for tests: revocation must land within one of these."""


@dataclass
class BrokerState:
    """A state directory with an admin and an issuer key."""

    root: Path
    admin_key: str
    issuer_key: str
    proxies: dict[str, Path] = field(default_factory=dict)
    database: str | None = None
    """``--database``: None for the state dir's SQLite file."""

    @classmethod
    def create(cls, root: Path, database: str | None = None) -> BrokerState:
        init_state_dir(root, database=database)
        broker = Broker(root, database=database)
        try:
            return cls(
                root,
                broker.create_apikey("admin", "admin", "test"),
                broker.create_apikey("issuer", "issuer", "test"),
                database=database,
            )
        finally:
            broker.close()

    def replica(self, root: Path) -> BrokerState:
        """Another replica's state dir on the same database: a copy of master.key, nothing else."""
        root.mkdir(mode=0o700)
        shutil.copy2(self.root / MASTER_KEY_NAME, root / MASTER_KEY_NAME)
        return BrokerState(root, self.admin_key, self.issuer_key, self.proxies, self.database)

    def open(self) -> Broker:
        return Broker(self.root, database=self.database)

    def add_proxy(self, name: str, public_url: str) -> Path:
        broker = self.open()
        try:
            credential = broker.add_proxy(name, public_url, "test")
        finally:
            broker.close()
        path = self.root.parent / f"{name}-credential.json"
        path.write_text(json.dumps({"proxy_id": credential["proxy_id"], "secret": credential["secret"]}))
        path.chmod(0o600)
        self.proxies[name] = path
        return path


def legacy_state_dir(root: Path) -> Path:
    """A state dir as releases before the keyring moved into the database left it: master.key,
    keyring.json, and no broker.db (the caller writes the old schema). Returns the keyring path."""
    init_state_dir(root)
    broker = Broker(root)
    try:
        keyring.save(broker.keyring(), root / "keyring.json")
    finally:
        broker.close()
    (root / "broker.db").unlink()
    return root / "keyring.json"


class BrokerProcess(ProxyProcess):
    state: BrokerState

    def client(self, key: str | None = None) -> BrokerClient:
        return BrokerClient(self.base, key)

    @property
    def admin(self) -> BrokerClient:
        return self.client(self.state.admin_key)

    @property
    def issuer(self) -> BrokerClient:
        return self.client(self.state.issuer_key)

    def kill(self) -> None:
        """SIGKILL: no chance to flush anything the database had not committed."""
        self.process.kill()
        self.process.wait()


def start_broker(
    state: BrokerState, *extra: str, port: int | None = None, heartbeat_interval: float = HEARTBEAT
) -> BrokerProcess:
    """Start ``console-broker serve`` on ``state``; returns once it listens."""
    port = port or free_port()
    log_path = state.root.parent / f"broker-{port}.log"
    command = [
        sys.executable,
        "-m",
        "broker.cli",
        "serve",
        "--state-dir",
        str(state.root),
        "--listen",
        f"127.0.0.1:{port}",
        "--heartbeat-interval",
        str(heartbeat_interval),
        "--log-level",
        "DEBUG",
        *(["--database", state.database] if state.database else []),
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
    broker = BrokerProcess(process, port, log_path, ready_line="console-broker listening")
    broker.state = state
    threading.Thread(target=broker._pump, daemon=True).start()
    if not broker.ready.wait(START_TIMEOUT) or broker.exited.is_set():
        broker.stop()
        raise AssertionError(f"broker did not start:\n{broker.log_text()}")
    return broker


def start_linked_proxy(
    tmp_path: Path, broker: BrokerProcess, name: str, *extra: str, interval: float = HEARTBEAT
) -> ProxyProcess:
    """A proxy registered at the broker (``proxy add``) and started with ``--broker``."""
    port = free_port()
    public_url = f"http://127.0.0.1:{port}"
    credential = broker.state.proxies.get(name) or broker.state.add_proxy(name, public_url)
    return start_proxy(
        tmp_path,
        None,
        "--broker",
        broker.base,
        "--proxy-credential",
        str(credential),
        "--heartbeat-interval",
        str(interval),
        "--public-url",
        public_url,
        *extra,
        port=port,
    )


def wait_for(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns something truthy, with a deadline (for heartbeats, where
    no event exists to wait on)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def healthy_proxies(broker: BrokerProcess, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    return wait_for(
        lambda: (
            [p for p in broker.admin.proxies() if p["healthy"]]
            if sum(p["healthy"] for p in broker.admin.proxies()) >= count
            else None
        ),
        timeout,
        what=f"{count} healthy proxies",
    )
