"""VerifiedReader: the one place where backing file, tree and verifier meet.

A read is widened to whole blocks, read into a buffer, verified in one native
call per piece (hashes of every block compared with the verified leaf hashes,
split across two cores), then sliced: only bytes that were hashed are ever
returned.

Most requests are up to 1 MiB of data in memory (a small file's whole read
among them): ``read_one`` answers them in one native call that reads, hashes and
compares (``Params.read_verifier``: the GIL released, the copy and the hashing
shared by both cores), with nothing else in the way (a 4 KiB read costs ~6 us).

The daemon drives ``read_steps`` for the others, on its request thread: a
generator that reads and verifies one piece (``STEP`` bytes) per step, so that
between steps the daemon can answer a metadata request, which then waits for
one piece at most, not for a whole 1 MiB read. When the backing data is in
memory (the page cache, checked with RWF_NOWAIT; or a tmpfs/ramfs file) a
request costs one pread and one native call per piece with no thread hand-off;
when a read would wait for the disk, the generator returns None and the daemon
repeats the read with ``read`` in a worker thread, so the request loop never
waits on I/O.

``attach_reader`` is how a reader is put on an open file, wherever that happens.

Buffers are page-aligned (anonymous mmap): the kernel copies into a buffer that
starts a few bytes past a page boundary three times slower.
"""

from __future__ import annotations

import errno
import mmap
import os
from typing import Generator, List, Optional, Tuple, Union

from . import fsutil
from .errors import SizeMismatch
from .treebuild import private_map, read_full
from .verifier import Verifier

STEP = 256 * 1024  # a piece: ~0.1-0.2 ms of pread and hashing on one core
# read_one's limit: one native call of up to 1 MiB holds the request thread ~0.3 ms (both
# cores hash it), still well under a metadata request's 1 ms budget, and a sequential
# reader's 1 MiB requests then cost one call instead of four steps.
ONE_CALL = 1 << 20
ALIGN_FROM = 64 * 1024  # below this, a misaligned copy costs less than an mmap
CACHESTAT = -1  # read_mode: RWF_NOWAIT refused; ask the page cache, never for the end
Data = Union[bytes, memoryview]


class BufferPool:
    """Page-aligned buffers for reads on the request thread.

    A buffer goes back to the pool when its handler returns: pyfuse3 sends the
    reply before any other task runs, so no other read can take it while the
    reply still points into it.  Reads in worker threads get buffers of their own.
    """

    def __init__(self, keep: int = 8):
        self.free: List[mmap.mmap] = []
        self.keep = keep

    def take(self, n: int) -> mmap.mmap:
        for i, buf in enumerate(self.free):
            if len(buf) >= n:
                return self.free.pop(i)
        return private_map(max(n, 1 << 20))

    def give(self, buf: mmap.mmap):
        if len(self.free) < self.keep:
            self.free.append(buf)


POOL = BufferPool()


def attach_reader(fd: int, tree, cache, label: str, stats=None, *, check_size: bool = True,
                  what: str = "backing file", sealed: str = "sealed size") -> "VerifiedReader":
    """The one way a verified reader is put on an open file: both views, the library
    (``open_verified``) and the offline checks (``verify``, ``verify --manifest``).

    ``tree`` is the trusted tree (a store object opened by a trusted digest, so its
    descriptor's data size is the sealed size); ``label`` names the file in every
    error.  First the file must be its sealed size (its fstat, now): a file truncated
    or extended since it was sealed fails here with SizeMismatch,
    ``"<label>: <what> is N bytes, <sealed> M"``, as an open on a mount does, before a
    byte is read.  ``check_size=False`` is for a caller that reads the file whole and
    reports the first failure in file order (a changed block before a truncation): the
    reader fails a read that meets the end of a truncated or extended file anyway.
    """
    if check_size:
        size, want = os.fstat(fd).st_size, tree.descriptor.data_size
        if size != want:
            name = str(label)
            raise SizeMismatch(f"{name}: {what} is {size} bytes, {sealed} {want}", name)
    return VerifiedReader(fd, Verifier(tree, cache, label), label, stats)


