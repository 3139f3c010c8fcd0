"""The manifest view's semantics, called directly (no mount, so in the fast tier): what each
request answers, as a table of (request, exact errno), and what the host's changes to the
share do to an open and a read.  One mount test per wire path lives elsewhere
(test_manifest.py, test_manifest_attacks.py); these are the rules where they are decided."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys

import pytest

from verityfuse import manifest
from verityfuse.errors import Corruption, IntegrityError, SizeMismatch
from verityfuse.store import Store
from verityfuse.verifier import TreeBlockCache
from verityfuse.inodes import ROOT_INO
from verityfuse.view_manifest import ManifestView

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

BS = 4096
FILES = {"app.bin": os.urandom(5 * BS + 7), "etc/config": b"key=value\n", "empty": b""}


@pytest.fixture
def view(tmp_path):
    src = tmp_path / "share"
    (src / "etc").mkdir(parents=True)
    for rel, data in FILES.items():
        (src / rel).write_bytes(data)
    os.symlink("etc/config", src / "link")
    m = tmp_path / "m.vfm"
    r = subprocess.run([sys.executable, "-m", "verityfuse", "seal", str(src), "--manifest", str(m),
                        "--unsigned"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    digest = subprocess.run([sys.executable, "-m", "verityfuse", "measure-manifest", str(m)],
                            capture_output=True, text=True).stdout.split()[0]
    mf = manifest.load(str(m), pinned_digest=digest)
    store = Store(str(src / ".verityfuse"), objects_only=True, in_share=True)
    v = ManifestView(str(src), mf.tree, store, TreeBlockCache(), mf.digest)
    yield v, src
    v.close()
    store.close()


def ino(v, path: str) -> int:
    i = ROOT_INO
    for part in path.split("/"):
        i = v.lookup(i, part.encode()).ino
    return i


def errno_of(call) -> int:
    with pytest.raises(OSError) as e:
        call()
    return e.value.errno


# Every request that would change the tree: EROFS, whatever it names (a manifest mount is
# read-only whatever its options; the kernel sees the same errno as from a ro mount).
MUTATIONS = [
    ("setattr", lambda v, f, d: v.setattr(f, None, None, None, None)),
    ("mknod", lambda v, f, d: v.mknod(d, b"n", stat.S_IFREG | 0o644, 0, None)),
    ("mkdir", lambda v, f, d: v.mkdir(d, b"n", 0o755, None)),
    ("symlink", lambda v, f, d: v.symlink(d, b"n", b"t", None)),
    ("unlink", lambda v, f, d: v.unlink(d, b"config")),
    ("rmdir", lambda v, f, d: v.rmdir(ROOT_INO, b"etc")),
    ("rename", lambda v, f, d: v.rename(d, b"config", ROOT_INO, b"x", 0)),
    ("link", lambda v, f, d: v.link(f, ROOT_INO, b"x")),
    ("create", lambda v, f, d: v.create(d, b"n", stat.S_IFREG | 0o644, os.O_WRONLY, None)),
    ("setxattr", lambda v, f, d: v.setxattr(f, b"user.x", b"1", 0, None)),
    ("removexattr", lambda v, f, d: v.removexattr(f, b"user.x")),
    ("open for write", lambda v, f, d: v.open(f, os.O_WRONLY)),
    ("open for read+write", lambda v, f, d: v.open(f, os.O_RDWR)),
    ("open with O_TRUNC", lambda v, f, d: v.open(f, os.O_RDONLY | os.O_TRUNC)),
]


@pytest.mark.parametrize("name,call", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_every_mutation_is_erofs(view, name, call):
    v, src = view
    before = sorted(os.listdir(src))
    assert errno_of(lambda: call(v, ino(v, "etc/config"), ino(v, "etc"))) == errno.EROFS
    assert sorted(os.listdir(src)) == before  # and the share is untouched


LOOKUPS = [
    ("a missing name", lambda v: v.lookup(ROOT_INO, b"absent"), errno.ENOENT),
    ("the store's name", lambda v: v.lookup(ROOT_INO, b".verityfuse"), errno.ENOENT),
    ("below a file", lambda v: v.lookup(ino(v, "app.bin"), b"x"), errno.ENOTDIR),
    ("open of a directory", lambda v: v.open(ino(v, "etc"), os.O_RDONLY), errno.EISDIR),
    ("open of a symlink", lambda v: v.open(ino(v, "link"), os.O_RDONLY), errno.EINVAL),
    ("opendir of a file", lambda v: v.opendir(ino(v, "app.bin")), errno.ENOTDIR),
    ("readlink of a file", lambda v: v.readlink(ino(v, "app.bin")), errno.EINVAL),
    ("an unknown inode", lambda v: v.getattr(10 ** 9), errno.ESTALE),
    ("getxattr", lambda v: v.getxattr(ino(v, "app.bin"), b"user.x"), errno.ENODATA),
]


@pytest.mark.parametrize("name,call,want", LOOKUPS, ids=[c[0] for c in LOOKUPS])
def test_lookup_and_open_errnos(view, name, call, want):
    assert errno_of(lambda: call(view[0])) == want


def test_attributes_and_listing_are_the_manifests(view):
    v, src = view
    os.chmod(src / "app.bin", 0o777)  # the host's metadata is not what the view says
    os.utime(src / "app.bin", (1, 1))
    a = v.getattr(ino(v, "app.bin"))
    st = os.lstat(src / "app.bin")
    assert (a.mode, a.size) == (stat.S_IFREG | 0o644, len(FILES["app.bin"]))
    assert a.mtime_ns != st.st_mtime_ns
    assert v.readlink(ino(v, "link")) == b"etc/config"
    (src / "added").write_bytes(b"not listed")
    dh = v.opendir(ROOT_INO)
    names = [n for n, _, _ in v.readdir(dh, 0)]
    v.releasedir(dh)
    assert names == [b".", b"..", b"app.bin", b"empty", b"etc", b"link"]


def _read_all(v, path: str) -> bytes:
    fh = v.open(ino(v, path), os.O_RDONLY)
    try:
        return bytes(fh.reader.read(0, 1 << 20))
    finally:
        v.release(fh)


@pytest.mark.parametrize("path", sorted(FILES))
def test_intact_files_read_exactly(view, path):
    assert _read_all(view[0], path) == FILES[path]


# What the host does to the share between two requests, and the exception each open or
# read raises (the adapter turns every one of them into EIO).
HOST_CHANGES = [
    ("a flipped byte", lambda p: p.write_bytes(b"X" + p.read_bytes()[1:]), IntegrityError),
    ("truncated", lambda p: os.truncate(p, BS), SizeMismatch),
    ("extended", lambda p: p.write_bytes(p.read_bytes() + b"!"), SizeMismatch),
    ("deleted", lambda p: p.unlink(), Corruption),
    ("a symlink to an intact copy",
     lambda p: (p.rename(p.with_name("copy")), os.symlink("copy", p)), Corruption),
    ("a directory", lambda p: (p.unlink(), p.mkdir()), Corruption),
    ("a FIFO", lambda p: (p.unlink(), os.mkfifo(p)), Corruption),
]


@pytest.mark.parametrize("name,change,exc", HOST_CHANGES, ids=[c[0] for c in HOST_CHANGES])
def test_host_changes_fail_closed(view, name, change, exc):
    v, src = view
    change(src / "app.bin")
    with pytest.raises(exc) as e:
        _read_all(v, "app.bin")
    assert e.value.errno == errno.EIO
    assert "app.bin" in str(e.value)
    assert _read_all(v, "etc/config") == FILES["etc/config"]  # the blast radius: one file


def test_a_change_after_open_fails_the_read_not_the_bytes(view):
    v, src = view
    fh = v.open(ino(v, "app.bin"), os.O_RDONLY)
    try:
        assert bytes(fh.reader.read(0, BS)) == FILES["app.bin"][:BS]
        with open(src / "app.bin", "r+b") as f:  # the same inode, changed under the handle
            f.seek(2 * BS)
            f.write(b"\0" * 8)
        with pytest.raises(IntegrityError) as e:
            fh.reader.read(2 * BS, BS)
        assert e.value.offset == 2 * BS
        assert bytes(fh.reader.read(BS, BS)) == FILES["app.bin"][BS:2 * BS]
    finally:
        v.release(fh)
