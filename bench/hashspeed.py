#!/usr/bin/env python3
"""How fast this machine hashes fs-verity blocks, and what that buys a tree build.

    python bench/hashspeed.py [--runs 5] [--size-mib 1024] [--only 1,2,3,4]

Prints four tables (min / median / max over --runs runs, engines interleaved
run by run so that a noisy neighbour hits both alike):
 1. SHA-256 over 4 KiB blocks: OpenSSL one block at a time and the 2-way
    SHA-NI engine, on 1 thread and on 2 Python threads (each hashing its own
    1 MiB buffers); MB/s of all threads together and us per block per thread.
    The engine is chosen when the module is imported, so each measurement runs
    in a child process (VERITYFUSE_NO_SHANI=1 for OpenSSL).
 2. verify_blocks on 1 MiB requests with the helper thread off and on, back to
    back and with 300 us of other (busy) work between requests, as a daemon
    sees sequential reads.
 3. The kernel's copy into a 1 MiB read buffer, page aligned and 16 bytes off
    (what a large bytearray gets).
 4. `verityfuse digest --threads 1/2` against `fsverity digest` on one file
    in a tmpfs this script mounts and unmounts (/dev/shm if it cannot mount):
    wall and CPU seconds, digests checked equal.
"""

import argparse
import json
import mmap
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20


def child(mode, threads):
    """One measurement in this process; prints JSON."""
    import threading
    from verityfuse import _hashblocks as hb
    engine = hb.info()["sha256"]
    if mode == "hash":
        bs, per_thread = 4096, 128 * MiB
        bufs = [os.urandom(MiB) for _ in range(threads)]
        hb.hash_blocks(1, b"", bufs[0], bs, 1)  # warm up

        def work(buf):
            for _ in range(per_thread // MiB):
                hb.hash_blocks(1, b"", buf, bs, 1)

        ts = [threading.Thread(target=work, args=(b,)) for b in bufs]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        dt = time.perf_counter() - t0
        total = per_thread * threads
        print(json.dumps({"engine": engine, "mbs": total / dt / 1e6,
                          "us_per_block": dt / (per_thread / bs) * 1e6}))
    elif mode == "verify":
        import hashlib
        data = os.urandom(MiB)
        exp = b"".join(hashlib.sha256(data[i:i + 4096]).digest() for i in range(0, MiB, 4096))
        hb.configure(threads)
        out = {"engine": engine}
        for gap_us in (0, 300):
            lat = []
            for _ in range(300):
                t0 = time.perf_counter()
                assert hb.verify_blocks(1, b"", data, 4096, exp) == -1
                lat.append(time.perf_counter() - t0)
                end = time.perf_counter() + gap_us * 1e-6
                while time.perf_counter() < end:  # other work of the daemon
                    pass
            out[f"gap{gap_us}"] = statistics.median(lat) * 1e6
        out["helper_jobs"] = hb.info()["helper_jobs"]  # of 600 calls
        print(json.dumps(out))


def run_child(mode, threads, shani):
    env = dict(os.environ)
    env.pop("VERITYFUSE_NO_SHANI", None)
    if not shani:
        env["VERITYFUSE_NO_SHANI"] = "1"
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(threads)], env=env,
                         check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out)


def mmm(values, fmt="{:.0f}"):
    v = sorted(values)
    return " / ".join(fmt.format(x) for x in (v[0], statistics.median(v), v[-1]))


def bench_hash(runs):
    print("1. SHA-256, 4 KiB blocks (min / median / max of %d runs)" % runs)
    res = {}
    for _ in range(runs):
        for shani in (False, True):
            for threads in (1, 2):
                r = run_child("hash", threads, shani)
                res.setdefault((r["engine"], threads), []).append(r)
    print(f"   {'engine':<12} {'threads':>7}  {'MB/s (all threads)':>24}  {'us/block/thread':>20}")
    for (engine, threads), rs in sorted(res.items()):
        print(f"   {engine:<12} {threads:>7}  {mmm([r['mbs'] for r in rs]):>24}  "
              f"{mmm([r['us_per_block'] for r in rs], '{:.2f}'):>20}")
    med = {k: statistics.median(r["mbs"] for r in v) for k, v in res.items()}
    if ("sha-ni-2way", 1) in med and ("openssl", 1) in med:
        print("   2-way vs 1-way per core: %.2fx (1 thread), %.2fx (2 threads)" % (
            med[("sha-ni-2way", 1)] / med[("openssl", 1)],
            med[("sha-ni-2way", 2)] / med[("openssl", 2)]))
    print()


