"""VerifiedReader: the one place where backing file, tree and verifier meet.

A read is widened to whole blocks, read into a buffer, verified in one native
call (hashes of every block compared with the verified leaf hashes, split
across two cores), then sliced: only bytes that were hashed are ever returned.

The daemon calls ``read_inline`` on its request thread: when the backing data
is in memory (the page cache, checked with RWF_NOWAIT; or a tmpfs/ramfs file)
the whole request costs one pread and one native call, with no thread
hand-off.  When the read would wait for the disk, it returns None and the
daemon repeats the read with ``read`` in a worker thread, so the request loop
never waits on I/O.
"""

from __future__ import annotations

import errno
import os

from . import fsutil
from .errors import SizeMismatch
from .merkle import read_full


class VerifiedReader:
    """pread-like reads of a verity file that never return unverified bytes.

    A backing file that was truncated or extended after sealing fails the reads
    that touch its end (the sealed size is authoritative).
    """

    def __init__(self, fd: int, verifier, label: str, stats=None):
        self.fd = fd
        self.verifier = verifier
        self.label = label
        self.stats = stats  # a stats.Stats, or None
        self.data_size = verifier.tree.descriptor.data_size
        self.bs = verifier.params.block_size
        # Memory-backed files never wait; elsewhere, ask the kernel (RWF_NOWAIT).
        self.in_memory = fsutil.in_memory(fd)
        self.nowait = not self.in_memory
        self._buf = bytearray()  # reused by inline reads: one at a time, on one thread

    def _check_eof(self):
        if os.pread(self.fd, 1, self.data_size):
            raise SizeMismatch(f"{self.label}: backing file was extended past its sealed size {self.data_size}")

    def read_inline(self, offset: int, size: int):
        """``read`` if it needs no disk I/O, else None (then call ``read`` in a thread)."""
        if not (self.in_memory or self.nowait):
            return None
        return self._read(offset, size, inline=True)

    def read(self, offset: int, size: int):
        """Verified bytes [offset, offset+size) clipped to the sealed size (a memoryview)."""
        return self._read(offset, size, inline=False)

    def _read(self, offset: int, size: int, inline: bool):
        bs, data_size = self.bs, self.data_size
        if offset >= data_size or size <= 0:
            if offset >= data_size:
                self._check_eof()
            return b""
        end = min(offset + size, data_size)
        first = offset // bs
        start = first * bs
        stop = min(-(-end // bs) * bs, data_size)
        n = stop - start
        padded = -(-n // bs) * bs  # the last block of the file is hashed zero-padded
        if inline:
            if len(self._buf) < padded:
                # Never resized in place: a reply may still hold a view of the old one.
                self._buf = bytearray(max(padded, 1 << 20))
            mv = memoryview(self._buf)[:padded]
        else:
            mv = memoryview(bytearray(padded))
        got = self._pread(mv[:n], start, inline)
        if got is None:
            return None
        if got != n:
            # Regular files only read short at EOF, unless interrupted: retry once fully.
            got = read_full(self.fd, mv[:n], start)
            if got != n:
                raise SizeMismatch(f"{self.label}: backing file was truncated to {start + got} "
                                   f"bytes, sealed size {data_size}")
        if padded != n:
            mv[n:] = bytes(padded - n)
        if stop == data_size:
            self._check_eof()
        self.verifier.verify(first, mv)
        if self.stats is not None:
            self.stats.verified(padded // bs, end - offset)
        return mv[offset - start: end - start]

    def _pread(self, mv: memoryview, start: int, inline: bool):
        """Bytes read into ``mv``; None if an inline read would have to wait."""
        if not inline or self.in_memory:
            return os.preadv(self.fd, [mv], start)
        try:
            got = os.preadv(self.fd, [mv], start, os.RWF_NOWAIT)
        except OSError as e:
            if e.errno == errno.EAGAIN:
                return None
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self.nowait = False  # this filesystem cannot say: always use a thread
                return None
            raise
        # A short count with NOWAIT can mean "the rest is not cached": let a thread finish.
        return got if got == len(mv) or start + got >= self.data_size else None
