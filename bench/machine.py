"""What the benchmarks share: CPU pressure, idle waits, CPU time spent (the machine's, a process tree's) and the CPU's
name on a shared machine; a `glm5 serve` started in a subprocess, and its /metrics read back."""

from __future__ import annotations

import os
import platform
import re
import socket
import subprocess
import sys
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
    """lscpu's model name and the widest matrix ISA it has (AMX, AVX512-BF16 or AVX2): which one decides fp32 or
    bf16."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = re.search(r"Model name:\s+(.*)", out).group(1).strip()
        flags = re.search(r"Flags:\s+(.*)", out).group(1).split()
        isa = "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "AVX2"
        return f"{name} ({isa})"
    except Exception:
        return platform.processor() or "unknown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, serve_args: list[str], log) -> subprocess.Popen:
    """`glm5 serve --port PORT *serve_args` in a subprocess writing to the file log; returns once /health answers
    200 (RuntimeError if it exits or takes over 300 s)."""
    cmd = [sys.executable, "-m", "glm5.server.cli", "serve", "--port", str(port), "--log-level", "warning",
           *serve_args]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return wait_healthy(proc, port, log, "the server")


def wait_healthy(proc: subprocess.Popen, port: int, log, what: str) -> subprocess.Popen:
    """Return proc once http://127.0.0.1:PORT/health answers 200; kill it and raise RuntimeError if it exits first or
    takes over 300 s."""
    import httpx

    t0 = time.monotonic()
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() - t0 > 300:
            proc.kill()
            raise RuntimeError(f"{what} did not start (see {log.name})")
        time.sleep(0.5)


def metric_values(text: str) -> dict[str, float]:
    """Prometheus text -> {name{labels}: value}."""
    out = {}
    for ln in text.splitlines():
        if ln and not ln.startswith("#"):
            name, _, v = ln.rpartition(" ")
            out[name] = float(v)
    return out


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat; idle and iowait excluded, steal included:
    a hypervisor's other guests take CPUs too; guest time left out, being already counted in user time)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) of a process and its live descendants; 0 for one that is gone."""
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rpartition(")")[2].split()  # after "(comm)", which may hold spaces
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(d))
        cpu[int(d)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += cpu.get(p, 0.0)
        todo += children.get(p, [])
    return total
