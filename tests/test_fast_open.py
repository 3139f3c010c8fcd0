"""The native open path (fast_opens, _fastopen.c) on a real local mount: read-only opens
of sealed files answered without Python serve the same bytes and the same errors, are
counted in the status and in the per-uid budget, hand a handle to Python when one of
its requests needs Python (a block changed behind the daemon's back still fails with
EIO), and never open another file than the one looked up, however the inode table's
fds are evicted and reused.  With VERITYFUSE_NO_FAST_OPEN every open is Python's."""

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest

from verityfuse import merkle
from verityfuse.testing import VerifiedMount, fuse_unavailable_reason, seal_tree

from conftest import flip, write

pytestmark = pytest.mark.mount

KiB = 1 << 10
PRLIMIT = shutil.which("prlimit")


def status(m):
    return json.loads(os.getxattr(m.mountpoint, "user.verityfuse.status"))


def opens(m):
    return status(m)["fast_opens"]


def read(path, flags=os.O_RDONLY):
    fd = os.open(path, flags)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        out = bytearray()
        while chunk := os.read(fd, 1 << 20):
            out += chunk
        return bytes(out)
    finally:
        os.close(fd)


@pytest.fixture
def files(tmp_path):
    """A source of sealed files: ``first`` (read first: an open on a file system the
    daemon has not read from yet is Python's, and tells it how to read there), one
    block, one leaf (100 KiB), more leaves (3 MiB), empty."""
    src = tmp_path / "src"
    src.mkdir()
    data = {"first": os.urandom(3000), "small": os.urandom(3000), "mid": os.urandom(100 * KiB),
            "big": os.urandom(3 * 1024 * KiB + 5), "empty": b""}
    for name, content in data.items():
        write(src / name, content)
    return src, data


def test_sealed_files_are_opened_natively_and_read_exactly(files, verified_mount):
    src, data = files
    m = verified_mount(src)
    assert read(m.mountpoint / "first") == data["first"]
    for name in ("small", "mid", "big", "empty"):  # their lookups come after: offered
        assert read(m.mountpoint / name) == data[name], name
    got = opens(m)
    # small and mid natively; big has leaves no read verified yet, empty nothing to read
    assert (got["opens"], got["releases"], got["open"], got["adopted"]) == (2, 2, 0, 0)
    assert status(m)["open_files"] == 0
    assert status(m)["integrity_failures"] == 0


def test_a_stat_reads_no_tree_block_and_the_native_open_verifies_the_first(files,
                                                                          verified_mount):
    """A lookup only offers the file: a stat (ls -l, find) pays for no tree block; the
    native open of a file of one leaf block verifies that block (prepare) first."""
    src, data = files
    m = verified_mount(src)
    read(m.mountpoint / "first")
    before = status(m)["tree_cache"]
    assert os.stat(m.mountpoint / "mid").st_size == 100 * KiB
    assert status(m)["tree_cache"] == before
    assert read(m.mountpoint / "mid") == data["mid"]
    st = status(m)
    assert st["tree_cache"]["misses"] == before["misses"] + 1  # its one leaf, verified once
    assert (st["fast_opens"]["opens"], st["fast_opens"]["declined_no_leaf"]) == (1, 0)


def test_native_handles_are_open_files_until_closed(files, verified_mount):
    src, data = files
    m = verified_mount(src)
    read(m.mountpoint / "first")
    fds = [os.open(m.mountpoint / name, os.O_RDONLY) for name in ("small", "mid", "small")]
    try:
        st = status(m)
        assert (st["open_files"], st["fast_opens"]["open"]) == (3, 3)
        assert [os.pread(fd, 1 << 20, 0) for fd in fds] == \
            [data["small"], data["mid"], data["small"]]
    finally:
        for fd in fds:
            os.close(fd)
    st = status(m)
    assert (st["open_files"], st["fast_opens"]["open"], st["fast_opens"]["releases"]) == (0, 0, 3)


def test_a_block_changed_behind_a_native_handle_fails_with_eio(files, verified_mount):
    """The native read declines the changed block; Python adopts the handle and fails
    the read with the mismatch the native read saw, and reports it once."""
    src, data = files
    m = verified_mount(src)
    read(m.mountpoint / "first")
    assert read(m.mountpoint / "mid") == data["mid"]  # offered, its leaf verified
    flip(src / "mid", 50 * KiB)
    fd = os.open(m.mountpoint / "mid", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(fd, 4096, 0) == data["mid"][:4096]
        with pytest.raises(OSError) as e:
            os.pread(fd, 4096, 48 * KiB)
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)
    st = status(m)
    assert (st["fast_opens"]["opens"], st["fast_opens"]["adopted"]) == (2, 1)
    # At least once: the kernel retries a failed readahead page with a read of its own.
    assert st["integrity_failures"] >= 1 and st["failures"][0]["offset"] == 48 * KiB
    assert st["open_files"] == 0
    assert "mid: data block at offset 49152: expected hash" in m.log()