class VerifiedReader:
    """pread-like reads of a verity file that never return unverified bytes.

    A backing file that was truncated or extended after sealing fails the reads
    that touch its end (the sealed size is authoritative).
    """

    # What the reads in worker threads wait on beyond a local file (a registry's blob):
    # the adapter lets only a few threads wait on one (ops_read.ThreadGates), and asks
    # ``read_cached`` first, which answers without waiting on it (or says None).
    wait_key: Optional[tuple] = None

    def read_cached(self, offset: int, size: int) -> Optional[bytes]:
        return None

    def __init__(self, fd: int, verifier, label: str, stats=None):
        self.fd = fd
        self.verifier = verifier
        self.label = label
        self.stats = stats  # a stats.Stats, or None
        self.data_size = verifier.tree.descriptor.data_size
        self.bs = verifier.params.block_size
        self.step = max(self.bs, STEP // self.bs * self.bs)
        # Memory-backed files never wait; elsewhere, ask the kernel (RWF_NOWAIT); where it
        # refuses that (FUSE, virtio-fs), ask the page cache (cachestat, decided then).
        self.in_memory = fsutil.in_memory(fd)
        self.nowait = not self.in_memory and fsutil.nowait_supported(fd)
        self.cachestat: Optional[bool] = None
        self.read_verify = verifier.params.read_verifier()

    def _check_eof(self):
        self._ends_here(0)

    def span(self, offset: int, size: int) -> Tuple[int, int, int]:
        """The one block alignment of a request, ``(start, end, stop)``: ``[offset, end)``
        is what it may return (clipped to the sealed size), ``[start, stop)`` the whole
        blocks that hold it (``stop`` clipped to the sealed size too: the file's last block
        is short, and hashed zero-padded).  ``stop == data_size`` says the read reaches
        the last block, which is followed by the end-of-file check."""
        bs, data_size = self.bs, self.data_size
        end = offset + size
        if end > data_size:
            end = data_size
        stop = end + (-end) % bs
        if stop > data_size:
            stop = data_size
        return offset - offset % bs, end, stop

    def read(self, offset: int, size: int) -> Data:
        """Verified bytes [offset, offset+size) clipped to the sealed size (any thread)."""
        steps = self._steps(offset, size, inline=False)
        try:
            while True:
                next(steps)
        except StopIteration as done:
            return done.value

    def read_one(self, offset: int, size: int) -> Optional[Data]:
        """The common read on the request thread, in one native call: up to ONE_CALL
        bytes inside the file (a small file's whole read too), data in memory.  None
        when the read is not of that kind or would wait on I/O: then use ``read_steps``."""
        if offset >= self.data_size or size <= 0:
            return None  # at or past the end: read_steps' end-of-file check answers
        start, end, stop = self.span(offset, size)
        n = stop - start
        padded = n + (-n) % self.bs  # the file's last block is hashed zero-padded
        if padded > ONE_CALL:
            return None
        flags = self.inline_flags(start, n, stop)
        if flags is None:
            return None
        first = start // self.bs
        buf = POOL.take(padded)
        try:
            mv = memoryview(buf)[:padded]
            expected = self.verifier.expected_hashes(first, padded // self.bs)
            try:  # pread, hash and compare in one native call, both cores, no GIL
                bad = self.read_verify(mv, expected, self.fd, start, n, flags)
            except (BlockingIOError, EOFError):
                return None  # would wait, or short: read_steps retries (names a truncation)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self.nowait = False  # this filesystem cannot say: always use a thread
                return None
            if bad >= 0:
                self.verifier.mismatch(first, mv, expected, bad)
            if stop == self.data_size and not self._ends_here(flags):
                return None  # not cached past the end: read_steps finds out in a thread
        finally:
            POOL.give(buf)  # reused only after this read's reply is sent
        if self.stats is not None:
            self.stats.verified(padded // self.bs, end - offset)
        return mv[offset - start: end - start]

    def read_mode(self) -> Optional[int]:
        """How this file can be read without waiting: 0 (in memory), RWF_NOWAIT, CACHESTAT
        (its file system refuses RWF_NOWAIT: FUSE, virtio-fs; the page cache says, from
        Linux 6.5), or None (it cannot be told: reads go to a worker thread).  The native
        path is registered with the same answer."""
        if self.in_memory:
            return 0
        if self.nowait:
            return os.RWF_NOWAIT
        if self.cachestat is None:
            self.cachestat = fsutil.all_cached(self.fd, 0, 1) is not None
        return CACHESTAT if self.cachestat else None

    def inline_flags(self, start: int, n: int, stop: int) -> Optional[int]:
        """preadv2 flags to read ``n`` bytes at ``start`` on the request thread without
        waiting, or None: the read goes to a worker thread.

        Where RWF_NOWAIT is refused (a FUSE or virtio-fs source: a confidential guest's
        share), the page cache says whether the pages are there (cachestat); never for
        the file's last block, whose end-of-file check could ask the file system.  A page
        evicted between that answer and the read makes it wait for the file system, as
        the store's reads on the request thread can already: availability is the host's
        to give anyway; integrity is unchanged (the bytes are hashed either way)."""
        mode = self.read_mode()
        if mode != CACHESTAT:
            return mode
        if stop < self.data_size and fsutil.all_cached(self.fd, start, n):
            return 0
        return None

    def _ends_here(self, flags: int) -> bool:
        """True if the file ends at its sealed size (with RWF_NOWAIT in ``flags``: False
        when that cannot be told without waiting); SizeMismatch if it goes on."""
        try:
            more = os.preadv(self.fd, [bytearray(1)], self.data_size, flags)
        except BlockingIOError:
            return False
        if more:
            name = str(self.label)
            raise SizeMismatch(f"{name}: backing file was extended past its sealed size "
                               f"{self.data_size}", name)
        return True

    def read_steps(self, offset: int, size: int) -> Generator[None, None, Optional[Data]]:
        """``read`` one piece per step, for the request thread; returns None if the
        read would wait on I/O (then call ``read`` in a worker thread)."""
        if not (self.in_memory or self.nowait):
            return None
        return (yield from self._steps(offset, size, inline=True))

    def _steps(self, offset: int, size: int, inline: bool):
        bs, data_size = self.bs, self.data_size
        if offset >= data_size or size <= 0:
            if offset >= data_size:
                self._check_eof()
            return b""
        start, end, stop = self.span(offset, size)
        first = start // bs
        n = stop - start
        padded = -(-n // bs) * bs  # the last block of the file is hashed zero-padded
        buf: Union[mmap.mmap, bytearray]
        if inline:
            buf = POOL.take(padded)
        else:  # a buffer of its own (page-aligned where the copy is large enough to care)
            buf = private_map(padded) if padded >= ALIGN_FROM else bytearray(padded)
        try:
            mv = memoryview(buf)[:padded]
            step = self.step
            if padded <= step:  # one piece: most requests
                if not self._fill(mv, start, n, inline):
                    return None
                self.verifier.verify(first, mv)
            else:
                for pos in range(0, padded, step):
                    piece = mv[pos:pos + step]
                    if not self._fill(piece, start + pos, min(n - pos, len(piece)), inline):
                        return None
                    self.verifier.verify(first + pos // bs, piece)
                    if pos + step < padded:
                        yield
            if stop == data_size:
                self._check_eof()
        finally:
            if isinstance(buf, mmap.mmap) and inline:
                POOL.give(buf)  # reused only after this read's reply is sent
        if self.stats is not None:
            self.stats.verified(padded // bs, end - offset)
        return mv[offset - start: end - start]

    def _fill(self, piece: memoryview, at: int, want: int, inline: bool) -> bool:
        """Read ``want`` bytes at ``at`` into ``piece`` and zero its tail; False if an
        inline read would have to wait."""
        got = self._pread(piece[:want], at, inline)
        if got is None:
            return False
        if got != want:
            # Regular files only read short at EOF, unless interrupted: retry once fully.
            got = read_full(self.fd, piece[:want], at)
            if got != want:
                name = str(self.label)
                raise SizeMismatch(f"{name}: backing file was truncated to {at + got} "
                                   f"bytes, sealed size {self.data_size}", name)
        if want < len(piece):
            piece[want:] = bytes(len(piece) - want)
        return True

    def _pread(self, mv: memoryview, start: int, inline: bool) -> Optional[int]:
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
