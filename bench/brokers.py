"""Broker throughput on its two engines: mints/s and redeems/s for SQLite, PostgreSQL with one
replica and with two, the broker's (and PostgreSQL's) CPU per mint, the heartbeat load of 100
simulated proxies on one replica, and the same 100 proxies each holding a watch (``GET
/proxy/watch``) while they heartbeat at their normal rate: the CPU the held watches cost at rest,
and a revocation's fan-out to all of them (time until every watch answered, CPU); then a fleet
sizing from these figures.

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
import contextlib
import http.client
import json
import math
import secrets
import shutil
import socket
import statistics
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
from broker.watch import WATCH_HOLD

PROXIES = 100
HEARTBEAT_INTERVAL = 5.0
"""The proxies' default heartbeat interval, for the sizing."""
FLEET_PROXIES, FLEET_SESSIONS = 100, 2000
WATCH_REVOCATIONS = 10
"""Revocations fanned out to the 100 held watches (the p50/max of the time until all answered)."""
WATCHES_GAUGE = "consolegate_broker_watches"


@dataclass
class Fleet:
    """A state dir's credentials: the issuer and admin keys, the proxies' bearer tokens, a target."""

    issuer: str
    admin: str = ""
    proxies: dict[str, str] = field(default_factory=dict)
    target: str = ""


def make_state(root: Path, database: str | None) -> Fleet:
    init_state_dir(root, database=database)
    broker = Broker(root, database=database)
    try:
        fleet = Fleet(broker.create_apikey("bench", "issuer", "bench"), broker.create_apikey("admin", "admin", "bench"))
        for i in range(PROXIES):
            name = f"p{i:03d}"
            credential = broker.add_proxy(name, f"http://127.0.0.1:{10000 + i}", "bench")
            fleet.proxies[name] = f"Bearer {credential['proxy_id']}.{credential['secret']}"
        fleet.target = broker.add_target({"name": "vm", "host": "127.0.0.1", "port": 5901}, "bench")["id"]
        return fleet
    finally:
        broker.close()


def serve_command(root: Path, port: int, heartbeat_interval: float, database: str | None) -> list[str]:
    """``console-broker serve`` on loopback ``port`` for a bench: state in ``root`` (and
    ``database`` when given), warnings only in its log."""
    return [
        sys.executable,
        "-m",
        "broker.cli",
        "serve",
        "--state-dir",
        str(root),
        "--listen",
        f"127.0.0.1:{port}",
        "--heartbeat-interval",
        str(heartbeat_interval),
        "--log-level",
        "WARNING",
        *(["--database", database] if database else []),
    ]


class Replica:
    """One ``console-broker serve`` process."""

    def __init__(self, root: Path, database: str | None) -> None:
        self.port = free_port()
        command = serve_command(root, self.port, HEARTBEAT_INTERVAL * 120, database)
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

    def __init__(self, port: int, timeout: float = 10) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

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


def drive(
    replicas: Sequence[Replica], threads_each: int, seconds: float, request: Callable[[Http, int], bool]
) -> dict[str, float]:
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
            body = {
                "jti": secrets.token_urlsafe(18),
                "session_id": sessions[n % len(sessions)],
                "exp": int(time.time()) + 600,
            }
            return conn.call("POST", "/api/v1/proxy/redeem", body, auths[n % len(auths)])[0] == 200

        drive(replicas, 2, min(0.5, seconds), mint)  # warm-up: pools, caches
        result = {
            "replicas": replicas_count,
            "mint": measured(replicas, cluster, lambda: drive(replicas, 4, seconds, mint)),
            "redeem": measured(replicas, cluster, lambda: drive(replicas, 4, seconds, redeem)),
        }
        return result
    finally:
        for replica in replicas:
            replica.stop()


def heartbeat(proxy: str, version: int, sessions: int = 0) -> dict[str, Any]:
    return {
        "proxy_id": proxy,
        "public_url": None,
        "sessions": sessions,
        "capacity": FLEET_SESSIONS,
        "draining": False,
        "version": version,
    }


def bench_heartbeats(work: Path, cluster: Any, seconds: float) -> dict[str, Any]:
    """100 proxies heartbeating one PostgreSQL replica as fast as it answers (each with its
    current keyring version, as a running proxy does): heartbeats/s and CPU per heartbeat."""
    database = cluster.new_database()
    fleet = make_state(work / "heartbeats", database)
    replica = Replica(work / "heartbeats", database)
    try:
        conn = Http(replica.port)
        versions = {
            p: conn.call("POST", "/api/v1/proxy/heartbeat", heartbeat(p, 0), a)[1]["keyring_version"]
            for p, a in fleet.proxies.items()
        }
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


