"""Revocation latency: from ``DELETE /api/v1/sessions/{id}`` to the browser's 4410.

Real processes: one Xvnc (bench.targets), ``console-broker serve`` and a ``console-proxy serve``
linked to it with a 30 s heartbeat, so only the push (``GET /proxy/watch``) can close a session
in time. On PostgreSQL (``--postgres``: a throwaway cluster, as the tests start it; or
``--database URL`` of an empty database) two replicas: the proxy watches A, the revocations are
made at B, so each one crosses the database's NOTIFY. Each round mints a reusable console at the
broker, opens it through the proxy (VNC handshake done), then times the DELETE until the close
frame arrives. p50/p99 over ``--count`` rounds; goal p99 < 1 s.

``python -m bench.revocation [--count N] [--postgres | --database URL] [--json FILE]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path as FsPath
from typing import Any

from bench.brokers import serve_command
from bench.clients import ClosedError, Conn, Path, handshake
from bench.targets import REPO, free_port, start_xvnc, stop_process
from broker.client import BrokerClient
from broker.service import Broker, init_state_dir
from broker.vault import MASTER_KEY_NAME

HEARTBEAT = 30.0
"""The proxy's heartbeat interval: far longer than the latency measured."""
GOAL_P99_MS = 1000.0
CLOSE_TIMEOUT = 20.0


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _spawn(work: FsPath, name: str, command: list[str], ready_url: str) -> subprocess.Popen[bytes]:
    """Start a process (log to ``work/name.log``); return once ``ready_url`` answers."""
    with (work / f"{name}.log").open("wb") as log:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited: {(work / f'{name}.log').read_text()[-500:]}")
        try:
            with urllib.request.urlopen(ready_url, timeout=2):
                return process
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    stop_process(process, 5)  # type: ignore[arg-type]
    raise RuntimeError(f"{name} did not start")


class Fleet:
    """Broker replica(s) and one linked proxy; :meth:`stop` ends them all."""

    def __init__(self, work: FsPath, database: str | None) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []
        root = work / "state-a"
        init_state_dir(root, database=database)
        broker = Broker(root, database=database)
        try:
            self.admin_key = broker.create_apikey("admin", "admin", "bench")
            self.issuer_key = broker.create_apikey("issuer", "issuer", "bench")
            proxy_port = free_port()
            credential = broker.add_proxy("p1", f"http://127.0.0.1:{proxy_port}", "bench")
        finally:
            broker.close()
        (work / "p1.json").write_text(json.dumps(credential))
        roots = [root]
        if database is not None:  # a second replica: a copy of master.key, the same database
            (work / "state-b").mkdir(mode=0o700)
            (work / "state-b" / MASTER_KEY_NAME).write_bytes((root / MASTER_KEY_NAME).read_bytes())
            roots.append(work / "state-b")
        self.brokers = [self._broker(work, r, database) for r in roots]
        self.proxy_port = proxy_port
        self.processes.append(
            _spawn(
                work,
                "proxy",
                [
                    sys.executable,
                    "-m",
                    "console_proxy.cli",
                    "serve",
                    "--listen",
                    f"127.0.0.1:{proxy_port}",
                    "--broker",
                    self.brokers[0],
                    "--proxy-credential",
                    str(work / "p1.json"),
                    "--heartbeat-interval",
                    str(HEARTBEAT),
                    "--public-url",
                    f"http://127.0.0.1:{proxy_port}",
                    "--log-level",
                    "WARNING",
                ],
                f"http://127.0.0.1:{proxy_port}/healthz",
            )
        )

    def _broker(self, work: FsPath, root: FsPath, database: str | None) -> str:
        port = free_port()
        self.processes.append(
            _spawn(
                work,
                f"broker-{root.name}",
                serve_command(root, port, HEARTBEAT, database),
                f"http://127.0.0.1:{port}/healthz",
            )
        )
        return f"http://127.0.0.1:{port}"

    @property
    def revoking(self) -> str:
        """Where revocations are made: the replica the proxy does not watch, when there are two."""
        return self.brokers[-1]

    def stop(self) -> None:
        for process in reversed(self.processes):
            stop_process(process, 10)  # type: ignore[arg-type]


async def _closed(conn: Conn) -> str:
    """Wait for the proxy to close the websocket; its close frame as text."""
    try:
        while True:
            await conn._wait()
    except ClosedError as exc:
        return str(exc)


