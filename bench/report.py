"""The table and the ratios: every comparison is between figures of the same run."""

from __future__ import annotations

import math
from typing import Any

PATHS = ("direct TCP", "websockify", "consolegate")


def _best(results: dict[str, Any], section: str, path: str) -> dict[str, Any]:
    return results.get(section, {}).get(path, {}).get("best", {})


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def ratios_and_goals(results: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    def get(section: str, path: str, key: str) -> float | None:
        return _best(results, section, path).get(key)

    r: dict[str, Any] = {
        "opens_consolegate_over_websockify": _ratio(get("opens", "consolegate", "per_second"),
                                                    get("opens", "websockify", "per_second")),
        "opens_one_core_consolegate_over_websockify": _ratio(get("opens_one_core", "consolegate", "per_second"),
                                                             get("opens_one_core", "websockify", "per_second")),
        "opens_budget_consolegate_over_websockify": _ratio(get("opens_budget", "consolegate", "per_second"),
                                                           get("opens_budget", "websockify", "per_second")),
        "opens_consolegate_over_direct": _ratio(get("opens", "consolegate", "per_second"),
                                                get("opens", "direct TCP", "per_second")),
        "bulk_consolegate_over_websockify": _ratio(get("bulk", "consolegate", "mib_per_s"),
                                                   get("bulk", "websockify", "mib_per_s")),
        "bulk_consolegate_over_direct": _ratio(get("bulk", "consolegate", "mib_per_s"),
                                               get("bulk", "direct TCP", "mib_per_s")),
        "bulk_websockify_over_direct": _ratio(get("bulk", "websockify", "mib_per_s"),
                                              get("bulk", "direct TCP", "mib_per_s")),
        "cpu_per_gib_consolegate_over_websockify": _ratio(get("bulk", "consolegate", "cpu_s_per_gib"),
                                                          get("bulk", "websockify", "cpu_s_per_gib")),
    }
    direct_p50 = get("small_write", "direct TCP", "p50_ms")
    for name in ("consolegate", "websockify"):
        p50 = get("small_write", name, "p50_ms")
        r[f"small_write_p50_{name}_minus_direct_ms"] = (p50 - direct_p50) if p50 is not None and direct_p50 is not None else None
    sessions = results.get("sessions", {})
    tokens = results.get("tokens", {})
    r["token_verify_over_raw"] = tokens.get("verify_over_raw")

    def goal(name: str, value: Any, target: str, met: bool | None) -> dict[str, Any]:
        return {"goal": name, "value": value, "target": target, "met": met}

    def cmp(value: float | None, ok: Any) -> bool | None:
        return None if value is None else bool(ok(value))

    echo_ok = (sessions.get("sessions_total") == sessions.get("asked") and sessions.get("refused_or_failed_opens") == 0
               and sessions.get("echo_done") == sessions.get("sessions_total")) if "asked" in sessions else None
    rss = sessions.get("rss_per_session_first_kib")
    goals = [
        goal("opens/s >= 5x websockify, equal CPU budget", r["opens_budget_consolegate_over_websockify"],
             ">= 5.0", cmp(r["opens_budget_consolegate_over_websockify"], lambda v: v >= 5.0)),
        goal("opens/s >= 5x websockify, proxy on its own core", r["opens_one_core_consolegate_over_websockify"],
             ">= 5.0", cmp(r["opens_one_core_consolegate_over_websockify"], lambda v: v >= 5.0)),
        goal("opens/s >= 5x websockify, all sharing the cores", r["opens_consolegate_over_websockify"], ">= 5.0",
             cmp(r["opens_consolegate_over_websockify"], lambda v: v >= 5.0)),
        goal("bulk throughput >= 1.0x websockify", r["bulk_consolegate_over_websockify"], ">= 1.0",
             cmp(r["bulk_consolegate_over_websockify"], lambda v: v >= 1.0)),
        goal("small-write p50 within 0.3 ms of direct TCP", r["small_write_p50_consolegate_minus_direct_ms"],
             "<= 0.3 ms", cmp(r["small_write_p50_consolegate_minus_direct_ms"], lambda v: v <= 0.3)),
        goal("<= 64 KiB RSS per idle session (1,000 open)", rss, "<= 64 KiB", cmp(rss, lambda v: v <= 64)),
        goal("2,000 concurrent sessions: no refusal, no stall", echo_ok, "all open, all echo in deadline", echo_ok),
        goal("token verify >= 75% of raw Ed25519", r["token_verify_over_raw"], ">= 0.75",
             cmp(r["token_verify_over_raw"], lambda v: v >= 0.75)),
    ]
    for name, rev in (results.get("revocation") or {}).items():
        if isinstance(rev, dict) and "p99_ms" in rev:
            r[f"revocation_{name}_p99_ms"] = rev["p99_ms"]
            goals.append(goal(f"revocation p99 < 1 s ({name}, DELETE to 4410)", rev["p99_ms"], "< 1000 ms",
                              rev["p99_ms"] < 1000))
    return r, goals


def _f(value: Any, fmt: str = "{:,.1f}") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return fmt.format(value)


def table(doc: dict[str, Any]) -> str:
    res, m = doc["results"], doc["machine"]
    title = (f"consolegate bench ({doc['profile']}, {doc['duration_s']}s) on {m['cpus']} x {m['cpu_model']}, "
             f"Linux {m['kernel']}, Python {m['python']}, tornado {m['tornado']}, websockify {m['websockify']}; "
             f"load {m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}")
    lines = [title, "best of interleaved rounds; ratios are within this run", ""]
    head = f"{'path':<13}{'opens/s':>9}{'open p50':>10}{'open p99':>10}{'bulk MiB/s':>12}{'CPU s/GiB':>11}" \
           f"{'16B p50':>9}{'16B p99':>9}"
    lines += [head, "-" * len(head)]
    for path in PATHS:
        o, b, s = _best(res, "opens", path), _best(res, "bulk", path), _best(res, "small_write", path)
        lines.append(f"{path:<13}{_f(o.get('per_second'), '{:,.0f}'):>9}{_f(o.get('p50_ms'), '{:.2f}ms'):>10}"
                     f"{_f(o.get('p99_ms'), '{:.2f}ms'):>10}{_f(b.get('mib_per_s'), '{:,.0f}'):>12}"
                     f"{_f(b.get('cpu_s_per_gib'), '{:.2f}'):>11}{_f(s.get('p50_ms'), '{:.3f}ms'):>9}"
                     f"{_f(s.get('p99_ms'), '{:.3f}ms'):>9}")
    one = res.get("opens_one_core", {})
    if one:
        lines += ["", "console opens with the proxy alone on one core (client and Xvnc on the other cores):"]
        for path in PATHS:
            o = _best(res, "opens_one_core", path)
            lines.append(f"{path:<13}{_f(o.get('per_second'), '{:,.0f}'):>9}{_f(o.get('p50_ms'), '{:.2f}ms'):>10}"
                         f"{_f(o.get('p99_ms'), '{:.2f}ms'):>10}")
    held = res.get("opens_budget", {})
    if "error" in held:
        lines += ["", f"console opens with equal CPU budgets: {held['error']}"]
    elif held:
        lines += ["", f"console opens with each proxy held to {held['share']:.2f} CPU (client and Xvnc unlimited):"]
        for path in PATHS[1:]:
            o = _best(res, "opens_budget", path)
            cpu = o.get("cpu_ms_per_open", {}).get("proxy")
            lines.append(f"{path:<13}{_f(o.get('per_second'), '{:,.0f}'):>9}{_f(o.get('p50_ms'), '{:.2f}ms'):>10}"
                         f"{_f(o.get('p99_ms'), '{:.2f}ms'):>10}   proxy CPU {_f(cpu, '{:.2f}')} ms/open")
    cpu_lines = []
    for path in PATHS:
        cpu = _best(res, "opens", path).get("cpu_ms_per_open")
        if cpu:
            cpu_lines.append(f"  {path:<13}" + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
                             + f" (total {sum(cpu.values()):.2f})")
    if cpu_lines:
        lines += ["", "CPU ms per console open (best round):", *cpu_lines]
    for section in ("opens", "opens_one_core", "opens_budget", "bulk", "small_write"):
        for path in PATHS:
            for rnd in res.get(section, {}).get(path, {}).get("rounds", []):
                if "error" in rnd:
                    lines.append(f"  ! {section} {path}: {rnd['error']}")
                elif rnd.get("errors"):
                    lines.append(f"  ! {section} {path}: {rnd['errors']} failed opens, e.g. {rnd['first_error']}")
    s = res.get("sessions", {})
    lines.append("")
    if "error" in s:
        lines.append(f"sessions: {s['error']}")
    elif s:
        lines.append(f"idle sessions (one consolegate process): {s['sessions_first']} open -> "
                     f"{_f(s['rss_per_session_first_kib'])} KiB RSS, {_f(s['pss_per_session_first_kib'])} KiB PSS "
                     f"per session; {s['sessions_total']}/{s['asked']} open -> "
                     f"{_f(s['rss_per_session_total_kib'])} KiB RSS per session")
        lines.append(f"  {s['refused_or_failed_opens']} refused/failed opens; echo round on all: {s['echo_done']} "
                     f"answered, {s['echo_stalled']} stalled (> {s['deadline_s']:.0f}s), {s['echo_failed']} failed; "
                     f"p50 {_f(s['echo_p50_ms'], '{:.1f}')} ms, max {_f(s['echo_max_ms'], '{:.1f}')} ms")
    t = res.get("tokens")
    if t is not None:
        if "error" in t:
            lines.append(f"tokens: {t['error']}")
        else:
            b = t["best_per_second"]
            lines.append(f"tokens (one core): mint {b['mint']:,.0f}/s, verify {b['verify']:,.0f}/s, "
                         f"raw Ed25519 verify {b['raw']:,.0f}/s -> verify/raw {t['verify_over_raw']:.1%}")
    lines += ["", "ratios (same run):"]
    for key, value in doc["ratios"].items():
        lines.append(f"  {key:<48}{_f(value, '{:.3f}')}")
    rev = res.get("revocation")
    if rev:
        from bench.revocation import table as revocation_table  # its figures' one formatter
        lines += ["", f"revocation: {rev['error']}" if "error" in rev else revocation_table(rev)]
    lines += ["", "goals:"]
    for g in doc["goals"]:
        state = {True: "MET", False: "MISSED", None: "n/a"}[g["met"]]
        value = g["value"]
        shown = _f(value, "{:.3f}") if isinstance(value, float) else str(value)
        lines.append(f"  [{state:>6}] {g['goal']:<48} {shown} (target {g['target']})")
    return "\n".join(lines)