class Heartbeats(threading.Thread):
    """The fleet's heartbeats at their normal rate: each proxy every :data:`HEARTBEAT_INTERVAL`,
    staggered evenly over the interval as independently started proxies are. A late beat moves
    the schedule instead of bursting to catch up (a proxy's timer runs from its last beat)."""

    def __init__(self, port: int, fleet: Fleet, versions: dict[str, int]) -> None:
        super().__init__(name="heartbeats", daemon=True)
        self.port, self.fleet, self.versions = port, fleet, versions
        self.stopping = threading.Event()
        self.sent = self.failed = 0

    def run(self) -> None:
        conn, names, due = Http(self.port), list(self.fleet.proxies), time.monotonic()
        step = HEARTBEAT_INTERVAL / len(names)
        n = 0
        while not self.stopping.wait(max(0.0, due - time.monotonic())):
            now = time.monotonic()
            due = (due if now - due < step else now) + step  # late by a beat or more: move on
            proxy = names[n % len(names)]
            try:
                ok = (
                    conn.call(
                        "POST",
                        "/api/v1/proxy/heartbeat",
                        heartbeat(proxy, self.versions[proxy]),
                        self.fleet.proxies[proxy],
                    )[0]
                    == 200
                )
            except (OSError, http.client.HTTPException):
                ok = False
            self.sent, self.failed = self.sent + ok, self.failed + (not ok)
            n += 1


class Fanout:
    """When each watch's answer named the session of the current round's revocation."""

    def __init__(self, watchers: int) -> None:
        self.watchers, self.lock, self.session = watchers, threading.Lock(), ""
        self.answered: list[float] = []
        self.done = threading.Event()

    def arm(self, session: str) -> None:
        with self.lock:
            self.session, self.answered = session, []
            self.done.clear()

    def saw(self, revoked: list[str], when: float) -> None:
        with self.lock:
            if self.session and self.session in revoked:
                self.answered.append(when)
                if len(self.answered) == self.watchers:
                    self.done.set()


