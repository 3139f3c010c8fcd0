"""The measurements made with the daemons mounted, and the manifest mount time.

Each phase_* function measures, prints its table and stores its raw figures in
``results`` (written by --json).
"""

from __future__ import annotations

import os
import statistics

import manifest_mount
import passlog
import reads
import responsive
from common import MiB, fmt_mmm, rotated, table
from workspace import MEDIUM_MIB

VERIFIED = ("local", "manifest")


def phase_memory(ms, ws, results):
    """VmHWM of each daemon at mount, after the medium file, after the big file."""
    passlog.section("memory")
    snaps = {}

    def snap(label):
        snaps[label] = {}
        for m in ms.mounts:
            mem = snaps[label][m.name] = m.mem()
            cache = m.tree_cache()
            if cache is not None:  # what of VmHWM is the bounded tree-block cache
                mem["cache_mib"] = cache["bytes"] / MiB
                mem["cache_max_mib"] = cache["max_bytes"] / MiB

    snap("at mount")
    buf = reads.aligned_buffer()
    for label, path, size in (("after medium file", "medium", os.path.getsize(ws.medium)),
                              ("after big file", "big", os.path.getsize(ws.big))):
        for m in ms.mounts:
            reads.seq_pass(os.path.join(m.mountpoint, path), m, buf, size, label=m.name)
        snap(label)
    results["memory"] = {"snapshots": snaps}
    return snaps


def print_memory(ms, snaps, big_mib):
    labels = list(snaps)
    def cell(mem):
        cache = f" ({mem['cache_mib']:.1f})" if "cache_mib" in mem else ""
        return f"{mem['VmHWM']:.1f}{cache}"

    rows = [[m.name] + [cell(snaps[lb][m.name]) for lb in labels] +
            [f"{snaps[labels[-1]][m.name]['VmRSS']:.1f}"] for m in ms.mounts]
    table("Daemon memory: VmHWM (MiB) after each step, all daemons mounted at once; "
          "(in brackets: the tree-block cache's bytes then)",
          ["daemon"] + labels + ["VmRSS now"], rows,
          note=f"Steps in order: fresh mount; read the medium file ({MEDIUM_MIB} MiB); read the "
               f"big file ({big_mib} MiB).\nFlat = the same VmHWM whatever the file size, "
               f"apart from the cache of verified Merkle tree blocks,\nwhich fills up to its "
               f"bound (--cache-size, 32 MiB) and no further.  After many small files: see the "
               f"container-start table.")
    passlog.print_passes("memory")


def phase_seq(ms, ws, repeats, results):
    size = os.path.getsize(ws.big)
    targets = ["source"] + [m.name for m in ms.mounts]
    passes = {t: [] for t in targets}
    copies = []
    buf = reads.aligned_buffer()
    scratch = ws.path("scratch")
    # One untimed pass through each mount first.  A daemon's first pass is served by
    # Python (its leaf blocks are not loaded yet), the others natively: without this a
    # run of the seq section alone timed that one as a repeat of the rest.  (What still
    # varies from pass to pass is this VM's memory: perf shows the kernel's copy into
    # fresh page-cache pages up to 5x slower in some passes, in any mount.)
    for m in ms.mounts:
        reads.seq_pass(os.path.join(m.mountpoint, "big"), m, buf, size)
        # A verityfuse daemon that verified nothing served the file unverified (a store
        # without its index entries): its figures would be a passthrough's.
        if not m.name.startswith("plain"):
            got = m.blocks_verified()
            if got is None or got < size // 4096:
                raise RuntimeError(f"{m.label}: verified {got} blocks of the {size // 4096} "
                                   f"it served: not a verified read")
    for r in range(repeats):
        passlog.repeat(r)
        copies.append(reads.copy_costs(ws.big, scratch, buf))
        for t in rotated(targets, r):
            if t == "source":
                passes[t].append(reads.seq_pass(ws.big, None, buf, size, label=t))
            else:
                m = ms[t]
                passes[t].append(reads.seq_pass(os.path.join(m.mountpoint, "big"), m, buf, size,
                                                label=t))
    os.unlink(scratch)
    mbs = {t: [size / p.wall / 1e6 for p in passes[t]] for t in targets}
    ratio = {t: [mbs[t][i] / mbs["plain"][i] for i in range(repeats)] for t in targets}
    ratio["manifest/local"] = [mbs["manifest"][i] / mbs["local"][i] for i in range(repeats)]
    noise = {t: [p.noise * 100 for p in passes[t]] for t in targets}
    cpu = {t: {"daemon": [p.daemon_cpu / (size / MiB) * 1e6 for p in passes[t]],
               "reader": [p.reader_cpu / (size / MiB) * 1e6 for p in passes[t]]}
           for t in targets}
    results["seq"] = {"size": size, "passes": {t: [p.as_dict() for p in v]
                                               for t, v in passes.items()},
                      "mbs": mbs, "ratio": ratio, "cpu_us_per_mib": cpu, "copy_us_per_mib": copies,
                      "noise": noise}
    return results["seq"]


