"""The measurements. Each is one bounded coroutine returning plain numbers (a dict).

Latencies are client-side wall clock (``time.perf_counter``); CPU is read from the proxy's
processes (psutil: user + system), memory from /proc (VmRSS and smaps_rollup Pss).
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

from bench.clients import (
    ClosedError,
    Conn,
    Desktop,
    Path,
    handshake,
    key_events_16,
    open_console,
    read_update,
    set_encodings_raw,
    update_request,
)
from bench.proxies import Proxy

GIB = 1 << 30
MIB = 1 << 20


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


# --- console opens ---------------------------------------------------------------------------


def cpu_snapshot(probes: dict[str, Callable[[], float]] | None) -> dict[str, float]:
    return {name: probe() for name, probe in (probes or {}).items()}


def cpu_per(before: dict[str, float], after: dict[str, float], count: int, scale: float = 1000.0) -> dict[str, float]:
    return {name: scale * (after[name] - before[name]) / count for name in before} if count else {}


async def opens(
    path: Path, seconds: float, concurrency: int, probes: dict[str, Callable[[], float]] | None = None
) -> dict[str, Any]:
    """Open/close consoles from ``concurrency`` workers for ``seconds``: rate and latencies.

    One open = TCP connect + websocket upgrade (if any) + RFB handshake with authentication
    + SetEncodings + a 64x64 non-incremental update read to the end; then the socket is closed.
    """
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            try:
                async with asyncio.timeout(10):  # no task per open, unlike wait_for
                    conn, _desktop, took = await open_console(path)
            except (OSError, ClosedError, TimeoutError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.01)
                continue
            conn.close()
            latencies.append(took)

    cpu0 = cpu_snapshot(probes)
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    cpu_ms = cpu_per(cpu0, cpu_snapshot(probes), len(latencies))
    return {
        "opens": len(latencies),
        "seconds": elapsed,
        "per_second": len(latencies) / elapsed,
        "cpu_ms_per_open": cpu_ms,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "concurrency": concurrency,
    }


# --- bulk throughput -------------------------------------------------------------------------


async def bulk(path: Path, seconds: float, proxy: Proxy | None) -> dict[str, Any]:
    """Full-screen non-incremental Raw updates back to back; payload bytes received per second.

    The next request is sent as soon as the previous update's header arrives, so the server
    always has one request pending and the pipe never drains. CPU of the proxy (and its
    children: websockify forks per connection) is read at the start and end of the window.
    """
    conn = await Conn.open(path)
    try:
        desktop: Desktop = await asyncio.wait_for(handshake(conn, path.password), 10)
        full = update_request(False, 0, 0, desktop.width, desktop.height)
        conn.send(set_encodings_raw() + full)
        await asyncio.wait_for(read_update(conn, desktop), 10)  # warm-up, outside the window
        conn.send(full)
        cpu0 = proxy.cpu_seconds() if proxy else 0.0
        bytes0, t0 = conn.received, time.perf_counter()
        deadline = t0 + seconds
        updates = 0
        while time.perf_counter() < deadline:
            await asyncio.wait_for(read_update(conn, desktop, on_header=lambda: conn.send(full)), 10)
            updates += 1
        t1, bytes1 = time.perf_counter(), conn.received
        cpu1 = proxy.cpu_seconds() if proxy else 0.0
    finally:
        conn.close()
    moved = bytes1 - bytes0
    result: dict[str, Any] = {
        "bytes": moved,
        "seconds": t1 - t0,
        "updates": updates,
        "mib_per_s": moved / MIB / (t1 - t0),
        "update_bytes": desktop.width * desktop.height * desktop.bpp,
    }
    if proxy is not None:
        result["proxy_cpu_s"] = cpu1 - cpu0
        result["cpu_s_per_gib"] = (cpu1 - cpu0) / (moved / GIB) if moved else float("nan")
    return result


# --- small-write latency ---------------------------------------------------------------------


async def small_writes(path: Path, rounds: int, pause: float = 0.002, gap: float = 0.005) -> dict[str, Any]:
    """16 B, 2 ms pause, 16 B; time from the second write to the last byte of its echo.

    The target (bench/echo_target.py) writes back every byte it receives. A Nagle stall on any
    hop shows up as ~40 ms on the second write (its first-write data still unacknowledged).
    """
    conn = await Conn.open(path)
    payload = key_events_16()
    samples: list[float] = []
    try:
        await asyncio.wait_for(handshake(conn, path.password), 10)
        for _ in range(rounds):
            conn.send(payload)
            await asyncio.sleep(pause)
            t0 = time.perf_counter()
            conn.send(payload)
            await asyncio.wait_for(conn.read(32), 5)
            samples.append(time.perf_counter() - t0)
            await asyncio.sleep(gap)
    finally:
        conn.close()
    return {
        "rounds": len(samples),
        "p50_ms": 1000 * percentile(samples, 50),
        "p99_ms": 1000 * percentile(samples, 99),
        "max_ms": 1000 * max(samples),
        "mean_ms": 1000 * statistics.fmean(samples),
    }


# --- many idle sessions in one process -------------------------------------------------------


async def _open_many(path: Path, count: int, parallel: int, into: list[Conn], errors: list[str]) -> None:
    gate = asyncio.Semaphore(parallel)

    async def one() -> None:
        async with gate:
            try:
                conn = await Conn.open(path)
                try:
                    await asyncio.wait_for(handshake(conn, path.password), 15)
                except BaseException:
                    conn.close()
                    raise
                into.append(conn)
            except (OSError, ClosedError, TimeoutError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(one() for _ in range(count)))


async def _settle(proxy: Proxy, seconds: float = 1.0) -> dict[str, int]:
    await asyncio.sleep(seconds)  # let the proxy finish its callbacks before reading memory
    return proxy.memory()


async def many_sessions(path: Path, proxy: Proxy, first: int, total: int, deadline_s: float) -> dict[str, Any]:
    """Open ``first`` sessions, read memory, go on to ``total``, then one echo round on all.

    Memory per idle session = (after - before) / sessions, before being read after a warm-up of
    50 opened-and-closed sessions. "No stall": every session gets its 16 B echo within
    ``deadline_s`` of the round's start.
    """
    warm: list[Conn] = []
    errors: list[str] = []
    await _open_many(path, 50, 25, warm, errors)
    for conn in warm:
        conn.close()
    warm.clear()
    gc.collect()
    before = await _settle(proxy, 1.5)
    conns: list[Conn] = []
    t0 = time.perf_counter()
    await _open_many(path, first, 64, conns, errors)
    t_first = time.perf_counter() - t0
    at_first = await _settle(proxy)
    opened_first = len(conns)
    t0 = time.perf_counter()
    await _open_many(path, total - first, 64, conns, errors)
    t_rest = time.perf_counter() - t0
    at_total = await _settle(proxy)
    payload = key_events_16()

    async def echo(conn: Conn) -> float:
        start = time.perf_counter()
        conn.send(payload)
        await conn.read(16)
        return time.perf_counter() - start

    round_start = time.perf_counter()
    tasks = [asyncio.ensure_future(echo(c)) for c in conns]
    done, pending = await asyncio.wait(tasks, timeout=deadline_s)
    round_s = time.perf_counter() - round_start
    for task in pending:
        task.cancel()
    latencies = [t.result() for t in done if t.exception() is None]
    failed = sum(1 for t in done if t.exception() is not None)
    for conn in conns:
        conn.close()

    def per(mem, n, key):
        return (mem[key] - before[key]) / n if n else float("nan")

    return {
        "sessions_first": opened_first,
        "sessions_total": len(conns),
        "asked": total,
        "refused_or_failed_opens": len(errors),
        "first_error": errors[0] if errors else None,
        "open_seconds_first": t_first,
        "open_seconds_rest": t_rest,
        "memory_before": before,
        "memory_at_first": at_first,
        "memory_at_total": at_total,
        "rss_per_session_first_kib": per(at_first, opened_first, "rss") / 1024,
        "pss_per_session_first_kib": per(at_first, opened_first, "pss") / 1024,
        "rss_per_session_total_kib": per(at_total, len(conns), "rss") / 1024,
        "echo_done": len(latencies),
        "echo_failed": failed,
        "echo_stalled": len(pending),
        "echo_round_s": round_s,
        "echo_p50_ms": 1000 * percentile(latencies, 50),
        "echo_p99_ms": 1000 * percentile(latencies, 99),
        "echo_max_ms": 1000 * max(latencies) if latencies else float("nan"),
        "deadline_s": deadline_s,
    }
