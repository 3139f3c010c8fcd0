"""Local mode at the edges (issue 9): ext4's fs-verity semantics where they are
subtle, bounded file descriptors, and bad input in the store.

Rules: real mounts through the fixture; exact errnos and bytes; where an enable
must still be running, the test waits for its half-built object in the store's
tmp/ (a condition, never a duration) and uses files large enough to hash for
seconds.
"""

import errno
import hashlib
import os
import subprocess
import sys

import pytest

from verityfuse.sealing import entry_of_path
from verityfuse.store import Store
from conftest import daemon_fds, drop_caches, wait_building, write
from test_ioctl import enable_error, fsv
from test_mount import object_file


def read_errno(path, offset=0, size=1):
    """None if open and read succeed, else the errno of whichever failed."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        return e.errno
    try:
        os.pread(fd, size, offset)
        return None
    except OSError as e:
        return e.errno
    finally:
        os.close(fd)

VF = [sys.executable, "-m", "verityfuse.cli"]


def sparse(path, size):
    with open(path, "wb") as f:
        f.truncate(size)


def enable_bg(path):
    return subprocess.Popen(["fsverity", "enable", str(path)], stderr=subprocess.PIPE, text=True)


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    return d


def test_remount_read_only_then_enable_is_erofs(src, verified_mount):
    write(src / "f", b"x" * 10000)
    m = verified_mount(src, seal=False)
    subprocess.run(["mount", "-i", "-o", "remount,ro", m.mountpoint], check=True)
    assert enable_error(m.mountpoint / "f") == "Read-only file system"
    assert not (src / ".verityfuse").exists()  # nothing written to SOURCE, no store made
    subprocess.run(["mount", "-i", "-o", "remount,rw", m.mountpoint], check=True)
    fsv("enable", m.mountpoint / "f", check=True)


@pytest.mark.daemon_errors(r"store .*/\.verityfuse: it exists but cannot be opened")
def test_an_enable_with_a_dangling_store_symlink_fails_and_the_mount_stays(src, verified_mount):
    """SOURCE/.verityfuse planted as a symlink to nothing before the lazy store is made:
    the store's mkdir found the name, its open did not, and the creation recursed until
    a RecursionError left the request loop: one user's `fsverity enable` unmounted the
    file system for everyone (a 2,600-line traceback in the log).  Now that enable fails,
    naming the store (a symlink there is refused: store_of), and the mount goes on."""
    write(src / "f", b"x" * 10000)
    write(src / "g", b"g" * 100)
    m = verified_mount(src, seal=False)
    os.symlink(src / "nowhere", src / ".verityfuse")
    assert enable_error(m.mountpoint / "f") == "Input/output error"
    assert (m.mountpoint / "g").read_bytes() == b"g" * 100  # still mounted, still serving
    assert "Traceback" not in m.log() and "RecursionError" not in m.log()
    assert f"store {src}/.verityfuse: a symlink or not a directory (refused as SOURCE's own " \
        f"store; name the store's own path with --store)" in m.log(), m.log()


def test_truncate_during_enable_is_etxtbsy(src, verified_mount):
    sparse(src / "huge", 16 << 30)
    m = verified_mount(src, seal=False)
    p = enable_bg(m.mountpoint / "huge")
    wait_building(src, p)
    with pytest.raises(OSError) as e:
        os.truncate(m.mountpoint / "huge", 10)
    assert e.value.errno == errno.ETXTBSY
    assert p.poll() is None  # refused while the build ran, not after a failure
    p.send_signal(2)
    p.wait(30)
    assert os.stat(src / "huge").st_size == 16 << 30


@pytest.mark.parametrize("how", ["rename", "unlink-other-name", "rename-in-source"])
def test_names_change_during_enable_verity_stays_with_the_inode(src, verified_mount, how):
    sparse(src / "big", 6 << 30)
    os.mkdir(src / "d")
    write(src / "d" / "small", b"s" * 5000)
    os.link(src / "big", src / "second")
    m = verified_mount(src, seal=False)
    mp = m.mountpoint
    p = enable_bg(mp / "big")
    wait_building(src, p)
    if how == "rename":
        os.rename(mp / "big", mp / "d" / "moved")
        final = "d/moved"
    elif how == "unlink-other-name":
        os.unlink(mp / "big")
        final = "second"
    else:
        os.rename(src / "big", src / "d" / "moved")
        final = "d/moved"
    assert p.poll() is None
    assert p.wait(120) == 0, p.stderr.read()
    digest = fsv("digest", src / final, check=True).stdout.split()[0]
    assert os.getxattr(mp / final, "user.fsverity.digest").decode() == digest
    assert fsv("measure", mp / final, check=True).stdout.split()[0] == digest
    fsv("enable", mp / "d" / "small", check=True)
    m.unmount()
    r = subprocess.run([*VF, "verify", src, "-v"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"OK {digest} {src}/{final}" in r.stdout and "CORRUPT" not in r.stdout


def test_enable_commit_drops_pages_cached_before_it(src, verified_mount):
    """A page cached before the enable was never verified: after the commit, a
    reader gets the bytes the digest covers, never the stale ones."""
    old, new = b"A" * 8192, b"B" * 8192
    write(src / "f", old)
    m = verified_mount(src, seal=False)
    fd = os.open(m.mountpoint / "f", os.O_RDONLY)
    try:
        assert os.pread(fd, 8192, 0) == old         # cached in the page cache
        write(src / "f", new)                        # changed behind the daemon, same size
        fsv("enable", m.mountpoint / "f", check=True)  # hashes what is on disk now
        assert os.pread(fd, 8192, 0) == new
    finally:
        os.close(fd)


def test_sealed_size_is_authoritative(src, verified_mount):
    write(src / "f", os.urandom(5 * 4096))
    m = verified_mount(src)
    os.truncate(src / "f", 2 * 4096)  # behind the daemon, to a block boundary
    drop_caches()
    assert os.stat(m.mountpoint / "f").st_size == 5 * 4096
    r = subprocess.run(["cat", m.mountpoint / "f"], capture_output=True)
    assert r.returncode == 1 and b"Input/output error" in r.stderr  # never a clean short EOF


def test_directory_renames_keep_verity_without_walking(src, verified_mount):
    os.makedirs(src / "a" / "b")
    for i in range(50):
        write(src / "a" / "b" / f"f{i}", str(i).encode() * 100)
    m = verified_mount(src)
    digest = os.getxattr(m.mountpoint / "a" / "b" / "f7", "user.fsverity.digest")
    os.rename(m.mountpoint / "a", m.mountpoint / "renamed")      # through the mount
    os.rename(src / "renamed" / "b", src / "renamed" / "c")       # directly in SOURCE
    drop_caches()
    f7 = m.mountpoint / "renamed" / "c" / "f7"
    assert os.getxattr(f7, "user.fsverity.digest") == digest
    with pytest.raises(PermissionError):
        open(f7, "ab")
    with Store(str(src / ".verityfuse")) as st:
        assert st.count_entries() == 50  # entries by inode: none was rewritten or lost


@pytest.mark.parametrize("flag", ["+i", "+a"])
def test_enable_on_immutable_or_append_only_is_eperm(src, verified_mount, flag):
    write(src / "f", b"x" * 5000)
    m = verified_mount(src, seal=False)
    subprocess.run(["chattr", flag, m.mountpoint / "f"], check=True)
    try:
        out = subprocess.run(["lsattr", m.mountpoint / "f"], capture_output=True, text=True).stdout
        assert out.split()[0][4 if flag == "+i" else 5] == flag[1]
        assert enable_error(m.mountpoint / "f") == "Operation not permitted"
    finally:
        subprocess.run(["chattr", "-i", "-a", m.mountpoint / "f"], check=True)


# -- bounded file descriptors ----------------------------------------------------------

def test_fd_count_does_not_grow_with_the_tree(src, verified_mount):
    """A tree of more files than the daemon keeps fds for (1024 at most): listed and
    read in full while the kernel remembers every inode, with the daemon's fds
    bounded by a number that does not grow with the tree."""
    dirs, per = 40, 100
    for d in range(dirs):
        os.mkdir(src / f"d{d}")
        for i in range(per):
            write(src / f"d{d}" / f"f{i}", f"{d}/{i}\n".encode())
    m = verified_mount(src, seal=False)
    r = subprocess.run(f"find {m.mountpoint} -type f | sort -V | xargs cat", shell=True,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "".join(f"{d}/{i}\n" for d in range(dirs) for i in range(per))
    after_read = daemon_fds(m.pid)
    r = subprocess.run(["ls", "-R", m.mountpoint], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.count("\nf") == dirs * per
    r = subprocess.run(["du", "-s", "--inodes", m.mountpoint], capture_output=True, text=True)
    assert r.returncode == 0 and int(r.stdout.split()[0]) == dirs * per + dirs + 1
    bound = 1024 + 32  # the fd LRU, plus the daemon's fixed fds
    assert after_read <= bound and daemon_fds(m.pid) <= bound, (after_read, daemon_fds(m.pid))


# -- the store under bad input, through the daemon ---------------------------------------

def test_fifo_in_the_store_fails_one_file_and_the_daemon_serves_on(src, verified_mount):
    write(src / "f", b"f" * 9000)
    write(src / "g", b"g" * 9000)
    m = verified_mount(src)
    obj = object_file(src, "f")
    os.unlink(obj)
    os.mkfifo(obj)
    assert read_errno(m.mountpoint / "f", 0, 10) == errno.EIO
    assert (m.mountpoint / "g").read_bytes() == b"g" * 9000
    assert f"{obj} is a FIFO, not a regular file" in m.log()


def test_oversized_block_size_in_the_store_is_corrupt(src, verified_mount):
    """A tree of 128 KiB blocks in the store (`seal` refuses to write one; another tool, or
    an older release, may have): EIO for that file, named, the others served."""
    from verityfuse import merkle
    from verityfuse.sealing import seal_path
    from verityfuse.store import Store

    write(src / "big", os.urandom(300000))
    write(src / "ok", b"ok")
    with Store(str(src / ".verityfuse"), create=True) as st:
        for name, bs in (("big", 131072), ("ok", 4096)):
            seal_path(st, str(src), name, merkle.Params(block_size=bs))
    m = verified_mount(src, seal=False)
    assert read_errno(m.mountpoint / "big", 0, 1) == errno.EIO
    assert "block size 131072 is larger than 65536" in m.log()
    assert (m.mountpoint / "ok").read_bytes() == b"ok"


def test_malformed_index_entry_is_named_by_the_daemon(src, verified_mount):
    write(src / "f", b"f" * 9000)
    m = verified_mount(src)
    with Store(str(src / ".verityfuse")) as st:
        e = entry_of_path(st, src / "f")
        p = os.path.join(st.path, *st._index_parts(e.key))
    m.unmount()
    with open(p, "wb") as f:
        f.write(b'{"version": 2, "path": 7, "digest": []}')
    m = verified_mount(src, seal=False)
    assert read_errno(m.mountpoint / "f", 0, 10) == errno.EIO
    log = m.log()
    assert f"{p}: malformed index entry: path, digest and signature must be strings" in log
    assert "Traceback" not in log


def test_no_request_writes_a_traceback(src, verified_mount):
    write(src / "f", b"f" * 9000)
    m = verified_mount(src)
    for offset in (2**64, 2**64 - 1, 10**40):
        with pytest.raises(OSError) as e:
            os.getxattr(m.mountpoint / "f", f"user.fsverity.merkle_tree.{offset}")
        assert e.value.errno == errno.EINVAL
    with open(src / "f", "r+b") as f:
        f.write(b"X")
    for _ in range(50):  # a request-triggered line, repeated: logged once
        drop_caches()
        assert read_errno(m.mountpoint / "f", 0, 1) == errno.EIO
    m.unmount()
    log = m.log()
    assert log.count("integrity failure: f: data block at offset 0") == 1
    assert "Traceback" not in log and "unexpected error" not in log


def test_create_racing_a_rename_never_strips_a_verity_file(tmp_path):
    """Another process renames a verity file over the name being created, between
    create's O_EXCL open and its lookup: create must not take the inode it then finds
    for the one it made (marking it not-verity would let the next open write it and
    read it unverified)."""
    import verityfuse
    from verityfuse.verifier import TreeBlockCache
    from verityfuse.view_local import LocalView

    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(3 * 4096 + 5)
    write(src / "sealed", data)
    verityfuse.seal(src)
    with Store(str(src / ".verityfuse")) as st:
        view = LocalView(str(src), st, TreeBlockCache())
        real_lookup = view.inodes.lookup

        def racing_lookup(parent, name):
            if name == b"new":  # the other process, between the two syscalls
                os.rename(src / "sealed", src / "new")
            return real_lookup(parent, name)

        try:
            view.inodes.lookup = racing_lookup
            with pytest.raises(OSError) as e:
                view.create(1, b"new", 0o644, os.O_WRONLY, None)
            assert e.value.errno == errno.EIO
            view.inodes.lookup = real_lookup
            ino = view.lookup(1, b"new").ino
            with pytest.raises(OSError) as e:
                view.open(ino, os.O_WRONLY)
            assert e.value.errno == errno.EPERM  # still a verity file
            fh = view.open(ino, os.O_RDONLY)
            try:
                assert fh.reader is not None and bytes(fh.reader.read(0, len(data))) == data
            finally:
                view.release(fh)
            assert view.close() == 1  # the one lookup above, never forgotten here
        finally:
            view.inodes.lookup = real_lookup


def test_enable_commit_that_cannot_verify_an_open_file_closes_it(tmp_path):
    """If a file open during an enable cannot be given a reader at commit (here the
    backing file grew between the build and the commit), that handle must not go on
    reading unverified bytes of what is now a verity file: it fails closed."""
    from verityfuse import ioctl, merkle
    from verityfuse.errors import SizeMismatch
    from verityfuse.verifier import TreeBlockCache
    from verityfuse.view_local import LocalView

    src = tmp_path / "src"
    src.mkdir()
    write(src / "f", os.urandom(5 * 4096))
    with Store(str(src / ".verityfuse"), create=True) as st:
        view = LocalView(str(src), st, TreeBlockCache())
        ino = view.lookup(1, b"f").ino
        fh = view.open(ino, os.O_RDONLY)
        try:
            job = view.enable_check(ino, fh, ioctl.parse_enable(ioctl.pack_enable(merkle.Params())))
            try:
                view.enable_build(job)
                with open(src / "f", "ab") as w:  # another process, before the commit
                    w.write(b"unverified tail")
                with pytest.raises(SizeMismatch):
                    view.enable_commit(job)
            finally:
                view.enable_finish(job)
            assert fh.reader is None
            with pytest.raises(OSError) as e:
                os.pread(fh.fd, 4096, 0)  # what the daemon does for a handle without a reader
            assert e.value.errno == errno.EBADF
        finally:
            view.release(fh)
            view.close()


@pytest.mark.parametrize("how", ["mknod-S_IFREG", "mknod-type-0", "create"])
def test_policy_require_refuses_every_way_to_create_a_regular_file(src, verified_mount, how):
    """Under --policy require no regular file can be made through the mount: create and
    mknod(2) (the kernel sends FUSE_MKNOD with S_IFREG for both mode kinds) give EPERM,
    log the refusal and leave nothing in SOURCE; other node types are not files."""
    import stat

    m = verified_mount(src, policy="require")
    target = m.mountpoint / "new"
    with pytest.raises(OSError) as e:
        if how == "create":
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))
        else:
            os.mknod(target, (stat.S_IFREG if how == "mknod-S_IFREG" else 0) | 0o644)
    assert e.value.errno == errno.EPERM
    assert not os.path.lexists(src / "new")
    assert "WARNING: policy require: refusing to create new\n" in m.log()
    os.mknod(m.mountpoint / "fifo", stat.S_IFIFO | 0o600)  # not a regular file: allowed
    assert stat.S_ISFIFO(os.lstat(src / "fifo").st_mode)


_LEASE_HOLDER = r"""
import fcntl, os, signal, sys
r, w = int(sys.argv[2]), int(sys.argv[3])
signal.signal(signal.SIGIO, lambda *a: os.write(w, b"B"))  # asked to give it up: says so, keeps it
fd = os.open(sys.argv[1], os.O_WRONLY)
fcntl.fcntl(fd, 1024, fcntl.F_WRLCK)  # F_SETLEASE
os.write(w, b"L")
os.read(r, 1)  # until the test says so
fcntl.fcntl(fd, 1024, fcntl.F_UNLCK)
os.write(w, b"U")
"""


class Lease:
    """A write lease on ``path``, held by another process (_LEASE_HOLDER) until
    ``release``: ``said()`` reads what it says (L taken, B asked to give it up, U gone)."""

    def __init__(self, path):
        self._to_child, self._from_test = os.pipe()
        self._from_child, self._to_test = os.pipe()
        self._holder = subprocess.Popen(
            [sys.executable, "-c", _LEASE_HOLDER, str(path), str(self._to_child),
             str(self._to_test)], pass_fds=(self._to_child, self._to_test))

    def said(self) -> bytes:
        return os.read(self._from_child, 1)

    def release(self):
        os.write(self._from_test, b"go")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._holder.kill()
        self._holder.wait()
        for fd in (self._to_child, self._from_test, self._from_child, self._to_test):
            os.close(fd)


@pytest.mark.mount
@pytest.mark.parametrize("mode,what", [("local", "read"), ("manifest", "read"),
                                       ("local", "truncate"), ("manifest", "descriptor")])
def test_a_lease_on_one_file_does_not_stall_the_mount(tmp_path, verified_mount, mode, what):
    """A file's owner may take a write lease on it; an open or a truncate(2) of it then
    waits until the lease is given up or lease-break-time (45 s) passes.  The daemon's
    open or truncate of the backing file must not wait on the request thread: meanwhile
    every other request of the mount is answered, and the waiting one completes once
    the lease is gone.  (The daemon truncated by path on the request thread before.)"""
    import threading

    src = tmp_path / "src"
    src.mkdir()
    write(src / "leased", b"L" * 10000)
    write(src / "other", b"O" * 10000)
    if mode == "local":
        m = verified_mount(src, seal=what == "read")  # a verity file cannot be truncated
    else:
        from verityfuse import manifest as mf
        mf.generate_key(str(tmp_path / "key.pem"), str(tmp_path / "pub.pem"))
        r = subprocess.run([sys.executable, "-m", "verityfuse.cli", "seal", str(src), "--manifest",
                            str(tmp_path / "m.json"), "--sign-key", str(tmp_path / "key.pem")],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        m = verified_mount(src, seal=False, extra_args=["--manifest", str(tmp_path / "m.json"),
                                                         "--trust-key", str(tmp_path / "pub.pem")])
    got = {}
    with Lease(src / "leased") as lease:
        assert lease.said() == b"L"
        leased = m.mountpoint / "leased"
        reader = threading.Thread(target=lambda: got.update(
            data=leased.read_bytes() if what == "read" else
            os.getxattr(leased, "user.fsverity.descriptor") if what == "descriptor" else
            os.truncate(leased, 5)))
        reader.start()
        assert lease.said() == b"B"  # the daemon's open asked for the lease
        assert (m.mountpoint / "other").read_bytes() == b"O" * 10000
        assert os.stat(m.mountpoint / "other").st_size == 10000
        assert reader.is_alive()  # still waiting for the lease, off the request thread
        lease.release()
        assert lease.said() == b"U"
        reader.join(timeout=60)
    if what == "read":
        assert got["data"] == b"L" * 10000
    elif what == "descriptor":  # a small file's, made from its bytes: it opened the file
        digest = os.getxattr(m.mountpoint / "leased", "user.fsverity.digest").decode()
        assert f"sha256:{hashlib.sha256(got['data']).hexdigest()}" == digest
    else:
        assert got == {"data": None}
        assert (src / "leased").read_bytes() == b"L" * 5


def test_no_local_verity_on_a_file_system_whose_handles_do_not_last(tmp_path, verified_mount):
    """Local verity is kept with the inode through its file handle.  A FUSE file system's
    handle is the node id its server gave, which it may give again, or change, once the
    kernel forgets the inode (after a cache eviction): a file enabled there lost its
    verity, or a new file took a deleted one's, and its tampered bytes were served
    unchecked.  On such a file system an enable is EOPNOTSUPP, `seal` refuses the files
    saying why, and the mount says so when it starts."""
    from conftest import fuse_helper, pattern

    pt = tmp_path / "pt"
    pt.mkdir()
    with fuse_helper("short_read_fs.py", pt, "f=12288:12288", what="the FUSE source"):
        r = subprocess.run(VF + ["seal", str(pt), "--store", str(tmp_path / "st")],
                           capture_output=True, text=True)
        assert r.returncode == 1 and r.stderr == (
            f"ERROR: can't seal '{pt}/f': its file system (fuse) gives no file handles that "
            f"last: verity cannot be kept with the inode\n"), r.stderr
        m = verified_mount(pt, seal=False)
        try:
            assert enable_error(m.mountpoint / "f") == "Operation not supported"
            assert (m.mountpoint / "f").read_bytes() == pattern(3 * 4096)
            assert (f"{pt}: its file system (fuse) gives no file handles that last: verity "
                    f"cannot be kept with the inode: its files are served unverified and "
                    f"fsverity enable fails (EOPNOTSUPP); use manifest mode") in m.log(), m.log()
        finally:
            m.unmount()


def test_a_store_inside_a_source_of_slash_is_hidden(tmp_path):
    """SOURCE / (a verified view of the whole system) with the store under it: the store
    is hidden as in any other SOURCE, reserved against every lookup of its name (it was
    looked for under "//", so it was served, and writable, like any directory)."""
    from verityfuse.verifier import TreeBlockCache
    from verityfuse.view_local import LocalView

    with Store(str(tmp_path / "store"), create=True) as st:
        view = LocalView("/", st, TreeBlockCache(), read_only=True)
        try:
            ino = 1
            for part in str(tmp_path).strip("/").split("/"):
                ino = view.lookup(ino, part.encode()).ino
            with pytest.raises(OSError) as e:
                view.lookup(ino, b"store")
            assert e.value.errno == errno.ENOENT
            (tmp_path / "other").mkdir()
            assert view.lookup(ino, b"other").ino > 1  # a name beside it is served
        finally:
            view.close()
