"""Building an fs-verity Merkle tree from a file (pure, stdlib only).

Building streams the file: memory is one pending block per level plus a few
chunks in flight per worker, whatever the file size.  Each worker hashes its
own chunks (2-way SHA-NI where the native module has it), from a mapping of
the page cache where the file can be mapped, else read into a page-aligned
buffer of its own; the caller takes the hashes in file order.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from typing import Callable, Optional, Union

from . import hashers
from .merkle import Descriptor, Geometry, Params

class Cancelled(Exception):
    """A build stopped because its cancel callback said so."""


# One read is this many bytes (rounded to whole blocks): large enough that the
# per-chunk overhead vanishes, small enough that a few in flight stay cheap.
CHUNK_SIZE = 1 << 20
# A mapped chunk (no buffer behind it) is larger: each mapping's page tables and
# its unmapping (a TLB shootdown on the other workers' CPUs) cost the same
# whatever its size.  `digest --threads 2` of 1 GiB in tmpfs: 0.36 s with 1 MiB,
# 0.33 s with 4 MiB (bench/build.py, fsverity digest 0.86 s).
MAPPED_CHUNK = 4 << 20


class TreeBuilder:
    """Consumes level-0 hashes in order, emits tree blocks and the root hash.

    Keeps one pending block per level.  ``write_block(offset, data)`` receives
    every tree block at its byte offset in the serialized (root-first) tree.
    """

    def __init__(self, geometry: Geometry, write_block=None):
        self.geo = geometry
        self.params = geometry.params
        self.hasher = self.params.block_hasher()
        self.write_block = write_block
        self.pending = [bytearray() for _ in geometry.level_blocks]
        self.emitted = [0] * len(geometry.level_blocks)

    def add_hashes(self, level: int, hashes: bytes):
        """Append hashes of level-1 blocks (data when level == 0)."""
        bs = self.params.block_size
        pend = self.pending[level]
        pend += hashes
        while len(pend) >= bs:
            self._flush(level, bytes(pend[:bs]))
            del pend[:bs]

    def _flush(self, level: int, block: bytes):
        block = block.ljust(self.params.block_size, b"\0")
        if self.write_block is not None:
            index = self.geo.level_start[level] + self.emitted[level]
            self.write_block(index * self.params.block_size, block)
        self.emitted[level] += 1
        digest = self.hasher(block)
        if level + 1 < len(self.pending):
            self.add_hashes(level + 1, digest)
        else:
            self.root = digest

    def finish(self) -> bytes:
        for level, pend in enumerate(self.pending):
            if pend:
                self._flush(level, bytes(pend))
                pend.clear()
        for level, n in enumerate(self.geo.level_blocks):
            if self.emitted[level] != n:
                raise RuntimeError(
                    f"tree level {level}: emitted {self.emitted[level]} blocks, expected {n}"
                )
        return self.root


def read_full(fd: int, buf: Union[bytearray, memoryview], offset: int) -> int:
    """pread until ``buf`` is full or EOF; returns the bytes read."""
    mv = memoryview(buf)
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [mv[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


# A file whose size moved while it was read has changed meanwhile (check_unchanged):
# ETXTBSY as for that, with what was expected and read.
def _shrank(size: int, got: int) -> OSError:
    return OSError(errno.ETXTBSY, f"file shrank while hashing: expected {size} bytes, got {got}")


def _grew(size: int) -> OSError:
    return OSError(errno.ETXTBSY, f"file grew while hashing: more than {size} bytes")


def _time(ns: int) -> str:
    return f"{ns // 10**9}.{ns % 10**9:09d}"


def check_unchanged(before: os.stat_result, fd: int):
    """Raise if the file open as ``fd`` was written since ``before`` (its fstat then): a
    file written while it is hashed (same size, other bytes) would get the digest of a
    mix of old and new bytes it never held, and every read of it fail.  Its size or mtime
    moved (ETXTBSY, as the kernel's enable of a file open for writing); not its ctime,
    which a rename or a new link moves too (verity stays with the inode across names).
    A write already under way at ``before`` had moved the mtime before it, and can go
    unseen: a writer must be done before its file is sealed."""
    now = os.fstat(fd)
    moved = [f"{what} {show(a)} -> {show(b)}" for what, a, b, show in (
        ("size", before.st_size, now.st_size, str),
        ("mtime", before.st_mtime_ns, now.st_mtime_ns, _time)) if a != b]
    if moved:
        raise OSError(errno.ETXTBSY, f"file changed while it was read ({', '.join(moved)})")


def read_upto(fd: int, size: int) -> bytes:
    """The first ``size`` + 1 bytes of the file at ``fd``, fewer where it ends first:
    ``size`` bytes when it has that many and no more.  One pread of a byte more than
    ``size`` (a small file's read and its end check in one system call), read on only
    where a source reads short before ``size`` (FUSE, network)."""
    data = os.pread(fd, size + 1, 0)
    while len(data) < size:
        more = os.pread(fd, size + 1 - len(data), len(data))
        if not more:
            break
        data += more
    return data


def read_small(fd: int, size: int) -> bytes:
    """The ``size`` bytes of a small file from offset 0, and proof that it has no more
    (read_upto); ETXTBSY naming the count when it has fewer or more."""
    data = read_upto(fd, size)
    if len(data) < size:
        raise _shrank(size, len(data))
    if len(data) > size:
        raise _grew(size)
    return data


def one_block_descriptor(params: Params, data: bytes) -> Descriptor:
    """The descriptor of a file whose bytes are ``data``, at most one block: it has no
    tree, its root hash is the hash of its one block, zero-padded (zeros: no block)."""
    bs = params.block_size
    if len(data) > bs:
        raise ValueError(f"{len(data)} bytes are more than one block of {bs}")
    root = params.block_hasher()(data.ljust(bs, b"\0")) if data else bytes(params.alg.digest_size)
    return Descriptor.build(params, len(data), root)


# The most hashing threads (or seal workers) anyone may ask for: each costs a thread and a
# buffer (up to 4 MiB mapped), and a million would exhaust the machine, not hash faster.
MAX_THREADS = 256


def default_threads() -> int:
    return _DEFAULT_THREADS


_DEFAULT_THREADS = max(1, min(4, os.cpu_count() or 1))
# Files up to this size are read into a buffer kept by the thread: sealing many
# small files maps no new buffer per file.  Larger ones map their own (the cost
# vanishes next to hashing them), so no thread keeps more than this.
SMALL_BUFFER = 64 << 10
_local = threading.local()


def _read_buffer(size: int) -> memoryview:
    """A page-aligned buffer to pread into.

    Alignment matters: a bytearray this large comes from mmap with a 16-byte
    header, and the kernel's copy into a destination 8-24 bytes past a page
    boundary runs at 1.6 GB/s instead of 7-8 GB/s on this project's AMD
    machine (measured with bench/hashspeed.py's read test), more than the
    hashing itself costs.
    """
    if size <= SMALL_BUFFER:
        buf = getattr(_local, "buf", None)
        if buf is None:
            buf = _local.buf = memoryview(private_map(SMALL_BUFFER))
        return buf[:size]
    return memoryview(private_map(size))


def private_map(size: int) -> mmap.mmap:
    """Anonymous memory of this process's own.  Python maps anonymous memory shared by
    default, and a fork (seal_pool's workers) would then share a buffer made before it:
    two workers reading different files into one buffer hashed each other's bytes."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)


def build_tree(
    fd: int,
    params: Params,
    data_size: Optional[int] = None,
    write_block=None,
    threads: Optional[int] = None,
    progress: Optional[Callable[[int], None]] = None,
    cancel: Optional[Callable[[], bool]] = None,
) -> Descriptor:
    """Stream ``fd`` (from offset 0, ``data_size`` bytes, default its size) into
    a tree and return its descriptor.

    The file is cut into chunks (of CHUNK_SIZE, or MAPPED_CHUNK where it can be
    mapped; a chunk that cannot be mapped after all is read, in that size).  With
    ``threads`` > 1, each of that many worker threads hashes its own chunks
    (mapped, or read into its own buffer; the native hasher and hashlib
    release the GIL); the calling thread consumes the hashes in file order.
    ``write_block(offset, block)`` receives the tree.  ``progress(bytes_done)``
    is called per chunk; ``cancel()`` returning True stops the build with
    ``Cancelled``.  Both are called from the calling thread.  A file that turns
    out shorter or longer than ``data_size`` raises OSError, and so does one written
    while it was read (``check_unchanged``).
    """
    before = os.fstat(fd)
    if data_size is None:
        data_size = before.st_size
    bs = params.block_size
    if data_size <= bs:  # no tree
        if cancel is not None and cancel():
            raise Cancelled()
        data = read_small(fd, data_size)
        check_unchanged(before, fd)
        return one_block_descriptor(params, data)

    geo = Geometry.compute(params, data_size)
    builder = TreeBuilder(geo, write_block)
    threads = threads or default_threads()
    # Where the file can be mapped, chunks are hashed from the page cache, without the
    # copy pread makes (a fifth of a build's time: hashers.mapped_hasher); a file of
    # one read is read, as the native module shares it with its helper thread.
    mapped = hashers.mapped_hasher(params) if data_size > CHUNK_SIZE else None
    chunk = max(bs, MAPPED_CHUNK // bs * bs)
    if mapped is None or chunk % mmap.PAGESIZE:  # a mapping starts on a page
        mapped, chunk = None, max(bs, CHUNK_SIZE // bs * bs)
    nchunks = -(-data_size // chunk)

    def chunk_hasher(hash_chunk: Callable) -> Callable[[int], bytes]:
        """h(k) -> the hashes of chunk k, for one thread (a buffer of its own)."""
        hm, buf = mapped, None

        def hash_at(k: int) -> bytes:
            nonlocal hm, buf
            offset = k * chunk
            want = min(chunk, data_size - offset)
            if hm is not None:
                hashes = hm(fd, offset, want)
                if hashes is not None:
                    return hashes
                hm = None  # not mapped: read, which says what is wrong, from here on
            if buf is None:
                buf = _read_buffer(min(chunk, geo.num_data_blocks * bs))
            padded = -(-want // bs) * bs
            mv = buf[:padded]
            got = read_full(fd, mv[:want], offset)
            if got != want:
                raise _shrank(data_size, offset + got)
            if padded != want:
                mv[want:] = bytes(padded - want)  # the buffer is reused: clear the padding
            return hash_chunk(mv)

        return hash_at

    def check_not_grown():
        if os.pread(fd, 1, data_size):
            raise _grew(data_size)

    if threads == 1 or nchunks == 1:
        # One thread: no workers.  The native module may still share a lone
        # chunk with its helper thread unless the caller asked for one thread.
        hash_at = chunk_hasher(params.blocks_hasher(threads=1 if threads == 1 else 0))
        for k in range(nchunks):
            if cancel is not None and cancel():
                raise Cancelled()
            builder.add_hashes(0, hash_at(k))
            if progress:
                progress(min((k + 1) * chunk, data_size))
    else:
        _hash_chunks_in_workers(min(threads, nchunks), nchunks,
                                lambda: chunk_hasher(params.blocks_hasher(threads=1)),
                                chunk, data_size, builder, progress, cancel)
    check_not_grown()
    check_unchanged(before, fd)
    root = builder.finish()

    return Descriptor.build(params, data_size, root)


# How many chunks the workers may run ahead of the consumer, per worker: a
# few, so a worker never waits for the consumer, and memory stays bounded
# (one buffer per worker, plus small hash lists).
AHEAD_PER_WORKER = 2


def _hash_chunks_in_workers(nworkers, nchunks, new_hasher, chunk, data_size,
                            builder, progress, cancel):
    """Worker w hashes chunks w, w + nworkers, ... with a hasher of its own
    (``new_hasher()``: its own buffer); this thread feeds their hashes to
    ``builder`` in chunk order.

    No buffer crosses threads: a worker hands over only the chunk's hashes
    (1/128 of its size), so the data is read and hashed on the same core.
    """
    cond = threading.Condition()
    results = {}          # chunk index -> hashes, or the exception that stopped its worker
    state = {"consumed": 0, "stop": False}
    ahead = AHEAD_PER_WORKER * nworkers

    def worker(w):
        hash_at = new_hasher()
        for k in range(w, nchunks, nworkers):
            with cond:
                while not state["stop"] and k >= state["consumed"] + ahead:
                    cond.wait()
                if state["stop"]:
                    return
            try:
                res = hash_at(k)
            except BaseException as e:  # handed to the consumer, raised there in order
                res = e
            with cond:
                results[k] = res
                cond.notify_all()
            if isinstance(res, BaseException):
                return

    workers = [threading.Thread(target=worker, args=(w,), name=f"verity-hash-{w}", daemon=True)
               for w in range(nworkers)]
    for t in workers:
        t.start()
    try:
        for k in range(nchunks):
            if cancel is not None and cancel():
                raise Cancelled()
            with cond:
                while k not in results:
                    cond.wait()
                res = results.pop(k)
                state["consumed"] = k + 1
                cond.notify_all()
            if isinstance(res, BaseException):
                raise res
            builder.add_hashes(0, res)
            if progress:
                progress(min((k + 1) * chunk, data_size))
    finally:
        with cond:
            state["stop"] = True
            cond.notify_all()
        for t in workers:
            t.join()