class Watcher(threading.Thread):
    """One simulated proxy's push channel: ``GET /proxy/watch`` (a snapshot first, then
    ``?since=N`` held), re-issued at once after each answer, as console_proxy does."""

    def __init__(self, port: int, auth: str, fanout: Fanout) -> None:
        super().__init__(name="watch", daemon=True)
        self.http, self.auth, self.fanout = Http(port, timeout=WATCH_HOLD + 15), auth, fanout
        self.stopping = threading.Event()
        self.seq: int | None = None
        self.answers = self.failed = 0

    def run(self) -> None:
        while not self.stopping.is_set():
            path = "/api/v1/proxy/watch" + ("" if self.seq is None else f"?since={self.seq}")
            try:
                status, body = self.http.call("GET", path, auth=self.auth)
            except (OSError, http.client.HTTPException):
                status, body = 0, None
            if status != 200:
                self.failed += 1
                self.stopping.wait(0.5)
                continue
            self.fanout.saw(body["revoked"], time.monotonic())
            self.seq, self.answers = body["seq"], self.answers + 1

    def stop(self) -> None:
        """Stop, unblocking a held watch by shutting its socket."""
        self.stopping.set()
        sock = self.http.conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def watches_held(port: int) -> int:
    """The broker's own count of held watches (its /metrics gauge)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    for line in text.splitlines():
        if line.startswith(WATCHES_GAUGE + " "):
            return int(float(line.split()[1]))
    return -1


def await_held(port: int, count: int, timeout: float = 30.0) -> None:
    """Until the broker holds ``count`` watches (polled sparingly: each poll is a request)."""
    deadline = time.monotonic() + timeout
    while watches_held(port) != count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the broker did not come to hold {count} watches")
        time.sleep(0.05)


def cpu_per_second(replica: Replica, cluster: Any, seconds: float, beats: Heartbeats | None) -> dict[str, float]:
    """The replica's and PostgreSQL's CPU over ``seconds`` of whatever is running, in ms per s
    (millicores), and the heartbeats answered meanwhile."""
    sent = beats.sent if beats else 0
    broker, pg, started = replica.cpu(), postgres_cpu(cluster), time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    return {
        "seconds": round(elapsed, 2),
        "broker_cpu_ms_per_s": round(1000 * (replica.cpu() - broker) / elapsed, 2),
        "postgres_cpu_ms_per_s": round(1000 * (postgres_cpu(cluster) - pg) / elapsed, 2),
        "heartbeats_per_s": round(((beats.sent if beats else 0) - sent) / elapsed, 1),
    }


def revocation_rounds(
    replica: Replica, cluster: Any, fleet: Fleet, fanout: Fanout, idle: dict[str, float]
) -> dict[str, Any]:
    """:data:`WATCH_REVOCATIONS` rounds: mint a console, wait for every watch to be held, revoke
    it, time until every watch has answered with it, and wait for every watch to be held again.
    The CPU from the DELETE to the watches held again, less the idle rate (heartbeats, held
    watches) over that time, is the fan-out's: the revoke, 100 answers and 100 re-issued watches."""
    conn, rounds = Http(replica.port), []
    broker_spent = pg_spent = 0.0
    for _ in range(WATCH_REVOCATIONS):
        status, body = conn.call(
            "POST", "/api/v1/consoles", {"target_id": fleet.target, "ttl": 600}, f"Bearer {fleet.issuer}"
        )
        if status != 201:
            raise RuntimeError(f"mint answered {status}")
        await_held(replica.port, fanout.watchers)
        fanout.arm(body["session_id"])
        broker, pg, started = replica.cpu(), postgres_cpu(cluster), time.monotonic()
        status, _ = conn.call("DELETE", f"/api/v1/sessions/{body['session_id']}", auth=f"Bearer {fleet.admin}")
        if status != 202 or not fanout.done.wait(30):
            raise RuntimeError(f"revocation answered {status}; {len(fanout.answered)} watches answered")
        await_held(replica.port, fanout.watchers)
        elapsed = time.monotonic() - started
        broker_spent += replica.cpu() - broker - idle["broker_cpu_ms_per_s"] / 1000 * elapsed
        pg_spent += postgres_cpu(cluster) - pg - idle["postgres_cpu_ms_per_s"] / 1000 * elapsed
        answered = sorted(1000 * (t - started) for t in fanout.answered)
        rounds.append({"all_answered_ms": answered[-1], "median_watch_ms": statistics.median(answered)})
    every = [r["all_answered_ms"] for r in rounds]
    return {
        "revocations": len(rounds),
        "all_answered_ms_p50": round(statistics.median(every), 1),
        "all_answered_ms_max": round(max(every), 1),
        "median_watch_ms_p50": round(statistics.median(r["median_watch_ms"] for r in rounds), 1),
        "broker_cpu_ms_per_fanout": round(1000 * broker_spent / len(rounds), 1),
        "postgres_cpu_ms_per_fanout": round(1000 * pg_spent / len(rounds), 1),
    }


