"""Conformance: outside manifest mode the mount is a passthrough that must behave exactly
like the backing filesystem (ext4).  The plain directory is the oracle.

Every check of tests/posix_checks.py runs twice, in a fresh directory of a plain
directory on the same filesystem as SOURCE and in a fresh directory of one mount
(``allow_other``, local mode, policy enforce), as root or as an unprivileged
identity and under the umask of its variant; the two records must be equal.
Records hold errno names, types, modes, owners, sizes, contents, listings and
xattr values, and only relations between inode numbers and timestamps.

One mount for the module, unmounted at teardown.  Needs root (identities,
drop_caches, chattr +i) and FUSE.

Issue 9's bugs and the checks that show them: 1 creation modes: create_modes-*
(root and an unprivileged user, umask 0/022/077), setgid_dir_inheritance;
2 stable inode numbers: stat_relations; 4 '.' and '..': readdir, readdir_large;
5 xattrs on symlinks: xattr_trusted_symlink; 6 chattr: chattr_immutable,
chattr_append, inode_flags, flags_enforced, test_sealed_file_verity_flag;
7 PATH_MAX: deep_paths (deep_paths_existing: files already that deep).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import NamedTuple

import pytest

import posix_checks as pc
from verityfuse.testing import VerifiedMount, seal_tree


class Sides(NamedTuple):
    plain: str   # the oracle: a directory of the backing filesystem
    source: str  # SOURCE of the mount, on the same filesystem
    mnt: str
    mount: VerifiedMount


@pytest.fixture(scope="module")
def sides(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the conformance checks run as root (identities, drop_caches, chattr +i)")
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        pytest.skip("FUSE is not available (/dev/fuse, fusermount3)")
    plain = tmp_path_factory.mktemp("conf-plain")
    src = tmp_path_factory.mktemp("conf-src")
    mnt = tmp_path_factory.mktemp("conf-mnt")
    assert os.stat(plain).st_dev == os.stat(src).st_dev, "the oracle must be on SOURCE's filesystem"
    seal_tree(src)  # nothing to seal: creates the store
    m = VerifiedMount(src, mnt, options=["allow_other"])
    try:
        yield Sides(str(plain), str(src), str(mnt), m)
    finally:
        m.unmount()
        for d in (plain, src):  # chattr +i/+a left behind would stop pytest's cleanup
            pc.clear_flags_tree(str(d))


def _fresh(path, who):
    os.mkdir(path)
    os.chmod(path, 0o755)
    if who is not None:
        os.chown(path, who.uid, who.gid)


def _diff(a, b, label, out):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            _diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{label} / {k}" if label else str(k), out)
    elif a != b:
        out.append(f"  {label}\n      plain: {a!r}\n      mount: {b!r}")


def differences(plain: dict, mount: dict) -> str:
    """Every label whose result differs, with both results, in the check's order."""
    out = []
    _diff(plain, mount, "", out)
    return "\n".join(out)


# What no pyfuse3 server can do on this stack; strict, so a fix upstream shows up here.
LIMITS = {
    "open_tmpfile": "libfuse 3.14 (Debian 12) has no tmpfile operation: O_TMPFILE is EOPNOTSUPP",
    "xattr_user-root": "pyfuse3 applies XATTR_CREATE/XATTR_REPLACE itself before the handler "
                       "runs; both together act as XATTR_CREATE",
}
LIMITS["xattr_user-user"] = LIMITS["xattr_user-root"]


@pytest.mark.parametrize("c", [
    pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=LIMITS[c.id])]
                 if c.id in LIMITS else []) for c in pc.CHECKS])
def test_conformance(sides, c):
    plain_dir = os.path.join(sides.plain, c.id)
    mnt_dir = os.path.join(sides.mnt, c.id)
    backing = os.path.join(sides.source, c.id)
    _fresh(plain_dir, c.who)
    _fresh(mnt_dir, c.who)
    prefix_max = max(len(plain_dir), len(backing))
    rec_plain = pc.run_check(c.fn, plain_dir, pc.Ctx(plain_dir, prefix_max), c.who, c.umask)
    try:
        rec_mnt = pc.run_check(c.fn, mnt_dir, pc.Ctx(backing, prefix_max), c.who, c.umask)
    except pc.ChildCrash as e:
        pytest.fail(f"{c.id} crashed on the mount (it ran on the plain directory):\n{e}")
    if rec_mnt != rec_plain:
        pytest.fail(f"{c.id}: the mount differs from the plain directory:\n"
                    f"{differences(rec_plain, rec_mnt)}", pytrace=False)


