"""The most a verified sequential read can reach on this machine, from measured costs.

Per MiB read through a FUSE passthrough, the work that no daemon can avoid is
three kernel copies of the data:

    c_reader  the reader's read(): FUSE page cache -> reader's buffer
    c_pread   the daemon's pread(): backing file (tmpfs) -> daemon's buffer
    c_reply   the daemon's reply: daemon's buffer -> FUSE page cache

c_reader and c_pread are measured as the CPU time of a 1 MiB pread from tmpfs
into a page-aligned buffer, c_reply as that of a 1 MiB pwrite over existing
tmpfs pages (bench/reads.py: copy_costs, once per repeat).  Verification adds
c_hash, one SHA-256 pass over the data at the fastest measured engine's
2-thread speed H2 (all threads together): c_hash = 2 cores x 1 MiB / H2.

With N cores (2 here) kept perfectly busy and no other overhead:

    W_u = c_reader + c_pread + c_reply          core-us per MiB, unverified
    W_v = W_u + c_hash                           core-us per MiB, verified
    V_max = N / W_v                              MiB per us: the verified ceiling
    ratio_max = min(1, V_max / U)

where U is the measured throughput of the unverified passthrough (median): a
verified read can be neither faster than N cores doing its irreducible work,
nor faster than the unverified read it is compared with.  Each verified result
is then shown as (its ratio) / ratio_max.

A second, "practical" ceiling replaces W_u by what the unverified passthrough
measurably spends (daemon CPU + reader CPU per MiB, medians), i.e. keeps
pyfuse3's per-request costs, which a verified pyfuse3 daemon pays too:
    ratio_practical = min(1, N / (C_plain + c_hash) / U).
"""

from __future__ import annotations

import statistics

from common import MiB, table

from build import best_2thread


def compute(seq, hash_results, ncpu):
    med = statistics.median
    c_read = med(c["read"] for c in seq["copy_us_per_mib"])
    c_write = med(c["write"] for c in seq["copy_us_per_mib"])
    c_read_off16 = med(c["read_off16"] for c in seq["copy_us_per_mib"])
    engine, h2 = best_2thread(hash_results)                 # MB/s, 2 threads together
    threads = 2
    c_hash = threads * (MiB / (h2 * 1e6)) * 1e6              # core-us per MiB
    w_u = c_read + c_read + c_write
    w_v = w_u + c_hash
    v_max = ncpu / w_v * MiB                                 # MB/s
    u = med(seq["mbs"]["plain"])
    c_plain = med(seq["cpu_us_per_mib"]["plain"]["daemon"]) + \
        med(seq["cpu_us_per_mib"]["plain"]["reader"])
    v_prac = ncpu / (c_plain + c_hash) * MiB
    # The rest of the machine's CPU use during the verified passes (others' share): the
    # cores actually left to the bench, and the ceiling they allow.
    noise = med([x for n in ("local", "manifest") for x in seq["noise"][n]]) / 100
    cores_left = ncpu * (1 - noise)
    v_left = cores_left / w_v * MiB
    return {"engine": engine, "others_share": noise, "cores_left": cores_left,
            "verified_max_mbs_cores_left": v_left, "ratio_max_cores_left": min(1.0, v_left / u), "hash_mbs_2threads": h2, "cores": ncpu,
            "c_reader": c_read, "c_pread": c_read, "c_reply": c_write, "c_hash": c_hash,
            "c_pread_16_off_page": c_read_off16,
            "w_unverified": w_u, "w_verified": w_v, "verified_max_mbs": v_max,
            "plain_mbs": u, "ratio_max": min(1.0, v_max / u),
            "c_plain_measured": c_plain, "verified_practical_mbs": v_prac,
            "ratio_practical": min(1.0, v_prac / u)}


def report(c, seq):
    rows = [
        ["c_reader: reader's copy out of the page cache (pread from tmpfs)", f"{c['c_reader']:.0f}"],
        ["c_pread: daemon's pread of the backing file (same copy)", f"{c['c_pread']:.0f}"],
        ["c_reply: daemon's reply into the page cache (pwrite to tmpfs)", f"{c['c_reply']:.0f}"],
        [f"c_hash: SHA-256 at {c['hash_mbs_2threads']:.0f} MB/s on 2 threads ({c['engine']})",
         f"{c['c_hash']:.0f}"],
        ["W_u = c_reader + c_pread + c_reply", f"{c['w_unverified']:.0f}"],
        ["W_v = W_u + c_hash", f"{c['w_verified']:.0f}"],
        ["(not in W) c_pread into a buffer 16 bytes past a page boundary",
         f"{c['c_pread_16_off_page']:.0f}"],
    ]
    table("Ceiling of a verified sequential read on this machine (core-us per MiB, medians)",
          ["cost", "core-us/MiB"], rows,
          note=f"V_max = {c['cores']} cores / W_v = {c['verified_max_mbs']:.0f} MB/s; "
               f"the unverified passthrough measured U = {c['plain_mbs']:.0f} MB/s.\n"
               f"ceiling ratio = min(1, V_max / U) = {c['ratio_max']:.2f}   "
               f"(the verified/unverified ratio this machine allows)\n"
               f"practical ceiling, with the passthrough's measured CPU "
               f"({c['c_plain_measured']:.0f} us/MiB) in place of W_u:\n"
               f"   min(1, {c['cores']} / ({c['c_plain_measured']:.0f} + {c['c_hash']:.0f}) "
               f"/ U) = {c['ratio_practical']:.2f}\n"
               f"the rest of the machine used {c['others_share'] * 100:.0f}% of the CPUs during "
               f"the verified passes (median);\n   with the {c['cores_left']:.2f} cores it left: "
               f"V_max = {c['verified_max_mbs_cores_left']:.0f} MB/s, ceiling ratio "
               f"{c['ratio_max_cores_left']:.2f}\n"
               + "\n".join(f"{n}: median {statistics.median(seq['ratio'][n]):.2f}x plain = "
                           f"{statistics.median(seq['ratio'][n]) / c['ratio_max']:.2f} of the "
                           f"ceiling, {statistics.median(seq['mbs'][n]) / c['verified_max_mbs']:.2f}"
                           f" of V_max" for n in ("local", "manifest")))
