"""verityfuse benchmark: every figure is a ratio measured side by side in one run.

1. Tree build of one file: `fsverity digest` (fsverity-utils, the reference)
   vs `verityfuse digest` on 1 and 2 threads vs `verityfuse seal`.  The file
   is read once first so every tool reads it from the page cache.  Peak RSS
   of each process is taken from wait4(); the small-file run shows that it
   does not grow with the file size.
2. Reads through FUSE: the source itself, an unverified pyfuse3 passthrough
   (bench/plain_passthrough.py) and verityfuse, over the same file.  The FUSE
   page cache is dropped before each run; the source lives in tmpfs by
   default (--dir), so the figures measure the daemons, not the disk.

Needs root (drop_caches, mounting).  Usage:
    python bench/bench.py [--size-mib 1024] [--dir /dev/shm] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from verityfuse.daemon import set_readahead  # noqa: E402
from verityfuse.testing import VerifiedMount, seal_tree  # noqa: E402

MiB = 1 << 20


def drop_caches():
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def timed_child(cmd):
    """Run ``cmd``; returns (seconds, peak RSS in MiB of that process).

    The peak is the child's own VmHWM, polled until it exits: wait4()'s
    ru_maxrss would include the forking Python's memory, which exec records.
    """
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0.0
    while p.poll() is None:
        try:
            peak = max(peak, dict(vm_hwm(p.pid)).get("VmHWM", 0.0))
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
        time.sleep(0.002)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{cmd} failed: {p.stderr.read().decode()}")
    p.stderr.close()
    return dt, peak


def vm_hwm(pid):
    """(name, MiB) for VmHWM and VmRSS of a process."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                yield line.split(":")[0], int(line.split()[1]) / 1024


def make_file(path, size):
    chunk = os.urandom(4 * MiB)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, len(chunk))
            f.write(chunk[:n])
            left -= n
    with open(path, "rb") as f:  # warm the page cache
        while f.read(16 * MiB):
            pass


def bench_build(path, size, repeat, store):
    vf = [sys.executable, "-m", "verityfuse.cli"]
    tools = {
        "fsverity digest": ["fsverity", "digest", path],
        "verityfuse digest --threads 1": [*vf, "digest", "--threads", "1", path],
        "verityfuse digest (2 threads)": [*vf, "digest", "--threads", "2", path],
        "verityfuse seal (2 threads)": [*vf, "seal", os.path.dirname(path), path,
                                        "--store", store, "--threads", "2"],
    }
    best = {name: (float("inf"), 0.0) for name in tools}
    for _ in range(repeat):  # interleaved, so drifts hit every tool alike
        for name, cmd in tools.items():
            dt, rss = timed_child(cmd)
            best[name] = (min(best[name][0], dt), max(best[name][1], rss))
    ref = best["fsverity digest"][0]
    print(f"\n## Tree build, {size // MiB} MiB, sha256/4096 (best of {repeat})")
    print(f"{'tool':34} {'MB/s':>8} {'x fsverity':>11} {'peak RSS MiB':>13}")
    for name, (dt, rss) in best.items():
        print(f"{name:34} {size / dt / 1e6:8.0f} {ref / dt:11.2f} {rss:13.1f}")
    return best


def read_seq(path, chunk=MiB):
    fd = os.open(path, os.O_RDONLY)
    n = 0
    t0 = time.perf_counter()
    try:
        while True:
            b = os.read(fd, chunk)
            if not b:
                break
            n += len(b)
    finally:
        os.close(fd)
    return n, time.perf_counter() - t0