def test_sealed_file_verity_flag(sides):
    """Mount only (this kernel's ext4 has no verity, so there is no oracle): a file sealed
    with `verityfuse seal` shows V in lsattr, and FS_IOC_SETFLAGS can neither clear
    FS_VERITY_FL nor set it.

    Expected as ext4 does it (ext4_fileattr_set): FS_VERITY_FL is visible but not
    modifiable, so SETFLAGS succeeds, applies the modifiable flags (here nodump) and
    leaves the verity flag as it was.  Every other flag is the backing file's."""
    rel = "verity-flag"
    os.mkdir(os.path.join(sides.mnt, rel))
    back = os.path.join(sides.source, rel)
    for n in ("sealed", "unsealed"):
        pc.write_file(os.path.join(back, n), b"verity flag test\n" * 100)
    r = subprocess.run([sys.executable, "-m", "verityfuse.cli", "seal", sides.source,
                        os.path.join(back, "sealed")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    mnt = {n: os.path.join(sides.mnt, rel, n) for n in ("sealed", "unsealed")}
    bk = {n: os.path.join(back, n) for n in ("sealed", "unsealed")}
    try:
        got, want = {}, {}
        got["lsattr sealed"] = pc.lsattr(mnt["sealed"])
        want["lsattr sealed"] = _with_v(pc.lsattr(bk["sealed"]))
        got["GETFLAGS sealed"] = pc.letters(mnt["sealed"])
        want["GETFLAGS sealed"] = _plus(pc.letters(bk["sealed"]), "V")
        flags = pc.attempt(pc.getflags, mnt["sealed"])
        got["SETFLAGS sealed: clear V, set d"] = pc.attempt(
            pc.setflags, mnt["sealed"], (flags & ~pc.FS_VERITY_FL) | pc.FS_NODUMP_FL) \
            if isinstance(flags, int) else flags
        want["SETFLAGS sealed: clear V, set d"] = "ok"
        got["GETFLAGS sealed after"] = pc.letters(mnt["sealed"])
        want["GETFLAGS sealed after"] = _plus(pc.letters(bk["sealed"]), "V")
        got["backing sealed has d"] = "d" in pc.letters(bk["sealed"])
        want["backing sealed has d"] = True
        got["open sealed O_WRONLY after"] = pc.try_open(mnt["sealed"], os.O_WRONLY)
        want["open sealed O_WRONLY after"] = "!EPERM"
        got["sealed digest xattr after"] = isinstance(
            pc.attempt(os.getxattr, mnt["sealed"], "user.fsverity.digest"), bytes)
        want["sealed digest xattr after"] = True
        uflags = pc.attempt(pc.getflags, mnt["unsealed"])
        got["SETFLAGS unsealed: set V and d"] = pc.attempt(
            pc.setflags, mnt["unsealed"], uflags | pc.FS_VERITY_FL | pc.FS_NODUMP_FL) \
            if isinstance(uflags, int) else uflags
        want["SETFLAGS unsealed: set V and d"] = "ok"
        got["GETFLAGS unsealed after"] = pc.letters(mnt["unsealed"])
        want["GETFLAGS unsealed after"] = pc.letters(bk["unsealed"])
        got["backing unsealed has d"] = "d" in pc.letters(bk["unsealed"])
        want["backing unsealed has d"] = True
        got["lsattr unsealed after"] = pc.lsattr(mnt["unsealed"])
        want["lsattr unsealed after"] = pc.lsattr(bk["unsealed"])
        got["open unsealed O_WRONLY after"] = pc.try_open(mnt["unsealed"], os.O_WRONLY)
        want["open unsealed O_WRONLY after"] = "ok"
        got["unsealed digest xattr after"] = pc.attempt(os.getxattr, mnt["unsealed"], "user.fsverity.digest")
        want["unsealed digest xattr after"] = "!ENODATA"
        if got != want:
            pytest.fail("the verity flag on the mount:\n" + differences(want, got).replace(
                "plain:", " want:").replace("mount:", "  got:"), pytrace=False)
    finally:
        for p in bk.values():
            pc.clear_flags_tree(os.path.dirname(p))


def _plus(letters: str, ch: str) -> str:
    """pc.flag_letters output (V is last) with ``ch`` added."""
    return letters if letters.startswith("!") else (ch if letters == "-" else letters + ch)


V_POS = 20  # lsattr prints one position per flag; V is the 21st (e2fsprogs lib/e2p/pf.c)


def _with_v(lsattr_string: str) -> str:
    """lsattr's string for the backing file with V set."""
    if lsattr_string.startswith("!") or len(lsattr_string) <= V_POS:
        return lsattr_string
    return lsattr_string[:V_POS] + "V" + lsattr_string[V_POS + 1:]
