"""Lookups answered through the shim's hook (fast_lookups, _fastlookup.c): the view's
lookup called as a plain function, without pyfuse3's coroutines.  On real mounts, in
local and manifest mode, every kind of entry has the attributes a lookup through
pyfuse3 gives it (a plain directory is the oracle where the view passes them through),
errors have their exact errnos, and the lookup counts stay right: after the kernel
forgets everything, no inode still has lookups.  In-process: what the C side makes of
each answer of the callback."""

import errno
import json
import os
import subprocess
import sys

import pytest

from verityfuse import manifest as mf
from verityfuse import merkle

from conftest import daemon_fds, drop_caches, wait_daemon_fds, write

KiB = 1 << 10
native = merkle._hashblocks
needs_native = pytest.mark.skipif(native is None or not hasattr(native, "fast_lookup_entry"),
                                  reason="native module not built")


def status(m):
    return json.loads(os.getxattr(m.mountpoint, "user.verityfuse.status"))


FIELDS = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_mtime_ns", "st_rdev")


def attrs(path):
    st = os.lstat(path)
    return {f: getattr(st, f) for f in FIELDS}


@pytest.fixture
def tree(tmp_path):
    """Every kind of entry: sealed files of one block and of several, an unsealed one
    (sealed, then changed behind the store's back), a hard link, a directory, a
    symlink, a FIFO."""
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    write(src / "one", os.urandom(3000))
    write(src / "leaves", os.urandom(100 * KiB))
    write(src / "dir" / "deep", os.urandom(5000))
    os.link(src / "one", src / "dir" / "alias")
    os.symlink("one", src / "link")
    return src


NAMES = ("one", "leaves", "dir", "dir/deep", "dir/alias", "link")


@pytest.mark.mount
def test_local_lookups_give_the_entries_attributes_and_errnos(tree, verified_mount):
    m = verified_mount(tree)
    os.mkfifo(tree / "fifo")  # after the seal: a FIFO is not sealed
    with open(tree / "leaves", "ab") as f:  # behind the store's back: the sealed size stays
        f.write(b"more")
    mnt = m.mountpoint
    for name in NAMES + ("fifo",):
        want = attrs(tree / name)
        if name == "leaves":
            want["st_size"] -= 4
        assert attrs(mnt / name) == want, name
    assert os.lstat(mnt / "one").st_ino == os.lstat(mnt / "dir" / "alias").st_ino
    for path, err in ((mnt / "missing", errno.ENOENT), (mnt / ("x" * 300), errno.ENAMETOOLONG),
                      (mnt / "one" / "x", errno.ENOTDIR), (mnt / "dir" / "missing", errno.ENOENT)):
        with pytest.raises(OSError) as e:
            os.lstat(path)
        assert e.value.errno == err, path
    got = status(m)["fast_lookups"]
    # one, leaves, dir, deep, alias, link, fifo (the root is the kernel's); missing x 2,
    # the long name.  The one under a file is refused by the kernel (ENOTDIR) unasked.
    assert got["answered"] >= 7 and got["errors"] >= 3, got
    assert got["declined"] == got["undone"] == 0, got


@pytest.mark.mount
def test_lookup_counts_stay_right_through_forgets(tree, verified_mount):
    """Every lookup the hook answered is counted once: after the kernel forgets its
    inodes (drop_caches), the daemon holds none; a count too many would keep one."""
    m = verified_mount(tree)
    drop_caches()
    base = daemon_fds(m.pid)
    for _ in range(3):
        for name in NAMES:
            os.lstat(m.mountpoint / name)
        with open(m.mountpoint / "dir" / "alias", "rb") as f:
            f.read()
        drop_caches()
    assert status(m)["fast_lookups"]["answered"] >= 3 * len(NAMES)
    drop_caches()
    # What stays open: the tree objects of leaves and dir/deep, kept for the next open.
    assert wait_daemon_fds(m.pid, base + 2) == base + 2
    assert m.unmount() == 0
    assert "0 inodes still had lookups" in m.log()


