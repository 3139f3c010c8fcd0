"""The final table: each target of issue 19, its median, min-max over the repeats,
PASS/MISS, and how many of the passes behind it were busy."""

from __future__ import annotations

import statistics

import passlog
from common import mmm, table
from phases import VERIFIED


def _busy(section):
    ps = [p for p in passlog.PASSES if p["section"] == section]
    n = sum(p["busy"] for p in ps)
    text = f"{n}/{len(ps)}"
    return passlog.red(text) if n else text


def summary(results, ceil):
    rows = []

    def add(what, values, target, ok, section, fmt="{:.2f}", note=""):
        if not values:
            return
        lo, med, hi = mmm(values)
        verdict = ("-" if ok is None else "PASS" if ok(med) else "MISS") + note
        rows.append([what, fmt.format(med), f"{fmt.format(lo)}-{fmt.format(hi)}", target,
                     verdict, _busy(section)])

    b = results.get("build")
    if b:
        add("digest --threads 1, x fsverity", b["speedup"]["verityfuse digest --threads 1"],
            ">= 1.8x", lambda x: x >= 1.8, "build")
        add("digest --threads 2, x fsverity", b["speedup"]["verityfuse digest --threads 2"],
            ">= 2.5x", lambda x: x >= 2.5, "build")
    seq = results.get("seq")
    if seq:
        for n in VERIFIED:
            extra = ""
            if ceil:
                extra = f" ({statistics.median(seq['ratio'][n]) / ceil['ratio_max']:.2f} of " \
                        f"ceiling {ceil['ratio_max']:.2f})"
            add(f"(a) seq 1 MiB, {n} / plain throughput", seq["ratio"][n], ">= 0.65x",
                lambda x: x >= 0.65, "seq", note=extra)
        add("(a) seq 1 MiB, manifest / local", seq["ratio"]["manifest/local"], "~1.00x",
            None, "seq")
        for n in VERIFIED:
            add(f"(a) seq, {n}: daemon CPU us per MiB", seq["cpu_us_per_mib"][n]["daemon"],
                "<= 1000", lambda x: x <= 1000, "seq", fmt="{:.0f}")
    for key, title, limit in (("warm", "pages dropped, tree cached", 1.10),
                              ("cold", "everything cold", 1.20)):
        rnd = results.get("random", {}).get(key)
        if rnd:
            for n in VERIFIED:
                add(f"(a) random 4K {title}, {n} / plain latency", rnd["ratio"][n],
                    f"<= {limit:.2f}x", lambda x, lim=limit: x <= lim, f"random-{key}")
    mem = results.get("memory")
    if mem:
        snaps = mem["snapshots"]
        for n in VERIFIED:
            a, b = snaps["after medium file"][n], snaps["after big file"][n]
            med, big = a["VmHWM"], b["VmHWM"]
            # The tree-block cache grows with the file until its bound, by design: what
            # must stay flat is the rest (a cache past its bound is a MISS too).
            cache = b.get("cache_mib", 0.0) - a.get("cache_mib", 0.0)
            within = b.get("cache_mib", 0.0) <= b.get("cache_max_mib", float("inf"))
            rows.append([f"memory, {n}: VmHWM medium -> big file, beyond the tree cache",
                         f"{big - med - cache:+.1f} MiB",
                         f"{med:.0f} -> {big:.0f} MiB, cache {cache:+.1f}", "flat (<= +5 MiB)",
                         "PASS" if big - med - cache <= 5 and within else "MISS",
                         _busy("memory")])
    st = results.get("stat")
    if st:
        for n in VERIFIED:
            s, idle = st["latency"][f"{n}/loaded"], st["latency"][f"{n}/idle"]
            rows.append([f"stat while verifying, {n}, median / p99",
                         f"{s['median'] / 1000:.2f} / {s['p99'] / 1000:.2f} ms",
                         f"idle {idle['median'] / 1000:.2f} / {idle['p99'] / 1000:.2f} ms",
                         "median < 1 ms", "PASS" if s["median"] < 1000 else "MISS",
                         _busy("stat")])
    sl = results.get("seal")
    if sl:
        for w in ("seal", "seal-manifest"):
            rss = statistics.median(r["peak_rss_mib"] for r in sl["runs"][w])
            pss = statistics.median(r.get("peak_pss_mib", 0.0) for r in sl["runs"][w])
            add(f"(c) {w} of {sl['files']} files, time x fsverity", sl["x_fsverity"][w],
                "<= 2.0x", lambda x: x <= 2.0, "seal",
                note=f" (peak RSS {rss:.0f} MiB, PSS with workers {pss:.0f} MiB)")
        add("(c) floor of store format 3 (bench/sealfloor.c), time x fsverity",
            sl["x_fsverity"].get("floor"), "(the least a seal can cost)", None, "seal")
        f = sl["rss_in_file_count"]
        mapped = f.get("mapped_all", 0.0) - f.get("mapped_part", 0.0)
        grow = f["rss_all"] - f["rss_part"] - mapped
        rows.append([f"(c) seal-manifest peak RSS, {f['files']} -> {sl['files']} files, "
                     f"beyond the manifest mapped for signing",
                     f"{grow:+.0f} MiB", f"{f['rss_part']:.0f} -> {f['rss_all']:.0f} MiB, "
                     f"mapped {mapped:+.0f}",
                     "flat (<= +10%)", "PASS" if grow <= 0.1 * f["rss_part"] else "MISS",
                     _busy("seal")])
    ctr = results.get("ctr")
    if ctr:
        for wl, r in ctr.items():
            nfiles = r["runs"]["plain"][0]["files"]
            for n in VERIFIED:
                add(f"(b) container start, {wl} ({nfiles} files), {n} time x plain",
                    r["x_plain"][n], "<= 1.5x", lambda x: x <= 1.5, f"ctr-{wl}")
    mm = results.get("manifest_mount")
    if mm:
        hwm = statistics.median(m["VmHWM"] for m in mm["memory"])
        add(f"(d) mount of a {mm['entries']}-entry manifest (s)", mm["seconds"], "-", None,
            "manifest", note=f" (VmHWM {hwm:.0f} MiB)")
    busy, total, _ = passlog.busy_summary()
    table("Summary: medians against the targets of issue 19 (min-max over the repeats)",
          ["target", "median", "min-max", "wanted", "result", "busy passes"], rows,
          note="The bench reports; it never fails on a MISS.  busy passes: passes of that "
               f"section during which the rest\nof the machine used over "
               f"{passlog.LIMITS['busy_cores']:.2f} core ({busy} of {total} in this run).  On "
               f"a shared machine read the min-max\ncolumn before trusting a PASS or a MISS "
               f"near its threshold.")
    return rows
