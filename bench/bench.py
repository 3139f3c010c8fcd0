"""verityfuse benchmark: every figure measured side by side, interleaved, repeated.

    python bench/bench.py [--quick] [--repeats 3] [--strict] [--sections ...] [--json FILE]

Needs root (it mounts a tmpfs and FUSE file systems).  In a tmpfs of its own it
writes a random big file (--size-mib), a 64 MiB file and the container-start
tree (--ctr-files small files, bench/smalltree.py), and measures, each repeat
visiting the daemons in a rotated order (unverified plain passthrough,
verityfuse local mode, manifest mode):

 1. hash: hashing speed of this machine (bench/hashspeed.py);
 2. build: `verityfuse digest --threads 1/2` against `fsverity digest`;
 3. memory: the daemons' VmHWM at mount, after 64 MiB, after the big file;
 4. seq: big file, sequential 1 MiB reads, pages dropped: MB/s, ratio to plain,
    daemon CPU us per MiB; the ceiling those figures allow (bench/ceiling.py);
 5. random: big file, random 4 KiB reads with the pages dropped and the tree
    blocks cached, and fully cold (fresh daemons);
 6. stat: latency of a metadata request while 1 MiB reads are verified;
 7. seal: `verityfuse seal` of the container tree (local, --manifest) against
    `fsverity digest` over it (bench/seal.py);
 8. ctr: container start, open+read+close of every file and of a random 5%
    on a fresh mount (bench/ctrstart.py);
 9. manifest: mount time and RSS of a 200k-entry manifest;
10. fusesrc: random 4 KiB reads over a FUSE source (a guest's virtio-fs share,
    which refuses RWF_NOWAIT), verityfuse against the plain passthrough
    (bench/fusesrc.py).
Every pass records the 1-minute load and the CPU others used meanwhile
(bench/passlog.py); a pass where others used over 0.10 of a core is BUSY.  The
summary gives min / median / max of every ratio against the targets.  Exit 0
whatever the figures; with --strict, 3 when the load was over 1.0 at the start
(refused before measuring) or any pass was busy.
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
import memwarm  # noqa: E402
import passlog  # noqa: E402
import seal  # noqa: E402
from common import compile_package, table  # noqa: E402
from ctrstart import phase_ctr  # noqa: E402
from fusesrc import phase_fusesrc  # noqa: E402
from mounts import MountSet  # noqa: E402
from passlog import SETTLE  # noqa: E402
from phases import (phase_manifest_mount, phase_memory, phase_random, phase_seq,  # noqa: E402
                    phase_stat, print_memory, print_seq)
from summary import summary  # noqa: E402
from workspace import Workspace  # noqa: E402

SECTIONS = ("hash", "build", "memory", "seq", "random", "stat", "seal", "ctr", "manifest",
            "fusesrc")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=None, help="size of the big file (1024)")
    ap.add_argument("--repeats", "--repeat", type=int, default=3, help="repeats (3)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 64 MiB, 2000 random reads, 10000 small files, "
                         "50000-entry manifest")
    ap.add_argument("--random-reads", type=int, default=None, help="4 KiB reads a pass (20000)")
    ap.add_argument("--ctr-files", type=int, default=None,
                    help="files of the container-start tree (100000)")
    ap.add_argument("--manifest-entries", type=int, default=None, help="(200000)")
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
    ap.add_argument("--warm-mib", type=int, default=None, metavar="MIB",
                    help="memory populated and freed right before every pass, so that what the "
                         "pass allocates is backed by the host (memwarm.py; default 1.5 x the "
                         "big file, at least 512; 0: none)")
    ap.add_argument("--busy-cores", type=float, default=0.10, metavar="C",
                    help="a pass is BUSY when the rest of the machine used more than C cores "
                         "meanwhile (0.10)")
    ap.add_argument("--strict", action="store_true",
                    help="refuse to start when the 1-minute load is over 1.0, and exit 3 when "
                         "any pass was busy")
    ap.add_argument("--json", metavar="FILE", help="write every raw figure here")
    a = ap.parse_args(argv)
    quick = dict(size_mib=64, random_reads=2000, ctr_files=10_000, stat_samples=600,
                 manifest_entries=50_000)
    full = dict(size_mib=1024, random_reads=20000, ctr_files=100_000, stat_samples=2000,
                manifest_entries=200_000)
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
            "hashblocks": build.native_info(), "loadavg_start": os.getloadavg(),
            "free_page_reporting": memwarm.free_page_reporting()}


def main(argv=None):
    args = parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench.py needs root (tmpfs and FUSE mounts)")

    def on_signal(signum, _frame):
        raise SystemExit(f"stopped by {signal.Signals(signum).name}: cleaning up")
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    manifest_mount.become_subreaper()
    SETTLE["max_s"] = args.settle
    warm_mib = args.warm_mib if args.warm_mib is not None else max(512, args.size_mib * 3 // 2)
    memwarm.WARM["bytes"] = warm_mib << 20
    passlog.LIMITS["busy_cores"] = args.busy_cores
    results = {"args": {k: (sorted(v) if isinstance(v, set) else v)
                        for k, v in vars(args).items()},
               "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
               "machine": machine()}
    mc = results["machine"]
    print(f"verityfuse bench, {mc['date']}: {mc['cpus']} x {mc['cpu']}, {mc['mem_mib']} MiB, "
          f"Linux {mc['kernel']}, Python {mc['python']}, pyfuse3 {mc['pyfuse3']}, "
          f"{mc['fusermount3']}")
    print(f"hashing module: {mc['hashblocks']}")
    print(f"bytecode: the {compile_package()} verityfuse modules compiled (as a package "
          f"install does): no timed command compiles its modules at start")
    print(f"free page reporting to the host: {mc['free_page_reporting']}; before every pass "
          f"{warm_mib} MiB populated and freed (--warm-mib: memwarm.py)")
    load0 = mc["loadavg_start"][0]
    busy_start = load0 > passlog.LIMITS["load_max"]
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in mc['loadavg_start'])}"
          + (passlog.red(f"  BUSY (1-minute load over {passlog.LIMITS['load_max']:.1f})")
             if busy_start else "")
          + f"; repeats {args.repeats}, big file {args.size_mib} MiB, "
            f"container tree {args.ctr_files} files")
    if busy_start and args.strict:
        print("--strict: refusing to measure on a busy machine")
        return 3
    t_start = time.perf_counter()
    ws = Workspace(args.size_mib, args.ctr_files, args.tmp_parent)
    ceil = None
    try:
        ws.mount_tmpfs()
        print(f"workspace: {ws.where}")
        ws.create(log=lambda s: print(s, flush=True))
        if args.sections & {"seal", "ctr"}:
            ws.create_tree(log=lambda s: print(s, flush=True))
        big_sections(args, ws, results)
        ceil = results.get("ceiling")
        if "fusesrc" in args.sections:
            phase_fusesrc(ws, args.repeats, args.random_reads, results)
        if "seal" in args.sections:
            seal.phase_seal(ws, args.repeats, results)
        if "ctr" in args.sections:
            if "seal" not in args.sections:
                seal.seal_untimed(ws)
            phase_ctr(ws, args.repeats, results)
        if "manifest" in args.sections:
            phase_manifest_mount(ws, args.manifest_entries, args.repeats, results)
        results["summary"] = summary(results, ceil)
    finally:
        ws.cleanup()
    busy, total, per = passlog.busy_summary()
    results["passes"] = passlog.PASSES
    results["busy"] = {"passes": busy, "of": total, "per_section": per,
                       "load_at_start_over_max": busy_start}
    results["loadavg_end"] = os.getloadavg()
    results["seconds"] = time.perf_counter() - t_start
    results["settle_waited_s"] = SETTLE["waited"]
    results["warm"] = dict(memwarm.WARM)
    line = (f"busy passes: {busy} of {total} (others used over {args.busy_cores:.2f} core)"
            + (": " + ", ".join(f"{k} {v}" for k, v in per.items() if v) if busy else ""))
    print("\n" + (passlog.red(line) if busy else line))
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in results['loadavg_end'])}; "
          f"bench took {results['seconds']:.0f} s"
          + (f" ({SETTLE['waited']:.0f} s of it settling)" if args.settle else "")
          + f"; memory warm-up {memwarm.WARM['seconds']:.0f} s over {memwarm.WARM['passes']} "
            f"passes")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"raw figures: {args.json}")
    if args.strict and (busy or busy_start):
        print("--strict: the machine was busy during this run; its figures are refused")
        return 3
    return 0


def big_sections(args, ws, results):
    """The sections on the big files: hashing, tree build, and with all daemons mounted at
    once, memory, sequential and random reads, metadata latency."""
    hres = None
    if "hash" in args.sections:
        results["hash"], hres = build.hashing_speed(args.repeats)
    if "build" in args.sections:
        results["build"] = build.tree_build(ws.big, args.repeats)
    if not args.sections & {"memory", "seq", "random", "stat"}:
        return
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
            print_memory(ms, phase_memory(ms, ws, results), ws.size_mib)
        if "seq" in args.sections:
            seq = phase_seq(ms, ws, args.repeats, results)
            ceil = None
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


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        # main's finally has unmounted and removed the workspace by now.
        sys.exit("interrupted: everything unmounted and removed")
