"""The machine's hashing speed, and tree building against `fsverity digest`."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import passlog
from common import MiB, fmt_mmm, proc_mem, rotated, table, verityfuse_cmd
from passlog import Others, settle


def native_info():
    """verityfuse._hashblocks.info() if the installed module has it, else a description."""
    try:
        from verityfuse import _hashblocks
    except ImportError:
        return {"sha256": "hashlib", "note": "native module not built"}
    info = getattr(_hashblocks, "info", None)
    if info is None:
        return {"sha256": "openssl", "note": "this _hashblocks has no info(): OpenSSL, one "
                "block at a time"}
    return dict(info())


# -- hashing speed ---------------------------------------------------------------------
#
# HOOK: bench/hashspeed.py (written by another agent) measures the engines of the
# native module: OpenSSL one block at a time and the 2-way SHA-NI engine, on 1 and
# 2 threads.  When it is there and works with the installed module, its
# measurement (hashspeed.run_child) is used; otherwise the fallback below measures
# whatever merkle.Params().blocks_hasher() uses, on 1 and 2 threads.

FALLBACK_CHILD = r"""
import json, os, sys, threading, time
from verityfuse import merkle
threads = int(sys.argv[1])
p = merkle.Params()
try:
    hb = p.blocks_hasher(1)        # newer merkle: 1 = this thread only, no helper
except TypeError:
    hb = p.blocks_hasher()
per_thread = 128 << 20
bufs = [os.urandom(1 << 20) for _ in range(threads)]
hb(bufs[0])
def work(buf):
    for _ in range(per_thread >> 20):
        hb(buf)
ts = [threading.Thread(target=work, args=(b,)) for b in bufs]
t0 = time.perf_counter()
for t in ts: t.start()
for t in ts: t.join()
dt = time.perf_counter() - t0
print(json.dumps({"mbs": per_thread * threads / dt / 1e6,
                  "us_per_block": dt / (per_thread / 4096) * 1e6}))
"""


def _hashspeed_runner():
    """hashspeed.run_child(mode, threads, shani) if usable, else None."""
    try:
        import hashspeed  # noqa: F401  (bench/hashspeed.py)
        from verityfuse import _hashblocks
        _hashblocks.info()
        hashspeed.run_child("hash", 1, False)  # a quick probe: raises if it cannot run
        return hashspeed.run_child
    except Exception:
        return None


def hashing_speed(repeats):
    """{(engine, threads): [MB/s...]}; engines interleaved run by run."""
    runner = _hashspeed_runner()
    res = {}
    if runner is not None:
        source = "bench/hashspeed.py"
        for _ in range(repeats):
            for shani in (False, True):
                for threads in (1, 2):
                    r = runner("hash", threads, shani)
                    res.setdefault((r["engine"], threads), []).append(r["mbs"])
    else:
        source = "bench/build.py fallback (bench/hashspeed.py absent or not usable here)"
        engine = native_info().get("sha256", "?")
        for _ in range(repeats):
            for threads in (1, 2):
                out = subprocess.run([sys.executable, "-c", FALLBACK_CHILD, str(threads)],
                                     check=True, capture_output=True, text=True).stdout
                res.setdefault((engine, threads), []).append(json.loads(out)["mbs"])
    rows = []
    for (engine, threads), v in sorted(res.items()):
        rows.append([engine, threads, fmt_mmm(v, "{:.0f}"),
                     f"{4096 / 1e6 / statistics.median(v) * threads * 1e6:.2f}"])
    table(f"Hashing speed: SHA-256 over 4 KiB blocks, MB/s of all threads (min / median / max "
          f"of {repeats}), from {source}",
          ["engine", "threads", "MB/s", "us/block/thread"], rows)
    return {"source": source, "runs": {f"{e}/{t}": v for (e, t), v in res.items()}}, res


def best_2thread(res):
    """(engine, median MB/s with 2 threads) of the fastest engine measured."""
    two = {e: statistics.median(v) for (e, t), v in res.items() if t == 2}
    e = max(two, key=two.get)
    return e, two[e]


# -- tree build ------------------------------------------------------------------------

def _run_cpu(cmd, label=None):
    """(wall s, CPU s, digest, others' share) with the child's rusage from wait4."""
    settle()
    child = []
    others = Others(label=label, extra_ours=lambda: sum(child))
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = p.stdout.read()
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    p.stdout.close()
    p.stderr.close()
    if p.returncode:
        raise RuntimeError(f"{cmd} failed: {err.decode(errors='replace')}")
    cpu = ru.ru_utime + ru.ru_stime
    child.append(cpu)
    return wall, cpu, out.split()[0].decode(), Others.share(others.stop(), wall)


def _peak_rss(cmd):
    """VmHWM (MiB) of one untimed run, polled: wait4's ru_maxrss would report the
    forking Python's size, which exec records."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0.0
    while p.poll() is None:
        try:
            peak = max(peak, proc_mem(p.pid).get("VmHWM", 0.0))
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    return peak


def tree_build(path, repeats):
    size = os.path.getsize(path)
    vf = verityfuse_cmd()
    cmds = {"fsverity digest": ["fsverity", "digest", path],
            "verityfuse digest --threads 1": vf + ["digest", "--threads", "1", path],
            "verityfuse digest --threads 2": vf + ["digest", "--threads", "2", path]}
    names = list(cmds)
    runs = {n: [] for n in names}
    digests = set()
    noise = {n: [] for n in names}
    passlog.section("build")
    for r in range(repeats):
        passlog.repeat(r)
        for n in rotated(names, r):
            label = n.replace("verityfuse digest --threads ", "digest-t")
            wall, cpu, digest, others = _run_cpu(cmds[n], label=label.replace(
                "fsverity digest", "fsverity"))
            runs[n].append((wall, cpu))
            noise[n].append(others)
            digests.add(digest)
    if len(digests) != 1:
        raise RuntimeError(f"the tools disagree on the digest: {digests}")
    peaks = {n: _peak_rss(c) for n, c in cmds.items()}
    ref = [w for w, _ in runs["fsverity digest"]]
    speedup = {n: [ref[i] / runs[n][i][0] for i in range(repeats)] for n in names}
    rows = []
    for n in names:
        walls = [w for w, _ in runs[n]]
        rows.append([n, fmt_mmm(walls), f"{statistics.median(c for _, c in runs[n]):.2f}",
                     f"{size / statistics.median(walls) / 1e6:.0f}", fmt_mmm(speedup[n]),
                     f"{peaks[n]:.1f}", fmt_mmm([x * 100 for x in noise[n]], "{:.0f}")])
    table(f"Tree build of {size // MiB} MiB in tmpfs (SHA-256/4096), {repeats} repeats, "
          f"interleaved (rotating order)",
          ["command", "wall s min/med/max", "CPU s med", "MB/s", "x fsverity min/med/max",
           "peak RSS MiB", "others' CPU %"], rows,
          note="x fsverity = fsverity digest's wall time / this command's, per repeat "
               "(higher is faster).\nCPU s: user+system of the process, all threads (wait4). "
               "The file is in tmpfs: no disk.\nothers' CPU %: what the rest of the machine "
               "used meanwhile, % of all CPUs (min / median / max): the noise.")
    passlog.print_passes("build")
    return {"size": size, "runs": runs, "speedup": speedup, "peak_rss_mib": peaks, "noise": noise,
            "digest": digests.pop()}
