"""How long a metadata request waits while the daemon verifies 1 MiB reads.

A loader process reads the big file through the mount with 1 MiB reads, in a
loop, dropping the file's pages (posix_fadvise DONTNEED) before each pass, so
every read reaches the daemon as 1 MiB FUSE_READs (readahead keeps several in
flight).  Meanwhile this process stats names that do not exist, a new name
each time: the kernel caches no negative entry for an ENOENT reply, so every
stat is a LOOKUP the daemon answers, and its latency is the time that request
waited for the daemon's loop plus the round trip.  The same is measured with
no load, and on the unverified passthrough under the same load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from common import percentile
from passlog import Others, settle

LOADER = r"""
import json, mmap, os, signal, sys, time
path = sys.argv[1]
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
buf = mmap.mmap(-1, 1 << 20)
n, t0 = 0, time.perf_counter()
print("ready", flush=True)
while not stop:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    while not stop:
        k = os.readv(fd, [buf])
        if not k:
            break
        n += k
    os.close(fd)
print(json.dumps({"bytes": n, "seconds": time.perf_counter() - t0}), flush=True)
"""


def sample_stats(mountpoint, count, gap_s=0.0005, tag="x"):
    """Latencies (us) of ``count`` stats of fresh non-existent names."""
    lat = []
    for i in range(count):
        p = os.path.join(mountpoint, f".bench-nonexistent-{tag}-{i}")
        t0 = time.perf_counter_ns()
        try:
            os.stat(p)
        except FileNotFoundError:
            pass
        else:
            raise RuntimeError(f"{p} exists")
        lat.append((time.perf_counter_ns() - t0) / 1000)
        time.sleep(gap_s)
    return lat


def under_load(mount, big_name, count, tag):
    """(stat latencies, loader MB/s, others' CPU share) while the loader reads through
    ``mount``."""
    settle()
    loader = subprocess.Popen([sys.executable, "-c", LOADER,
                               os.path.join(mount.mountpoint, big_name)],
                              stdout=subprocess.PIPE, text=True)
    try:
        if loader.stdout.readline().strip() != "ready":
            raise RuntimeError("the loader did not start")
        time.sleep(0.3)  # let readahead ramp up
        others = Others(mount.pid, loader.pid, label=f"{mount.name}-loaded")
        t0 = time.perf_counter()
        lat = sample_stats(mount.mountpoint, count, tag=tag)
        wall = time.perf_counter() - t0
        noise = Others.share(others.stop(), wall)
    finally:
        loader.terminate()
        out, _ = loader.communicate(timeout=60)
    r = json.loads(out.strip().splitlines()[-1])
    return lat, r["bytes"] / r["seconds"] / 1e6, noise


def summarize(lat):
    return {"median": percentile(lat, 50), "p99": percentile(lat, 99), "max": max(lat),
            "n": len(lat)}
