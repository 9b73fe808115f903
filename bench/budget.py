"""Hold processes to a fixed share of one CPU with a cgroup CPU quota (v1 or v2), then undo it.

Why: on a small benchmark machine the load generator and Xvnc need CPU too, so the console-open
rate of a fast proxy is bounded by them rather than by the proxy. Giving each proxy the same
budget — less than the machine has to spare — makes the proxy the bottleneck for both, so the
rates compare what each proxy does with the same CPU. websockify's per-connection children are
forked inside the group and count against its budget.

Needs root (or a delegated cgroup); :func:`available` says whether it can work here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Self

V1 = Path("/sys/fs/cgroup/cpu")
V2 = Path("/sys/fs/cgroup")
PERIOD_US = 4_000  # short periods: a throttled proxy waits at most this long


def _layout() -> tuple[Path, str] | None:
    """(parent directory, "v1" | "v2") of a writable cgroup CPU controller, or None."""
    if (V1 / "cpu.cfs_quota_us").exists() and os.access(V1, os.W_OK):
        return V1, "v1"
    controllers = V2 / "cgroup.controllers"
    if controllers.exists() and "cpu" in controllers.read_text().split() and os.access(V2, os.W_OK):
        return V2, "v2"
    return None


def available() -> bool:
    return _layout() is not None


class CpuBudget:
    """``with CpuBudget(pids, 0.5):`` — the processes (and children they fork) share half a CPU."""

    def __init__(self, pids: Sequence[int], share: float, name: str = "consolegate-bench") -> None:
        layout = _layout()
        if layout is None:
            raise RuntimeError("no writable cgroup CPU controller (needs root)")
        self.parent, self.kind = layout
        self.pids, self.share = list(pids), share
        self.group = self.parent / f"{name}-{os.getpid()}"
        # where each process was, to put it back there (inside a container that is not the root)
        self.origins = {pid: self._cgroup_of(pid) for pid in self.pids}

    def __enter__(self) -> Self:
        self.group.mkdir(exist_ok=True)
        try:
            self._limit(max(1000, int(self.share * PERIOD_US)))
            for pid in self.pids:
                self._move(self.group, pid)
                if not self._inside(pid):
                    raise RuntimeError(f"process {pid} did not move into {self.group}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _limit(self, quota: int) -> None:
        if self.kind == "v1":
            (self.group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (self.group / "cpu.cfs_quota_us").write_text(str(quota))
            return
        control = self.parent / "cgroup.subtree_control"
        if "cpu" not in control.read_text().split():
            control.write_text("+cpu")
        (self.group / "cpu.max").write_text(f"{quota} {PERIOD_US}")

    def __exit__(self, *exc: object) -> None:
        """Everything in the group (children forked meanwhile too) back out, then the group goes.
        A process that forks while being moved can leave one behind: a few passes settle it."""
        for _ in range(5):
            procs = [int(p) for p in (self.group / "cgroup.procs").read_text().split()]
            if not procs:
                break
            home = self.origins.get(self.pids[0], self.parent) if self.pids else self.parent
            for pid in procs:  # a child forked inside goes where its first parent came from
                self._move(self.origins.get(pid, home), pid)
        # still populated (a zombie not yet reaped): an empty-quota group is left behind
        with contextlib.suppress(OSError):
            self.group.rmdir()

    def _cgroup_of(self, pid: int) -> Path:
        """The CPU controller's cgroup directory ``pid`` is in now (the parent if not found)."""
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except OSError:
            return self.parent
        for line in lines:
            _, controllers, path = line.split(":", 2)
            if (controllers == "") if self.kind == "v2" else ("cpu" in controllers.split(",")):
                return self.parent / path.lstrip("/")
        return self.parent

    def _inside(self, pid: int) -> bool:
        return str(pid) in (self.group / "cgroup.procs").read_text().split()

    @staticmethod
    def _move(group: Path, pid: int) -> None:
        # exited meanwhile
        with contextlib.suppress(ProcessLookupError):
            (group / "cgroup.procs").write_text(str(pid))
