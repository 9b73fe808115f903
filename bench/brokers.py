"""Broker throughput on its two engines: mints/s and redeems/s for SQLite, PostgreSQL with one
replica and with two, the broker's (and PostgreSQL's) CPU per mint, and the heartbeat load of
100 simulated proxies on one replica; then a fleet sizing from these figures.

Real ``console-broker serve`` processes over HTTP with kept-alive connections, a throwaway
PostgreSQL 15 cluster (tests/pgcluster.py: ``fsync=off``, so the figures are the broker's and
the protocol's, not a disk's). Each broker runs its handlers and their database calls on one
event loop, so a replica serves one request at a time: its rate is bounded by the round trips a
request makes to the database, and CPU ms per request (from the process's CPU time over the run)
is what a sizing can scale. Client threads share the machine with the brokers and PostgreSQL;
on a small machine the rates are the machine's, the CPU per request is the code's.

Run alone: ``python -m bench.brokers [--seconds S] [--json FILE]``; in ``python -m bench`` as
the section ``brokers``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.targets import REPO, free_port, stop_process, workdir
from broker.service import Broker, init_state_dir
from broker.vault import MASTER_KEY_NAME

PROXIES = 100
HEARTBEAT_INTERVAL = 5.0
"""The proxies' default heartbeat interval, for the sizing."""
FLEET_PROXIES, FLEET_SESSIONS = 100, 2000


@dataclass
class Fleet:
    """A state dir's credentials: the issuer key, the proxies' bearer tokens, a target."""

    issuer: str
    proxies: dict[str, str] = field(default_factory=dict)
    target: str = ""


def make_state(root: Path, database: str | None) -> Fleet:
    init_state_dir(root, database=database)
    broker = Broker(root, database=database)
    try:
        fleet = Fleet(broker.create_apikey("bench", "issuer", "bench"))
        for i in range(PROXIES):
            name = f"p{i:03d}"
            credential = broker.add_proxy(name, f"http://127.0.0.1:{10000 + i}", "bench")
            fleet.proxies[name] = f"Bearer {credential['proxy_id']}.{credential['secret']}"
        fleet.target = broker.add_target({"name": "vm", "host": "127.0.0.1", "port": 5901}, "bench")["id"]
        return fleet
    finally:
        broker.close()


class Replica:
    """One ``console-broker serve`` process."""

    def __init__(self, root: Path, database: str | None) -> None:
        self.port = free_port()
        command = [sys.executable, "-m", "broker.cli", "serve", "--state-dir", str(root), "--listen",
                   f"127.0.0.1:{self.port}", "--heartbeat-interval", str(HEARTBEAT_INTERVAL * 120),
                   "--log-level", "WARNING", *(["--database", database] if database else [])]
        self.process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.ps = psutil.Process(self.process.pid)
        deadline = time.monotonic() + 30
        while not self._ready():
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise RuntimeError("the broker did not start")
            time.sleep(0.05)

    def _ready(self) -> bool:
        try:
            return Http(self.port).call("GET", "/healthz")[0] == 200
        except OSError:
            return False

    def cpu(self) -> float:
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def stop(self) -> None:
        stop_process(self.process, 5)  # type: ignore[arg-type]


