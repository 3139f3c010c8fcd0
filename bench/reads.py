"""Reads through the mounts: sequential, random 4 KiB, memory after many files,
and the copy costs the sequential ceiling is computed from.

Every pass records wall time, the reader's CPU time (this thread,
CLOCK_THREAD_CPUTIME_ID) and the daemon's CPU time (the whole process's
CPU-time clock, common.proc_cpu, so worker and helper threads count).
"""

from __future__ import annotations

import mmap
import os
import random
import time

from common import MiB, fadvise_dontneed
from passlog import Others, settle


class Pass:
    """One timed pass.  ``others``: CPU seconds everything else on the machine used
    meanwhile (common.Others); ``noise`` is that as a share of the machine."""

    __slots__ = ("wall", "reader_cpu", "daemon_cpu", "nbytes", "count", "open_s", "others")

    def __init__(self, wall, reader_cpu, daemon_cpu, nbytes=0, count=0, open_s=0.0, others=0.0):
        self.wall, self.reader_cpu, self.daemon_cpu = wall, reader_cpu, daemon_cpu
        self.nbytes, self.count, self.open_s, self.others = nbytes, count, open_s, others

    @property
    def noise(self):
        return Others.share(self.others, self.wall)

    def as_dict(self):
        return dict({k: getattr(self, k) for k in self.__slots__}, noise=self.noise)


def _daemon_cpu(mount):
    return mount.cpu() if mount is not None else 0.0


def seq_pass(path, mount, buf, expect, label=None):
    """Drop the file's pages (posix_fadvise DONTNEED through the mount: only this file,
    not the machine's caches), then read it whole with 1 MiB reads (open included).
    The backing file is in tmpfs: its pages are its storage and stay."""
    settle()
    fadvise_dontneed(path)
    others = Others(mount and mount.pid, label=label)
    d0, c0, t0 = _daemon_cpu(mount), time.thread_time(), time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    n = 0
    try:
        while True:
            k = os.readv(fd, [buf])
            if not k:
                break
            n += k
    finally:
        os.close(fd)
    t1, c1, d1 = time.perf_counter(), time.thread_time(), _daemon_cpu(mount)
    if n != expect:
        raise RuntimeError(f"{path}: read {n} bytes, expected {expect}")
    return Pass(t1 - t0, c1 - c0, d1 - d0, nbytes=n, others=others.stop())


def random_offsets(size, count, seed):
    rng = random.Random(seed)
    return [rng.randrange(size // 4096) * 4096 for _ in range(count)]


def random_pass(path, mount, offsets, cold, label=None):
    """``count`` aligned 4 KiB preads, each a page-cache miss that reaches the daemon.

    warm (cold=False): the kernel still knows the inode and the daemon has served
    the file before (its tree blocks are cached); the file's pages are dropped
    with posix_fadvise(DONTNEED) right before the pass.  cold: the caller
    restarted the daemons: a new mount has no pages, dentries or inodes, so the
    open looks the file up again and the daemon starts with nothing cached.
    Random buffered reads get no readahead: each miss is one 4 KiB FUSE_READ (checked with
    plain_passthrough.py --stats).  Offsets repeat by chance (~N^2/2 of the
    file's pages) and those few reads hit the page cache, alike for every mount.
    """
    buf = mmap.mmap(-1, 4096)
    settle()
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    open_s = time.perf_counter() - t0
    try:
        if not cold:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        others = Others(mount and mount.pid, label=label)
        d0, c0, t0 = _daemon_cpu(mount), time.thread_time(), time.perf_counter()
        for off in offsets:
            if os.preadv(fd, [buf], off) != 4096:
                raise RuntimeError(f"{path}: short read at {off}")
        t1, c1, d1 = time.perf_counter(), time.thread_time(), _daemon_cpu(mount)
    finally:
        os.close(fd)
        buf.close()
    return Pass(t1 - t0, c1 - c0, d1 - d0, count=len(offsets), open_s=open_s,
                others=others.stop())


def aligned_buffer(size=MiB):
    """A page-aligned buffer (mmap): the kernel's copies into it are not misaligned."""
    return mmap.mmap(-1, size)


def copy_costs(source_file, scratch, buf, mib=256):
    """CPU microseconds per MiB of the two kernel copies a FUSE read is made of.

    read:  pread of 1 MiB from tmpfs pages into a user buffer: what the reader's
           read() from the FUSE page cache costs, and the daemon's pread of the
           backing file;
    write: pwrite of 1 MiB from a user buffer into existing tmpfs pages: the
           closest measurable stand-in for the daemon's reply, which the kernel
           copies from the daemon's buffer into the FUSE page cache.
    """
    size = min(os.path.getsize(source_file), mib * MiB) // MiB * MiB
    out = {}
    # Not part of the ceiling: the same pread into a buffer 16 bytes past a page
    # boundary, where a freshly mmapped 1 MiB bytearray's data starts (the kernel's
    # copy can be much slower there).
    odd_map = mmap.mmap(-1, MiB + mmap.PAGESIZE)
    odd = memoryview(odd_map)[16:16 + MiB]
    fd = os.open(source_file, os.O_RDONLY)
    try:
        for key, target in (("read", buf), ("read_off16", odd)):
            c0 = time.thread_time()
            for off in range(0, size, MiB):
                os.preadv(fd, [target], off)
            out[key] = (time.thread_time() - c0) / (size / MiB) * 1e6
    finally:
        os.close(fd)
        odd.release()
        odd_map.close()
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size < size:  # allocate the pages once, outside the timing
            for off in range(0, size, MiB):
                os.pwritev(fd, [buf], off)
        c0 = time.thread_time()
        for off in range(0, size, MiB):
            os.pwritev(fd, [buf], off)
        out["write"] = (time.thread_time() - c0) / (size / MiB) * 1e6
    finally:
        os.close(fd)
    return out
