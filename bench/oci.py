"""Lazy, verified reads from an OCI registry against pulling (issue 20 item 5).

    python bench/oci.py [--size-mib 1024] [--repeats 3] [--cache-mib 64] [--dir DIR]

Needs root (FUSE) and the test registry (`make registry-deps`).  It writes a
random file of --size-mib in DIR (default a temporary directory), seals it
with a signed manifest, starts Debian's docker-registry on 127.0.0.1 with its
storage in DIR, pushes, and then, side by side in each repeat (a rotating
order, a fresh mount and a dropped page cache for every lazy figure):

- time to first byte: mount oci:// + open + the first 4 KiB, against pulling
  the whole data blob (GET, discarded) before reading it;
- time to read 5% of the image (51 reads of 1 MiB spread over a 1 GiB file)
  lazily, against the same pull;
- sequential throughput of the whole file through the mount (verified), against
  an unverified client reading the blob by 1 MiB ranges over one keep-alive
  connection (urllib3);
- bytes fetched from the registry (the mount's own count), and the daemon's
  peak memory (VmHWM) after the sequential read, against --cache-mib.

It prints min / median / max of each figure; it never fails on a slow figure.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))
sys.path.insert(2, str(HERE.parent / "tests"))

from common import drop_caches, fmt_mmm, proc_mem, rotated, table, verityfuse_cmd  # noqa: E402

PIECE = 1 << 20


def sh(*args):
    r = subprocess.run([*verityfuse_cmd(), *map(str, args)], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"verityfuse {' '.join(map(str, args[:2]))}: {r.stderr}")
    return r.stdout


def make_tree(work: pathlib.Path, size: int):
    src = work / "src"
    src.mkdir()
    with open(src / "image", "wb") as f:
        left = size
        while left:
            n = min(left, 16 << 20)
            f.write(os.urandom(n))
            left -= n
    sh("keygen", work / "key.pem", work / "pub.pem")
    sh("seal", src, "--manifest", work / "m.json", "--sign-key", work / "key.pem")
    return src


def mounted(ref, mnt, pub, cache_mib):
    from verityfuse.testing import VerifiedMount
    return VerifiedMount(f"oci://{ref}", mnt, extra_args=[
        "--plain-http", "--trust-key", str(pub), "--cache-size", str(cache_mib)], timeout=60)


def fetched(mnt) -> int:
    return json.loads(os.getxattr(mnt, "user.verityfuse.status"))["registry"]["bytes_fetched"]


def spread_offsets(size: int):
    """5% of the file in 1 MiB reads, evenly spread."""
    n = max(1, size // 20 // PIECE)
    stride = size // n
    return [i * stride // PIECE * PIECE for i in range(n)]


def lazy_first_byte(ref, mnt, pub, cache_mib):
    drop_caches()
    t0 = time.perf_counter()
    m = mounted(ref, mnt, pub, cache_mib)
    try:
        with open(mnt / "image", "rb", buffering=0) as f:
            f.read(4096)
        dt = time.perf_counter() - t0
        return dt, fetched(mnt)
    finally:
        m.unmount()


def lazy_five_percent(ref, mnt, pub, cache_mib, size):
    drop_caches()
    t0 = time.perf_counter()
    m = mounted(ref, mnt, pub, cache_mib)
    try:
        fd = os.open(mnt / "image", os.O_RDONLY)
        try:
            for off in spread_offsets(size):
                os.pread(fd, PIECE, off)
        finally:
            os.close(fd)
        return time.perf_counter() - t0, fetched(mnt)
    finally:
        m.unmount()


def lazy_sequential(ref, mnt, pub, cache_mib, size):
    drop_caches()
    m = mounted(ref, mnt, pub, cache_mib)
    try:
        t0 = time.perf_counter()
        with open(mnt / "image", "rb", buffering=0) as f:
            while f.read(PIECE):
                pass
        dt = time.perf_counter() - t0
        return size / dt / 1e6, fetched(mnt), proc_mem(m.pid)["VmHWM"]
    finally:
        m.unmount()


def client_for(host, ref):
    from verityfuse.oci_client import Client
    from verityfuse.oci_ref import parse_ref
    return Client(parse_ref(f"{host}/{ref.split('/', 1)[1]}"), timeout=30)


def pull_whole(client, blob, size):
    """GET the whole blob, as a pull would before anything can be read."""
    t0 = time.perf_counter()
    r = client.request("GET", f"/v2/{client.ref.repo}/blobs/{blob}", "pull")
    n = 0
    for chunk in r.stream(PIECE):
        n += len(chunk)
    r.release_conn()
    assert n == size, (n, size)
    return time.perf_counter() - t0


def unverified_ranges(client, blob, size):
    t0 = time.perf_counter()
    for off in range(0, size, PIECE):
        client.get_range(blob, off, min(PIECE, size - off), "bench")
    return size / (time.perf_counter() - t0) / 1e6


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache-mib", type=int, default=64)
    p.add_argument("--dir", help="work directory (default: a temporary one, removed)")
    args = p.parse_args(argv)
    size = args.size_mib << 20
    work = pathlib.Path(args.dir or tempfile.mkdtemp(prefix="verityfuse-oci-bench-"))
    from registry import Registry
    from verityfuse.oci_client import sha256_digest

    reg = None
    try:
        src = make_tree(work, size)
        reg = Registry(work / "registry")
        ref = f"{reg.host}/bench/image:v1"
        t0 = time.perf_counter()
        out = sh("push", src, ref, "--manifest", work / "m.json", "--plain-http")
        push_s = time.perf_counter() - t0
        with open(src / "image", "rb") as f:
            import hashlib
            h = hashlib.sha256()
            while True:
                b = f.read(16 << 20)
                if not b:
                    break
                h.update(b)
        blob = "sha256:" + h.hexdigest()
        assert sha256_digest(b"") != blob
        mnt = work / "mnt"
        mnt.mkdir()
        client = client_for(reg.host, ref)
        res = {k: [] for k in ("ttfb", "ttfb_bytes", "five", "five_bytes", "pull", "seq",
                               "seq_bytes", "hwm", "ranges")}
        runs = ["ttfb", "five", "pull", "seq", "ranges"]
        for r in range(args.repeats):
            for what in rotated(runs, r):
                if what == "ttfb":
                    dt, n = lazy_first_byte(ref, mnt, work / "pub.pem", args.cache_mib)
                    res["ttfb"].append(dt)
                    res["ttfb_bytes"].append(n)
                elif what == "five":
                    dt, n = lazy_five_percent(ref, mnt, work / "pub.pem", args.cache_mib, size)
                    res["five"].append(dt)
                    res["five_bytes"].append(n)
                elif what == "pull":
                    res["pull"].append(pull_whole(client, blob, size))
                elif what == "seq":
                    mbs, n, hwm = lazy_sequential(ref, mnt, work / "pub.pem", args.cache_mib, size)
                    res["seq"].append(mbs)
                    res["seq_bytes"].append(n)
                    res["hwm"].append(hwm)
                else:
                    res["ranges"].append(unverified_ranges(client, blob, size))
        client.close()
        print(f"# verityfuse from an OCI registry: a {args.size_mib} MiB file, "
              f"{args.repeats} repeats, cache {args.cache_mib} MiB; push took {push_s:.1f} s")
        print(out.strip())
        mib = 1 << 20
        table("Time to data (seconds, min / median / max)", ["what", "lazy (verified)", "pull the blob"], [
            ["first 4 KiB (incl. mount)", fmt_mmm(res["ttfb"], "{:.3f}"), fmt_mmm(res["pull"], "{:.3f}")],
            ["5% of the file (incl. mount)", fmt_mmm(res["five"], "{:.3f}"), fmt_mmm(res["pull"], "{:.3f}")],
        ])
        table("Bytes fetched from the registry (MiB)", ["what", "lazy", "pull"], [
            ["first 4 KiB", fmt_mmm([b / mib for b in res["ttfb_bytes"]]), f"{size / mib:.0f}"],
            ["5% of the file", fmt_mmm([b / mib for b in res["five_bytes"]]), f"{size / mib:.0f}"],
            ["the whole file", fmt_mmm([b / mib for b in res["seq_bytes"]]), f"{size / mib:.0f}"],
        ])
        table("Sequential read (MB/s, min / median / max)", ["client", "MB/s"], [
            ["verityfuse oci:// mount (verified, cold)", fmt_mmm(res["seq"], "{:.0f}")],
            ["range GETs of 1 MiB (unverified)", fmt_mmm(res["ranges"], "{:.0f}")],
        ])
        table("Daemon memory after the sequential read (MiB)", ["VmHWM", "cache budget"], [
            [fmt_mmm(res["hwm"], "{:.0f}"), f"{args.cache_mib} (data) + {args.cache_mib} (tree blocks)"],
        ])
    finally:
        if reg is not None:
            reg.stop()
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
