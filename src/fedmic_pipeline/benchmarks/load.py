"""What other processes do to the machine while the benchmark times itself.

On a shared 2-core machine two torch threads slow down many-fold when another process
takes a core, which says nothing about the code measured; so the benchmark records the
load average and the cores that *other* processes used during each timed run (from
/proc/stat), can wait for a quiet machine, and discards contended repetitions.
"""

from __future__ import annotations

import os
import time
from typing import Any

__all__ = ["ForeignLoad", "cpu_busy_s", "load1", "wait_for_load"]


def cpu_busy_s() -> float | None:
    """Seconds of CPU time all processes of the machine have used (from /proc/stat)."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class ForeignLoad:
    """CPU cores used by *other* processes during a span: machine busy time minus this
    process's own CPU time, over wall time (None where /proc/stat is unreadable)."""

    def __enter__(self) -> ForeignLoad:
        self.busy0, self.own0, self.wall0 = cpu_busy_s(), time.process_time(), time.perf_counter()
        self.cores: float | None = None
        return self

    def __exit__(self, *exc: object) -> None:
        busy1, own1, wall1 = cpu_busy_s(), time.process_time(), time.perf_counter()
        if self.busy0 is not None and busy1 is not None and wall1 > self.wall0:
            self.cores = round(max(0.0, (busy1 - self.busy0) - (own1 - self.own0)) / (wall1 - self.wall0), 2)


def load1() -> float | None:
    """The 1-minute load average, rounded (None where the platform has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not on every platform
        return None


def wait_for_load(max_load: float, timeout_s: float, say: Any = None) -> float | None:
    """Wait (up to ``timeout_s``) until the 1-minute load average is at most ``max_load``."""
    deadline = time.monotonic() + timeout_s
    load = load1()
    while load is not None and load > max_load and time.monotonic() < deadline:
        if say is not None:
            say(f"load average {load} > {max_load}: waiting...")
        time.sleep(min(30.0, max(1.0, deadline - time.monotonic())))
        load = load1()
    return load
