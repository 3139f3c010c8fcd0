"""Every measured pass with what the rest of the machine did meanwhile.

A pass is one timed measurement (one file read through one mount, one seal,
one mount of a manifest).  Around each, ``Others`` records the 1-minute load
average at its start and end and the CPU time the machine spent busy (wall time
x CPUs minus the idle and iowait time of /proc/stat: on a tickless kernel those
two are measured, not sampled per tick as user/system are, and steal counts as
busy) minus the CPU time of the bench and of the processes it measures
(/proc/PID/stat utime + stime, all threads; wait4 for reaped children): what
*others* used during the pass, in cores (CPU seconds / wall seconds).  A pass
where others used more than ``busy_cores`` (0.10 of a core by default) plus the
counters' resolution (10 ms per CPU and per read) is busy: its figure is not
the code's alone.  A pass shorter than half a second is judged over the half
second from its start (see ``Others.stop``).  The load average
is shown for each pass but judged only before the bench starts (``LOAD_MAX``):
once the bench runs, its own reader and daemons keep the 1-minute load near 1-2
on an idle machine, so a per-pass load threshold would flag every pass.
"""

from __future__ import annotations

import os
import sys
import time

import memwarm
from common import proc_cpu

CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1
LIMITS = {"busy_cores": 0.10, "load_max": 1.0}
PASSES: list = []
CONTEXT = {"section": "-", "repeat": 0}
COLOR = sys.stdout.isatty()


def machine_idle() -> float:
    """CPU seconds all CPUs spent idle or waiting for I/O since boot."""
    with open("/proc/stat") as f:
        v = f.readline().split()
    return (int(v[4]) + int(v[5])) / CLK_TCK


# Two reads of idle time (10 ms units) per CPU, and of each of our processes' CPU.
RESOLUTION_S = 2 * NCPU / CLK_TCK
MIN_WINDOW = 0.5


def load1() -> float:
    return os.getloadavg()[0]


class Others:
    """CPU time used by everything but the bench process and ``pids`` from construction
    to ``stop()``.  With a ``label``, ``stop()`` also logs the pass (see ``record``)."""

    def __init__(self, *pids, label=None, extra_ours=None):
        self.pids = (os.getpid(),) + tuple(p for p in pids if p)
        self.label = label
        # extra_ours(): CPU seconds of measured processes that are gone by stop()
        # (children reaped with wait4), counted as ours.
        self.extra_ours = extra_ours
        self.load0 = load1()
        self.p0 = sum(self._cpu(p) for p in self.pids)
        self.i0 = machine_idle()
        self.t0 = time.perf_counter()

    @staticmethod
    def _cpu(pid):
        try:
            return proc_cpu(pid)
        except (OSError, ValueError):
            return 0.0  # exited meanwhile: its time is in extra_ours

    def stop(self) -> float:
        """CPU seconds others used during the pass.  A pass shorter than MIN_WINDOW is
        judged over the MIN_WINDOW seconds from its start (the bench sleeps the rest):
        over a few tens of milliseconds the counters' 10 ms steps would say nothing;
        the share measured over the window is scaled back to the pass."""
        wall = time.perf_counter() - self.t0
        if self.label is not None and wall < MIN_WINDOW:
            time.sleep(MIN_WINDOW - wall)
        idle = machine_idle() - self.i0
        window = time.perf_counter() - self.t0
        ours = sum(self._cpu(p) for p in self.pids) - self.p0
        if self.extra_ours is not None:
            ours += self.extra_ours()
        others = max(0.0, window * NCPU - idle - ours)
        self.wall = wall
        self.seconds = others * wall / window
        if self.label is not None:
            record(self.label, wall, others, self.load0, load1(), window)
        return self.seconds

    @staticmethod
    def share(seconds: float, wall: float) -> float:
        """``seconds`` of CPU as a fraction of all CPUs over ``wall`` seconds."""
        return seconds / (wall * NCPU) if wall > 0 else 0.0


def section(name: str):
    CONTEXT.update(section=name, repeat=0)


def repeat(r: int):
    CONTEXT["repeat"] = r


def record(label, wall, others_s, load_start, load_end, window):
    """``others_s``: CPU seconds others used over ``window`` seconds (>= the pass's wall)."""
    cores = others_s / window if window > 0 else 0.0
    p = {"section": CONTEXT["section"], "repeat": CONTEXT["repeat"], "label": label,
         "wall": wall, "window": window, "others_cores": cores,
         "load_start": load_start, "load_end": load_end,
         "busy": others_s > LIMITS["busy_cores"] * window + RESOLUTION_S}
    PASSES.append(p)
    return p


def red(text: str) -> str:
    return f"\033[1;31m{text}\033[0m" if COLOR else text


def fmt_pass(p) -> str:
    s = f"{p['label']} {p['load_start']:.2f}>{p['load_end']:.2f} {p['others_cores']:.2f}c"
    return red(s + " BUSY") if p["busy"] else s


def print_passes(section_name: str):
    """One line per repeat: each pass's 1-minute load before > after, and the CPU others
    used meanwhile, in cores."""
    ps = [p for p in PASSES if p["section"] == section_name]
    if not ps:
        return
    busy = sum(p["busy"] for p in ps)
    print(f"   passes (label, 1-min load before>after, others' CPU in cores; BUSY: others > "
          f"{LIMITS['busy_cores']:.2f} core): {busy} of {len(ps)} busy")
    for r in sorted({p["repeat"] for p in ps}):
        line = "  ".join(fmt_pass(p) for p in ps if p["repeat"] == r)
        print(f"     r{r + 1}: {line}")
    sys.stdout.flush()


def busy_summary():
    """(busy passes, all passes, {section: busy count})."""
    per = {}
    for p in PASSES:
        per.setdefault(p["section"], 0)
        per[p["section"]] += p["busy"]
    return sum(p["busy"] for p in PASSES), len(PASSES), per


SETTLE = {"max_s": 0.0, "threshold": 0.15, "waited": 0.0}


def settle():
    """Before every timed pass.  With --settle S: wait (up to S seconds) until the rest
    of the machine has used less than 15% of all CPUs over a 0.25 s window (off by
    default).  Then memory the host backs, for what the pass allocates (memwarm)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < SETTLE["max_s"]:
        o = Others()
        time.sleep(0.25)
        if Others.share(o.stop(), 0.25) < SETTLE["threshold"]:
            break
    SETTLE["waited"] += time.monotonic() - t0
    memwarm.warm()
