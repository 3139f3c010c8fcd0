"""A share served through FUSE: random 4 KiB reads where the source refuses RWF_NOWAIT.

A confidential guest reads its image from a virtio-fs share, a FUSE file system,
which refuses RWF_NOWAIT: the question by which verityfuse keeps a read that could
wait for the host off its request thread.  There it asks the page cache instead
(cachestat), so reads of cached pages are verified on the request thread (the native
path) and only the rest go to a worker thread.

The bench stands a FUSE source up from the workspace's SRC (the plain passthrough,
unverified, over tmpfs: a stand-in for virtio-fs in a guest) and mounts two daemons
over it, side by side: the plain passthrough again (unverified; it reads inline,
whatever the source) and verityfuse in manifest mode (its store read through the FUSE
source too, as in a guest).  Each reads the 64 MiB file once (the source's page cache
and verityfuse's tree blocks are then warm); each pass drops the top mount's pages
and does aligned 4 KiB reads at random offsets, every one a FUSE_READ to that daemon.
Reported: time per read, verified / plain in the same repeat, daemon CPU per read, and
what verityfuse's native path answered (its status).
"""

from __future__ import annotations

import json
import os
import sys

import passlog
import reads
from common import HERE, fmt_mmm, rotated, table, verityfuse_cmd
from mounts import Mount


def phase_fusesrc(ws, repeats, count, results):
    plain = [sys.executable, os.path.join(HERE, "plain_passthrough.py")]
    src = ws.path("mnt-fusesrc")
    source = Mount("source", "FUSE source (plain passthrough of SRC)", src, plain + [ws.src, src],
                   ws.path("fusesrc.log"))
    top_plain, top_vf = ws.path("mnt-fs-plain"), ws.path("mnt-fs-manifest")
    tops = [
        Mount("plain", "plain passthrough over it", top_plain, plain + [src, top_plain],
              ws.path("fs-plain.log")),
        Mount("manifest", "verityfuse, manifest mode, over it", top_vf,
              verityfuse_cmd() + ["mount", "-f", src, top_vf, "-o", "ro", "--manifest",
                                  ws.manifest, "--trust-key", ws.pub, "--manifest-digest",
                                  ws.manifest_digest, "--log-file", ws.path("fs-manifest.log")],
              ws.path("fs-manifest.out")),
    ]
    started = []
    try:
        source.start()
        started.append(source)
        source.wait_ready()
        for m in tops:
            m.start()
            started.append(m)
        for m in tops:
            m.wait_ready()
        _measure(ws, tops, repeats, count, results)
    finally:
        for m in reversed(started):
            m.stop()


def _measure(ws, tops, repeats, count, results):
    name = os.path.basename(ws.medium)
    size = os.path.getsize(ws.medium)
    buf = reads.aligned_buffer()
    for m in tops:  # warm: the source's pages, verityfuse's tree blocks
        reads.seq_pass(os.path.join(m.mountpoint, name), m, buf, size)
    names = [m.name for m in tops]
    by_name = {m.name: m for m in tops}
    passes = {n: [] for n in names}
    vf_status = by_name["manifest"].mountpoint
    before = _fast(vf_status)
    passlog.section("fusesrc")
    for r in range(repeats):
        passlog.repeat(r)
        offsets = reads.random_offsets(size, count, seed=2000 + r)
        for n in rotated(names, r):
            m = by_name[n]
            passes[n].append(reads.random_pass(os.path.join(m.mountpoint, name), m, offsets,
                                               False, label=n))
    after = _fast(vf_status)
    us = {n: [p.wall / p.count * 1e6 for p in passes[n]] for n in names}
    ratio = [us["manifest"][i] / us["plain"][i] for i in range(repeats)]
    fast = {k: after.get(k, 0) - before.get(k, 0) for k in after
            if k == "reads" or k.startswith("declined")} if after else None
    results["fusesrc"] = {"count": count, "us": us, "ratio": ratio, "fast_reads": fast,
                          "passes": {n: [p.as_dict() for p in v] for n, v in passes.items()}}
    rows = [[n, fmt_mmm(us[n], "{:.1f}"),
             fmt_mmm(ratio if n == "manifest" else [1.0] * repeats),
             fmt_mmm([p.daemon_cpu / p.count * 1e6 for p in passes[n]], "{:.1f}"),
             fmt_mmm([p.noise * 100 for p in passes[n]], "{:.0f}")] for n in names]
    table(f"A FUSE source (as a guest's virtio-fs share): random 4 KiB reads of the "
          f"{size >> 20} MiB file, {count} a pass, {repeats} repeats interleaved",
          ["daemon", "us/read min/med/max", "x plain min/med/max",
           "daemon CPU us/read min/med/max", "others' CPU %"], rows,
          note="Both daemons over the same FUSE source (the plain passthrough of SRC, whose pages "
               "stay cached);\nthe top mount's pages are dropped before each pass. The source "
               "refuses RWF_NOWAIT: verityfuse asks\nthe page cache (cachestat) and verifies "
               "cached pages on its request thread.\n"
               f"verityfuse's native path over the passes: {json.dumps(fast)}")
    passlog.print_passes("fusesrc")


def _fast(mountpoint):
    """The running verityfuse's native-path counters (its status xattr)."""
    try:
        st = json.loads(os.getxattr(mountpoint, "user.verityfuse.status"))
    except OSError:
        return {}
    return st.get("fast_reads") or {}