def print_seq(ms, seq, ceil, repeats):
    labels = {"source": "source file (tmpfs, no FUSE)"}
    labels.update({m.name: m.name for m in ms.mounts})
    rows = []
    for t in seq["mbs"]:
        frac = "-"
        if t in VERIFIED and ceil:
            frac = fmt_mmm([x / ceil["ratio_max"] for x in seq["ratio"][t]])
        rows.append([labels[t], fmt_mmm(seq["mbs"][t], "{:.0f}"), fmt_mmm(seq["ratio"][t]),
                     fmt_mmm(seq['cpu_us_per_mib'][t]['daemon'], "{:.0f}")
                     if t != "source" else "-",
                     f"{statistics.median(seq['cpu_us_per_mib'][t]['reader']):.0f}", frac,
                     fmt_mmm(seq["noise"][t], "{:.0f}")])
    table(f"Big file, sequential: {seq['size'] // MiB} MiB with 1 MiB reads, its pages dropped, "
          f"{repeats} repeats interleaved",
          ["path", "MB/s min/med/max", "x plain min/med/max", "daemon CPU us/MiB min/med/max",
           "reader CPU us/MiB", "of ceiling min/med/max", "others' CPU %"], rows,
          note="x plain: this path's MB/s / the plain passthrough's in the same repeat.\n"
               "Pages dropped: posix_fadvise(DONTNEED) on the file through the mount before "
               "each pass;\nthe backing file is in tmpfs (no disk).\n"
               "daemon CPU = user+system of the whole daemon process (its CPU-time clock, all "
               "threads) per MiB read;\nreader CPU (median) = this thread.\n"
               "of ceiling: x plain / the ceiling ratio below.\n"
               "others' CPU %: what the rest of the machine used during each pass, % of all "
               "CPUs (min / median / max).\n"
               + ("plain-thr: the passthrough handing reads over 16 KiB to a worker thread.\n"
                  if "plain-thr" in seq["mbs"] else "")
               + f"manifest / local mode, same repeat: "
               f"{fmt_mmm(seq['ratio']['manifest/local'])} (min / median / max)")
    passlog.print_passes("seq")


def phase_random(ms, ws, repeats, count, cold, results):
    size = os.path.getsize(ws.big)
    names = [m.name for m in ms.mounts]
    passes = {n: [] for n in names}
    key = "cold" if cold else "warm"
    if not cold:
        # The warm-up: each daemon reads (and verifies) the whole file once, so its
        # tree blocks are cached whatever sections ran before.
        buf = reads.aligned_buffer()
        for m in ms.mounts:
            reads.seq_pass(os.path.join(m.mountpoint, "big"), m, buf, size)
    passlog.section(f"random-{key}")
    for r in range(repeats):
        passlog.repeat(r)
        offsets = reads.random_offsets(size, count, seed=1000 + r)
        if cold:
            ms.restart()
        for n in rotated(names, r):
            m = ms[n]
            passes[n].append(reads.random_pass(os.path.join(m.mountpoint, "big"), m, offsets,
                                               cold, label=n))
    us = {n: [p.wall / p.count * 1e6 for p in passes[n]] for n in names}
    ratio = {n: [us[n][i] / us["plain"][i] for i in range(repeats)] for n in names}
    ratio["manifest/local"] = [us["manifest"][i] / us["local"][i] for i in range(repeats)]
    results.setdefault("random", {})[key] = {
        "count": count, "passes": {n: [p.as_dict() for p in v] for n, v in passes.items()},
        "us": us, "ratio": ratio}
    rows = []
    for n in names:
        ps = passes[n]
        rows.append([n, fmt_mmm(us[n], "{:.1f}"), fmt_mmm(ratio[n]),
                     fmt_mmm([p.daemon_cpu / p.count * 1e6 for p in ps], "{:.1f}"),
                     f"{statistics.median(p.reader_cpu / p.count * 1e6 for p in ps):.1f}",
                     f"{statistics.median(p.open_s for p in ps) * 1e3:.2f}",
                     fmt_mmm([p.noise * 100 for p in ps], "{:.0f}")])
    how = ("cold: all daemons restarted before each repeat (a fresh daemon and a new mount: "
           "no page,\ndentry or inode cached in the kernel, nothing in the daemon); the open "
           "(a lookup) is timed apart." if cold else
           "pages dropped, tree cached: each daemon read the whole file once before (its "
           "verified tree blocks\nare cached), the kernel knows the inode; the file's pages "
           "are dropped with posix_fadvise(DONTNEED)\nbefore each pass.")
    title = "everything cold" if cold else "pages dropped, tree blocks cached"
    table(f"Big file, random 4 KiB reads, {title}: {count} aligned preads a pass, {repeats} "
          f"repeats interleaved", ["daemon", "us/read min/med/max", "x plain min/med/max",
                                   "daemon CPU us/read min/med/max", "reader CPU us/read",
                                   "open ms",
                           "others' CPU %"], rows,
          note=how + "\nEach read misses the page cache and is one 4 KiB FUSE_READ (no "
               "readahead on random misses).\n"
               f"manifest / local mode, same repeat: {fmt_mmm(ratio['manifest/local'])}")
    passlog.print_passes(f"random-{key}")