@pytest.mark.parametrize("change", ["truncated", "extended"])
def test_a_file_resized_behind_the_daemon_fails_its_open_as_before(files, verified_mount,
                                                                   change):
    src, data = files
    m = verified_mount(src)
    read(m.mountpoint / "first")
    assert read(m.mountpoint / "small") == data["small"]
    with open(src / "small", "r+b") as f:
        f.truncate(100 if change == "truncated" else 5000)
    with pytest.raises(OSError) as e:
        os.open(m.mountpoint / "small", os.O_RDONLY)
    assert e.value.errno == errno.EIO
    assert opens(m)["declined_failed"] == 1
    size = 100 if change == "truncated" else 5000
    assert f"small: backing file is {size} bytes, sealed size 3000" in m.log()


def test_write_opens_of_sealed_files_are_refused_by_python(files, verified_mount):
    src, data = files
    m = verified_mount(src)
    read(m.mountpoint / "first")
    read(m.mountpoint / "small")
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        with pytest.raises(OSError) as e:
            os.open(m.mountpoint / "small", flags)
        assert e.value.errno == errno.EPERM, flags
    got = opens(m)
    assert (got["opens"], got["declined_refused"]) == (1, 3)
    assert (src / "small").read_bytes() == data["small"]


def test_native_handles_count_in_the_per_uid_budget(files, verified_mount):
    src, data = files
    m = verified_mount(src, options=["max_handles_per_uid=4"])
    read(m.mountpoint / "first")
    fds = [os.open(m.mountpoint / "small", os.O_RDONLY) for _ in range(4)]
    try:
        assert opens(m)["open"] == 4
        with pytest.raises(OSError) as e:
            os.open(m.mountpoint / "mid", os.O_RDONLY)
        assert e.value.errno == errno.EMFILE
        os.close(fds.pop())
        fds.append(os.open(m.mountpoint / "mid", os.O_RDONLY))
        assert os.pread(fds[-1], 10, 0) == data["mid"][:10]
    finally:
        for fd in fds:
            os.close(fd)
    assert "refusing more with EMFILE" in m.log()


def test_ioctls_and_fsync_of_a_native_handle_use_its_fd_and_leave_it_native(files,
                                                                            verified_mount):
    """FS_IOC_GETFLAGS names the handle: Python answers it from the handle's fd (lsattr
    shows the verity flag), as it does an fsync, without taking the handle over."""
    src, data = files
    m = verified_mount(src)
    read(m.mountpoint / "first")
    out = subprocess.run(["lsattr", str(m.mountpoint / "small")], capture_output=True,
                         text=True, check=True).stdout
    assert out.split()[0].count("V") == 1
    fd = os.open(m.mountpoint / "small", os.O_RDONLY)
    try:
        os.fsync(fd)
        os.fdatasync(fd)
        assert os.pread(fd, 4096, 0) == data["small"]
    finally:
        os.close(fd)
    got = opens(m)
    assert (got["adopted"], got["open"]) == (0, 0) and got["opens"] >= 2, got  # lsattr's own


def test_a_file_truncated_behind_a_native_handle_fails_its_read_not_its_close(
        files, verified_mount):
    """As for a handle Python opened: the size was checked at the open; a later change
    is found by the read that meets it (EIO), while an fsync and the close succeed."""
    src, data = files
    m = verified_mount(src)
    read(m.mountpoint / "first")
    fd = os.open(m.mountpoint / "mid", os.O_RDONLY)
    try:
        os.truncate(src / "mid", 10 * KiB)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        with pytest.raises(OSError) as e:
            os.pread(fd, 4096, 12 * KiB)
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)
    st = status(m)
    assert (st["fast_opens"]["adopted"], st["open_files"]) == (1, 0)
    assert st["integrity_failures"] >= 1


class LimitedMount(VerifiedMount):
    """A daemon started with 128 file descriptors: an inode LRU of 16."""

    command = (PRLIMIT or "prlimit", "--nofile=128", sys.executable, "-m", "verityfuse.cli")


@pytest.fixture
def mounts():
    reason = fuse_unavailable_reason()
    if reason is not None:
        pytest.skip(f"FUSE is not usable here: {reason}")
    made = []
    yield made
    for m in made:
        m.unmount()


