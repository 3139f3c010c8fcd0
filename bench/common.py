"""Shared helpers of the benchmark: statistics, tables, /proc figures, caches."""

from __future__ import annotations

import os
import re
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
    """How to run the CLI of this checkout: ``-P``, or ``-m`` would import the package
    of the directory the bench was started in first (another checkout's, in an A/B)."""
    return [sys.executable, "-P", "-m", "verityfuse.cli"]


def compile_package() -> int:
    """Compile this checkout's verityfuse to bytecode, as installing a package does (pip
    compiles it), so that each command the bench times starts as a user's would.  Else
    an environment with PYTHONDONTWRITEBYTECODE (this project's development machine sets
    it) makes every start compile the modules it imports from source: ~30 ms of a
    `digest` of 1 GiB that takes ~0.5 s.  Returns how many modules have bytecode now."""
    import compileall

    package = os.path.join(ROOT, "verityfuse")
    if not compileall.compile_dir(package, quiet=1):
        raise RuntimeError("compiling verityfuse to bytecode failed")
    return sum(1 for name in os.listdir(package) if name.endswith(".py"))


def drop_caches(level: int = 3):
    """1: page cache; 2: dentries and inodes (the kernel FORGETs FUSE inodes); 3: both.
    Machine-wide (other users' caches too): bench.py uses fadvise_dontneed or a fresh
    mount instead; bench/oci.py still calls this."""
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
    """CPU seconds (user + system, all threads, also those that ended) of a process.

    Read from the process's CPU-time clock (clock_gettime of the clock id
    MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED) = (~pid << 3) | 2, as
    clock_getcpuclockid(3) builds it): nanoseconds, where /proc/PID/stat's
    utime + stime come in 10 ms steps (156 us per MiB of a 64 MiB pass).  Falls
    back to /proc/PID/stat where that clock cannot be read."""
    try:
        return time.clock_gettime_ns(((~pid) << 3) | 2) / 1e9
    except OSError:
        pass
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


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


def _width(text: str) -> int:
    """Printed width: ANSI colour sequences (passlog.red) take no room."""
    return len(re.sub(r"\x1b\[[0-9;]*m", "", text))


def _pad(text: str, width: int, left: bool) -> str:
    fill = " " * (width - _width(text))
    return text + fill if left else fill + text


def table(title, headers, rows, note=None):
    """Print a plain-text table; the first column left-aligned, others right."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(_width(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    print(f"\n## {title}")
    line = "  ".join(_pad(h, widths[i], i == 0) for i, h in enumerate(headers))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(_pad(c, widths[i], i == 0) for i, c in enumerate(r)))
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