def phase_stat(ms, ws, repeats, samples, results):
    names = ["plain", "local", "manifest"]
    lat = {(n, c): [] for n in names for c in ("idle", "loaded")}
    load = {n: [] for n in names}
    noise = {n: [] for n in names}
    per_round = max(50, samples // repeats)
    passlog.section("stat")
    for r in range(repeats):
        passlog.repeat(r)
        for n in rotated(names, r):
            m = ms[n]
            lat[(n, "idle")] += responsive.sample_stats(m.mountpoint, per_round, tag=f"i{r}")
            la, mbs, others = responsive.under_load(m, "big", per_round, tag=f"l{r}")
            lat[(n, "loaded")] += la
            load[n].append(mbs)
            noise[n].append(others * 100)
    rows = []
    out = {}
    for (n, c), v in lat.items():
        s = responsive.summarize(v)
        out[f"{n}/{c}"] = dict(s, samples=v)
        rows.append([n, c, f"{s['median']:.0f}", f"{s['p99']:.0f}", f"{s['max']:.0f}",
                     f"{statistics.median(load[n]):.0f}" if c == "loaded" else "-",
                     fmt_mmm(noise[n], "{:.0f}") if c == "loaded" else "-"])
    results["stat"] = {"latency": out, "loader_mbs": load, "noise": noise}
    table(f"Metadata latency: stat of a new non-existent name (a LOOKUP answered by the daemon), "
          f"{per_round * repeats} samples each",
          ["daemon", "while", "median us", "p99 us", "max us", "loader MB/s", "others' CPU %"],
          rows,
          note="loaded: another process reads the big file through the same mount with 1 MiB "
               "reads,\nits pages dropped before each pass, so the daemon verifies 1 MiB "
               "requests all the time.\nTarget: under 1 ms while loaded (verityfuse).")
    passlog.print_passes("stat")
    return out


def phase_manifest_mount(ws, entries, repeats, results):
    path = ws.path("manifest-big.json")
    digest, n, payload = manifest_mount.write_manifest(path, ws.key, entries)
    times, mems, noise = [], [], []
    passlog.section("manifest")
    for r in range(repeats):
        passlog.repeat(r)
        dt, mem, others = manifest_mount.mount_once(ws.src, ws.path("mnt-big"), path, ws.pub,
                                                    digest, ws.path("mnt-big.log"))
        times.append(dt)
        mems.append(mem)
        noise.append(others * 100)
    hwm = [m["VmHWM"] for m in mems]
    results["manifest_mount"] = {"entries": n, "payload_bytes": payload,
                                 "manifest_bytes": os.path.getsize(path), "seconds": times,
                                 "memory": mems, "noise": noise}
    table(f"Mount time of a {n}-entry signed manifest (verityfuse mount --manifest, background "
          f"mode), {repeats} runs",
          ["entries", "manifest MiB", "mount s min/med/max", "daemon VmHWM MiB min/med/max",
           "others' CPU %"],
          [[n, f"{os.path.getsize(path) / MiB:.1f}", fmt_mmm(times),
            fmt_mmm(hwm, "{:.0f}"), fmt_mmm(noise, "{:.0f}")]],
          note="From starting the command to its return (the mount is ready): interpreter "
               "start, imports,\nsignature check, parse of the whole payload, FUSE init.")
    passlog.print_passes("manifest")
    os.unlink(path)
    return times, hwm
