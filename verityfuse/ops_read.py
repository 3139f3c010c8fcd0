"""How the FUSE adapter serves a read: on the trio thread when the bytes are in memory, in
a worker thread when reading could wait on a disk (part of the adapter: it uses trio).

One slow disk must not stall the daemon: every request is answered on the one trio thread,
so a read that waits there holds up every stat and every read of every other file.  The
kernel says whether a read would wait (RWF_NOWAIT: EAGAIN, or a short count, when the page
cache lacks some of it); memory-backed files (tmpfs, ramfs) never wait.  The same rule
serves verified reads (``reader.VerifiedReader``, which asks the kernel itself) and the
files without verity that local mode passes through.
"""

from __future__ import annotations

import errno
import os
import select
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable, Dict, Hashable, Optional

import trio

from . import fsutil
from .errors import replayed
from .view import FileHandle

# Unverified reads up to this size may be served on the trio thread: a thread round trip
# costs more than copying a few pages; a larger read goes to a thread (it may wait anyway).
INLINE_READ = 16 * 1024

# How a handle's unverified reads may be served inline (FileHandle.inline_reads).
MEMORY = "memory"   # memory-backed: a plain read never waits
NOWAIT = "nowait"   # ask the kernel with RWF_NOWAIT, finish in a thread if it would wait
THREAD = "thread"   # the filesystem cannot tell (EOPNOTSUPP): always a thread


def fuse_device_poll() -> Optional[select.poll]:
    """A poll object on this process's /dev/fuse fd (pyfuse3 keeps it to itself): the
    read path asks it whether a request is waiting before it yields."""
    for fd in fsutil.fds_open_on("/dev/fuse"):
        p = select.poll()
        p.register(fd, select.POLLIN)
        return p
    return None


def pread_nowait(fd: int, size: int, offset: int) -> memoryview:
    """What ``os.pread`` returns, read only from the page cache: fewer bytes only at the
    end of the file.  BlockingIOError (EAGAIN) when some of them are not cached."""
    buf = memoryview(bytearray(size))
    got = 0
    while got < size:
        # A short count says the rest is not cached (EAGAIN on the next call) or is past
        # the end of the file (0 on the next call): the next call tells which.
        n = os.preadv(fd, [buf[got:]], offset + got, os.RWF_NOWAIT)
        if n == 0:
            break
        got += n
    return buf[:got]


# Of a mount's worker threads, how many may wait on one blob of a network source (an
# OCI registry): a registry stalling one file holds that many threads until its deadline,
# and the other requests of that file wait without one, so other files find threads.
PER_BLOB_THREADS = 8


class _Gate:
    __slots__ = ("places", "users", "stalls", "error")

    def __init__(self):
        self.places = trio.CapacityLimiter(PER_BLOB_THREADS)
        self.users = 0  # requests holding or awaiting a place
        self.stalls = 0  # stalls seen (``ThreadGates.failed``), the last one's error kept
        self.error: Optional[BaseException] = None


