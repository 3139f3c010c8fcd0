"""The final table: each target, its median, min-max, and PASS/MISS."""

from __future__ import annotations

import statistics

from common import mmm, table
from phases import VERIFIED


def summary(results, ceil):
    rows = []

    def add(what, values, target, ok, fmt="{:.2f}", note=""):
        if not values:
            return
        lo, med, hi = mmm(values)
        rows.append([what, fmt.format(med), f"{fmt.format(lo)}-{fmt.format(hi)}", target,
                     ("PASS" if ok(med) else "MISS") + note])

    seq = results.get("seq")
    if seq:
        for n in VERIFIED:
            extra = ""
            if ceil:
                extra = f" ({statistics.median(seq['ratio'][n]) / ceil['ratio_max']:.2f} of " \
                        f"ceiling {ceil['ratio_max']:.2f})"
            add(f"seq read, {n} / plain", seq["ratio"][n], ">= 0.55x", lambda x: x >= 0.55,
                note=extra)
        add("seq read, manifest / local", seq["ratio"]["manifest/local"], ">= 1.00x",
            lambda x: x >= 1.0)
    for key in ("warm", "cold"):
        rnd = results.get("random", {}).get(key)
        if rnd:
            for n in VERIFIED:
                add(f"random 4K {key}, {n} / plain", rnd["ratio"][n], "<= 1.05x",
                    lambda x: x <= 1.05)
            add(f"random 4K {key}, manifest / local", rnd["ratio"]["manifest/local"],
                "<= 1.00x", lambda x: x <= 1.0)
    b = results.get("build")
    if b:
        add("digest --threads 1 / fsverity", b["speedup"]["verityfuse digest --threads 1"],
            ">= 1.6x", lambda x: x >= 1.6)
        add("digest --threads 2 / fsverity", b["speedup"]["verityfuse digest --threads 2"],
            ">= 2.2x", lambda x: x >= 2.2)
    mem = results.get("memory")
    if mem:
        snaps = mem["snapshots"]
        labels = list(snaps)
        for n in VERIFIED:
            h = {lb: snaps[lb][n]["VmHWM"] for lb in labels}
            med, big, files = h["after medium file"], h["after big file"], h[labels[-1]]
            # Flat: at most 5 MiB more after the big file than after the 64 MiB one, and
            # after all the small files than after the big file.
            rows.append([f"memory, {n}: VmHWM medium -> big file", f"+{big - med:.1f} MiB",
                         f"{med:.0f} -> {big:.0f} MiB", "flat (<= +5 MiB)",
                         "PASS" if big - med <= 5 else "MISS"])
            last = files - h[labels[-2]]
            rows.append([f"memory, {n}: VmHWM big file -> {labels[-1][1:]}",
                         f"+{files - big:.1f} MiB", f"{big:.0f} -> {files:.0f} MiB",
                         "flat (<= +5 MiB)", ("PASS" if files - big <= 5 else "MISS")
                         + f" (last quarter +{last:.1f})"])
    st = results.get("stat")
    if st:
        for n in VERIFIED:
            s, idle = st["latency"][f"{n}/loaded"], st["latency"][f"{n}/idle"]
            for q in ("median", "p99"):
                rows.append([f"stat while verifying, {n}, {q}", f"{s[q] / 1000:.2f} ms",
                             f"idle {idle[q] / 1000:.2f} ms", "< 1 ms",
                             "PASS" if s[q] < 1000 else "MISS"])
    mm = results.get("manifest_mount")
    if mm:
        hwm = statistics.median(m["VmHWM"] for m in mm["memory"])
        add(f"mount, {mm['entries']}-entry manifest (s)", mm["seconds"], "< 2 s",
            lambda x: x < 2.0, note=f" (VmHWM {hwm:.0f} MiB)")
    table("Summary: medians against the targets (min-max over the repeats)",
          ["target", "median", "min-max", "wanted", "result"], rows,
          note="The bench reports; it never fails on a MISS.  Single runs on this shared "
               "2-core machine are noisy:\nread the min-max column before trusting a PASS "
               "or a MISS near its threshold.")
    return rows
