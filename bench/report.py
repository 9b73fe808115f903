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


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or math.isnan(a) or math.isnan(b) else a - b


def ratios_and_goals(results: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    def get(section: str, path: str, key: str) -> float | None:
        return _best(results, section, path).get(key)

    def proxy_cpu(section: str, path: str) -> float | None:
        return _best(results, section, path).get("cpu_ms_per_open", {}).get("proxy")

    wss = results.get("wss", {})

    def wss_get(part: str, path: str, key: str) -> float | None:
        return wss.get(part, {}).get(path, {}).get("best", {}).get(key)

    r: dict[str, Any] = {
        "opens_seq_consolegate_over_websockify": _ratio(
            get("opens", "consolegate", "per_second"), get("opens", "websockify", "per_second")
        ),
        "opens_seq_consolegate_over_direct": _ratio(
            get("opens", "consolegate", "per_second"), get("opens", "direct TCP", "per_second")
        ),
        "opens_seq_direct_over_websockify": _ratio(
            get("opens", "direct TCP", "per_second"), get("opens", "websockify", "per_second")
        ),
        "open_p50_consolegate_minus_direct_ms": _minus(
            get("opens", "consolegate", "p50_ms"), get("opens", "direct TCP", "p50_ms")
        ),
        "open_p50_websockify_minus_direct_ms": _minus(
            get("opens", "websockify", "p50_ms"), get("opens", "direct TCP", "p50_ms")
        ),
        "opens_budget_consolegate_over_websockify": _ratio(
            get("opens_budget", "consolegate", "per_second"), get("opens_budget", "websockify", "per_second")
        ),
        "proxy_cpu_per_open_budget_consolegate_over_websockify": _ratio(
            proxy_cpu("opens_budget", "consolegate"), proxy_cpu("opens_budget", "websockify")
        ),
        "bulk_consolegate_over_websockify": _ratio(
            get("bulk", "consolegate", "mib_per_s"), get("bulk", "websockify", "mib_per_s")
        ),
        "bulk_consolegate_over_direct": _ratio(
            get("bulk", "consolegate", "mib_per_s"), get("bulk", "direct TCP", "mib_per_s")
        ),
        "cpu_per_gib_websockify_over_consolegate": _ratio(
            get("bulk", "websockify", "cpu_s_per_gib"), get("bulk", "consolegate", "cpu_s_per_gib")
        ),
        "wss_opens_consolegate_over_websockify": _ratio(
            wss_get("opens", "consolegate", "per_second"), wss_get("opens", "websockify", "per_second")
        ),
        "wss_bulk_consolegate_over_websockify": _ratio(
            wss_get("bulk", "consolegate", "mib_per_s"), wss_get("bulk", "websockify", "mib_per_s")
        ),
        "wss_cpu_per_gib_websockify_over_consolegate": _ratio(
            wss_get("bulk", "websockify", "cpu_s_per_gib"), wss_get("bulk", "consolegate", "cpu_s_per_gib")
        ),
    }
    direct_p50 = get("small_write", "direct TCP", "p50_ms")
    for name in ("consolegate", "websockify"):
        r[f"small_write_p50_{name}_minus_direct_ms"] = _minus(get("small_write", name, "p50_ms"), direct_p50)
    sessions = results.get("sessions", {})
    tokens = results.get("tokens", {})
    r["token_verify_over_openssl_raw_ed25519"] = tokens.get("verify_over_raw")

    echo_ok = (
        (
            sessions.get("sessions_total") == sessions.get("asked")
            and sessions.get("refused_or_failed_opens") == 0
            and sessions.get("echo_done") == sessions.get("sessions_total")
        )
        if "asked" in sessions
        else None
    )
    rss = sessions.get("rss_per_session_first_kib")
    goals = [
        _goal(
            "token verify >= 80% of OpenSSL's raw Ed25519 verify",
            r["token_verify_over_openssl_raw_ed25519"],
            ">=",
            0.80,
        ),
        _goal(
            "sequential opens >= 4x websockify (shared cores)", r["opens_seq_consolegate_over_websockify"], ">=", 4.0
        ),
        _goal("  stretch: sequential opens >= 5x websockify", r["opens_seq_consolegate_over_websockify"], ">=", 5.0),
        _goal(
            "open p50 added over direct TCP <= 0.6 ms", r["open_p50_consolegate_minus_direct_ms"], "<=", 0.6, unit=" ms"
        ),
        _goal(
            "proxy CPU per open <= 1/6 websockify's (equal budgets)",
            r["proxy_cpu_per_open_budget_consolegate_over_websockify"],
            "<=",
            1 / 6,
        ),
        _goal("wss opens/s >= 1.0x websockify --cert/--key", r["wss_opens_consolegate_over_websockify"], ">=", 1.0),
        _goal("wss bulk MiB/s >= 1.0x websockify --cert/--key", r["wss_bulk_consolegate_over_websockify"], ">=", 1.0),
        _goal(
            "wss CPU per GiB: websockify's / ours >= 1.0", r["wss_cpu_per_gib_websockify_over_consolegate"], ">=", 1.0
        ),
        _goal("bulk throughput >= 1.0x websockify", r["bulk_consolegate_over_websockify"], ">=", 1.0),
        _goal(
            "small-write p50 within 0.3 ms of direct TCP",
            r["small_write_p50_consolegate_minus_direct_ms"],
            "<=",
            0.3,
            unit=" ms",
        ),
        _goal("<= 64 KiB RSS per idle session (1,000 open)", rss, "<=", 64.0, unit=" KiB"),
        {
            "goal": "2,000 concurrent sessions: no refusal, no stall",
            "value": echo_ok,
            "target": "all open, all echo in deadline",
            "met": echo_ok,
            "margin": None,
        },
    ]
    for name, rev in (results.get("revocation") or {}).items():
        if isinstance(rev, dict) and "p99_ms" in rev:
            r[f"revocation_{name}_p99_ms"] = rev["p99_ms"]
            goals.append(
                _goal(f"revocation p99 <= 1 s ({name}, DELETE to 4410)", rev["p99_ms"], "<=", 1000.0, unit=" ms")
            )
    return r, goals


def _goal(name: str, value: float | None, op: str, target: float, unit: str = "") -> dict[str, Any]:
    """A goal with its margin: how far past the target (positive, met) or short of it (negative),
    in the figure's own unit and relative to the target."""
    if value is None or math.isnan(value):
        return {"goal": name, "value": None, "target": f"{op} {target:.3g}{unit}", "met": None, "margin": None}
    margin = value - target if op == ">=" else target - value
    return {
        "goal": name,
        "value": value,
        "target": f"{op} {target:.3g}{unit}",
        "met": margin >= 0,
        "margin": margin,
        "margin_relative": margin / target if target else None,
        "unit": unit,
    }


def _f(value: Any, fmt: str = "{:,.1f}") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return fmt.format(value)


def table(doc: dict[str, Any]) -> str:
    res, m = doc["results"], doc["machine"]
    title = (
        f"consolegate bench ({doc['profile']}, {doc['duration_s']}s) on {m['cpus']} x {m['cpu_model']}, "
        f"Linux {m['kernel']}, Python {m['python']}, tornado {m['tornado']}, websockify {m['websockify']}; "
        f"load {m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}"
    )
    lines = [
        title,
        (
            "best of interleaved rounds; ratios are within this run; opens are sequential "
            "(one at a time), the client, Xvnc and the proxy sharing the cores"
        ),
        "",
    ]
    head = (
        f"{'path':<13}{'opens/s':>9}{'open p50':>10}{'open p99':>10}{'bulk MiB/s':>12}{'CPU s/GiB':>11}"
        f"{'16B p50':>9}{'16B p99':>9}"
    )
    lines += [head, "-" * len(head)]
    for path in PATHS:
        o, b, s = _best(res, "opens", path), _best(res, "bulk", path), _best(res, "small_write", path)
        lines.append(
            f"{path:<13}{_f(o.get('per_second'), '{:,.0f}'):>9}{_f(o.get('p50_ms'), '{:.2f}ms'):>10}"
            f"{_f(o.get('p99_ms'), '{:.2f}ms'):>10}{_f(b.get('mib_per_s'), '{:,.0f}'):>12}"
            f"{_f(b.get('cpu_s_per_gib'), '{:.2f}'):>11}{_f(s.get('p50_ms'), '{:.3f}ms'):>9}"
            f"{_f(s.get('p99_ms'), '{:.3f}ms'):>9}"
        )
    held = res.get("opens_budget", {})
    if "error" in held:
        lines += ["", f"console opens with equal CPU budgets: {held['error']}"]
    elif held:
        lines += ["", f"console opens with each proxy held to {held['share']:.2f} CPU (client and Xvnc unlimited):"]
        for path in PATHS[1:]:
            o = _best(res, "opens_budget", path)
            cpu = o.get("cpu_ms_per_open", {}).get("proxy")
            lines.append(
                f"{path:<13}{_f(o.get('per_second'), '{:,.0f}'):>9}{_f(o.get('p50_ms'), '{:.2f}ms'):>10}"
                f"{_f(o.get('p99_ms'), '{:.2f}ms'):>10}   proxy CPU {_f(cpu, '{:.2f}')} ms/open"
            )
    cpu_lines = []
    for path in PATHS:
        cpu = _best(res, "opens", path).get("cpu_ms_per_open")
        if cpu:
            cpu_lines.append(
                f"  {path:<13}"
                + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
                + f" (total {sum(cpu.values()):.2f})"
            )
    if cpu_lines:
        lines += ["", "CPU ms per console open (best round):", *cpu_lines]
    wss = res.get("wss", {})
    if "error" in wss:
        lines += ["", f"wss: {wss['error']}"]
    elif wss:
        lines += ["", "wss (each proxy terminating TLS, same certificate, same client):"]
        for path in PATHS[1:]:
            o, b = wss.get("opens", {}).get(path, {}).get("best", {}), wss.get("bulk", {}).get(path, {}).get("best", {})
            lines.append(
                f"{path:<13}{_f(o.get('per_second'), '{:,.0f}'):>9}{_f(o.get('p50_ms'), '{:.2f}ms'):>10}"
                f"{_f(o.get('p99_ms'), '{:.2f}ms'):>10}{_f(b.get('mib_per_s'), '{:,.0f}'):>12}"
                f"{_f(b.get('cpu_s_per_gib'), '{:.2f}'):>11}"
            )
    sections = [(res.get(name, {}), name) for name in ("opens", "opens_budget", "bulk", "small_write")]
    sections += [(wss.get(part, {}), f"wss {part}") for part in ("opens", "bulk")]
    for held_rounds, section in sections:
        for path in PATHS:
            for rnd in held_rounds.get(path, {}).get("rounds", []):
                if "error" in rnd:
                    lines.append(f"  ! {section} {path}: {rnd['error']}")
                elif rnd.get("errors"):
                    lines.append(f"  ! {section} {path}: {rnd['errors']} failed opens, e.g. {rnd['first_error']}")
    s = res.get("sessions", {})
    lines.append("")
    if "error" in s:
        lines.append(f"sessions: {s['error']}")
    elif s:
        lines.append(
            f"idle sessions (one consolegate process): {s['sessions_first']} open -> "
            f"{_f(s['rss_per_session_first_kib'])} KiB RSS, {_f(s['pss_per_session_first_kib'])} KiB PSS "
            f"per session; {s['sessions_total']}/{s['asked']} open -> "
            f"{_f(s['rss_per_session_total_kib'])} KiB RSS per session"
        )
        lines.append(
            f"  {s['refused_or_failed_opens']} refused/failed opens; echo round on all: {s['echo_done']} "
            f"answered, {s['echo_stalled']} stalled (> {s['deadline_s']:.0f}s), {s['echo_failed']} failed; "
            f"p50 {_f(s['echo_p50_ms'], '{:.1f}')} ms, max {_f(s['echo_max_ms'], '{:.1f}')} ms"
        )
    t = res.get("tokens")
    if t is not None:
        if "error" in t:
            lines.append(f"tokens: {t['error']}")
        else:
            b = t["best_per_second"]
            lines.append(
                f"tokens (one core): mint {b['mint']:,.0f}/s, verify {b['verify']:,.0f}/s, "
                f"OpenSSL raw Ed25519 verify {b['raw']:,.0f}/s -> verify/raw {t['verify_over_raw']:.1%}"
                + (f" ({t['ratio_method']})" if "ratio_method" in t else "")
            )
    lines += ["", "ratios (same run):"]
    for key, value in doc["ratios"].items():
        lines.append(f"  {key:<56}{_f(value, '{:.3f}')}")
    rev = res.get("revocation")
    if rev:
        from bench.revocation import table as revocation_table  # its figures' one formatter

        lines += ["", f"revocation: {rev['error']}" if "error" in rev else revocation_table(rev)]
    lines += ["", "goals (MET/MISSED, margin = how far past (+) or short of (-) the target):"]
    for g in doc["goals"]:
        state = {True: "MET", False: "MISSED", None: "n/a"}[g["met"]]
        value = g["value"]
        shown = _f(value, "{:.3f}") if isinstance(value, float) else str(value)
        margin = ""
        if g.get("margin") is not None:
            margin = f", margin {g['margin']:+.3f}{g['unit']}"
            if g.get("margin_relative") is not None:
                margin += f" ({g['margin_relative']:+.0%})"
        lines.append(f"  [{state:>6}] {g['goal']:<56} {shown} (target {g['target']}{margin})")
    return "\n".join(lines)
