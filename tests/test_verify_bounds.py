"""`verify`'s count of stale index entries: each inode once, hard links included, in
memory that does not grow with the number of files verified (it used to keep every
file's key: ~43 MB of RSS at 100,000 files against 27 MB now)."""

import json
import os
import subprocess
import sys
import tracemalloc

import verityfuse
from verityfuse.cli import main

VF = [sys.executable, "-m", "verityfuse"]


def _tree(root, n, per_dir=100):
    for i in range(n):
        d = root / f"d{i // per_dir}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(b"%d" % i)


def test_stale_entries_count_each_hard_linked_inode_once(tmp_path):
    src, store = tmp_path / "src", tmp_path / "store"
    src.mkdir()
    (src / "a").write_bytes(b"linked three times\n")
    os.link(src / "a", src / "b")
    os.link(src / "a", src / "c")
    (src / "d").write_bytes(b"replaced\n")
    (src / "e").write_bytes(b"kept\n")
    subprocess.run(VF + ["seal", str(src), "--store", str(store)], check=True,
                   capture_output=True)
    os.remove(src / "d")
    (src / "d").write_bytes(b"a new inode: its old entry is stale\n")

    r = subprocess.run(VF + ["verify", str(src), "--store", str(store), "--json"],
                       capture_output=True)
    summary = json.loads(r.stdout.decode().splitlines()[-1])["summary"]
    assert (summary["sealed"], summary["unsealed"], summary["stale_entries"]) == (4, 1, 1), r
    report = verityfuse.verify(src, store=store)
    assert (report.sealed, report.stale_entries) == (4, 1)


def test_verify_takes_no_memory_per_file(tmp_path, capsys):
    """Peak Python memory of `verify` over 6,000 files, then 18,000 (in directories of
    100): the keys kept for the stale count grew it by ~1.6 MB, now by ~0.3 MB."""
    peaks = {}
    for n in (2000, 6000, 18000):
        _tree(tmp_path / str(n), n)
        subprocess.run(VF + ["seal", str(tmp_path / str(n)), "--store", str(tmp_path / f"{n}.st")],
                       check=True, capture_output=True)
        tracemalloc.start()
        try:
            assert main(["verify", str(tmp_path / str(n)), "--store", str(tmp_path / f"{n}.st")]) == 0
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert f"{18000} of {18000} sealed files intact" in capsys.readouterr().err
    # The 2,000-file run only warms up (imports, the first thread pool).
    assert peaks[18000] - peaks[6000] < 900_000, peaks