def bench_watches(work: Path, cluster: Any, seconds: float) -> dict[str, Any]:
    """100 proxies heartbeating one PostgreSQL replica at their normal rate, then each also
    holding a watch: the CPU per second of both (idle: no change; and of the replica with no
    load at all, its floor), then revocations fanned out to all 100 watches. The idle window
    spans one whole hold (every watch answered empty and re-issued once, as in a steady fleet),
    however short ``seconds`` is."""
    database = cluster.new_database()
    fleet = make_state(work / "watches", database)
    replica = Replica(work / "watches", database)
    fanout = Fanout(PROXIES)
    watchers = [Watcher(replica.port, auth, fanout) for auth in fleet.proxies.values()]
    beats = Heartbeats(replica.port, fleet, {})
    try:
        conn = Http(replica.port)
        beats.versions.update(
            {
                p: conn.call("POST", "/api/v1/proxy/heartbeat", heartbeat(p, 0), a)[1]["keyring_version"]
                for p, a in fleet.proxies.items()
            }
        )
        quiet = cpu_per_second(replica, cluster, min(seconds, 5.0), None)
        beats.start()
        time.sleep(1.0)  # warm-up: the pool, the first heartbeats
        alone = cpu_per_second(replica, cluster, seconds, beats)
        for watcher in watchers:
            watcher.start()
        await_held(replica.port, PROXIES)
        idle = cpu_per_second(replica, cluster, max(seconds, WATCH_HOLD + 1), beats)
        result = {
            "proxies": PROXIES,
            "heartbeat_interval": HEARTBEAT_INTERVAL,
            "watch_hold": WATCH_HOLD,
            "quiet": quiet,
            "heartbeats_alone": alone,
            "with_watches_idle": idle,
            **revocation_rounds(replica, cluster, fleet, fanout, idle),
        }
        result["heartbeats_failed"] = beats.failed
        result["watch_failures"] = sum(w.failed for w in watchers)
        return result
    finally:
        beats.stopping.set()
        for watcher in watchers:
            watcher.stop()
        replica.stop()
        if beats.is_alive():
            beats.join(5)
        for watcher in watchers:
            if watcher.is_alive():
                watcher.join(5)


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
        results["watches"] = bench_watches(work, cluster, seconds)
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
        "postgres_cpu_ms_per_request", 0
    )
    sessions = FLEET_PROXIES * FLEET_SESSIONS
    steady, storm = sessions / 1800, sessions / 600
    beat_rate = FLEET_PROXIES / HEARTBEAT_INTERVAL
    beat_cores = beat_rate * beats["broker_cpu_ms_per_request_total"] / 1000
    per_replica_consoles = 1 / (1 / one["mint"]["per_second"] + 1 / one["redeem"]["per_second"])
    return {
        "sessions": sessions,
        "consoles_per_s_steady": round(steady, 1),
        "consoles_per_s_storm": round(storm, 1),
        "broker_cpu_ms_per_console": round(console_cpu, 3),
        "postgres_cpu_ms_per_console": round(pg_console_cpu, 3),
        "heartbeats_per_s": beat_rate,
        "heartbeat_broker_cores": round(beat_cores, 4),
        "consoles_per_s_one_replica_measured": round(per_replica_consoles, 1),
        "mints_per_s_two_replicas_measured": round(two["mint"]["per_second"], 1),
        "broker_cores_steady": round(steady * console_cpu / 1000 + beat_cores, 3),
        "broker_cores_storm": round(storm * console_cpu / 1000 + beat_cores, 3),
        "postgres_cores_storm": round(storm * pg_console_cpu / 1000, 3),
        # a replica answers one request at a time: its measured rate, not its CPU, bounds it
        "replicas_steady": math.ceil(steady / per_replica_consoles),
        "replicas_storm": math.ceil(storm / per_replica_consoles),
        **(watch_sizing(results["watches"]) if "watches" in results else {}),
    }


def watch_sizing(watches: dict[str, Any]) -> dict[str, Any]:
    """What the 100 proxies' watches add: the idle cost of holding them (and re-issuing each
    after every hold), and per revocation the fan-out's CPU and how many revocations a second one
    broker core carries for the whole fleet. The fleet's watches may spread over replicas; the
    sum of their CPU is the same."""
    idle, alone = watches["with_watches_idle"], watches["heartbeats_alone"]
    fanout = watches["broker_cpu_ms_per_fanout"]
    return {
        "watches": watches["proxies"],
        "watches_idle_broker_cores": round((idle["broker_cpu_ms_per_s"] - alone["broker_cpu_ms_per_s"]) / 1000, 4),
        "watches_idle_postgres_cores": round(
            (idle["postgres_cpu_ms_per_s"] - alone["postgres_cpu_ms_per_s"]) / 1000, 4
        ),
        "heartbeats_measured_broker_cores": round(
            (alone["broker_cpu_ms_per_s"] - watches["quiet"]["broker_cpu_ms_per_s"]) / 1000, 4
        ),
        "revocation_broker_cpu_ms": fanout,
        "revocation_postgres_cpu_ms": watches["postgres_cpu_ms_per_fanout"],
        "revocations_per_s_per_broker_core": round(1000 / fanout, 1) if fanout > 0 else None,
    }