def read_random(path, size, count, seed=7):
    rng = random.Random(seed)
    offsets = [rng.randrange(size // 4096) * 4096 for _ in range(count)]
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        for off in offsets:
            os.pread(fd, 4096, off)
        return (time.perf_counter() - t0) / count
    finally:
        os.close(fd)


def hash_ceiling(mib=256):
    """SHA-256 over 4 KiB blocks with the native hasher, 1 and 2 threads: the
    most any verified read can reach on this machine."""
    from concurrent.futures import ThreadPoolExecutor

    from verityfuse import merkle
    hb = merkle.Params().blocks_hasher()
    buf = memoryview(os.urandom(mib * MiB))
    t0 = time.perf_counter()
    hb(buf)
    one = len(buf) / (time.perf_counter() - t0)
    half = len(buf) // 2
    with ThreadPoolExecutor(2) as ex:
        t0 = time.perf_counter()
        list(ex.map(hb, [buf[:half], buf[half:]]))
        two = len(buf) / (time.perf_counter() - t0)
    print(f"\n## SHA-256 ceiling ({'native' if merkle.NATIVE else 'hashlib'}): "
          f"{one / 1e6:.0f} MB/s on 1 thread, {two / 1e6:.0f} MB/s on 2 threads")


def bench_reads(src, name, size, repeat, random_reads, work):
    plain_mnt = os.path.join(work, "plain")
    os.mkdir(plain_mnt)
    plain = subprocess.Popen([sys.executable, os.path.join(HERE, "plain_passthrough.py"), src,
                              plain_mnt])
    try:
        for _ in range(500):
            if os.path.ismount(plain_mnt):
                break
            time.sleep(0.02)
        os.stat(plain_mnt)  # answered only after INIT, whose reply sets readahead
        # The same readahead window verityfuse sets for itself, so that the
        # ratio measures verification, not a different request size.
        set_readahead(plain_mnt, 1024)
        vmnt = os.path.join(work, "verity")
        os.mkdir(vmnt)
        with VerifiedMount(src, vmnt) as vm:
            paths = {"source (tmpfs, no FUSE)": os.path.join(src, name),
                     "pyfuse3 passthrough (unverified)": os.path.join(plain_mnt, name),
                     "verityfuse (verified)": os.path.join(vmnt, name)}
            seq = {k: float("inf") for k in paths}
            rnd = {k: float("inf") for k in paths}
            for _ in range(repeat):
                for k, p in paths.items():
                    drop_caches()
                    n, dt = read_seq(p)
                    if n != size:
                        raise RuntimeError(f"{p}: read {n} bytes, expected {size}")
                    seq[k] = min(seq[k], dt)
                    drop_caches()
                    rnd[k] = min(rnd[k], read_random(p, size, random_reads))
            mem = dict(vm_hwm(vm.pid))
        print(f"\n## Reads of a {size // MiB} MiB sealed file, page cache dropped before each "
              f"(best of {repeat})")
        print(f"{'path':34} {'seq MB/s':>9} {'rand 4K us':>11}")
        for k in paths:
            print(f"{k:34} {size / seq[k] / 1e6:9.0f} {rnd[k] * 1e6:11.1f}")
        p, v = "pyfuse3 passthrough (unverified)", "verityfuse (verified)"
        print(f"verified / unverified sequential throughput: {seq[p] / seq[v]:.2f}x")
        print(f"verified / unverified random 4 KiB latency:  {rnd[v] / rnd[p]:.2f}x")
        print("verityfuse daemon memory: " + ", ".join(f"{k} {v:.1f} MiB" for k, v in mem.items()))
    finally:
        if os.path.ismount(plain_mnt):
            subprocess.run(["fusermount3", "-u", plain_mnt])
        plain.wait(10)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--small-mib", type=int, default=64, help="size of the memory-check file")
    ap.add_argument("--dir", default="/dev/shm", help="where the test files go")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--random-reads", type=int, default=2000)
    ap.add_argument("--skip-reads", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench.py needs root (drop_caches, mounts)")
    work = tempfile.mkdtemp(prefix="verityfuse-bench-", dir=args.dir)
    try:
        src = os.path.join(work, "src")
        os.mkdir(src)
        store = os.path.join(work, "store")
        print(f"machine: {os.cpu_count()} CPUs; python {sys.version.split()[0]}; "
              f"files in {args.dir}")
        small = os.path.join(src, "small")
        make_file(small, args.small_mib * MiB)
        bench_build(small, args.small_mib * MiB, 1, store)
        big = os.path.join(src, "big")
        make_file(big, args.size_mib * MiB)
        bench_build(big, args.size_mib * MiB, args.repeat, store)
        os.unlink(small)
        hash_ceiling()
        if not args.skip_reads:
            seal_tree(src, ["big"])
            bench_reads(src, "big", args.size_mib * MiB, args.repeat, args.random_reads, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