class ThreadGates:
    """At most PER_BLOB_THREADS worker threads per key (a blob) at a time.  ``held(key)``
    waits on the trio thread for one of its key's places (at once for key None) and
    gives the error of a stall on that key that came while it waited (else None): the
    caller fails with it at once, instead of each queued request waiting out a deadline
    of its own in turn, holding a kernel request all along.  A key's entry lives while
    a request holds or awaits it: memory grows with the requests waiting, not with the
    files ever read."""

    def __init__(self):
        self._gates: Dict[Hashable, _Gate] = {}

    @asynccontextmanager
    async def held(self, key: Optional[Hashable]) -> AsyncIterator[Optional[BaseException]]:
        if key is None:
            yield None
            return
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = _Gate()
        gate.users += 1
        seen = gate.stalls
        try:
            async with gate.places:
                yield gate.error if gate.stalls != seen else None
        finally:
            gate.users -= 1
            if not gate.users:
                del self._gates[key]

    def failed(self, key: Optional[Hashable], error: BaseException):
        """A request holding a place of ``key`` failed with ``error``: if that is a
        stall (``stall`` set: oci_http.TooSlow), the requests waiting fail with it."""
        gate = self._gates.get(key) if key is not None else None
        if gate is not None and getattr(error, "stall", False):
            gate.stalls += 1
            gate.error = error

    async def run(self, key: Optional[Hashable], run: Callable[..., Awaitable], fn, *args,
                  cached: Optional[Callable] = None):
        """``await run(fn, *args)`` in one of ``key``'s places.  ``cached(*args)`` never
        waits on the network and answers what it can (else None): asked first, so that
        what is cached needs no place (a stalled blob leaves it readable), and again when
        handed a stall, which is failed with (a copy of its error) only if it cannot.
        Asked first always, not only when every place is taken: the pieces of a large read
        that its first piece's fetch brought in then skip the reader's readahead
        bookkeeping (bench/oci.py, 5% of a file: 0.857-0.906 s against 0.916-0.938 asked
        only when full; sequential 130-140 against 140-146 MB/s)."""
        if cached is not None and key is not None:
            data = await run(cached, *args)
            if data is not None:
                return data
        async with self.held(key) as stalled:
            if stalled is not None:
                if cached is not None:
                    data = await run(cached, *args)
                    if data is not None:
                        return data
                raise replayed(stalled)
            try:
                return await run(fn, *args)
            except Exception as e:
                self.failed(key, e)
                raise

    def __len__(self) -> int:
        return len(self._gates)


class Reads:
    """The read path of one mount.  ``run(fn, *args)`` runs ``fn`` in a worker thread
    (the adapter's, with its limiter); ``fuse_poll`` is set once FUSE_INIT came through
    /dev/fuse (until then a read yields between every piece)."""

    def __init__(self, run: Callable[..., Awaitable]):
        self.run = run
        self.gates = ThreadGates()  # the reads and opens of a network source's blobs
        self.fuse_poll: Optional[select.poll] = None
        self._turn = trio.Lock()  # one verified read on this thread at a time (fair)

    def _request_waiting(self) -> bool:
        """Whether another request is queued on /dev/fuse (True if that cannot be told)."""
        return self.fuse_poll is None or bool(self.fuse_poll.poll(0))

    async def read(self, h: FileHandle, off: int, size: int):
        reader = h.reader
        if reader is None:
            return await self._unverified(h, off, size)
        # Most reads are one piece of data in memory: answered at once, without
        # waiting for a long read's turn (as a stat would be).
        data = reader.read_one(off, size)
        if data is not None:
            return data
        # Verified on this thread, piece by piece, when the data is in memory.  Between
        # pieces a request waiting on /dev/fuse is let in: a stat is answered at once,
        # another read waits for this one (interleaving reads only delays every reply).
        try:
            self._turn.acquire_nowait()  # no scheduler round trip when it is free
        except trio.WouldBlock:
            await self._turn.acquire()
        try:
            steps = reader.read_steps(off, size)
            while True:
                next(steps)
                if self._request_waiting():
                    await trio.lowlevel.checkpoint()
        except StopIteration as done:
            data = done.value
        finally:
            self._turn.release()
        if data is not None:
            return data
        return await self.gates.run(reader.wait_key, self.run, reader.read, off, size,
                                    cached=reader.read_cached)

    async def _unverified(self, h: FileHandle, off: int, size: int):
        """A file without verity (local mode passes it through): inline only when small
        and in memory, else in a worker thread."""
        if size <= INLINE_READ:
            if h.inline_reads is None:
                h.inline_reads = MEMORY if fsutil.in_memory(h.fd) else NOWAIT
            if h.inline_reads == MEMORY:
                return os.pread(h.fd, size, off)
            if h.inline_reads == NOWAIT:
                try:
                    return pread_nowait(h.fd, size, off)
                except BlockingIOError:
                    pass  # not all cached: the thread reads it
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    h.inline_reads = THREAD
        return await self.run(os.pread, h.fd, size, off)
