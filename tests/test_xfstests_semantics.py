"""Kernel semantics that upstream xfstests found missing (issue 17, item 10), each
checked against the plain-directory oracle: the same steps on a directory of the
backing filesystem, mounted with the same options, must give the same record.

Needs root (bind mounts, drop_caches, identities) and FUSE; every mount is
unmounted in a finally.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time

import pytest

from conftest import drop_caches, pattern, write
from verityfuse.testing import VerifiedMount, seal_tree

pytestmark = [pytest.mark.mount,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (bind mounts, drop_caches)")]

LONG_AGO = 10 ** 14  # ns (about 28 h) before mtime: relatime would update such an atime


@contextlib.contextmanager
def bind_mount(src, dst, options):
    """The oracle: SOURCE's filesystem itself, under the mount options of the test."""
    subprocess.run(["mount", "--bind", str(src), str(dst)], check=True)
    try:
        if options:
            subprocess.run(["mount", "-o", f"remount,bind,{options}", str(dst)], check=True)
        yield dst
    finally:
        subprocess.run(["umount", str(dst)], check=True)


@contextlib.contextmanager
def verityfuse_mount(src, dst, options):
    m = VerifiedMount(src, dst, options=[options] if options else [])
    try:
        yield dst
    finally:
        m.unmount()


def populate(d):
    os.mkdir(d / "dir")
    write(d / "dir" / "entry", b"e")
    write(d / "sealed", pattern(3 * 4096 + 5))
    write(d / "plain", b"plain data")


def atime_record(side, backing) -> dict:
    """Read each file and list the directory through ``side``; say whether the atime
    of what ``backing`` holds moved from long ago (reads reach the filesystem: caches
    dropped first)."""
    rec = {}
    for name, read in (("sealed", lambda p: open(p, "rb").read()),
                       ("plain", lambda p: open(p, "rb").read()),
                       ("dir", os.listdir)):
        b = backing / name
        st = os.stat(b)
        old = st.st_mtime_ns - LONG_AGO
        os.utime(b, ns=(old, st.st_mtime_ns))
        drop_caches()
        read(side / name)
        rec[f"{name}: atime updated by a read"] = os.stat(b).st_atime_ns != old
    return rec


@pytest.mark.parametrize("options", ["noatime", None])
def test_atime_of_reads_follows_the_mount_options_generic_120(tmp_path, options):
    plain, src = tmp_path / "plain", tmp_path / "src"
    for d in (plain, src):
        d.mkdir()
        populate(d)
    seal_tree(src, [src / "sealed"])
    (tmp_path / "p").mkdir()
    (tmp_path / "m").mkdir()
    with bind_mount(plain, tmp_path / "p", options) as side:
        want = atime_record(side, plain)
    with verityfuse_mount(src, tmp_path / "m", options) as side:
        got = atime_record(side, src)
    assert got == want
    # and the oracle says what generic/120 expects
    updated = options != "noatime"
    assert want == {"sealed: atime updated by a read": updated,
                    "plain: atime updated by a read": updated, "dir: atime updated by a read": updated}


def ctime_record(side, backing) -> dict:
    """Change an inode flag through ``side`` (chattr, then FS_IOC_FSSETXATTR as xfs_io
    does), stat through ``side`` at once: the ctime seen must be the file's new one."""
    import posix_checks as pc

    rec = {}
    for name, how in (("plain", "chattr"), ("dir", "chattr"), ("plain", "fssetxattr")):
        before = os.stat(side / name).st_ctime_ns  # cached by a FUSE mount from here on
        time.sleep(0.02)  # past a coarse clock's tick (before 6.13): the change moves ctime
        if how == "chattr":
            subprocess.run(["chattr", "+d", str(side / name)], check=True)
        else:
            pc.fssetxattr(str(side / name), 0)  # clears what chattr set
        seen = os.stat(side / name).st_ctime_ns
        rec[f"{how} {name}: ctime moved"] = seen > before
        rec[f"{how} {name}: ctime seen is the file's"] = seen == os.stat(backing / name).st_ctime_ns
    return rec


def test_ctime_is_fresh_right_after_a_flag_change_generic_277(tmp_path):
    plain, src = tmp_path / "plain", tmp_path / "src"
    for d in (plain, src):
        d.mkdir()
        populate(d)
    seal_tree(src, [src / "sealed"])
    (tmp_path / "m").mkdir()
    want = ctime_record(plain, plain)
    with verityfuse_mount(src, tmp_path / "m", None) as side:
        got = ctime_record(side, src)
    assert got == want
    assert all(want.values()), want