async def _one(fleet: Fleet, target_id: str, password: str) -> float:
    """One console minted, opened, revoked: milliseconds from the DELETE to the 4410."""
    issuer = BrokerClient(fleet.revoking, fleet.issuer_key)
    admin = BrokerClient(fleet.revoking, fleet.admin_key)
    console = await asyncio.to_thread(issuer.mint, target_id, single_use=False)
    conn = await Conn.open(
        Path("consolegate", "ws", fleet.proxy_port, "/websockify", token=console["token"], password=password)
    )
    try:
        await handshake(conn, password)
        closed = asyncio.ensure_future(_closed(conn))
        started = time.perf_counter()
        await asyncio.to_thread(admin.revoke, console["session_id"])
        reason = await asyncio.wait_for(closed, CLOSE_TIMEOUT)
        elapsed = (time.perf_counter() - started) * 1000
    finally:
        conn.close()
    if "4410" not in reason:
        raise RuntimeError(f"expected 4410, got {reason}")
    return elapsed


def _percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))]


async def measure(work: FsPath, count: int, database: str | None) -> dict[str, Any]:
    xvnc = start_xvnc(work)
    fleet = None
    try:
        fleet = Fleet(work, database)
        admin = BrokerClient(fleet.revoking, fleet.admin_key)
        target = admin.add_target(name="bench", host="127.0.0.1", port=xvnc.port, password=xvnc.password)
        deadline = time.monotonic() + 10
        while not any(p["healthy"] for p in admin.proxies()):
            if time.monotonic() > deadline:
                raise RuntimeError("the proxy never became healthy")
            await asyncio.sleep(0.1)
        latencies = [await _one(fleet, target["id"], xvnc.password) for _ in range(count)]
    finally:
        if fleet is not None:
            fleet.stop()
        xvnc.stop()
    p99 = _percentile(latencies, 0.99)
    return {
        "engine": "postgresql" if database else "sqlite",
        "replicas": 2 if database else 1,
        "revocations": count,
        "proxy_heartbeat_s": HEARTBEAT,
        "p50_ms": round(statistics.median(latencies), 2),
        "p99_ms": round(p99, 2),
        "max_ms": round(max(latencies), 2),
        "min_ms": round(min(latencies), 2),
        "goal_p99_ms": GOAL_P99_MS,
        "met": p99 < GOAL_P99_MS,
    }


def run(count: int = 50, *, postgres: bool = False, database: str | None = None) -> dict[str, Any]:
    """Every configuration asked for; PostgreSQL from a throwaway cluster when ``postgres``."""
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="consolegate-revoke-") as tmp:
        work = FsPath(tmp)
        (work / "sqlite").mkdir()
        _log(f"revocation latency, SQLite, one broker: {count} revocations")
        results["sqlite"] = asyncio.run(measure(work / "sqlite", count, None))
        cluster = None
        if postgres and database is None:
            sys.path.insert(0, str(REPO / "tests"))
            from pgcluster import PgCluster  # the tests' throwaway cluster (needs Debian's postgresql)

            cluster = PgCluster()
            database = cluster.new_database()
        try:
            if database is not None:
                (work / "postgresql").mkdir()
                _log(f"revocation latency, PostgreSQL, two replicas (watch at A, revoke at B): {count} revocations")
                results["postgresql"] = asyncio.run(measure(work / "postgresql", count, database))
        finally:
            if cluster is not None:
                cluster.destroy()
    return results


def table(results: dict[str, Any]) -> str:
    lines = ["revocation latency (DELETE -> browser's 4410; proxy heartbeat 30 s, so the watch did it):"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"  {name}: {r['error']}")
            continue
        lines.append(
            f"  {r['engine']:<10} {r['replicas']} replica(s)  p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms"
            f"  max {r['max_ms']:.1f} ms  over {r['revocations']}  (goal p99 < {r['goal_p99_ms']:.0f} ms: "
            f"{'met' if r['met'] else 'MISSED'})"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.revocation", description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=50, help="revocations per configuration (default 50)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--postgres", action="store_true", help="also two replicas on a throwaway PostgreSQL cluster")
    where.add_argument("--database", metavar="URL", help="also two replicas on this (empty) PostgreSQL database")
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    args = parser.parse_args(argv)
    results = run(args.count, postgres=args.postgres, database=args.database)
    print(table(results))
    if args.json:
        FsPath(args.json).write_text(json.dumps({"revocation": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