@pytest.mark.mount
def test_manifest_lookups(tree, tmp_path, verified_mount):
    mf.generate_key(str(tmp_path / "key.pem"), str(tmp_path / "pub.pem"))
    r = subprocess.run([sys.executable, "-m", "verityfuse.cli", "seal", tree, "--manifest",
                        tmp_path / "m.json", "--sign-key", tmp_path / "key.pem"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = verified_mount(tree, seal=False, extra_args=[
        "--manifest", str(tmp_path / "m.json"), "--trust-key", str(tmp_path / "pub.pem")])
    os.unlink(tree / "one")  # the host removes it: the manifest still names it
    for name, size in (("one", 3000), ("leaves", 100 * KiB), ("dir/deep", 5000)):
        assert os.lstat(m.mountpoint / name).st_size == size, name
    (tree / "planted").write_bytes(b"x")  # the host adds one: not in the manifest
    with pytest.raises(OSError) as e:
        os.lstat(m.mountpoint / "planted")
    assert e.value.errno == errno.ENOENT
    got = status(m)["fast_lookups"]
    assert got["answered"] >= 3 and got["errors"] >= 1 and got["declined"] == 0, got


@pytest.mark.mount
def test_without_it_lookups_go_through_pyfuse3(tree, verified_mount, monkeypatch):
    monkeypatch.setenv("VERITYFUSE_NO_FAST_LOOKUP", "1")
    m = verified_mount(tree)
    assert attrs(m.mountpoint / "one") == attrs(tree / "one")
    assert "fast_lookups" not in status(m)
    drop_caches()
    assert m.unmount() == 0
    assert "0 inodes still had lookups" in m.log()


# -- the C side, in-process (no FUSE) ----------------------------------------------------

@pytest.fixture
def hook():
    """Install callbacks for the test; the hook is cleared after it."""
    calls = []

    def install(lookup):
        native.fast_lookup_set(lookup, lambda ino: calls.append(ino))
        return calls

    yield install
    native.fast_lookup_set(None, None)


@needs_native
def test_the_c_side_answers_with_the_callbacks_attributes_errno_or_not_at_all(hook):
    hook(lambda parent, name: (parent + 1, 0o100644, 2, 7, 8, 3, 12345, 4096, 24,
                               -1_500_000_000, 1_700_000_000_123_456_789, 5, 1.5))
    rc, st = native.fast_lookup(1, b"name")
    assert rc == 0
    # ino, mode, nlink, uid, gid, rdev, size, blksize, blocks, then (s, ns) three times
    assert st == (2, 0o100644, 2, 7, 8, 3, 12345, 4096, 24, -2, 500_000_000,
                  1_700_000_000, 123_456_789, 0, 5, 1.5)
    hook(lambda parent, name: errno.ENOENT)
    assert native.fast_lookup(1, b"x") == (errno.ENOENT, None)
    hook(lambda parent, name: -3)  # not an errno: EIO, never a "success"
    assert native.fast_lookup(1, b"x") == (errno.EIO, None)
    hook(lambda parent, name: None)
    assert native.fast_lookup(1, b"x") == (-1, None)
    before = native.fast_lookup_info()
    native.fast_lookup_set(None, None)
    assert native.fast_lookup(1, b"x") == (-1, None)  # no callback: pyfuse3's
    assert native.fast_lookup_info()["declined"] == before["declined"]


@needs_native
def test_a_raising_callback_is_eio_and_a_bad_answer_given_back(hook):
    def boom(parent, name):
        raise RuntimeError("a bug")

    hook(boom)  # the view may have counted it: never looked up a second time
    assert native.fast_lookup(1, b"x") == (errno.EIO, None)  # cleared, not raised here
    calls = hook(lambda parent, name: (42, "not a mode"))
    assert native.fast_lookup(1, b"x") == (-1, None)
    assert calls == [42]  # the lookup it counted is given back before pyfuse3 counts its own
    good = (43, 0o100644, 1, 0, 0, 0, 1, 4096, 1, 0, 0, 0, 1.0)
    for at, bad in ((3, 2 ** 32), (4, -1), (1, 2 ** 32), (6, -1), (0, 2 ** 64)):
        answer = good[:at] + (bad,) + good[at + 1:]  # uid 2**32 is not root, nor gid -1
        calls.clear()
        hook(lambda parent, name: answer)
        assert native.fast_lookup(1, b"x") == (-1, None), at
        assert calls == ([] if at == 0 else [43]), at


@needs_native
def test_an_interrupt_in_the_callback_is_raised_again(hook):
    def interrupted(parent, name):
        raise KeyboardInterrupt

    hook(interrupted)
    before = native.fast_lookup_info()["errors"]
    with pytest.raises(KeyboardInterrupt):
        native.fast_lookup(1, b"x")  # answered EIO: nothing escapes into libfuse
        for _ in range(1000):  # the interrupt, pending, is raised at the next check
            pass
    assert native.fast_lookup_info()["errors"] == before + 1


@needs_native
def test_set_checks_its_arguments():
    with pytest.raises(TypeError):
        native.fast_lookup_set(lambda p, n: None, None)
    with pytest.raises(TypeError):
        native.fast_lookup_set(1, 2)


@needs_native
@pytest.mark.parametrize("untrusted", [False, True])
def test_the_python_side_answers_as_the_error_boundary(hook, monkeypatch, untrusted):
    """NativeLookups' callback, with the boundary's mapping: an OSError its errno (ENOSYS
    never: EOPNOTSUPP, or EIO from an untrusted share), an integrity failure to pyfuse3
    (its measurement waits), out of memory ENOMEM, a bug EIO; every attribute."""
    from verityfuse.errors import ContentMismatch
    from verityfuse.fast_lookups import NativeLookups
    from verityfuse.ops_boundary import errno_of, sync_errno
    from verityfuse.view import Attr

    monkeypatch.delenv("VERITYFUSE_NO_FAST_LOOKUP", raising=False)

    class Shim:
        def set_fast_lookup(self, entry):
            return True

    class View:
        def __init__(self):
            self.gone = []

        def lookup(self, parent, name, ctx):
            if name == b"file":
                return Attr(9, 0o100444, 2, 5, 6, 77, 11, 12, 13, rdev=14, blksize=15, blocks=16,
                            timeout=4.0)
            raise {b"missing": FileNotFoundError(errno.ENOENT, "no"),
                   b"nosys": OSError(errno.ENOSYS, "the share's"),
                   b"bad": ContentMismatch("f: block 0 mismatch"),
                   b"oom": MemoryError(),
                   b"bug": ZeroDivisionError("a bug")}[name]

        def unlookup(self, ino):
            self.gone.append(ino)

    lookups = NativeLookups.load(Shim(), View(), lambda e: sync_errno(
        e, "lookup", lambda e, what: errno_of(e, what, None, untrusted)))
    try:
        # ino, mode, nlink, uid, gid, rdev, size, blksize, blocks, a/m/ctime (s, ns)
        assert native.fast_lookup(1, b"file") == (
            0, (9, 0o100444, 2, 5, 6, 14, 77, 15, 16, 0, 11, 0, 12, 0, 13, 4.0))
        assert native.fast_lookup(1, b"missing") == (errno.ENOENT, None)
        assert native.fast_lookup(1, b"nosys") == (
            errno.EIO if untrusted else errno.EOPNOTSUPP, None)
        assert native.fast_lookup(1, b"bad") == (-1, None)
        assert native.fast_lookup(1, b"oom") == (errno.ENOMEM, None)
        assert native.fast_lookup(1, b"bug") == (errno.EIO, None)
    finally:
        lookups.close()
    assert native.fast_lookup(1, b"file") == (-1, None)