@pytest.mark.skipif(PRLIMIT is None, reason="needs prlimit")
def test_evicted_inode_fds_are_never_used_for_another_file(tmp_path, mounts):
    """With a daemon of few fds (the inode LRU keeps 16), the O_PATH fd a native open
    was offered is closed and its number reused for other files while names are looked
    up: every open still serves its own file's bytes."""
    src = tmp_path / "src"
    src.mkdir()
    data = {f"f{i:03d}": os.urandom(1000 + i) for i in range(200)}
    for name, content in data.items():
        write(src / name, content)
    seal_tree(src)
    (tmp_path / "mnt").mkdir()
    m = LimitedMount(src, tmp_path / "mnt")
    mounts.append(m)
    read(m.mountpoint / "f000")
    for rep in range(2):
        for name, content in data.items():
            assert read(m.mountpoint / name) == content, (name, rep)
    got = opens(m)
    assert got["opens"] > 100 and got["inodes"] <= 16, got
    assert status(m)["integrity_failures"] == 0
    # f000's fd was evicted long ago, its name is still cached (no new lookup): its open
    # is Python's, which offers it again, so the next one is native.
    before = opens(m)["opens"]
    for _ in range(2):
        assert read(m.mountpoint / "f000") == data["f000"]
    assert opens(m)["opens"] >= before + 1


def test_opens_are_refused_natively_too_once_the_tripwire_refuses(files, verified_mount):
    src, data = files
    m = verified_mount(src, extra_args=["--on-corruption", "refuse"])
    read(m.mountpoint / "first")
    assert read(m.mountpoint / "mid") == data["mid"]
    flip(src / "mid", 0)
    with pytest.raises(OSError) as e:
        read(m.mountpoint / "mid")
    assert e.value.errno == errno.EIO
    with pytest.raises(OSError) as e:
        os.open(m.mountpoint / "small", os.O_RDONLY)  # offered at its lookup: refused
    assert e.value.errno == errno.EIO
    assert opens(m)["declined_refused"] >= 1
    assert status(m)["tripwire"]["refusing_opens"] is True


def test_without_it_every_open_is_python_s(files, verified_mount, monkeypatch):
    monkeypatch.setenv("VERITYFUSE_NO_FAST_OPEN", "1")
    src, data = files
    m = verified_mount(src)
    for name in ("first", "small", "mid"):
        assert read(m.mountpoint / name) == data[name]
    assert "fast_opens" not in status(m)


# -- the C tables, in-process (no FUSE) ------------------------------------------------

native = merkle._hashblocks
needs_native = pytest.mark.skipif(native is None or not hasattr(native, "fast_open_entry"),
                                  reason="native module not built")


@pytest.fixture
def c_opens(tmp_path):
    """An O_PATH fd of a 3000-byte file, offered as inode 7 (a one-block file: its
    root hash is its expected hash), and the native open path's state reset after."""
    path = write(tmp_path / "f", os.urandom(3000))
    pathfd = os.open(path, os.O_PATH)
    root = bytes(range(32))  # any hash: nothing is read here
    key = bytes([1]) + root
    assert native.fast_inode_put(7, pathfd, 1, b"", 4096, 3000, key, root, 0) is True
    yield pathfd
    native.fast_open_set(None, None, None, False)
    native.fast_open_close()
    os.close(pathfd)


@needs_native
def test_a_failing_or_refusing_admit_leaves_the_open_to_python(c_opens):
    calls = []

    def boom(uid):
        calls.append(uid)
        raise RuntimeError("a bug in the budget")

    native.fast_open_set(boom, calls.append, boom, False)
    assert native.fast_open(7, os.O_RDONLY, 1000) is None  # no exception escapes either
    native.fast_open_set(lambda uid: None, calls.append, boom, False)
    assert native.fast_open(7, os.O_RDONLY, 1000) is None
    assert calls == [1000]  # nothing to release: no handle was made
    assert native.fast_open_info()["declined_refused"] >= 2


@needs_native
def test_an_open_that_fails_after_admit_gives_its_handle_back(c_opens, tmp_path):
    released = []
    native.fast_open_set(lambda uid: 41, released.append, lambda ino: False, False)
    with open(tmp_path / "f", "ab") as f:
        f.write(b"x")  # 3001 bytes: not its sealed size
    assert native.fast_open(7, os.O_RDONLY, 0) is None
    assert released == [41]
    os.truncate(tmp_path / "f", 3000)
    fh = native.fast_open(7, os.O_RDONLY, 0)
    assert fh == 41 and native.fast_native(41)[0] == 7
    assert native.fast_open(9, os.O_RDONLY, 0) is None  # never offered
    assert native.fast_open(7, os.O_RDWR, 0) is None  # not read-only


@needs_native
def test_the_offered_inodes_are_bounded_and_dropped(c_opens):
    root = bytes(range(32))
    key = bytes([1]) + root
    n = 1
    while native.fast_inode_put(1000 + n, c_opens, 1, b"", 4096, 3000, key, root, 0):
        n += 1
    assert n == 8192 == native.fast_open_info()["inodes"]
    for i in range(1, n):
        native.fast_inode_drop(1000 + i)
    native.fast_inode_drop(7)
    assert native.fast_open_info()["inodes"] == 0
    with pytest.raises(ValueError):  # a one-block file without its root hash
        native.fast_inode_put(7, c_opens, 1, b"", 4096, 3000, key, b"", 0)
