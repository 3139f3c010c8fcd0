"""Verified data blocks of an OCI mount, kept in memory (``BlockCache``) or on disk
(``DiskBlockCache``, ``--cache DIR``); pure.

The disk cache is the same bounded LRU, with the blocks in sparse files instead of
memory: one file per fs-verity digest, each block at its own
offset, in a directory private to this mount (made 0700 under DIR at mount,
removed at unmount: nothing is reused across mounts).  Evicting a block
punches a hole, so the disk used stays within the budget; evicting a file's last
block removes the file.  At most ``MAX_OPEN`` of the files are open at a time (the
rest are opened again by name when used): fds stay bounded however many files are
read.  Memory: the index, about 150 bytes per cached block.  The cache only saves
fetches: a block it cannot write or read back (a full disk, no fd left, an I/O
error) is simply not cached, and is fetched.

Only verified blocks are written, and every block read back is verified again
by ``VerifiedReader`` before it is served: a cache directory someone else can
write to costs a fetch from the registry again (``OciReader.read`` drops the
blocks that failed), never integrity.  Use guest-private storage.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

log = logging.getLogger("verityfuse")

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

MAX_OPEN = 64  # cache files kept open (DiskBlockCache): the daemon's fds are for its users
MAX_FAILURES = 1024  # fetch failures kept for the readers that waited on them


class BlockCache:
    """Verified data blocks keyed by (fs-verity digest, block index), LRU-bounded in bytes,
    with claims so that concurrent readers of one block fetch it once."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._d: "OrderedDict[tuple, bytes]" = OrderedDict()
        self.cond = threading.Condition()
        self.inflight: set = set()
        # The failure of a fetch other readers waited on goes to each of them, instead of
        # each fetching again in turn, waiting out a timeout of its own (20 readers of a
        # block a registry stalls: 20 timeouts in a row).  Only to readers that waited
        # while it ran (by sequence number), or, for a stall, to every reader for a while
        # after it (``cool``): readers of one page, which the kernel sends one at a time,
        # each waited out the deadline again.  Later, a read tries again.
        self.fail_seq = 0
        self.failures: "OrderedDict[tuple, Tuple[int, Exception, float]]" = OrderedDict()

    def take(self, keys: List[tuple], out: Dict[tuple, bytes]) -> Tuple[List[tuple], bool]:
        """Under the lock: copy cached blocks into ``out``; claim the missing ones nobody
        fetches (returned); True if some are being fetched by another reader."""
        mine, waiting = [], False
        for k in keys:
            if k in out:
                continue
            block = self._get(k)
            if block is not None:
                self._d.move_to_end(k)
                self.hits += 1
                out[k] = block
            elif k in self.inflight:
                waiting = True
            else:
                self.misses += 1
                self.inflight.add(k)
                mine.append(k)
        return mine, waiting

    def peek(self, keys: List[tuple]) -> Optional[Dict[tuple, bytes]]:
        """Under the lock: every one of ``keys`` from the cache, or None if one is missing
        (nothing claimed, no miss counted: the caller fetches through ``take``)."""
        out: Dict[tuple, bytes] = {}
        for k in keys:
            block = self._get(k)
            if block is None:
                return None
            out[k] = block
        for k in out:
            self._d.move_to_end(k)
        self.hits += len(out)
        return out

    def fetch_failed(self, key: tuple, error: Exception, cool: float = 0):
        """Under the lock: the fetch of ``key`` failed with ``error``; ``cool``: seconds
        during which every read of it fails with that error at once."""
        self.fail_seq += 1
        self.failures[key] = (self.fail_seq, error, time.monotonic() + cool if cool else 0.0)
        self.failures.move_to_end(key)
        while len(self.failures) > MAX_FAILURES:
            self.failures.popitem(last=False)

    def failed_since(self, seq: Optional[int], keys: List[tuple], out) -> Optional[Exception]:
        """Under the lock: the error of a fetch of one of ``keys`` (not in ``out``) that
        failed after ``fail_seq`` was ``seq`` (None: no such fetch is waited on), or whose
        failure still cools; else None."""
        now = time.monotonic()
        for k in keys:
            f = self.failures.get(k) if k not in out else None
            if f is not None and ((seq is not None and f[0] > seq) or now < f[2]):
                return f[1]
        return None

    def _get(self, k: tuple) -> Optional[bytes]:
        """A cached block, or None (a cache on disk reads it back)."""
        return self._d.get(k)

    def put(self, key: tuple, block: bytes, offset: int = 0):
        """Cache ``block`` (``offset``: its place in the file, for a cache on disk)."""
        if key in self._d:
            return
        self._d[key] = block
        self.bytes += len(block)
        while self.bytes > self.max_bytes:
            _, old = self._d.popitem(last=False)
            self.bytes -= len(old)

    def drop(self, keys: List[tuple]):
        """Under the lock: forget ``keys`` (the next read fetches them again)."""
        for k in keys:
            block = self._d.pop(k, None)
            if block is not None:
                self.bytes -= len(block)

    def snapshot(self) -> dict:
        with self.cond:
            return {"hits": self.hits, "misses": self.misses, "blocks": len(self._d),
                    "bytes": self.bytes, "max_bytes": self.max_bytes}

    def close(self):
        pass  # memory only


