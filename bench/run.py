"""``python -m bench`` / ``python -m bench.run``: every benchmark in one process run, one table.

Sections (each bounded by its own time budget; a section that overruns is reported, not hung on):

1. console opens, one after another (sequential), the client, Xvnc and the proxy sharing the
   machine's cores: opens/s and open latency p50/p99 — direct TCP, websockify 0.13, consolegate —
   against one real Xvnc (VncAuth, 1920x1080x24). websockify gets the client doing VNC auth
   itself. The added latency is a path's p50 minus direct TCP's.
   1b. the two proxies each held to the same CPU budget by a cgroup quota (half a core on a
   two-core machine, one core from four up; needs root), opened concurrently so the budget is
   used up: the proxy's CPU per open, with the load generator out of the way.
2. bulk server->browser throughput (full-screen Raw updates) on the same three paths; CPU seconds
   per GiB relayed for each proxy.
3. small-write latency (16 B, 2 ms pause, 16 B) through each path to bench/echo_target.py.
4. wss: consolegate terminating TLS itself against websockify with ``--cert/--key`` (the same
   certificate, the same client): sequential opens/s, bulk MiB/s and CPU per GiB.
5. 1,000 then 2,000 idle sessions in one fresh consolegate process (to the echo target): memory
   per session, refusals, and one echo round on all of them with a deadline (no stall).
6. token mints/s and verifies/s against OpenSSL's raw Ed25519 verify (bench/token_bench.py, a
   subprocess: it pins itself to one core).
7. revocation latency, DELETE to the browser's 4410 (bench/revocation.py): SQLite with one
   broker, and two replicas on a throwaway PostgreSQL when Debian's postgresql is installed.
8. ``brokers``: broker mints/s and redeems/s on SQLite, PostgreSQL with one replica and two, CPU
   per mint, heartbeats and watches of 100 proxies (a revocation's fan-out), and a fleet sizing
   (bench/brokers.py; also runs alone).

Paths are measured in interleaved rounds (A B C, B C A, ...) and the best round counts, so a
noisy moment on a shared machine hurts every path alike. Every comparison is a ratio of figures
from this one run. Exits 0 whether or not goals are met (it is a benchmark, not a test).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path as FsPath
from typing import Any

import psutil

from bench import brokers, budget, measure, report, revocation
from bench import profile as bench_profile
from bench.clients import Path
from bench.proxies import Proxy, start_consolegate, start_websockify, version_of_websockify
from bench.targets import REPO, Target, certificate, start_echo, start_xvnc, workdir

PROFILES = {
    "full": {
        "rounds": 3,
        "opens_s": 4.0,
        "bulk_s": 4.0,
        "small_rounds": 300,
        "concurrency": 8,
        "sessions_first": 1000,
        "sessions_total": 2000,
        "token_seconds": 1.0,
        "token_rounds": 3,
        "revocations": 50,
        "broker_seconds": 5.0,
    },
    "quick": {
        "rounds": 2,
        "opens_s": 2.0,
        "bulk_s": 2.0,
        "small_rounds": 150,
        "concurrency": 8,
        "sessions_first": 1000,
        "sessions_total": 2000,
        "token_seconds": 0.5,
        "token_rounds": 2,
        "revocations": 20,
        "broker_seconds": 2.0,
    },
}
"""``concurrency`` is for the CPU-budget section only: the other open measurements are sequential."""


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in FsPath("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import tornado

    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "tornado": tornado.version,
        "websockify": version_of_websockify(),
        "loadavg_start": os.getloadavg(),
    }


def raise_nofile(wanted: int = 16384) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, max(soft, wanted)) if hard != resource.RLIM_INFINITY else max(soft, wanted)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


async def bounded(name: str, budget: float, coro: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    try:
        return await asyncio.wait_for(coro, budget)
    except TimeoutError:
        return {"error": f"{name}: over its {budget:.0f}s budget"}
    except Exception as exc:
        return {"error": f"{name}: {type(exc).__name__}: {exc}"}


async def interleaved(
    paths: list[Path], rounds: int, budget: float, one: Callable[[Path], Awaitable[dict[str, Any]]], key: str, best: str
) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {p.name: [] for p in paths}
    for r in range(rounds):
        order = paths[r % len(paths) :] + paths[: r % len(paths)]
        for path in order:
            runs[path.name].append(await bounded(f"{key} {path.name}", budget, one(path)))
    out = {}
    for name, results in runs.items():
        good = [x for x in results if "error" not in x]
        pick = (max if best == "max" else min)(good, key=lambda x: x[key]) if good else results[-1]
        out[name] = {"best": pick, "rounds": results}
    return out


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


SECTIONS = ("opens", "bulk", "small_write", "sessions", "wss")


def budget_share() -> float:
    """The CPU each proxy gets in section 1b: at most one core, and never more than half of
    what the client and Xvnc leave, so the proxy — not the load generator — is the limit."""
    return max(0.25, min(1.0, (len(os.sched_getaffinity(0)) - 1) / 2))


async def run_all(profile: dict[str, Any], work: FsPath, only: set[str], spy_dir: FsPath | None) -> dict[str, Any]:
    results: dict[str, Any] = {}

    def spying(section: str, proxy: Proxy) -> Callable[[], None]:
        """Start py-spy on ``proxy`` for ``section``; returns the stop-and-summarise call."""
        if spy_dir is None:
            return lambda: None
        recorder = bench_profile.Recorder(proxy.process.pid, spy_dir / f"{section}.txt")

        def stop() -> None:
            out = recorder.stop()
            if out is not None:
                summary = bench_profile.summarize(out)
                (spy_dir / f"{section}.summary.txt").write_text(summary + "\n")
                log("py-spy " + summary.replace("\n", "\n    "))

        return stop

    targets: list[Target] = []
    proxies: list[Proxy] = []
    try:
        log("starting Xvnc 1920x1080x24 (VncAuth), echo target, consolegate, websockify x2")
        xvnc = start_xvnc(work)
        targets.append(xvnc)
        echo = start_echo(work)
        targets.append(echo)
        cg = start_consolegate(work)
        proxies.append(cg)
        wsx = start_websockify(work, xvnc.port)
        proxies.append(wsx)
        wse = start_websockify(work, echo.port)
        proxies.append(wse)
        pw = xvnc.password
        vnc_paths = [
            Path("direct TCP", "tcp", xvnc.port, password=pw),
            Path("websockify", "ws", wsx.port, "/", password=pw),
            Path("consolegate", "ws", cg.port, "/websockify", token=cg.mint("127.0.0.1", xvnc.port, pw)),
        ]
        echo_paths = [
            Path("direct TCP", "tcp", echo.port),
            Path("websockify", "ws", wse.port, "/"),
            Path("consolegate", "ws", cg.port, "/websockify", token=cg.mint("127.0.0.1", echo.port, None)),
        ]
        owner = {"websockify": wsx, "consolegate": cg}
        xvnc_ps = psutil.Process(xvnc.process.pid)

        def cpu_probes(path: Path) -> dict[str, Callable[[], float]]:
            """CPU seconds of the client (this process), Xvnc, and the path's proxy if any."""
            probes: dict[str, Callable[[], float]] = {
                "client": time.process_time,
                "xvnc": lambda: sum(xvnc_ps.cpu_times()[:2]),
            }
            if path.name in owner:
                probes["proxy"] = owner[path.name].cpu_seconds
            return probes

        if "opens" in only:
            log("section 1: console opens, sequential, sharing the cores")
            stop = spying("opens", cg)
            results["opens"] = await interleaved(
                vnc_paths,
                profile["rounds"],
                profile["opens_s"] + 20,
                lambda p: measure.opens(p, profile["opens_s"], 1, cpu_probes(p)),
                "per_second",
                "max",
            )
            stop()
            if budget.available():
                share = budget_share()
                log(f"section 1b: console opens, each proxy held to {share:.2f} CPU (cgroup quota)")
                try:
                    with budget.CpuBudget([cg.process.pid, wsx.process.pid], share):
                        results["opens_budget"] = await interleaved(
                            vnc_paths[1:],
                            profile["rounds"],
                            profile["opens_s"] + 20,
                            lambda p: measure.opens(p, profile["opens_s"], profile["concurrency"], cpu_probes(p)),
                            "per_second",
                            "max",
                        )
                    results["opens_budget"]["share"] = share
                except (OSError, RuntimeError) as exc:  # the cgroup would not take them: say so, go on
                    results["opens_budget"] = {"error": f"CPU budget: {exc}"}
            else:
                results["opens_budget"] = {"error": "no writable cgroup CPU controller (run as root)"}
        if "bulk" in only:
            log("section 2: bulk throughput")
            stop = spying("bulk", cg)
            results["bulk"] = await interleaved(
                vnc_paths,
                profile["rounds"],
                profile["bulk_s"] + 25,
                lambda p: measure.bulk(p, profile["bulk_s"], owner.get(p.name)),
                "mib_per_s",
                "max",
            )
            stop()
        if "small_write" in only:
            log("section 3: small-write latency")
            stop = spying("small_write", cg)
            results["small_write"] = await interleaved(
                echo_paths,
                profile["rounds"],
                60,
                lambda p: measure.small_writes(p, profile["small_rounds"]),
                "p50_ms",
                "min",
            )
            stop()
        for proxy in proxies:
            proxy.stop()
        proxies.clear()
        if "wss" in only:
            log("section 4: wss, each proxy terminating TLS with the same certificate")
            results["wss"] = await wss_section(profile, work, xvnc, proxies, spying)
            for proxy in proxies:
                proxy.stop()
            proxies.clear()

        if "sessions" not in only:
            return results
        log(f"section 5: {profile['sessions_first']} then {profile['sessions_total']} idle sessions in one proxy")
        many = start_consolegate(work, "--max-sessions", str(profile["sessions_total"] + 100))
        proxies.append(many)
        many_path = Path("consolegate", "ws", many.port, "/websockify", token=many.mint("127.0.0.1", echo.port, None))
        stop = spying("sessions", many)
        results["sessions"] = await bounded(
            "sessions",
            150,
            measure.many_sessions(
                many_path, many, profile["sessions_first"], profile["sessions_total"], deadline_s=10.0
            ),
        )
        stop()
    finally:
        for proxy in proxies:
            proxy.stop()
        for target in targets:
            target.stop()
    return results


