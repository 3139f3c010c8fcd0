"""The container-start workload: open + read + close of many small files, cold.

A container starting from an image opens and reads thousands of small files
(interpreter, libraries, modules, configuration) once each, on a fresh mount.
Two workloads over the container-start tree (bench/smalltree.py):

- ``all``: every file of the tree, in path order (a full scan: an image check,
  a language runtime importing a large package set);
- ``5%``: a random 5% of the files in a random order (a service starting: it
  touches a small part of the image, scattered).

Each pass mounts a fresh daemon (so no page, dentry or inode is cached in the
kernel and nothing in the daemon; the backing tree is in tmpfs), waits until it
is ready, and times only the reads: ``open``, ``read`` until EOF, ``close`` of
each file.  Three daemons, in a rotating order within each repeat: the plain
passthrough, verityfuse local mode (``--store``), verityfuse manifest mode
(``--manifest M --trust-key PUB --manifest-digest D --store``).  Reported: time
per pass and per file, verified time / plain time in the same repeat, the
daemon's CPU per file, and after ``all`` the daemon's VmHWM.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import passlog
import smalltree
from common import HERE, fmt_mmm, rotated, table, verityfuse_cmd
from mounts import Mount
from passlog import Others, settle

MODES = ("plain", "local", "manifest")
FRACTION = 0.05


def make_mount(ws, mode):
    mnt = ws.path(f"mnt-ctr-{mode}")
    if mode == "plain":
        cmd = [sys.executable, os.path.join(HERE, "plain_passthrough.py"), ws.ctr, mnt]
        return Mount(mode, "plain passthrough", mnt, cmd, ws.path("ctr-plain.log"))
    cmd = verityfuse_cmd() + ["mount", "-f", ws.ctr, mnt, "-o", "ro",
                              "--log-file", ws.path(f"ctr-{mode}.log")]
    if mode == "local":
        cmd += ["--store", ws.ctr_store]
    else:
        cmd += ["--store", ws.ctr_mstore, "--manifest", ws.ctr_manifest, "--trust-key", ws.pub,
                "--manifest-digest", ws.ctr_digest]
    return Mount(mode, f"verityfuse, {mode} mode", mnt, cmd, ws.path(f"ctr-{mode}.out"))


def read_files(root, names, expect, mount, label):
    """Open, read to EOF and close each file; returns (wall, daemon CPU s, others' share)."""
    buf = bytearray(64 * 1024)
    settle()
    others = Others(mount.pid, label=label)
    d0, t0 = mount.cpu(), time.perf_counter()
    n = 0
    for name in names:
        fd = os.open(os.path.join(root, name), os.O_RDONLY)
        try:
            while True:
                k = os.readv(fd, [buf])
                if not k:
                    break
                n += k
        finally:
            os.close(fd)
    wall, d1 = time.perf_counter() - t0, mount.cpu()
    if n != expect:
        raise RuntimeError(f"{label}: read {n} bytes from {len(names)} files, expected {expect}")
    return wall, d1 - d0, Others.share(others.stop(), wall)


def one_pass(ws, mode, names, expect):
    m = make_mount(ws, mode)
    try:
        m.start()
        m.wait_ready()
        wall, dcpu, noise = read_files(m.mountpoint, names, expect, m, mode)
        return {"wall": wall, "daemon_cpu": dcpu, "noise": noise, "hwm": m.mem()["VmHWM"]}
    finally:
        m.stop()


def phase_ctr(ws, repeats, results):
    size_of = dict(zip(ws.ctr_names, ws.ctr_sizes))
    out = {}
    for workload in ("all", "5%"):
        runs = {m: [] for m in MODES}
        passlog.section(f"ctr-{workload}")
        for r in range(repeats):
            passlog.repeat(r)
            names = ws.ctr_names if workload == "all" else \
                smalltree.sample(ws.ctr_names, FRACTION, seed=500 + r)
            expect = sum(size_of[n] for n in names)
            for mode in rotated(list(MODES), r):
                p = one_pass(ws, mode, names, expect)
                p["files"] = len(names)
                runs[mode].append(p)
        slower = {m: [runs[m][i]["wall"] / runs["plain"][i]["wall"] for i in range(repeats)]
                  for m in MODES}
        slower["manifest/local"] = [runs["manifest"][i]["wall"] / runs["local"][i]["wall"]
                                    for i in range(repeats)]
        out[workload] = {"runs": runs, "x_plain": slower}
        print_ctr(workload, runs, slower, repeats, len(ws.ctr_names))
    results["ctr"] = out
    return out


def print_ctr(workload, runs, slower, repeats, total):
    nfiles = runs["plain"][0]["files"]
    rows = []
    for m in MODES:
        ps = runs[m]
        rows.append([m, fmt_mmm([p["wall"] for p in ps]),
                     fmt_mmm([p["wall"] / p["files"] * 1e6 for p in ps], "{:.0f}"),
                     fmt_mmm(slower[m]),
                     fmt_mmm([p["daemon_cpu"] / p["files"] * 1e6 for p in ps], "{:.0f}"),
                     f"{statistics.median(p['hwm'] for p in ps):.0f}",
                     fmt_mmm([p["noise"] * 100 for p in ps], "{:.0f}")])
    what = (f"every file ({nfiles})" if workload == "all"
            else f"a random 5% ({nfiles} of {total} files, random order)")
    table(f"Container start: open + read + close of {what}, a fresh mount each pass, "
          f"{repeats} repeats interleaved",
          ["daemon", "s min/med/max", "us/file min/med/max", "time x plain min/med/max",
           "daemon CPU us/file", "VmHWM MiB", "others' CPU %"], rows,
          note="time x plain: this daemon's time / the plain passthrough's in the same repeat "
               "(higher is slower; target <= 1.5).\nA fresh daemon for every pass: nothing "
               "cached in the kernel or the daemon; the tree is in tmpfs (no disk).\n"
               f"manifest / local mode, same repeat: {fmt_mmm(slower['manifest/local'])}")
    passlog.print_passes(f"ctr-{workload}")