def punch_hole(fd: int, offset: int, length: int):
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class DiskBlockCache(BlockCache):
    def __init__(self, directory: str, max_bytes: int):
        super().__init__(max_bytes)
        try:
            self.dir = tempfile.mkdtemp(prefix="verityfuse-cache-", dir=directory)
        except OSError as e:  # the directory given, not the random name under it
            raise OSError(e.errno, f"cache directory {directory}: {e.strerror}") from None
        # Punch a hole now: a filesystem that cannot would let the disk use grow unbounded.
        probe = os.path.join(self.dir, "probe")
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.pwrite(fd, bytes(8192), 0)
            punch_hole(fd, 0, 4096)
        except OSError as e:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise OSError(e.errno, f"cache directory {directory}: cannot punch holes in its "
                                   f"files ({e.strerror}): pick another filesystem") from None
        finally:
            os.close(fd)
        os.unlink(probe)
        self.fds: "OrderedDict[str, int]" = OrderedDict()  # the open ones, least recent first
        self._where: Dict[tuple, Tuple[int, int]] = {}  # key -> (offset, length) on disk
        self._blocks: Dict[str, int] = {}  # digest -> its blocks on disk (its file exists)

    def _path(self, fsv: str) -> str:
        return os.path.join(self.dir, fsv.replace(":", "-"))  # sha256-<hex>: the manifest's

    def _fd(self, fsv: str) -> int:
        fd = self.fds.get(fsv)
        if fd is not None:
            self.fds.move_to_end(fsv)
            return fd
        fd = os.open(self._path(fsv), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        self.fds[fsv] = fd
        if len(self.fds) > MAX_OPEN:
            os.close(self.fds.popitem(last=False)[1])
        return fd

    def _get(self, k: tuple) -> Optional[bytes]:
        where = self._where.get(k)
        if where is None:
            return None
        try:
            block = os.pread(self._fd(k[0]), where[1], where[0])
        except OSError:  # no fd left, an I/O error: a miss, never a reader's failure
            block = b""
        if len(block) != where[1]:  # or the file was cut short: forget it, fetch again
            self._forget(k)
            return None
        return block

    def put(self, key: tuple, block: bytes, offset: int = 0):
        if key in self._d:
            return
        try:
            os.pwrite(self._fd(key[0]), block, offset)
        except OSError:  # a full disk, no fd left: the block is simply not cached
            return
        self._d[key] = b""  # the LRU order; the bytes are on disk
        self._where[key] = (offset, len(block))
        self._blocks[key[0]] = self._blocks.get(key[0], 0) + 1
        self.bytes += len(block)
        while self.bytes > self.max_bytes:
            self._forget(next(iter(self._d)))

    def drop(self, keys: List[tuple]):
        for k in keys:
            if k in self._where:
                self._forget(k)

    def _forget(self, k: tuple):
        """Remove cached block ``k``: a hole punched, or its file gone with its last block."""
        del self._d[k]
        off, length = self._where.pop(k)
        self.bytes -= length
        fsv = k[0]
        self._blocks[fsv] -= 1
        try:
            if self._blocks[fsv]:
                punch_hole(self._fd(fsv), off, length)
                return
            del self._blocks[fsv]
            fd = self.fds.pop(fsv, None)
            if fd is not None:
                os.close(fd)
            os.unlink(self._path(fsv))
        except OSError as e:  # the disk used may exceed the budget: say so, serve on
            log.warning("cache %s: cannot free a block of %s: %s", self.dir, fsv, e.strerror)

    def snapshot(self) -> dict:
        snap = super().snapshot()
        snap["directory"] = self.dir
        return snap

    def close(self):
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}
        shutil.rmtree(self.dir, ignore_errors=True)
