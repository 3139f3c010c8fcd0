"""Nothing that can wait on a disk runs on the trio thread (ops.py, ops_read.py), with a
fake view and no mount: the handlers are called in a trio run of their own, as the daemon's
loop would.  The adapter's worker threads are all taken (its limiter held), so a request
that needs one waits for it while another request is answered; one served on the trio
thread would have finished before the test looked.  No timings: trio tells when every task
is blocked."""

import os
import stat
from types import SimpleNamespace

import pytest
import trio
import trio.testing

from verityfuse import fsutil
from verityfuse.ops import VerityOperations
from verityfuse.ops_read import INLINE_READ
from verityfuse.view import Attr, DirHandle, FileHandle

CTX = SimpleNamespace(uid=0, gid=0, pid=0, umask=0o022)
DATA = bytes(range(256)) * 40  # 10240 bytes, each 256 the same: offsets show


class FakeView:
    """A view of one file and its directory, opened for real."""

    posix_acl = False

    def __init__(self, path):
        self.path = path

    def getattr(self, ino):
        return Attr(ino, stat.S_IFREG | 0o644, 1, 0, 0, len(DATA), 0, 0, 0)

    def open(self, ino, flags, ctx):
        return FileHandle(os.open(self.path, os.O_RDONLY | os.O_CLOEXEC), None)

    def opendir(self, ino, ctx):
        return DirHandle(None, os.open(os.path.dirname(self.path),
                                       os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))

    def release(self, fh):
        fh.close()

    def releasedir(self, dh):
        dh.close()


@pytest.fixture
def ops(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(DATA)
    fd = os.open(path, os.O_RDONLY)
    try:
        if fsutil.in_memory(fd):
            pytest.skip(f"{tmp_path} is memory-backed: its reads never wait")
        try:
            os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
        except OSError as e:
            pytest.skip(f"{tmp_path} cannot say whether a read would wait: {e}")
    finally:
        os.close(fd)
    return VerityOperations(FakeView(str(path)), threads=1)


def _drop_cache(path):
    """The file's pages leave the page cache: the next read of it waits on the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # only clean pages can be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


async def _while_threads_busy(ops, request):
    """Run ``request`` with every worker thread taken; returns (whether it had finished
    when every task was blocked and another request had been answered, its result)."""
    out = []

    async def run():
        out.append(await request())

    async with trio.open_nursery() as nursery:
        await ops.limiter.acquire()
        try:
            nursery.start_soon(run)
            await trio.testing.wait_all_tasks_blocked()
            assert (await ops.getattr(7, CTX)).st_ino == 7  # the loop answers meanwhile
            finished = bool(out)
        finally:
            ops.limiter.release()
    return finished, out[0]


def test_fsyncdir_runs_in_a_worker_thread(ops):
    async def main():
        dfh = await ops.opendir(1, CTX)
        try:
            return await _while_threads_busy(ops, lambda: ops.fsyncdir(dfh, False))
        finally:
            await ops.releasedir(dfh)

    assert trio.run(main) == (False, None)


def test_fsync_runs_in_a_worker_thread(ops):
    async def main():
        fi = await ops.open(2, os.O_RDONLY, CTX)
        try:
            return await _while_threads_busy(ops, lambda: ops.fsync(fi.fh, True))
        finally:
            await ops.release(fi.fh)

    assert trio.run(main) == (False, None)


def test_an_unverified_read_that_would_wait_runs_in_a_worker_thread(ops):
    async def main():
        fi = await ops.open(2, os.O_RDONLY, CTX)
        try:
            _drop_cache(ops.view.path)
            return await _while_threads_busy(ops, lambda: ops.read(fi.fh, 4096, 100))
        finally:
            await ops.release(fi.fh)

    finished, data = trio.run(main)
    assert (finished, bytes(data)) == (False, DATA[4096:4196])


@pytest.mark.parametrize("off,size", [(0, 100), (300, INLINE_READ), (len(DATA), 10),
                                      (len(DATA) + 5, 10)])
def test_an_unverified_read_of_cached_pages_is_answered_inline(ops, off, size):
    """Even with every worker thread taken: the kernel said (RWF_NOWAIT) it would not wait.
    Reads that cross or start past the end of the file end there."""
    async def main():
        fi = await ops.open(2, os.O_RDONLY, CTX)
        try:
            os.pread(ops.handles[fi.fh].fd, len(DATA), 0)  # every page cached
            return await _while_threads_busy(ops, lambda: ops.read(fi.fh, off, size))
        finally:
            await ops.release(fi.fh)

    finished, data = trio.run(main)
    assert (finished, bytes(data)) == (True, DATA[off:off + size])


def test_a_large_unverified_read_runs_in_a_worker_thread(ops):
    """Above INLINE_READ a thread round trip costs less than the copy on the loop."""
    async def main():
        fi = await ops.open(2, os.O_RDONLY, CTX)
        try:
            return await _while_threads_busy(ops, lambda: ops.read(fi.fh, 0, INLINE_READ + 1))
        finally:
            await ops.release(fi.fh)

    finished, data = trio.run(main)
    assert (finished, bytes(data)) == (False, DATA)