async def wss_section(
    profile: dict[str, Any],
    work: FsPath,
    xvnc: Target,
    proxies: list[Proxy],
    spying: Callable[[str, Proxy], Callable[[], None]],
) -> dict[str, Any]:
    """Sequential opens and bulk through consolegate's own TLS and websockify's ``--cert/--key``."""
    cert, key, client = certificate(work)
    cg = start_consolegate(work, "--tls-cert", str(cert), "--tls-key", str(key))
    proxies.append(cg)
    wsx = start_websockify(work, xvnc.port, "--cert", str(cert), "--key", str(key), "--ssl-only")
    proxies.append(wsx)
    paths = [
        Path("websockify", "ws", wsx.port, "/", password=xvnc.password, tls=client),
        Path(
            "consolegate",
            "ws",
            cg.port,
            "/websockify",
            token=cg.mint("127.0.0.1", xvnc.port, xvnc.password),
            tls=client,
        ),
    ]
    owner = {"websockify": wsx, "consolegate": cg}
    stop = spying("wss", cg)
    try:
        opened = await interleaved(
            paths,
            profile["rounds"],
            profile["opens_s"] + 20,
            lambda p: measure.opens(p, profile["opens_s"], 1, {"proxy": owner[p.name].cpu_seconds}),
            "per_second",
            "max",
        )
        relayed = await interleaved(
            paths,
            profile["rounds"],
            profile["bulk_s"] + 25,
            lambda p: measure.bulk(p, profile["bulk_s"], owner[p.name]),
            "mib_per_s",
            "max",
        )
    finally:
        stop()
    return {"opens": opened, "bulk": relayed}


