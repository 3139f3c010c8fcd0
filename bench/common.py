"""Shared helpers of the benchmark: statistics, tables, /proc figures, caches."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

MiB = 1 << 20
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Every child (daemons, CLI runs, hashspeed's children) imports verityfuse from this
# checkout, as the bench itself does.
if os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] != ROOT:
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH"))
                                               if p)


def verityfuse_cmd():
    """How to run the CLI of this checkout."""
    return [sys.executable, "-m", "verityfuse.cli"]


def drop_caches(level: int = 3):
    """1: page cache; 2: dentries and inodes (the kernel FORGETs FUSE inodes); 3: both."""
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write(f"{level}\n")


def fadvise_dontneed(path: str):
    """Drop one file's pages from the page cache (works on FUSE files)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads, also those that ended) of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy (all CPUs; steal included: time the
    hypervisor gave to someone else)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


class Others:
    """CPU time used by everything but the bench process and ``pids`` over an interval:
    the noise a measurement ran in.  ``share(wall)`` is that as a fraction of the
    machine's capacity (all CPUs) during ``wall`` seconds."""

    def __init__(self, *pids):
        self.pids = (os.getpid(),) + tuple(p for p in pids if p)
        self.b0 = machine_busy()
        self.p0 = sum(proc_cpu(p) for p in self.pids)

    def stop(self) -> float:
        busy = machine_busy() - self.b0
        ours = sum(proc_cpu(p) for p in self.pids) - self.p0
        self.seconds = max(0.0, busy - ours)
        return self.seconds

    @staticmethod
    def share(seconds: float, wall: float) -> float:
        return seconds / (wall * (os.cpu_count() or 1)) if wall > 0 else 0.0


SETTLE = {"max_s": 0.0, "threshold": 0.15, "waited": 0.0}


def settle():
    """With --settle S: wait (up to S seconds) until the rest of the machine has used
    less than 15% of all CPUs over a 0.25 s window.  Off by default."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < SETTLE["max_s"]:
        o = Others()
        time.sleep(0.25)
        if Others.share(o.stop(), 0.25) < SETTLE["threshold"]:
            break
    SETTLE["waited"] += time.monotonic() - t0


def proc_mem(pid: int) -> dict:
    """{"VmHWM": MiB, "VmRSS": MiB} of a process."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


def mmm(values):
    """(min, median, max) of a non-empty sequence."""
    v = sorted(values)
    return v[0], statistics.median(v), v[-1]


def fmt_mmm(values, fmt="{:.2f}", sep=" / "):
    if not values:
        return "-"
    return sep.join(fmt.format(x) for x in mmm(values))


def percentile(values, p):
    v = sorted(values)
    if not v:
        return float("nan")
    k = (len(v) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def rotated(items, r):
    """The r-th rotation of ``items``: each repeat starts with a different one."""
    r %= len(items)
    return items[r:] + items[:r]


def table(title, headers, rows, note=None):
    """Print a plain-text table; the first column left-aligned, others right."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    print(f"\n## {title}")
    line = "  ".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i])
                     for i, h in enumerate(headers))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i])
                        for i, c in enumerate(r)))
    if note:
        for n in note.strip().splitlines():
            print(f"   {n}")
    sys.stdout.flush()


def wait_for(cond, timeout, what, step=0.01):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)
