"""Bounded resources per user (issue 16 items 6 and 7).

One unprivileged user (``-o allow_other``) opening one file until refused must
not take the daemon's file descriptors from everyone else: the refusal is
EMFILE (never EIO), root's open of another file still works, and nothing is
logged or counted as an integrity failure.  The daemon runs under a small
RLIMIT_NOFILE (prlimit) so that the limit is reached in a few hundred opens.
"""

import errno
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from verityfuse.testing import VerifiedMount, fuse_unavailable_reason

from conftest import write

pytestmark = pytest.mark.mount
NOBODY = 65534
PRLIMIT = shutil.which("prlimit")


class LimitedMount(VerifiedMount):
    """A daemon started with 256 file descriptors (soft and hard)."""

    command = (PRLIMIT or "prlimit", "--nofile=256", sys.executable, "-m", "verityfuse.cli")


def vf(*args):
    r = subprocess.run([sys.executable, "-m", "verityfuse.cli", *map(str, args)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture
def share():
    """SOURCE and MOUNTPOINT under a directory every user can traverse."""
    if fuse_unavailable_reason() or PRLIMIT is None or os.geteuid() != 0:
        pytest.skip("needs FUSE, prlimit and root (a second uid)")
    d = Path(tempfile.mkdtemp(prefix="verityfuse-bounds-", dir="/tmp"))
    os.chmod(d, 0o755)
    (d / "src").mkdir()
    (d / "mnt").mkdir()
    write(d / "src" / "a", b"a" * 10000)
    write(d / "src" / "b", b"b" * 10000)
    for f in ("a", "b"):
        os.chmod(d / "src" / f, 0o644)
    mounts = []
    yield d, mounts
    for m in mounts:
        m.unmount()
    shutil.rmtree(d, ignore_errors=True)


def mount(d, mounts, mode, options=(), cls=LimitedMount):
    src = d / "src"
    if mode == "manifest":
        vf("seal", src, "--manifest", d / "m.json")
        digest = vf("measure-manifest", d / "m.json").split()[0]
        extra = ["--manifest", str(d / "m.json"), "--manifest-digest", digest]
    else:
        vf("seal", src, src / "a", src / "b")
        extra = []
    m = cls(src, d / "mnt", options=["allow_other", *options], extra_args=extra,
            log_file=d / "log")
    mounts.append(m)
    return m


def open_until_refused(path, uid=NOBODY):
    """A child as ``uid`` opens ``path`` until refused and keeps every fd open;
    returns (how many opens worked, the errno of the refusal, a function that ends it)."""
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only os calls, then _exit
        code = 1
        try:
            os.close(r)
            os.close(go_w)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            fds = []
            err = 0
            try:
                while len(fds) < 5000:
                    fds.append(os.open(path, os.O_RDONLY))
            except OSError as e:
                err = e.errno
            os.write(w, f"{len(fds)} {err}\n".encode())
            os.read(go_r, 1)  # hold every fd until the parent is done
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    os.close(go_r)
    with os.fdopen(r) as f:
        line = f.readline()

    def end():
        os.close(go_w)
        os.waitpid(pid, 0)

    try:
        n, err = map(int, line.split())
    except ValueError:
        end()
        raise AssertionError(f"the child reported {line!r}")
    return n, err, end


def status(mnt):
    return json.loads(os.getxattr(mnt, "user.verityfuse.status"))


@pytest.mark.parametrize("mode", ["manifest", "local"])
def test_one_user_cannot_take_every_file_descriptor(share, mode):
    d, mounts = share
    m = mount(d, mounts, mode)
    n, err, end = open_until_refused(str(d / "mnt" / "a"))
    try:
        assert (err, errno.errorcode.get(err)) == (errno.EMFILE, "EMFILE"), n
        # Everyone else still opens and reads (root here), and the daemon's own work
        # (its status, a lookup of a new name) still has descriptors.
        assert (d / "mnt" / "b").read_bytes() == b"b" * 10000
        assert (d / "mnt" / "a").read_bytes() == b"a" * 10000
        st = status(d / "mnt")
    finally:
        end()
    assert (st["integrity_failures"], st["failures"]) == (0, [])
    assert st["tripwire"]["tripped"] is False  # nothing measured as a violation
    assert "integrity failure" not in m.log()
    assert "ERROR" not in m.log()
    assert (d / "mnt" / "a").read_bytes() == b"a" * 10000  # the handles were all released


def test_max_handles_per_uid_counts_files_and_directories(share):
    d, mounts = share
    mount(d, mounts, "local", options=["max_handles_per_uid=7"], cls=VerifiedMount)
    mnt = d / "mnt"
    dirs = [os.open(mnt, os.O_RDONLY | os.O_DIRECTORY) for _ in range(3)]
    try:
        # root holds 3 directories: its share, not nobody's
        n, err, end = open_until_refused(str(mnt / "a"))
        end()
        assert (n, err) == (7, errno.EMFILE)
        files = [os.open(mnt / "b", os.O_RDONLY) for _ in range(4)]
        with pytest.raises(OSError) as e:
            os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
        assert e.value.errno == errno.EMFILE
        for fd in files:
            os.close(fd)
    finally:
        for fd in dirs:
            os.close(fd)
    assert "uid 65534 holds 7 open handles (max_handles_per_uid): refusing more with EMFILE" \
        in mounts[0].log()


@pytest.mark.parametrize("mode", ["manifest", "local"])
def test_the_daemon_keeps_fds_for_itself(share, mode):
    """With a per-uid share above what the fd limit affords, the daemon's total (256
    fds: (256 - 32 for the inode LRU - 64 kept) / 2 = 80 handles) is ENFILE, and the
    daemon still has fds for its own work: a lookup, its status, its log."""
    d, mounts = share
    m = mount(d, mounts, mode, options=["max_handles_per_uid=100000"])
    n, err, end = open_until_refused(str(d / "mnt" / "a"))
    try:
        assert (n, errno.errorcode.get(err)) == (80, "ENFILE")
        assert os.stat(d / "mnt" / "b").st_size == 10000
        st = status(d / "mnt")
    finally:
        end()
    assert (st["integrity_failures"], st["tripwire"]["tripped"]) == (0, False)
    assert "80 handles open, all the fd limit affords: refusing more with ENFILE" in m.log()
    assert (d / "mnt" / "b").read_bytes() == b"b" * 10000


# -- resource errors are never corruption (in-process, a low fd limit) -------------


def _views(tmp_path, mode):
    from verityfuse import manifest
    from verityfuse.store import Store
    from verityfuse.verifier import TreeBlockCache

    src = tmp_path / "src"
    src.mkdir()
    for name in ("a", "b"):
        # Past 16 KiB: a manifest mount reads its tree object (a smaller file's tree is made
        # from its bytes, small_trees.small_tree), whose fd these tests count.
        write(src / name, name.encode() * 20000)
    if mode == "manifest":
        from verityfuse.view_manifest import ManifestView

        vf("seal", src, "--manifest", tmp_path / "m.json")
        digest = vf("measure-manifest", tmp_path / "m.json").split()[0]
        m = manifest.load(str(tmp_path / "m.json"), (), digest)
        store = Store(str(src / ".verityfuse"), objects_only=True, in_source=True)
        view = ManifestView(str(src), m.tree, store, TreeBlockCache(), m.digest)
    else:
        from verityfuse.view_local import LocalView

        vf("seal", src, src / "a", src / "b")
        store = Store(str(src / ".verityfuse"))
        view = LocalView(str(src), store, TreeBlockCache())
    return view, store


@pytest.mark.parametrize("mode", ["manifest", "local"])
def test_running_out_of_fds_is_emfile_never_corruption(tmp_path, mode):
    """An open that runs out of fds (the share's file, the store's directories, the
    tree object: wherever it happens) fails with EMFILE, and the file opens again
    once fds are free: nothing is taken for, or remembered as, corruption."""
    import resource

    from verityfuse.errors import VerityError

    view, store = _views(tmp_path, mode)
    ino = view.lookup(1, b"a").ino
    store._trees.drop_idle()  # local mode's lookup kept the tree open: make the open need it
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    handles, errs = [], set()
    try:
        # Every limit from "the first fd an open needs" to "the last": each of the
        # open's steps is the one that fails once.
        base = len(os.listdir("/proc/self/fd"))
        for limit in range(base, base + 12):
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
            try:
                handles.append(view.open(ino, os.O_RDONLY))
            except VerityError as e:
                raise AssertionError(f"limit {limit}: {type(e).__name__}: {e}") from None
            except OSError as e:
                errs.add(e.errno)
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            for h in handles:
                view.release(h)
            handles.clear()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for h in handles:
            view.release(h)
    assert errs == {errno.EMFILE}
    h = view.open(ino, os.O_RDONLY)
    try:
        assert h.reader.read(0, 10000) == b"a" * 10000
    finally:
        view.release(h)
        view.close()
        store.close()


@pytest.mark.parametrize("mode", ["manifest", "local"])
def test_handles_of_one_file_share_one_tree_fd(tmp_path, mode):
    gc.collect()  # an earlier test's garbage closes its fds now, not mid-count
    at_start = len(os.listdir("/proc/self/fd"))
    view, store = _views(tmp_path, mode)
    ino = view.lookup(1, b"a").ino
    store._trees.drop_idle()  # local mode's lookup kept the tree open: count it below
    before = len(os.listdir("/proc/self/fd"))
    handles = [view.open(ino, os.O_RDONLY) for _ in range(50)]
    try:
        assert len(os.listdir("/proc/self/fd")) - before == 50 + 1  # one backing fd each, one tree
        trees = {h.closers[0].fd for h in handles}
        assert len(trees) == 1
    finally:
        for h in handles[:-1]:
            view.release(h)
    assert handles[-1].reader.read(0, 10000) == b"a" * 10000  # the last one still reads
    view.release(handles[-1])
    assert len(os.listdir("/proc/self/fd")) == before + 1  # the tree, kept for the next open
    h = view.open(ino, os.O_RDONLY)
    assert h.closers[0].fd in trees and len(os.listdir("/proc/self/fd")) == before + 2
    view.release(h)
    view.close()
    store.close()  # and the kept tree with it
    assert len(os.listdir("/proc/self/fd")) == at_start


# -- memory per directory handle (issue 16 item 7) ------------------------------------


def _big_dir_views(tmp_path, mode, n=3000):
    from verityfuse import manifest
    from verityfuse.store import Store
    from verityfuse.verifier import TreeBlockCache

    src = tmp_path / "src"
    (src / "big").mkdir(parents=True)
    for i in range(n):
        (src / "big" / f"entry-with-a-longish-name-{i:06d}").touch()
    if mode == "manifest":
        from verityfuse.view_manifest import ManifestView

        vf("seal", src, "--manifest", tmp_path / "m.json")
        digest = vf("measure-manifest", tmp_path / "m.json").split()[0]
        m = manifest.load(str(tmp_path / "m.json"), (), digest)
        store = Store(str(src / ".verityfuse"), objects_only=True, in_source=True)
        return ManifestView(str(src), m.tree, store, TreeBlockCache(), m.digest), store
    from verityfuse.view_local import LocalView

    store = Store(str(src / ".verityfuse"), lazy=True)
    return LocalView(str(src), store, TreeBlockCache()), store


@pytest.mark.parametrize("mode", ["manifest", "local"])
def test_directory_handles_hold_no_copy_of_the_listing(tmp_path, mode):
    """20 handles listing a 3,000-entry directory cost (in Python objects) less than
    five copies of its listing (one is ~210 kB): not one each; each lists it exactly,
    `.` and `..` first."""
    import tracemalloc

    view, store = _big_dir_views(tmp_path, mode)
    big = view.lookup(1, b"big").ino
    want = sorted([b".", b".."] + [f"entry-with-a-longish-name-{i:06d}".encode()
                                   for i in range(3000)])

    def listing(dh):
        names = [name for name, _, _ in view.readdir(dh, 0)]
        assert names[:2] == [b".", b".."] and sorted(names) == want
        for name in names[2:]:
            view.unlookup(view.lookup(big, name).ino)  # readdirplus counted one lookup each
            view.unlookup(view.lookup(big, name).ino)

    handles = [view.opendir(big)]
    listing(handles[0])  # the directory's inodes (local) and index (manifest) exist now
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(20):
            handles.append(view.opendir(big))
            listing(handles[-1])
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        for dh in handles:
            view.releasedir(dh)
        view.close()
        store.close()
    assert grown < 1_000_000, f"20 handles took {grown} bytes"
    if mode == "manifest":
        assert len({id(dh.entries) for dh in handles}) == 1  # one index, shared


def getdents(fd, size=4096):
    """One getdents64 call on ``fd``: [(name, d_off)] (the kernel's offsets)."""
    import ctypes
    import struct

    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(size)
    n = libc.syscall(217, fd, buf, size)  # SYS_getdents64 on x86_64
    if n < 0:
        raise OSError(ctypes.get_errno(), "getdents64")
    out, pos = [], 0
    raw = buf.raw[:n]
    while pos < n:
        _, off, reclen = struct.unpack_from("<QqH", raw, pos)
        name = raw[pos + 19:pos + reclen].split(b"\0", 1)[0]
        out.append((name, off))
        pos += reclen
    return out


@pytest.mark.parametrize("mode", ["manifest", "local"])
def test_readdir_through_a_mount_is_exact_while_entries_change(share, mode):
    """Listed in small pieces while SOURCE changes (local mode): every entry that stays
    is listed exactly once, `.` and `..` once each, nothing twice; an entry added or
    removed meanwhile at most once (the plain directory's promise). A listing resumed
    at an offset the mount gave (seekdir) goes on from there."""
    import sys as _sys
    if _sys.maxsize < 2**32:
        pytest.skip("getdents64 numbers are x86_64's")
    d, mounts = share
    src = d / "src"
    (src / "dir").mkdir()
    names = {f"n{i:05d}".encode() for i in range(1500)}
    for n in names:
        (src / "dir" / n.decode()).touch()
    mount(d, mounts, mode, cls=VerifiedMount)
    fd = os.open(d / "mnt" / "dir", os.O_RDONLY | os.O_DIRECTORY)
    try:
        first = getdents(fd)
        listed = list(first)
        seen = [n for n, _ in first]
        added, removed = set(), set()
        if mode == "local":
            rest = sorted(names - set(seen))
            removed = set(rest[::3])
            for n in removed:
                os.unlink(src / "dir" / n.decode())
            added = {f"new{i:04d}".encode() for i in range(300)}
            for n in added:
                (src / "dir" / n.decode()).touch()
        while True:
            chunk = getdents(fd)
            if not chunk:
                break
            listed += chunk
            seen += [n for n, _ in chunk]
        assert len(seen) == len(set(seen)), "an entry was listed twice"
        assert sorted(n for n in seen if n in (b".", b"..")) == [b".", b".."]
        stayed = names - removed
        assert stayed <= set(seen)
        assert set(seen) <= names | added | {b".", b".."}
        # seekdir to an offset the mount gave: the listing goes on after that entry
        k = len(listed) // 2
        os.lseek(fd, listed[k][1], 0)
        again = []
        while True:
            chunk = getdents(fd)
            if not chunk:
                break
            again += [n for n, _ in chunk]
        assert again == [n for n, _ in listed[k + 1:]]
    finally:
        os.close(fd)


def test_out_of_memory_is_enomem_never_eio():
    import pyfuse3
    import trio

    from verityfuse.ops import VerityOperations

    class View:
        posix_acl = False

        def getattr(self, ino):
            raise MemoryError()

    ops = VerityOperations(View())

    async def main():
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.getattr(1, None)
        return e.value.errno

    assert trio.run(main) == errno.ENOMEM