def token_section(profile: dict[str, Any], work: FsPath) -> dict[str, Any]:
    """bench/token_bench.py as a subprocess (it pins its process to one core)."""
    out = work / "token.json"
    cmd = [
        sys.executable,
        "-m",
        "bench.token_bench",
        "--seconds",
        str(profile["token_seconds"]),
        "--rounds",
        str(profile["token_rounds"]),
        "--json",
        str(out),
    ]
    budget = 20 + 6 * profile["token_seconds"] * profile["token_rounds"] * 3
    try:
        done = subprocess.run(
            cmd,
            check=False,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=budget,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    except subprocess.TimeoutExpired:
        return {"error": f"token_bench over its {budget:.0f}s budget"}
    if done.returncode != 0 or not out.exists():
        return {"error": f"token_bench exited {done.returncode}: {done.stderr.strip()[-300:]}"}
    return json.loads(out.read_text())


def revocation_section(profile: dict[str, Any]) -> dict[str, Any]:
    try:
        return revocation.run(profile["revocations"], postgres=FsPath("/usr/lib/postgresql/15/bin/initdb").exists())
    except Exception as exc:
        return {"error": f"revocation: {type(exc).__name__}: {exc}"}


def broker_section(profile: dict[str, Any], work: FsPath) -> dict[str, Any]:
    """bench/brokers.py in this process (it starts its own brokers and PostgreSQL)."""
    try:
        return brokers.run(profile["broker_seconds"], work)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter rounds (about one minute in all)")
    parser.add_argument("--json", metavar="FILE", help="write every figure, round and ratio as JSON")
    parser.add_argument(
        "--only",
        action="append",
        choices=[*SECTIONS, "tokens", "revocation", "brokers"],
        help="run only this section (repeatable); default: all",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="record the consolegate proxy with py-spy during each section; summaries in DIR",
    )
    args = parser.parse_args(argv)
    profile = PROFILES["quick" if args.quick else "full"]
    raise_nofile()
    info = machine()
    started = time.time()
    work = workdir()
    only = set(args.only or [*SECTIONS, "tokens", "revocation", "brokers"])
    spy_dir = FsPath(args.profile) if args.profile else None
    if spy_dir is not None:
        if bench_profile.py_spy() is None:
            parser.error(
                "--profile needs py-spy, and it is not installed: "
                "pip install -c constraints.txt -e '.[bench]' (py-spy is in the bench extra)"
            )
        spy_dir.mkdir(parents=True, exist_ok=True)
    results = asyncio.run(run_all(profile, work, only, spy_dir))
    if "tokens" in only:
        log("section 6: token mint/verify vs OpenSSL's raw Ed25519 verify")
        results["tokens"] = token_section(profile, work)
    if "revocation" in only:
        log("section 7: revocation latency")
        results["revocation"] = revocation_section(profile)
    if "brokers" in only:
        log("section 8: brokers on SQLite and PostgreSQL")
        results["brokers"] = broker_section(profile, work)
    info["loadavg_end"] = os.getloadavg()
    document = {
        "profile": "quick" if args.quick else "full",
        "settings": profile,
        "machine": info,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "results": results,
    }
    document["ratios"], document["goals"] = report.ratios_and_goals(results)
    print(report.table(document))
    if "brokers" in results:
        print(
            "\n"
            + (
                brokers.table(results["brokers"])
                if "error" not in results["brokers"]
                else f"brokers: {results['brokers']['error']}"
            )
        )
    if args.json:
        FsPath(args.json).write_text(json.dumps(document, indent=2, default=str) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
