"""The native read path on a real mount: reads answered without Python are the same
bytes, counted in the status, and a block changed behind a warm daemon's back (its
leaves verified and held natively) still fails its read with EIO, reported once by
Python, in local and in manifest mode.  With VERITYFUSE_NO_FAST_READ every read is
Python's."""

import errno
import json
import os
import subprocess
import sys

import pytest

from verityfuse import manifest as mf
from conftest import flip, fuse_helper, write

MiB = 1 << 20


def status(m):
    return json.loads(os.getxattr(m.mountpoint, "user.verityfuse.status"))


def read_all(path):
    """Read with 1 MiB reads after dropping the file's pages: every read reaches the daemon."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        out = bytearray()
        while chunk := os.read(fd, MiB):
            out += chunk
        return bytes(out)
    finally:
        os.close(fd)


def read_at(path, offset, size=4096):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    files = {"big": os.urandom(3 * MiB + 5), "small": os.urandom(3000),
             "mid": os.urandom(100_000)}
    for name, data in files.items():
        write(src / name, data)
    return src, files


def _manifest(tmp_path, src):
    """Seal ``src`` with a signed manifest; the guest's mount arguments."""
    mf.generate_key(str(tmp_path / "key.pem"), str(tmp_path / "pub.pem"))
    r = subprocess.run([sys.executable, "-m", "verityfuse.cli", "seal", src, "--manifest",
                        tmp_path / "m.json", "--sign-key", tmp_path / "key.pem"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return ["--manifest", str(tmp_path / "m.json"), "--trust-key", str(tmp_path / "pub.pem")]


@pytest.mark.parametrize("mode", ["local", "manifest"])
def test_native_reads_and_a_block_changed_behind_their_back(tree, tmp_path, verified_mount,
                                                            mode):
    src, files = tree
    if mode == "local":
        m = verified_mount(src)
    else:
        m = verified_mount(src, seal=False, extra_args=_manifest(tmp_path, src))
    assert status(m)["fast_reads"] is not False
    for rep in range(2):
        for name, data in files.items():
            assert read_all(m.mountpoint / name) == data, (name, rep)
    st = status(m)
    fast = st["fast_reads"]
    # The small files from their first read; the big one once its leaves were verified.
    # A read whose backing pages were dropped meanwhile (/tmp on a disk, another test's
    # load) is declined as one that would wait, and Python serves it off the request
    # thread: one in ~40 runs under two busy CPUs.
    assert fast["reads"] + fast["declined_would_wait"] >= 2 * 2 + 4, f"{fast}"
    assert fast["declined_failed"] == 0 and st["integrity_failures"] == 0
    # At least: the kernel may ask again for a page it dropped meanwhile (reclaim, or
    # another test's load), so the daemon's count only has a floor (one run in ~25 under
    # two busy CPUs served a 4 KiB page more).
    assert st["bytes_served"] >= 2 * sum(len(d) for d in files.values())
    # The big file's second round of 1 MiB reads: sent by the shim's reply thread.
    assert fast["replies_apart"] >= 1, f"{fast}"

    # The host changes one byte of the big file: the warm daemon holds its leaves.
    off = 2 * MiB + 4096 * 3 + 17
    flip(src / "big", off)
    block = off - off % 4096
    with pytest.raises(OSError) as e:
        read_at(m.mountpoint / "big", block)
    assert e.value.errno == errno.EIO
    with pytest.raises(OSError) as e:
        read_all(m.mountpoint / "big")
    assert e.value.errno == errno.EIO
    # Its other blocks, and the other files, still read.
    assert read_at(m.mountpoint / "big", block + 4096) == files["big"][block + 4096:block + 8192]
    assert read_all(m.mountpoint / "mid") == files["mid"]
    st = status(m)
    assert st["integrity_failures"] >= 1
    assert st["failures"][0]["offset"] == block
    assert st["fast_reads"]["declined_failed"] >= 1


def test_large_replies_sent_apart_from_concurrent_readers_are_exact(tmp_path, verified_mount):
    """Large native answers are sent from the shim's reply thread while the next request
    is read and hashed: with four readers at once, the reply buffers are all in use, and
    every byte must still be the file's (no buffer filled again before it was sent)."""
    import threading

    src = tmp_path / "src"
    src.mkdir()
    files = {f"f{i}": os.urandom(8 * MiB + 4096 * i + 1) for i in range(4)}
    for name, data in files.items():
        write(src / name, data)
    m = verified_mount(src)
    for name, data in files.items():  # first round: Python verifies the leaves
        assert read_all(m.mountpoint / name) == data
    wrong = []

    def reader(name):
        for _ in range(3):
            if read_all(m.mountpoint / name) != files[name]:
                wrong.append(name)

    threads = [threading.Thread(target=reader, args=(n,)) for n in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
    st = status(m)
    assert st["integrity_failures"] == 0 and st["fast_reads"]["declined_failed"] == 0
    assert st["fast_reads"]["replies_apart"] >= 4 * 3 * 4, f"{st['fast_reads']}"
    # At least, as in test_native_reads_and_a_block_changed_behind_their_back.
    assert st["bytes_served"] >= 4 * sum(map(len, files.values()))


def test_a_file_extended_behind_an_open_handle_fails_its_last_block(tree, verified_mount):
    """An open fails on a file whose size changed; a handle opened before still reads its
    other blocks, and the read of its last block checks where the file ends."""
    src, files = tree
    data = files["mid"]
    m = verified_mount(src)
    fd = os.open(m.mountpoint / "mid", os.O_RDONLY)
    try:
        assert os.pread(fd, MiB, 0) == data
        with open(src / "mid", "ab") as f:
            f.write(b"appended by the host")
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        last = len(data) - len(data) % 4096
        with pytest.raises(OSError) as e:
            os.pread(fd, 4096, last)
        assert e.value.errno == errno.EIO
        assert os.pread(fd, 4096, 0) == data[:4096]  # not its end: unchanged
    finally:
        os.close(fd)
    assert "backing file was extended past its sealed size 100000" in m.log()


def test_without_the_native_path_python_serves_every_read(tree, verified_mount, monkeypatch):
    monkeypatch.setenv("VERITYFUSE_NO_FAST_READ", "1")
    src, files = tree
    m = verified_mount(src)
    for name, data in files.items():
        assert read_all(m.mountpoint / name) == data
    st = status(m)
    assert st["fast_reads"] is False
    assert st["verified_reads"] >= 3 and st["bytes_served"] >= sum(map(len, files.values()))


@pytest.fixture
def fuse_source(tmp_path):
    """SOURCE seen through an unverified FUSE passthrough (bench/plain_passthrough.py), as
    a confidential guest sees its virtio-fs share: a file system that refuses
    RWF_NOWAIT.  Yields (backing dir, the passthrough's mount point), mounted."""
    backing, pt = tmp_path / "backing", tmp_path / "pt"
    backing.mkdir()
    pt.mkdir()
    with fuse_helper(os.path.join("..", "bench", "plain_passthrough.py"), pt,
                     before=[str(backing)], what="the FUSE source"):
        yield backing, pt


def test_a_fuse_source_is_read_natively_where_its_pages_are_cached(fuse_source, tmp_path,
                                                                  verified_mount):
    """RWF_NOWAIT is refused on a FUSE source: the page cache is asked (cachestat), cached
    pages are read and verified natively, and a block the host changes and evicts is read
    again by Python and fails with EIO."""
    backing, pt = fuse_source
    data = os.urandom(4 * MiB)
    write(backing / "big", data)
    args = _manifest(tmp_path, backing) + ["--store", str(backing / ".verityfuse")]
    m = verified_mount(pt, seal=False, extra_args=args)
    fd = os.open(m.mountpoint / "big", os.O_RDONLY)
    try:
        assert os.pread(fd, 4 * MiB, 0) == data  # Python, in a thread: fills the caches
        before = status(m)["fast_reads"]
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the mount's pages, not pt's
        for off in range(0, 3 * MiB, 256 * 1024):
            assert os.pread(fd, 4096, off) == data[off:off + 4096]
        after = status(m)["fast_reads"]
        native, waited = (after[k] - before[k] for k in ("reads", "declined_would_wait"))
        # Every read natively, but one whose page of pt's the kernel dropped meanwhile
        # (memory pressure, another test's drop_caches) is declined as one that would wait.
        assert native + waited == 12 and native >= 1, (before, after)
        # The host changes a block and it leaves the guest's cache: Python reads it again.
        off = MiB + 8192
        flip(backing / "big", off + 5)
        pfd = os.open(pt / "big", os.O_RDONLY)
        os.posix_fadvise(pfd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(pfd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        with pytest.raises(OSError) as e:
            os.pread(fd, 4096, off)
        assert e.value.errno == errno.EIO
        assert os.pread(fd, 4096, off + 4096) == data[off + 4096:off + 8192]
    finally:
        os.close(fd)
    assert status(m)["failures"][0]["offset"] == off
