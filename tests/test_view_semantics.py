"""The views' semantics, called directly (no mount, so in the fast tier): what each
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
from conftest import flip

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
    store = Store(str(src / ".verityfuse"), objects_only=True, in_source=True)
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
    ("a flipped byte", lambda p: flip(p, 0), IntegrityError),
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


# -- the local view: a passthrough, with a plain directory as the oracle ------------------

class Ctx:
    """What a request's context gives the view (pyfuse3's RequestContext): root here."""
    uid = gid = 0
    umask = 0o022

    def __init__(self):
        self.pid = os.getpid()


class Fields:
    update_size = update_mode = update_uid = update_gid = False
    update_atime = update_mtime = update_ctime = False

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _tree(root):
    (root / "d").mkdir(parents=True)
    (root / "d" / "inner").write_bytes(b"x")
    (root / "f").write_bytes(FILES["app.bin"])
    (root / "sealed").write_bytes(FILES["app.bin"])
    (root / "e").mkdir()


@pytest.fixture
def local(tmp_path):
    from verityfuse.view_local import LocalView
    src, oracle = tmp_path / "src", tmp_path / "oracle"
    _tree(src)
    _tree(oracle)
    r = subprocess.run([sys.executable, "-m", "verityfuse", "seal", str(src), str(src / "sealed")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    store = Store(str(src / ".verityfuse"))
    v = LocalView(str(src), store, TreeBlockCache())
    yield v, src, oracle
    v.close()
    store.close()


# (operation, what the view is asked, what the oracle directory is asked): the same errno
# from both, or success from both.
POSIX = [
    ("lookup a missing name", lambda v: v.lookup(ROOT_INO, b"nope"),
     lambda o: os.lstat(o / "nope")),
    ("mkdir over a file", lambda v: v.mkdir(ROOT_INO, b"f", 0o755, Ctx()),
     lambda o: os.mkdir(o / "f")),
    ("rmdir a non-empty directory", lambda v: v.rmdir(ROOT_INO, b"d"), lambda o: os.rmdir(o / "d")),
    ("rmdir a file", lambda v: v.rmdir(ROOT_INO, b"f"), lambda o: os.rmdir(o / "f")),
    ("unlink a directory", lambda v: v.unlink(ROOT_INO, b"d"), lambda o: os.unlink(o / "d")),
    ("unlink a missing name", lambda v: v.unlink(ROOT_INO, b"nope"),
     lambda o: os.unlink(o / "nope")),
    ("rename a directory over a file", lambda v: v.rename(ROOT_INO, b"e", ROOT_INO, b"f", 0),
     lambda o: os.rename(o / "e", o / "f")),
    ("rename a file over a directory", lambda v: v.rename(ROOT_INO, b"f", ROOT_INO, b"e", 0),
     lambda o: os.rename(o / "f", o / "e")),
    ("rename a directory into itself", lambda v: v.rename(ROOT_INO, b"d", ino(v, "d"), b"x", 0),
     lambda o: os.rename(o / "d", o / "d" / "x")),
    ("rename over a non-empty directory", lambda v: v.rename(ROOT_INO, b"e", ROOT_INO, b"d", 0),
     lambda o: os.rename(o / "e", o / "d")),
    ("link a directory", lambda v: v.link(ino(v, "d"), ROOT_INO, b"l"),
     lambda o: os.link(o / "d", o / "l")),
    ("a name longer than 255 bytes", lambda v: v.mkdir(ROOT_INO, b"n" * 256, 0o755, Ctx()),
     lambda o: os.mkdir(o / ("n" * 256))),
    ("lookup below a file", lambda v: v.lookup(ino(v, "f"), b"x"), lambda o: os.lstat(o / "f" / "x")),
    ("mkdir, then rmdir it", lambda v: (v.mkdir(ROOT_INO, b"n", 0o755, Ctx()),
                                        v.rmdir(ROOT_INO, b"n")),
     lambda o: (os.mkdir(o / "n"), os.rmdir(o / "n"))),
]


def _outcome(call):
    try:
        call()
    except OSError as e:
        return e.errno
    return 0


@pytest.mark.parametrize("name,view_call,oracle_call", POSIX, ids=[p[0] for p in POSIX])
def test_local_view_answers_as_the_backing_directory(local, name, view_call, oracle_call):
    v, src, oracle = local
    assert _outcome(lambda: view_call(v)) == _outcome(lambda: oracle_call(oracle))
    assert sorted(os.listdir(src)) == sorted(os.listdir(oracle) + [".verityfuse"])


# What verity adds to the passthrough: the kernel's errnos for a verity file.
VERITY = [
    ("open for write", lambda v: v.open(ino(v, "sealed"), os.O_WRONLY), errno.EPERM),
    ("open for read+write", lambda v: v.open(ino(v, "sealed"), os.O_RDWR), errno.EPERM),
    ("truncate", lambda v: v.setattr(ino(v, "sealed"), os.stat_result((0,) * 10),
                                     Fields(update_size=True), None, Ctx()), errno.EPERM),
]


@pytest.mark.parametrize("name,call,want", VERITY, ids=[c[0] for c in VERITY])
def test_local_view_verity_rules(local, name, call, want):
    v, src, _ = local
    assert errno_of(lambda: call(v)) == want
    assert (src / "sealed").read_bytes() == FILES["app.bin"]
    # the same operations on the unsealed twin pass through
    fh = v.open(ino(v, "f"), os.O_RDWR)
    v.release(fh)


def test_local_view_reads_verified_and_fails_a_changed_block(local):
    v, src, _ = local
    assert _read_all(v, "sealed") == FILES["app.bin"]
    flip(src / "sealed", 3 * BS + 1)  # behind the view's back, as a tampering process
    with pytest.raises(IntegrityError) as e:
        _read_all(v, "sealed")
    assert (e.value.offset, e.value.errno) == (3 * BS, errno.EIO)
    fh = v.open(ino(v, "f"), os.O_RDONLY)  # the unsealed twin: no reader, passed through
    try:
        assert fh.reader is None and os.pread(fh.fd, 1 << 20, 0) == FILES["app.bin"]
    finally:
        v.release(fh)
