"""The measurements made with the daemons mounted, and the manifest mount time.

Each phase_* function measures, prints its table and stores its raw figures in
``results`` (written by --json).
"""

from __future__ import annotations

import os
import statistics

import manifest_mount
import reads
import responsive
from common import MiB, fmt_mmm, rotated, table
from workspace import MEDIUM_MIB

VERIFIED = ("local", "manifest")


def phase_memory(ms, ws, results):
    snaps = {}

    def snap(label):
        snaps[label] = {m.name: m.mem() for m in ms.mounts}

    snap("at mount")
    buf = reads.aligned_buffer()
    for label, path, size in (("after medium file", "medium", os.path.getsize(ws.medium)),
                              ("after big file", "big", os.path.getsize(ws.big))):
        for m in ms.mounts:
            reads.seq_pass(os.path.join(m.mountpoint, path), m, buf, size)
        snap(label)
    names = ws.small_files()
    files = {m.name: [] for m in ms.mounts}
    quarters = [names[len(names) * q // 4: len(names) * (q + 1) // 4] for q in range(4)]
    done = 0
    for part in quarters:
        for m in ms.mounts:
            files[m.name].append(reads.files_pass(os.path.join(m.mountpoint, "many"), part, m))
        done += len(part)
        snap(f"+{done} files")
    results["memory"] = {"snapshots": snaps,
                         "files": {k: [p.as_dict() for p in v] for k, v in files.items()}}
    return snaps, files


def print_memory(ms, snaps, files, nfiles, big_mib):
    labels = list(snaps)
    rows = []
    for m in ms.mounts:
        rows.append([m.name] + [f"{snaps[lb][m.name]['VmHWM']:.1f}" for lb in labels] +
                    [f"{snaps[labels[-1]][m.name]['VmRSS']:.1f}",
                     f"{nfiles / sum(p.wall for p in files[m.name]):.0f}"])
    table("Daemon memory: VmHWM (MiB) after each step, all daemons mounted at once",
          ["daemon"] + labels + ["VmRSS now", "small files/s"], rows,
          note=f"Steps in order: fresh mount; read the medium file ({MEDIUM_MIB} MiB); read the "
               f"big file ({big_mib} MiB);\nread {nfiles} files of 4-16 KiB, a quarter at a time "
               f"(each step after drop_caches).  Flat = the same VmHWM\nwhatever the file "
               f"size and the number of files.  verityfuse keeps verified Merkle tree blocks "
               f"in an LRU\nbounded at 32 MiB (--cache-size); each small file has one 4 KiB tree "
               f"block:\n{nfiles} files need {nfiles * 4 / 1024:.0f} MiB of them, "
               + ("so past ~8192 files the cache is full and evicts."
                  if nfiles * 4096 > 32 * MiB else "under that bound."))


def phase_seq(ms, ws, repeats, results):
    size = os.path.getsize(ws.big)
    targets = ["source"] + [m.name for m in ms.mounts]
    passes = {t: [] for t in targets}
    copies = []
    buf = reads.aligned_buffer()
    scratch = ws.path("scratch")
    for r in range(repeats):
        copies.append(reads.copy_costs(ws.big, scratch, buf))
        for t in rotated(targets, r):
            if t == "source":
                passes[t].append(reads.seq_pass(ws.big, None, buf, size))
            else:
                m = ms[t]
                passes[t].append(reads.seq_pass(os.path.join(m.mountpoint, "big"), m, buf, size))
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
                     f"{statistics.median(seq['cpu_us_per_mib'][t]['daemon']):.0f}"
                     if t != "source" else "-",
                     f"{statistics.median(seq['cpu_us_per_mib'][t]['reader']):.0f}", frac,
                     fmt_mmm(seq["noise"][t], "{:.0f}")])
    table(f"Sequential read of {seq['size'] // MiB} MiB with 1 MiB reads, after drop_caches, "
          f"{repeats} repeats interleaved",
          ["path", "MB/s min/med/max", "x plain min/med/max", "daemon CPU us/MiB",
           "reader CPU us/MiB", "of ceiling min/med/max", "others' CPU %"], rows,
          note="x plain: this path's MB/s / the plain passthrough's in the same repeat.\n"
               "CPU: medians; daemon = user+system of the whole daemon process "
               "(/proc/PID/stat), reader = this thread.\n"
               "of ceiling: x plain / the ceiling ratio below.\n"
               "others' CPU %: what the rest of the machine used during each pass, % of all "
               "CPUs (min / median / max).\n"
               + ("plain-thr: the passthrough handing reads over 16 KiB to a worker thread.\n"
                  if "plain-thr" in seq["mbs"] else "")
               + f"manifest / local mode, same repeat: "
               f"{fmt_mmm(seq['ratio']['manifest/local'])} (min / median / max)")