def table(results: dict[str, Any]) -> str:
    lines = [
        "broker (mints and redeems over HTTP, 4 client threads per replica):",
        (f"  {'engine':<22}{'mints/s':>9}{'redeems/s':>11}{'CPU ms/mint (per replica)':>28}{'PG CPU ms/mint':>16}"),
    ]
    for key, label in (
        ("sqlite", "SQLite"),
        ("postgresql_1", "PostgreSQL, 1 replica"),
        ("postgresql_2", "PostgreSQL, 2 replicas"),
    ):
        r = results.get(key)
        if not r or "error" in r:
            lines.append(f"  {label:<22}{(r or {}).get('error', 'not run')}")
            continue
        m, d = r["mint"], r["redeem"]
        per = ", ".join(f"{v:.2f}" for v in m["broker_cpu_ms_per_request"])
        pg = m.get("postgres_cpu_ms_per_request")
        lines.append(
            f"  {label:<22}{m['per_second']:>9,.0f}{d['per_second']:>11,.0f}{per:>28}"
            f"{'-' if pg is None else f'{pg:.2f}':>16}"
        )
    b = results.get("heartbeats")
    if b:
        lines.append(
            f"  heartbeats of {b['proxies']} proxies on one PostgreSQL replica: {b['per_second']:,.0f}/s at most, "
            f"{b['broker_cpu_ms_per_request_total']:.2f} ms broker CPU and "
            f"{b.get('postgres_cpu_ms_per_request', 0):.2f} ms PostgreSQL CPU per heartbeat"
        )
    w = results.get("watches")
    if w:
        lines += watch_lines(w)
    s = results.get("sizing")
    if s:
        lines.append(
            f"  sizing, {FLEET_PROXIES} proxies x {FLEET_SESSIONS} sessions ({s['sessions']:,}): "
            f"{s['consoles_per_s_steady']}/s consoles steady (30 min sessions), {s['consoles_per_s_storm']}/s "
            f"in a 10-minute storm; {s['broker_cpu_ms_per_console']:.2f} ms broker + "
            f"{s['postgres_cpu_ms_per_console']:.2f} ms PostgreSQL CPU per console; heartbeats "
            f"{s['heartbeats_per_s']:.0f}/s = {s['heartbeat_broker_cores']:.3f} core; broker cores "
            f"{s['broker_cores_steady']:.2f} steady, {s['broker_cores_storm']:.2f} storm; one replica "
            f"measured {s['consoles_per_s_one_replica_measured']}/s consoles (mint + redeem): "
            f"{_replicas(s['replicas_steady'])} steady, {s['replicas_storm']} for the storm (plus one spare)"
        )
        if "watches" in s:
            lines.append(
                f"  sizing, {s['watches']} watches: held idle {s['watches_idle_broker_cores']:.3f} broker core"
                " + "
                f"{s['watches_idle_postgres_cores']:.3f} PostgreSQL core (heartbeats at their normal rate "
                f"measured {s['heartbeats_measured_broker_cores']:.3f} core above the idle replica); each "
                f"revocation fans out for {s['revocation_broker_cpu_ms']:.0f} ms broker + "
                f"{s['revocation_postgres_cpu_ms']:.0f} ms PostgreSQL CPU: one broker core carries "
                f"{s['revocations_per_s_per_broker_core']} revocations/s to all {s['watches']} proxies"
            )
    return "\n".join(lines)


def _replicas(count: int) -> str:
    return f"{count} replica" if count == 1 else f"{count} replicas"


def watch_lines(w: dict[str, Any]) -> list[str]:
    """The watch load's rows of the table: CPU per second at rest, then per revocation."""
    lines = [
        (
            f"  watches: {w['proxies']} proxies on one PostgreSQL replica, heartbeats every "
            f"{w['heartbeat_interval']:g} s each, one watch each (held up to {w['watch_hold']:g} s, "
            "re-issued after each answer):"
        ),
        f"    {'load':<38}{'heartbeats/s':>13}{'broker CPU ms/s':>17}{'PG CPU ms/s':>13}",
    ]
    for key, label in (
        ("quiet", "nothing (the replica's floor)"),
        ("heartbeats_alone", "heartbeats alone"),
        ("with_watches_idle", "heartbeats + 100 watches held, idle"),
    ):
        r = w[key]
        lines.append(
            f"    {label:<38}{r['heartbeats_per_s']:>13.1f}{r['broker_cpu_ms_per_s']:>17.1f}"
            f"{r['postgres_cpu_ms_per_s']:>13.1f}"
        )
    lines.append(
        f"    one revocation (DELETE) to all {w['proxies']} watches answered: "
        f"p50 {w['all_answered_ms_p50']:.0f} ms, "
        f"max {w['all_answered_ms_max']:.0f} ms over {w['revocations']} (median watch "
        f"{w['median_watch_ms_p50']:.0f} ms); per fan-out {w['broker_cpu_ms_per_fanout']:.0f} ms broker + "
        f"{w['postgres_cpu_ms_per_fanout']:.0f} ms PostgreSQL CPU (the revoke, {w['proxies']} answers, "
        f"{w['proxies']} watches re-issued)"
    )
    if w["heartbeats_failed"] or w["watch_failures"]:
        lines.append(f"    failures: {w['heartbeats_failed']} heartbeats, {w['watch_failures']} watches")
    return lines


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
