"""verityfuse benchmark: every figure measured side by side, interleaved, repeated.

    python bench/bench.py [--size-mib 1024] [--repeats 5] [--quick] [--json FILE]

Needs root (it mounts a tmpfs and FUSE file systems, and drops caches).  It
mounts a tmpfs holding a random file (--size-mib), a 64 MiB file and --files
small files, seals them with a signed manifest, and measures:

 1. hashing speed of this machine (bench/hashspeed.py when present);
 2. tree build: `verityfuse digest --threads 1/2` against `fsverity digest`;
 3. with all daemons mounted at once (bench/mounts.py): the daemons' memory
    (VmHWM) at mount, after 64 MiB, after the big file and after the small files;
 4. sequential reads after drop_caches, each repeat in a rotating order: MB/s,
    ratio to the unverified passthrough, CPU us per MiB of daemon and reader;
 5. the ceiling those figures allow (bench/ceiling.py);
 6. random 4 KiB reads, warm and cold;
 7. the latency of a metadata request while 1 MiB reads are verified;
 8. mount time of a 100k-entry manifest.
It reports min / median / max of every ratio and a summary against the targets;
it never fails on a missed target (exit 0), only on an error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))

import build  # noqa: E402
import ceiling  # noqa: E402
import manifest_mount  # noqa: E402
from common import SETTLE, table  # noqa: E402
from mounts import MountSet  # noqa: E402
from phases import (phase_manifest_mount, phase_memory, phase_random, phase_seq,  # noqa: E402
                    phase_stat, print_memory, print_seq)
from summary import summary  # noqa: E402
from workspace import Workspace  # noqa: E402

SECTIONS = ("hash", "build", "memory", "seq", "random", "stat", "manifest")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=None, help="size of the big file (1024)")
    ap.add_argument("--repeats", "--repeat", type=int, default=None, help="repeats (5)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 64 MiB, 3 repeats, 5000 random reads, 1000 files")
    ap.add_argument("--random-reads", type=int, default=None, help="4 KiB reads a pass (20000)")
    ap.add_argument("--files", type=int, default=None, help="small files (10000)")
    ap.add_argument("--manifest-entries", type=int, default=100_000)
    ap.add_argument("--stat-samples", type=int, default=None,
                    help="stats per mount and condition (2000)")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--tmp-parent", default="/tmp", help="where the bench's tmpfs is mounted")
    ap.add_argument("--plain-thr", action="store_true",
                    help="also mount the passthrough with reads over 16 KiB in a worker thread")
    ap.add_argument("--settle", type=float, default=0.0, metavar="S",
                    help="before each timed pass, wait up to S seconds for the rest of the "
                         "machine to use < 15%% of the CPUs (default 0: off)")
    ap.add_argument("--json", metavar="FILE", help="write every raw figure here")
    a = ap.parse_args(argv)
    quick = dict(size_mib=64, repeats=3, random_reads=5000, files=1000, stat_samples=600)
    full = dict(size_mib=1024, repeats=5, random_reads=20000, files=10000, stat_samples=2000)
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.sections = {s.strip() for s in a.sections.split(",") if s.strip()}
    bad = a.sections - set(SECTIONS)
    if bad:
        ap.error(f"unknown sections: {', '.join(sorted(bad))}")
    if a.repeats < 1:
        ap.error("--repeats must be at least 1")
    return a


def machine():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) // 1024
    try:
        import pyfuse3
        pyfuse = getattr(pyfuse3, "__version__", "?")
    except ImportError:
        pyfuse = "?"
    fuse = subprocess.run(["fusermount3", "-V"], capture_output=True, text=True).stdout.strip()
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "cpu": cpu, "cpus": os.cpu_count(), "mem_mib": mem, "kernel": platform.release(),
            "python": platform.python_version(), "pyfuse3": pyfuse, "fusermount3": fuse,
            "hashblocks": build.native_info(), "loadavg_start": os.getloadavg()}


def main(argv=None):
    args = parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench.py needs root (tmpfs and FUSE mounts, drop_caches)")

    def on_signal(signum, _frame):
        raise SystemExit(f"stopped by {signal.Signals(signum).name}: cleaning up")
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    manifest_mount.become_subreaper()
    SETTLE["max_s"] = args.settle
    results = {"args": {k: (sorted(v) if isinstance(v, set) else v)
                        for k, v in vars(args).items()},
               "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
               "machine": machine()}
    mc = results["machine"]
    print(f"verityfuse bench, {mc['date']}: {mc['cpus']} x {mc['cpu']}, {mc['mem_mib']} MiB, "
          f"Linux {mc['kernel']}, Python {mc['python']}, pyfuse3 {mc['pyfuse3']}, "
          f"{mc['fusermount3']}")
    print(f"hashing module: {mc['hashblocks']}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in mc['loadavg_start'])}; "
          f"repeats {args.repeats}, big file {args.size_mib} MiB")
    t_start = time.perf_counter()
    ws = Workspace(args.size_mib, args.files, args.tmp_parent)
    ceil = None
    try:
        ws.mount_tmpfs()
        print(f"workspace: {ws.where}")
        ws.create(log=lambda s: print(s, flush=True))
        hres = None
        if "hash" in args.sections:
            results["hash"], hres = build.hashing_speed(args.repeats)
        if "build" in args.sections:
            results["build"] = build.tree_build(ws.big, args.repeats)
        need_mounts = args.sections & {"memory", "seq", "random", "stat"}
        if need_mounts:
            with MountSet(ws, args.plain_thr) as ms:
                settings = ms.settings()
                results["mount_settings"] = settings
                table("Mounts (all at once; settings read back from the kernel)",
                      ["daemon", "what", "read_ahead_kb", "options"],
                      [[m.name, m.label, settings[m.name]["readahead_kb"],
                        settings[m.name]["options"]] for m in ms.mounts],
                      note="All: pyfuse3 + the same libfuse (max_read/max_pages 256 = 1 MiB "
                           "requests), keep_cache, no writeback cache.")
                if "memory" in args.sections:
                    snaps, files = phase_memory(ms, ws, results)
                    print_memory(ms, snaps, files, len(ws.small_files()), ws.size_mib)
                if "seq" in args.sections:
                    seq = phase_seq(ms, ws, args.repeats, results)
                    if hres:
                        ceil = ceiling.compute(seq, hres, os.cpu_count())
                        results["ceiling"] = ceil
                    print_seq(ms, seq, ceil, args.repeats)
                    if ceil:
                        ceiling.report(ceil, seq)
                if "random" in args.sections:
                    phase_random(ms, ws, args.repeats, args.random_reads, False, results)
                if "stat" in args.sections:
                    phase_stat(ms, ws, args.repeats, args.stat_samples, results)
                results["memory_final"] = {m.name: m.mem() for m in ms.mounts}
                if "random" in args.sections:
                    phase_random(ms, ws, args.repeats, args.random_reads, True, results)
        if "manifest" in args.sections:
            phase_manifest_mount(ws, args.manifest_entries, args.repeats, results)
        results["summary"] = summary(results, ceil)
    finally:
        ws.cleanup()
    results["loadavg_end"] = os.getloadavg()
    results["seconds"] = time.perf_counter() - t_start
    results["settle_waited_s"] = SETTLE["waited"]
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in results['loadavg_end'])}; "
          f"bench took {results['seconds']:.0f} s"
          + (f" ({SETTLE['waited']:.0f} s of it settling)" if args.settle else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"raw figures: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