def bench_verify(runs):
    print("2. verify_blocks, 1 MiB of 4 KiB blocks per call: median us per call "
          "(min / median / max of %d runs)" % runs)
    res = {}
    for _ in range(runs):
        for threads in (1, 2):
            res.setdefault(threads, []).append(run_child("verify", threads, True))
    for threads, rs in sorted(res.items()):
        label = "helper on " if threads == 2 else "helper off"
        for gap in (0, 300):
            us = [r[f"gap{gap}"] for r in rs]
            print(f"   {rs[0]['engine']}, {label}, {gap:>3} us between calls: "
                  f"{mmm(us):>18} us = {MiB / statistics.median(us):.0f} MB/s")
        if threads == 2:
            print("   the helper joined %s of 600 calls (min / median / max)"
                  % mmm([r["helper_jobs"] for r in rs]))
    print()


def bench_read_alignment(path, runs):
    print("3. pread of %s into a 1 MiB buffer (MB/s, min / median / max)" % path)
    fd = os.open(path, os.O_RDONLY)
    size = min(os.fstat(fd).st_size, 512 * MiB)
    region = mmap.mmap(-1, MiB + 4096)
    res = {0: [], 16: []}
    for _ in range(runs):
        for shift in res:
            mv = memoryview(region)[shift:shift + MiB]
            t0 = time.perf_counter()
            for off in range(0, size - MiB + 1, MiB):
                os.preadv(fd, [mv], off)
            res[shift].append(size / (time.perf_counter() - t0) / 1e6)
            mv.release()
    os.close(fd)
    for shift, v in res.items():
        print(f"   buffer {'page aligned' if shift == 0 else f'{shift} bytes off':<13} {mmm(v)}")
    print()


def timed(cmd):
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise SystemExit(f"{cmd} failed: {p.returncode}")
    return time.perf_counter() - t0, ru.ru_utime + ru.ru_stime, out.split()[0]


def bench_digest(path, runs):
    size = os.path.getsize(path)
    print(f"4. tree build of {size / MiB:.0f} MiB (SHA-256/4096), median of {runs} runs, interleaved")
    # The entry point beside this interpreter (the venv's), as a user runs it.
    script = os.path.join(os.path.dirname(sys.executable), "verityfuse")
    vf = [script] if os.path.exists(script) else [sys.executable, "-P", "-m", "verityfuse.cli"]
    cmds = {"fsverity digest": ["fsverity", "digest", path]}
    for t in (1, 2):
        cmds[f"verityfuse digest --threads {t}"] = vf + ["digest", f"--threads={t}", path]
    res = {k: [] for k in cmds}
    digests = set()
    for _ in range(runs):
        for name, cmd in cmds.items():
            wall, cpu, digest = timed(cmd)
            res[name].append((wall, cpu))
            digests.add(digest)
    if len(digests) != 1:
        raise SystemExit(f"digests differ: {digests}")
    base = statistics.median(w for w, _ in res["fsverity digest"])
    print(f"   {'command':<30} {'wall s (min/med/max)':>22} {'CPU s (med)':>12} "
          f"{'MB/s':>6} {'vs fsverity':>12}")
    for name, v in res.items():
        wall = statistics.median(w for w, _ in v)
        print(f"   {name:<30} {mmm([w for w, _ in v], '{:.2f}'):>22} "
              f"{statistics.median(c for _, c in v):>12.2f} {size / wall / 1e6:>6.0f} "
              f"{base / wall:>11.2f}x")
    print()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--only", default="1,2,3,4", help="which tables, e.g. 1,2 or 4")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], int(args.child[1]))

    from verityfuse import _hashblocks as hb
    print(f"engines: {hb.info()}; CPUs: {os.cpu_count()}; load: {os.getloadavg()[0]:.2f}\n")
    only = set(args.only.split(","))
    if "1" in only:
        bench_hash(args.runs)
    if "2" in only:
        bench_verify(args.runs)
    if not only & {"3", "4"}:
        return
    mnt = tempfile.mkdtemp(prefix="hashspeed.")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={args.size_mib + 64}m",
                              "hashspeed", mnt], capture_output=True).returncode == 0
    where = mnt if mounted else "/dev/shm"
    path = os.path.join(where, f"hashspeed.{os.getpid()}.bin")
    try:
        with open(path, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MiB))
        if "3" in only:
            bench_read_alignment(path, args.runs)
        if "4" in only:
            bench_digest(path, args.runs)
    finally:
        if os.path.exists(path):
            os.unlink(path)
        if mounted:
            subprocess.run(["umount", mnt], check=True)
        os.rmdir(mnt)
    print(f"max RSS of children: {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    sys.exit(main())
