"""A small Prometheus text-format registry: counters, gauges and histograms with labels.

Written here rather than pulled in (prometheus_client), and kept so after weighing it again for
the process figures: prometheus_client would be the proxy's third dependency for what is ~150
lines here; its default registry is global to the process, where each ProxyState (several per
test process) owns one; and its process collector reads the same /proc files as
:func:`add_process_metrics`, under the same standard names (``process_*``), so dashboards built
for it work unchanged. Rendering stays a plain function of the values.
"""

from __future__ import annotations

import bisect
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from console_proxy import __version__

LabelValues = tuple[str, ...]


def _number(value: float) -> str:
    """Exact for whole numbers (byte counters pass 10**6 quickly; ``:g`` would round them)."""
    if math.isnan(value):  # a figure that could not be read
        return "NaN"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    pairs = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.label_names = name, help_text, tuple(labels)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def render(self) -> list[str]:
        """The metric's lines in the Prometheus text format, its header first."""
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self.values: dict[LabelValues, float] = {}

    def inc(self, *labels: str, amount: float = 1) -> None:
        self.values[labels] = self.values.get(labels, 0) + amount

    def get(self, *labels: str) -> float:
        return self.values.get(labels, 0)

    def render(self) -> list[str]:
        lines = self.header()
        if not self.values and not self.label_names:
            lines.append(f"{self.name} 0")
        for labels, value in sorted(self.values.items()):
            lines.append(f"{self.name}{_labels(self.label_names, labels)} {_number(value)}")
        return lines


class LiveCounter(Counter):
    """A counter whose labelled values are read when rendered (e.g. bytes of open sessions too)."""

    def __init__(
        self, name: str, help_text: str, labels: Sequence[str], read: Callable[[], dict[LabelValues, float]]
    ) -> None:
        super().__init__(name, help_text, labels)
        self.read = read

    def render(self) -> list[str]:
        self.values = self.read()
        return super().render()


class Gauge(_Metric):
    """A value read when rendered, so it can never drift from the truth it reports."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        super().__init__(name, help_text)
        self.read = read

    def render(self) -> list[str]:
        return [*self.header(), f"{self.name} {_number(self.read())}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        super().__init__(name, help_text)
        self.bounds = sorted(buckets)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def render(self) -> list[str]:
        lines, running = self.header(), 0
        for bound, count in zip([*self.bounds, float("inf")], self.counts, strict=True):
            running += count
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            lines.append(f'{self.name}_bucket{{le="{le}"}} {running}')
        lines += [f"{self.name}_sum {_number(self.total)}", f"{self.name}_count {running}"]
        return lines


class InfoGauge(_Metric):
    """A constant 1 whose labels carry the information (``consolegate_build_info{version=…}``)."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, labels: dict[str, str]) -> None:
        super().__init__(name, help_text, list(labels))
        self.label_values = tuple(labels.values())

    def render(self) -> list[str]:
        return [*self.header(), f"{self.name}{_labels(self.label_names, self.label_values)} 1"]


class LabelledGauge(_Metric):
    """Gauges by label, read when rendered; a label whose value is None is left out."""

    kind = "gauge"

    def __init__(
        self, name: str, help_text: str, labels: Sequence[str], read: Callable[[], dict[LabelValues, float | None]]
    ) -> None:
        super().__init__(name, help_text, labels)
        self.read = read

    def render(self) -> list[str]:
        lines = self.header()
        for labels, value in sorted(self.read().items()):
            if value is not None:
                lines.append(f"{self.name}{_labels(self.label_names, labels)} {_number(value)}")
        return lines


CERTIFICATE_EXPIRY = "consolegate_certificate_expiry_timestamp_seconds"
ExpiryReaders = dict[str, Callable[[], "float | None"]]


def add_certificate_expiry(registry: Registry) -> ExpiryReaders:
    """``consolegate_certificate_expiry_timestamp_seconds{use=…}`` (both servers); returns the
    readers to fill in, by use (``wss``, ``https``, ``client``, ``ca``): each is read at every
    scrape, so a reload or a renewal shows at once, and a certificate no longer readable drops out."""
    readers: ExpiryReaders = {}
    registry.add(
        LabelledGauge(
            CERTIFICATE_EXPIRY,
            "Expiry (Unix time) of each certificate in use, by use.",
            ["use"],
            lambda: {(use,): read() for use, read in readers.items()},
        )
    )
    return readers


