"""What the benchmarks need to know about a shared machine: CPU pressure, idle waits, the CPU's name."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time


def cpu_stall_us() -> int | None:
    """System-wide time (us) during which some runnable task waited for a CPU (PSI); None if unavailable."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(re.search(r"^some .*total=(\d+)", f.read(), re.M).group(1))
    except (OSError, AttributeError):
        return None


def busy_cores(window_s: float = 0.5) -> float:
    """Cores kept busy by the whole machine over a short window (this process sleeps meanwhile)."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v) - v[3] - v[4], sum(v)  # (busy, total) jiffies; idle and iowait excluded
    b0, t0 = sample()
    time.sleep(window_s)
    b1, t1 = sample()
    return (b1 - b0) / max(1, t1 - t0) * os.cpu_count()


def wait_quiet(max_wait_s: float, busy_limit: float = 0.2) -> float:
    """Sleep until other processes leave the CPUs alone (or max_wait_s passes); returns the seconds waited."""
    t0 = time.perf_counter()
    try:
        while busy_cores() > busy_limit and time.perf_counter() - t0 < max_wait_s:
            time.sleep(1.0)
    except (OSError, ValueError):
        pass
    return time.perf_counter() - t0


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return re.search(r"Model name:\s+(.*)", out).group(1).strip()
    except Exception:
        return platform.processor() or "unknown"