def phase_random(ms, ws, repeats, count, cold, results):
    size = os.path.getsize(ws.big)
    names = [m.name for m in ms.mounts]
    passes = {n: [] for n in names}
    for r in range(repeats):
        offsets = reads.random_offsets(size, count, seed=1000 + r)
        if cold:
            ms.restart()
        for n in rotated(names, r):
            m = ms[n]
            passes[n].append(reads.random_pass(os.path.join(m.mountpoint, "big"), m, offsets,
                                               cold))
    us = {n: [p.wall / p.count * 1e6 for p in passes[n]] for n in names}
    ratio = {n: [us[n][i] / us["plain"][i] for i in range(repeats)] for n in names}
    ratio["manifest/local"] = [us["manifest"][i] / us["local"][i] for i in range(repeats)]
    key = "cold" if cold else "warm"
    results.setdefault("random", {})[key] = {
        "count": count, "passes": {n: [p.as_dict() for p in v] for n, v in passes.items()},
        "us": us, "ratio": ratio}
    rows = []
    for n in names:
        ps = passes[n]
        rows.append([n, fmt_mmm(us[n], "{:.1f}"), fmt_mmm(ratio[n]),
                     f"{statistics.median(p.daemon_cpu / p.count * 1e6 for p in ps):.1f}",
                     f"{statistics.median(p.reader_cpu / p.count * 1e6 for p in ps):.1f}",
                     f"{statistics.median(p.open_s for p in ps) * 1e3:.2f}",
                     fmt_mmm([p.noise * 100 for p in ps], "{:.0f}")])
    how = ("cold: all daemons restarted, then drop_caches (page cache, dentries, inodes) before "
           "each pass;\nnothing is cached in the kernel or in any daemon; the open (a lookup) "
           "is timed apart." if cold else
           "warm: the daemons have read the file before (verified tree blocks cached), the kernel "
           "knows\nthe inode; its pages are dropped with posix_fadvise(DONTNEED) before each pass.")
    table(f"Random 4 KiB reads, {key}: {count} aligned preads a pass, {repeats} repeats "
          f"interleaved", ["daemon", "us/read min/med/max", "x plain min/med/max",
                           "daemon CPU us/read", "reader CPU us/read", "open ms",
                           "others' CPU %"], rows,
          note=how + "\nEach read misses the page cache and is one 4 KiB FUSE_READ (no "
               "readahead on random misses).\n"
               f"manifest / local mode, same repeat: {fmt_mmm(ratio['manifest/local'])}")


def phase_stat(ms, ws, repeats, samples, results):
    names = ["plain", "local", "manifest"]
    lat = {(n, c): [] for n in names for c in ("idle", "loaded")}
    load = {n: [] for n in names}
    noise = {n: [] for n in names}
    per_round = max(50, samples // repeats)
    for r in range(repeats):
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
    return out


def phase_manifest_mount(ws, entries, repeats, results):
    path = ws.path("manifest-100k.json")
    digest, n, payload = manifest_mount.write_manifest(path, ws.key, entries)
    times, mems, noise = [], [], []
    for _ in range(repeats):
        dt, mem, others = manifest_mount.mount_once(ws.src, ws.path("mnt-100k"), path, ws.pub,
                                                    digest, ws.path("mnt-100k.log"))
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
    os.unlink(path)
    return times, hwm