M = TypeVar("M", bound=_Metric)


class Registry:
    def __init__(self) -> None:
        self.metrics: list[_Metric] = []

    def add(self, metric: M) -> M:
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for metric in self.metrics:
            lines += metric.render()
        return "\n".join(lines) + "\n"


# --- the process: the figures prometheus_client's process collector gives, from /proc ----------

_PROC = Path("/proc/self")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def resident_bytes() -> float:
    """Resident set size: the second field of /proc/self/statm, in pages."""
    try:
        return float(int((_PROC / "statm").read_text().split()[1]) * _PAGE)
    except (OSError, IndexError, ValueError):
        return float("nan")


def open_fds() -> float:
    try:
        return float(len(os.listdir(_PROC / "fd")))
    except OSError:
        return float("nan")


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def start_time() -> float:
    """Unix time the process started: its start tick (/proc/self/stat) after boot (/proc/stat)."""
    try:
        fields = (_PROC / "stat").read_text().rpartition(")")[2].split()
        boot = next(
            float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime ")
        )
        return boot + int(fields[19]) / _TICKS
    except (OSError, IndexError, ValueError, StopIteration):
        return _IMPORTED


_IMPORTED = time.time()


def add_process_metrics(registry: Registry, component: str) -> None:
    """RSS, open files, CPU seconds, start time, and ``consolegate_build_info`` (both servers)."""
    add = registry.add
    add(
        InfoGauge(
            "consolegate_build_info",
            "Always 1; the labels say what runs.",
            {"component": component, "version": __version__},
        )
    )
    add(Gauge("process_resident_memory_bytes", "Resident memory size in bytes.", resident_bytes))
    add(Gauge("process_open_fds", "Number of open file descriptors.", open_fds))
    add(Gauge("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.", cpu_seconds))
    add(Gauge("process_start_time_seconds", "Start time of the process since unix epoch in seconds.", start_time))


class ProxyMetrics:
    """The proxy's metrics; one instance per process."""

    def __init__(
        self,
        active_sessions: Callable[[], float],
        draining: Callable[[], float],
        relayed: Callable[[], dict[LabelValues, float]],
        cut_text_dropped: Callable[[], dict[LabelValues, float]] = dict,
        pipelined: Callable[[], dict[LabelValues, float]] = dict,
    ) -> None:
        self.registry = Registry()
        add = self.registry.add
        add(Gauge("consolegate_proxy_active_sessions", "Console sessions open now.", active_sessions))
        add(Gauge("consolegate_proxy_draining", "1 while the proxy drains after SIGTERM.", draining))
        self.sessions = add(Counter("consolegate_proxy_sessions_total", "Sessions ended, by outcome.", ["outcome"]))
        self.refusals = add(Counter("consolegate_proxy_refusals_total", "Requests refused, by code.", ["code"]))
        self.proxy_protocol_refused = add(
            Counter(
                "consolegate_proxy_proxy_protocol_refused_total",
                "Connections closed for their PROXY protocol header (missing, malformed, untrusted).",
                ["reason"],
            )
        )
        add(
            LiveCounter(
                "consolegate_proxy_bytes_total",
                "Bytes relayed, by direction (open sessions included).",
                ["direction"],
                relayed,
            )
        )
        add(
            LiveCounter(
                "consolegate_proxy_cut_text_dropped_total",
                "Clipboard texts dropped, by direction (in: to the VM, out: from it) and reason "
                "(policy: the token's clip claim, too_large: above --max-cut-text); open sessions included.",
                ["direction", "reason"],
                cut_text_dropped,
            )
        )
        add(
            LiveCounter(
                "consolegate_proxy_upstream_pipelined_total",
                "Hypervisor handshakes whose opening was pipelined from an earlier one's offer "
                "(guessed), then had to start again on a new connection (redialled), or whose "
                "server broke it and is not pipelined again (refused).",
                ["outcome"],
                pipelined,
            )
        )
        self.handshake = add(
            Histogram(
                "consolegate_proxy_handshake_seconds",
                "From websocket open to ServerInit sent to the browser.",
                [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
            )
        )
        self.certificates = add_certificate_expiry(self.registry)
        add_process_metrics(self.registry, "proxy")

    def render(self) -> str:
        return self.registry.render()
