"""Sealing the container-start tree against `fsverity digest` over the same files.

Each repeat runs, in a rotating order:

- ``seal``: ``verityfuse seal CTR --store STORE`` (local mode's store, written
  from empty: the store is removed before the pass, untimed);
- ``seal-manifest``: ``verityfuse seal CTR --store MSTORE --manifest M
  --sign-key K`` (what an image build does for manifest mode; store and manifest
  removed before the pass);
- ``fsverity``: ``fsverity digest`` over every file of the tree (4,000 paths an
  invocation), the lower bound of hashing the same bytes with the same tree
  format and writing nothing;
- ``floor``: ``sealfloor`` (bench/sealfloor.c, compiled here; left out without a
  compiler or OpenSSL's headers), the system calls store format 3 needs per file
  and nothing else, in as many processes as seal has workers: the least a seal
  into this format can cost.

Each pass records wall time, CPU seconds (user + system from wait4, threads and
reaped children included) and peak RSS (VmHWM, polled every 20 ms from a
thread: wait4's ru_maxrss would report the forking Python's size).  The stores
and manifest of the last repeat are the ones the container-start mounts serve.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time

import passlog
from common import fmt_mmm, proc_mem, rotated, table, verityfuse_cmd
from passlog import Others, settle

BATCH = 4000


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _pss_mib(pid):
    """Proportional set size: shared pages split among their processes, so a seal's
    worker processes (forks of it) add only what they do not share."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class PeakRss(threading.Thread):
    """Polls VmHWM of one pid (every 20 ms) and the PSS of it and its children (its
    worker processes, every 100 ms) until ``done`` is set; keeps the maxima (MiB)."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self.pss, self.done = pid, 0.0, 0.0, threading.Event()
        self.start()

    def run(self):
        n = 0
        while not self.done.is_set():
            try:
                self.peak = max(self.peak, proc_mem(self.pid).get("VmHWM", 0.0))
            except (OSError, ValueError):
                pass
            if n % 5 == 0:
                self.pss = max(self.pss, sum(_pss_mib(p) for p in [self.pid, *_children(self.pid)]))
            n += 1
            self.done.wait(0.02)


def run_measured(cmds, label, cwd=None):
    """Run ``cmds`` one after the other: (wall s, CPU s, peak RSS MiB, others' share, peak
    PSS MiB of the command and its worker processes)."""
    settle()
    cpu = [0.0]
    others = Others(label=label, extra_ours=lambda: cpu[0])
    peak = pss = 0.0
    t0 = time.perf_counter()
    for cmd in cmds:
        with tempfile.TemporaryFile() as err:
            p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=cwd)
            poll = PeakRss(p.pid)
            try:
                _, status, ru = os.wait4(p.pid, 0)
            finally:
                poll.done.set()
                poll.join()
            p.returncode = os.waitstatus_to_exitcode(status)
            cpu[0] += ru.ru_utime + ru.ru_stime
            peak, pss = max(peak, poll.peak), max(pss, poll.pss)
            if p.returncode:
                err.seek(0)
                raise RuntimeError(f"{cmd[:4]} ... failed ({p.returncode}): "
                                   f"{err.read()[-2000:].decode(errors='replace')}")
    wall = time.perf_counter() - t0
    return wall, cpu[0], peak, Others.share(others.stop(), wall), pss


def _clear(*paths):
    for p in paths:
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.unlink(p)


def build_floor(ws):
    """The sealfloor binary, compiled into the workspace; None if it cannot be."""
    out = ws.path("sealfloor")
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sealfloor.c")
    try:
        r = subprocess.run(["gcc", "-O2", "-o", out, src, "-lcrypto"], capture_output=True)
    except OSError:  # no compiler
        return None
    return out if r.returncode == 0 else None


def seal_once(ws, what, floor=None):
    vf = verityfuse_cmd()
    if what == "floor":
        out, names = ws.path("floor-store"), ws.path("floor-names")
        _clear(out)
        if not os.path.exists(names):
            with open(names, "w") as f:
                f.write("".join(n + "\n" for n in ws.ctr_names))
        from verityfuse.seal_pool import workers as seal_workers
        workers = str(seal_workers(None))  # as many as seal has by default
        try:
            return run_measured([[floor, ws.ctr, names, out, workers]], what)
        finally:
            _clear(out)
    if what == "seal":
        _clear(ws.ctr_store)
        return run_measured([vf + ["seal", ws.ctr, "--store", ws.ctr_store]], what)
    if what == "seal-manifest":
        _clear(ws.ctr_mstore, ws.ctr_manifest)
        return run_measured([vf + ["seal", ws.ctr, "--store", ws.ctr_mstore, "--manifest",
                                   ws.ctr_manifest, "--sign-key", ws.key]], what)
    names = ws.ctr_names
    return run_measured([["fsverity", "digest", *names[i:i + BATCH]]
                         for i in range(0, len(names), BATCH)], what, cwd=ws.ctr)


def phase_seal(ws, repeats, results):
    floor = build_floor(ws)
    whats = ["fsverity", "seal", "seal-manifest"] + (["floor"] if floor else [])
    runs = {w: [] for w in whats}
    passlog.section("seal")
    for r in range(repeats):
        passlog.repeat(r)
        for w in rotated(whats, r):
            runs[w].append(seal_once(ws, w, floor))
    ws.measure_ctr_manifest()
    flat = rss_in_file_count(ws)
    flat["rss_all"] = statistics.median(x[2] for x in runs["seal-manifest"])
    n = len(ws.ctr_names)
    slower = {w: [runs[w][i][0] / runs["fsverity"][i][0] for i in range(repeats)]
              for w in whats}
    rows = []
    for w in whats:
        walls = [x[0] for x in runs[w]]
        rows.append([w, fmt_mmm(walls), fmt_mmm(slower[w]),
                     f"{statistics.median(x[1] for x in runs[w]):.2f}",
                     f"{n / statistics.median(walls):.0f}",
                     fmt_mmm([x[2] for x in runs[w]], "{:.0f}"),
                     fmt_mmm([x[4] for x in runs[w]], "{:.0f}"),
                     fmt_mmm([x[3] * 100 for x in runs[w]], "{:.0f}")])
    table(f"Seal of the container-start tree ({n} files, "
          f"{sum(ws.ctr_sizes) / (1 << 20):.0f} MiB in tmpfs) against fsverity digest, "
          f"{repeats} repeats interleaved",
          ["command", "wall s min/med/max", "x fsverity (time) min/med/max", "CPU s med",
           "files/s", "peak RSS MiB min/med/max", "peak PSS with workers MiB",
           "others' CPU %"], rows,
          note="seal: `verityfuse seal CTR --store S` into an empty store (local mode); "
               "seal-manifest: the same with\n--manifest M --sign-key K (manifest mode); "
               "fsverity: `fsverity digest` over the same files; floor: bench/sealfloor.c,\n"
               "the system calls store format 3 needs per file and nothing else (the least "
               "a seal into it can cost)" + ("" if floor else ": not built here (gcc, "
               "libssl-dev)") + ".\n"
               "x fsverity: this wall time / fsverity's in the same repeat (lower is faster; "
               "target <= 2).\nPeak RSS: the command's process; PSS with workers: it and "
               "its worker processes (forks sharing most pages), shared pages split among "
               "them.\nMemory in the file count: seal-manifest's peak RSS sealing the "
               f"first {flat['files']} files (one untimed run) against\nall {n}: "
               f"{flat['rss_part']:.0f} -> {flat['rss_all']:.0f} MiB, of which the signed "
               f"manifest mapped for signing {flat['mapped_part']:.0f} -> "
               f"{flat['mapped_all']:.0f} MiB (flat: the rest the same).")
    passlog.print_passes("seal")
    results["seal"] = {"files": n, "bytes": sum(ws.ctr_sizes),
                       "runs": {w: [dict(zip(("wall", "cpu", "peak_rss_mib", "noise",
                                              "peak_pss_mib"), x))
                                    for x in v] for w, v in runs.items()},
                       "x_fsverity": slower, "rss_in_file_count": flat}
    return results["seal"]


def rss_in_file_count(ws):
    """Peak RSS of `seal --manifest` over a part of the files, against the median over
    all of them: does memory grow with the file count?  The part is the tree's first
    top directory (a tenth of the files), sealed as a SOURCE of its own, so that it is
    walked and streamed as the whole tree is (paths named on the command line are an
    update, which holds the manifest's entries)."""
    top = ws.ctr_names[0].split("/")[0]
    files = sum(1 for name in ws.ctr_names if name.startswith(top + "/"))
    store, manifest = ws.path("ctr-part-store"), ws.path("ctr-part.json")
    try:
        _, _, rss, _, _ = run_measured([verityfuse_cmd() + [
            "seal", os.path.join(ws.ctr, top), "--store", store, "--manifest", manifest,
            "--sign-key", ws.key]], None)
        payload = os.path.getsize(manifest) / (1 << 20)
    finally:
        _clear(store, manifest)
    # Signing maps the finished manifest (Ed25519 hashes all of it): its pages count in
    # the RSS, page cache and not a copy, and grow with the file count by design.
    return {"files": files, "rss_part": rss, "mapped_part": payload,
            "mapped_all": os.path.getsize(ws.ctr_manifest) / (1 << 20)}


def seal_untimed(ws):
    """The stores and manifest the container-start mounts need, when the seal section
    is not run."""
    run_measured([verityfuse_cmd() + ["seal", ws.ctr, "--store", ws.ctr_store]], None)
    run_measured([verityfuse_cmd() + ["seal", ws.ctr, "--store", ws.ctr_mstore, "--manifest",
                                      ws.ctr_manifest, "--sign-key", ws.key]], None)
    ws.measure_ctr_manifest()