class Http:
    """One kept-alive connection (a client thread's)."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def call(self, method: str, path: str, body: Any = None, auth: str | None = None) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if auth:
            headers["Authorization"] = auth
        try:
            self.conn.request(method, path, None if body is None else json.dumps(body), headers)
            answer = self.conn.getresponse()
        except (OSError, http.client.HTTPException):
            self.conn.close()  # reconnect on the next call
            raise
        raw = answer.read()
        return answer.status, json.loads(raw) if raw else None


def postgres_cpu(cluster: Any) -> float:
    """CPU seconds of the PostgreSQL server: the postmaster and its backends now alive."""
    try:
        pid = int((cluster.root / "data" / "postmaster.pid").read_text().split()[0])
        main = psutil.Process(pid)
        total = 0.0
        for proc in [main, *main.children(recursive=True)]:
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                continue
        return total
    except (OSError, ValueError, psutil.Error):
        return 0.0


def drive(replicas: Sequence[Replica], threads_each: int, seconds: float,
          request: Callable[[Http, int], bool]) -> dict[str, float]:
    """``request(conn, n)`` from ``threads_each`` threads per replica for ``seconds``; the
    successful requests/s and failures."""
    done, failed, stop = [0], [0], threading.Event()
    lock = threading.Lock()

    def worker(replica: Replica) -> None:
        conn, n, ok, bad = Http(replica.port), 0, 0, 0
        while not stop.is_set():
            n += 1
            try:
                good = request(conn, n)
            except (OSError, http.client.HTTPException):
                good = False
            ok, bad = ok + good, bad + (not good)
        with lock:
            done[0] += ok
            failed[0] += bad

    workers = [threading.Thread(target=worker, args=(r,)) for r in replicas for _ in range(threads_each)]
    started = time.monotonic()
    for thread in workers:
        thread.start()
    stop.wait(seconds)
    stop.set()
    for thread in workers:
        thread.join()
    elapsed = time.monotonic() - started
    return {"per_second": done[0] / elapsed, "requests": done[0], "failed": failed[0], "seconds": elapsed}


def measured(replicas: Sequence[Replica], cluster: Any, run: Callable[[], dict[str, float]]) -> dict[str, Any]:
    """``run()`` with the CPU the replicas and PostgreSQL spent on it, per successful request."""
    before = [r.cpu() for r in replicas]
    pg_before = postgres_cpu(cluster) if cluster else 0.0
    result: dict[str, Any] = run()
    spent = [r.cpu() - b for r, b in zip(replicas, before, strict=True)]
    count = max(result["requests"], 1)
    result["broker_cpu_ms_per_request"] = [round(1000 * s / count * len(replicas), 3) for s in spent]
    result["broker_cpu_ms_per_request_total"] = round(1000 * sum(spent) / count, 3)
    if cluster:
        result["postgres_cpu_ms_per_request"] = round(1000 * (postgres_cpu(cluster) - pg_before) / count, 3)
    return result


def bench_engine(name: str, work: Path, cluster: Any, replicas_count: int, seconds: float) -> dict[str, Any]:
    database = cluster.new_database() if cluster else None
    root = work / name
    fleet = make_state(root / "a", database)
    roots = [root / "a"]
    for i in range(1, replicas_count):
        other = root / chr(ord("a") + i)
        other.mkdir(mode=0o700)
        shutil.copy2(root / "a" / MASTER_KEY_NAME, other / MASTER_KEY_NAME)
        roots.append(other)
    replicas = [Replica(r, database) for r in roots]
    try:
        first = Http(replicas[0].port)
        for proxy, auth in fleet.proxies.items():
            first.call("POST", "/api/v1/proxy/heartbeat", heartbeat(proxy, 0), auth)
        sessions: list[str] = []
        issuer = f"Bearer {fleet.issuer}"

        def mint(conn: Http, _: int) -> bool:
            status, body = conn.call("POST", "/api/v1/consoles", {"target_id": fleet.target, "ttl": 600}, issuer)
            if status == 201:
                sessions.append(body["session_id"])
            return status == 201

        auths = list(fleet.proxies.values())

        def redeem(conn: Http, n: int) -> bool:
            body = {"jti": secrets.token_urlsafe(18), "session_id": sessions[n % len(sessions)],
                    "exp": int(time.time()) + 600}
            return conn.call("POST", "/api/v1/proxy/redeem", body, auths[n % len(auths)])[0] == 200

        drive(replicas, 2, min(0.5, seconds), mint)  # warm-up: pools, caches
        result = {"replicas": replicas_count,
                  "mint": measured(replicas, cluster, lambda: drive(replicas, 4, seconds, mint)),
                  "redeem": measured(replicas, cluster, lambda: drive(replicas, 4, seconds, redeem))}
        return result
    finally:
        for replica in replicas:
            replica.stop()


def heartbeat(proxy: str, version: int, sessions: int = 0) -> dict[str, Any]:
    return {"proxy_id": proxy, "public_url": None, "sessions": sessions, "capacity": FLEET_SESSIONS,
            "draining": False, "version": version}


def bench_heartbeats(work: Path, cluster: Any, seconds: float) -> dict[str, Any]:
    """100 proxies heartbeating one PostgreSQL replica as fast as it answers (each with its
    current keyring version, as a running proxy does): heartbeats/s and CPU per heartbeat."""
    database = cluster.new_database()
    fleet = make_state(work / "heartbeats", database)
    replica = Replica(work / "heartbeats", database)
    try:
        conn = Http(replica.port)
        versions = {p: conn.call("POST", "/api/v1/proxy/heartbeat", heartbeat(p, 0), a)[1]["keyring_version"]
                    for p, a in fleet.proxies.items()}
        names = list(fleet.proxies)

        def beat(http: Http, n: int) -> bool:
            proxy = names[n % len(names)]
            body = heartbeat(proxy, versions[proxy], sessions=n % FLEET_SESSIONS)
            return http.call("POST", "/api/v1/proxy/heartbeat", body, fleet.proxies[proxy])[0] == 200

        result = measured([replica], cluster, lambda: drive([replica], 4, seconds, beat))
        result["proxies"] = PROXIES
        return result
    finally:
        replica.stop()


def run(seconds: float, work: Path | None = None) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "tests"))  # tests/pgcluster.py: the tests' throwaway cluster
    from pgcluster import PgCluster, available

    work = work or workdir()
    results: dict[str, Any] = {"seconds": seconds}
    results["sqlite"] = bench_engine("sqlite", work, None, 1, seconds)
    if not available():
        results["postgresql"] = {"error": "PostgreSQL 15 is not installed"}
        return results
    cluster = PgCluster()
    try:
        results["postgresql_1"] = bench_engine("pg1", work, cluster, 1, seconds)
        results["postgresql_2"] = bench_engine("pg2", work, cluster, 2, seconds)
        results["heartbeats"] = bench_heartbeats(work, cluster, seconds)
    finally:
        cluster.destroy()
    results["sizing"] = sizing(results)
    return results


def sizing(results: dict[str, Any]) -> dict[str, Any]:
    """A fleet of 100 proxies x 2,000 sessions from the measured CPU per request: what the
    heartbeats cost, and how many consoles per second a replica core and the database carry.

    A console costs one mint and (single use) one redeem at the broker. Churn assumed: every
    session replaced once per 30 minutes (steady), and a storm of all of them in 10 minutes."""
    one, two, beats = results["postgresql_1"], results["postgresql_2"], results["heartbeats"]
    console_cpu = one["mint"]["broker_cpu_ms_per_request_total"] + one["redeem"]["broker_cpu_ms_per_request_total"]
    pg_console_cpu = one["mint"].get("postgres_cpu_ms_per_request", 0) + one["redeem"].get(
        "postgres_cpu_ms_per_request", 0)
    sessions = FLEET_PROXIES * FLEET_SESSIONS
    steady, storm = sessions / 1800, sessions / 600
    beat_rate = FLEET_PROXIES / HEARTBEAT_INTERVAL
    beat_cores = beat_rate * beats["broker_cpu_ms_per_request_total"] / 1000
    per_replica_consoles = 1 / (1 / one["mint"]["per_second"] + 1 / one["redeem"]["per_second"])
    return {
        "sessions": sessions, "consoles_per_s_steady": round(steady, 1), "consoles_per_s_storm": round(storm, 1),
        "broker_cpu_ms_per_console": round(console_cpu, 3), "postgres_cpu_ms_per_console": round(pg_console_cpu, 3),
        "heartbeats_per_s": beat_rate, "heartbeat_broker_cores": round(beat_cores, 4),
        "consoles_per_s_one_replica_measured": round(per_replica_consoles, 1),
        "mints_per_s_two_replicas_measured": round(two["mint"]["per_second"], 1),
        "broker_cores_steady": round(steady * console_cpu / 1000 + beat_cores, 3),
        "broker_cores_storm": round(storm * console_cpu / 1000 + beat_cores, 3),
        "postgres_cores_storm": round(storm * pg_console_cpu / 1000, 3),
        # a replica answers one request at a time: its measured rate, not its CPU, bounds it
        "replicas_steady": math.ceil(steady / per_replica_consoles),
        "replicas_storm": math.ceil(storm / per_replica_consoles),
    }


def table(results: dict[str, Any]) -> str:
    lines = ["broker (mints and redeems over HTTP, 4 client threads per replica):",
             (f"  {'engine':<22}{'mints/s':>9}{'redeems/s':>11}{'CPU ms/mint (per replica)':>28}"
             f"{'PG CPU ms/mint':>16}")]
    for key, label in (("sqlite", "SQLite"), ("postgresql_1", "PostgreSQL, 1 replica"),
                       ("postgresql_2", "PostgreSQL, 2 replicas")):
        r = results.get(key)
        if not r or "error" in r:
            lines.append(f"  {label:<22}{(r or {}).get('error', 'not run')}")
            continue
        m, d = r["mint"], r["redeem"]
        per = ", ".join(f"{v:.2f}" for v in m["broker_cpu_ms_per_request"])
        pg = m.get("postgres_cpu_ms_per_request")
        lines.append(f"  {label:<22}{m['per_second']:>9,.0f}{d['per_second']:>11,.0f}{per:>28}"
                     f"{'-' if pg is None else f'{pg:.2f}':>16}")
    b = results.get("heartbeats")
    if b:
        lines.append(f"  heartbeats of {b['proxies']} proxies on one PostgreSQL replica: {b['per_second']:,.0f}/s at most, "
                     f"{b['broker_cpu_ms_per_request_total']:.2f} ms broker CPU and "
                     f"{b.get('postgres_cpu_ms_per_request', 0):.2f} ms PostgreSQL CPU per heartbeat")
    s = results.get("sizing")
    if s:
        lines.append(f"  sizing, {FLEET_PROXIES} proxies x {FLEET_SESSIONS} sessions ({s['sessions']:,}): "
                     f"{s['consoles_per_s_steady']}/s consoles steady (30 min sessions), {s['consoles_per_s_storm']}/s "
                     f"in a 10-minute storm; {s['broker_cpu_ms_per_console']:.2f} ms broker + "
                     f"{s['postgres_cpu_ms_per_console']:.2f} ms PostgreSQL CPU per console; heartbeats "
                     f"{s['heartbeats_per_s']:.0f}/s = {s['heartbeat_broker_cores']:.3f} core; broker cores "
                     f"{s['broker_cores_steady']:.2f} steady, {s['broker_cores_storm']:.2f} storm; one replica "
                     f"measured {s['consoles_per_s_one_replica_measured']}/s consoles (mint + redeem): "
                     f"{s['replicas_steady']} replicas steady, {s['replicas_storm']} for the storm (plus one spare)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.brokers", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="each measurement's duration")
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    args = parser.parse_args(argv)
    results = run(args.seconds)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
