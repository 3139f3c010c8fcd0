"""fs-verity Merkle trees, byte-identical to the kernel's (pure, stdlib only).

Format (Documentation/filesystems/fsverity.rst): every B-byte data block,
the last one zero-padded, is hashed as H(padded_salt || block); the hashes are
packed into B-byte tree blocks (zero-padded), which are hashed the same way,
level by level, until one block remains.  The root hash is the hash of that
block (or of the only data block; all zeros for an empty file).  The tree is
stored root level first.  The file digest is H(256-byte descriptor).

Building streams the file: memory is one pending block per level plus one
read buffer per hashing thread, whatever the file size.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

from . import uapi
from .errors import FileTooLarge, InvalidDescriptor, InvalidParameters, SaltTooLong

# The native batch hasher (same bytes, GIL released per batch); hashlib if absent.
try:
    from . import _hashblocks
except ImportError:  # not built: no compiler or OpenSSL headers at install time
    _hashblocks = None
if os.environ.get("VERITYFUSE_PURE_PYTHON"):
    _hashblocks = None
NATIVE = _hashblocks is not None


@dataclass(frozen=True)
class HashAlg:
    name: str
    number: int  # FS_VERITY_HASH_ALG_*
    digest_size: int
    block_size: int  # the compression function's block: the salt pads to it

    def new(self):
        return hashlib.new(self.name)


SHA256 = HashAlg("sha256", uapi.FS_VERITY_HASH_ALG_SHA256, 32, 64)
SHA512 = HashAlg("sha512", uapi.FS_VERITY_HASH_ALG_SHA512, 64, 128)
ALGORITHMS = {a.name: a for a in (SHA256, SHA512)}
ALGORITHMS_BY_NUMBER = {a.number: a for a in (SHA256, SHA512)}

DEFAULT_BLOCK_SIZE = 4096
# fsverity-utils allows 64 levels; the kernel allows 8 and answers EFBIG past that.
MAX_LEVELS = uapi.FS_VERITY_MAX_LEVELS


def hash_alg(name_or_number) -> HashAlg:
    """Look up an algorithm by name ("sha256") or fs-verity number (1)."""
    if isinstance(name_or_number, int):
        alg = ALGORITHMS_BY_NUMBER.get(name_or_number)
    else:
        alg = ALGORITHMS.get(str(name_or_number).lower())
    if alg is None:
        raise InvalidParameters(
            f"unknown hash algorithm: {name_or_number!r} "
            f"(available: {' '.join(ALGORITHMS)})"
        )
    return alg


@dataclass(frozen=True)
class Params:
    """Tree parameters: what `fsverity digest --hash-alg --block-size --salt` sets."""

    alg: HashAlg = SHA256
    block_size: int = DEFAULT_BLOCK_SIZE
    salt: bytes = b""

    def __post_init__(self):
        bs = self.block_size
        if not isinstance(bs, int) or bs <= 0 or bs & (bs - 1):
            raise InvalidParameters(f"invalid block size {bs}: must be a power of 2")
        if bs < 2 * self.alg.digest_size:
            raise InvalidParameters(
                f"block size ({bs}) too small for hash algorithm {self.alg.name}"
            )
        # log_blocksize is a u8 and block_size a u32 in the ABI.
        if bs > 1 << 31:
            raise InvalidParameters(f"invalid block size {bs}: too large")
        if len(self.salt) > uapi.FS_VERITY_MAX_SALT_SIZE:
            raise SaltTooLong(
                f"unsupported salt size ({len(self.salt)}): at most "
                f"{uapi.FS_VERITY_MAX_SALT_SIZE} bytes"
            )

    @property
    def log_blocksize(self) -> int:
        return self.block_size.bit_length() - 1

    @property
    def hashes_per_block(self) -> int:
        return self.block_size // self.alg.digest_size

    def block_hasher(self) -> Callable[[bytes], bytes]:
        """Return h(block) -> H(padded_salt || block).

        The salted prefix is hashed once; each block copies that state, which
        costs the same as hashing from scratch but skips the prefix.
        """
        if not self.salt:
            ctor = getattr(hashlib, self.alg.name)
            return lambda block: ctor(block).digest()
        base = self.alg.new()
        base.update(padded_salt(self))

        def h(block):
            c = base.copy()
            c.update(block)
            return c.digest()

        return h

    def blocks_hasher(self, threads: int = 0) -> Callable[[bytes], bytes]:
        """Return hb(buf) -> the concatenated block hashes of every whole block in ``buf``.

        ``threads``: 0 lets the native module share a large buffer with its
        helper thread (its configured default), 1 keeps the work in the
        calling thread (for callers that run their own threads).
        """
        bs = self.block_size
        if NATIVE:
            alg, prefix, hb = self.alg.number, padded_salt(self), _hashblocks.hash_blocks
            return lambda buf: hb(alg, prefix, buf, bs, threads)
        h = self.block_hasher()

        def hash_all(buf):
            mv = memoryview(buf)
            return b"".join(h(mv[off: off + bs]) for off in range(0, len(mv) - bs + 1, bs))

        return hash_all

    def blocks_verifier(self, threads: int = 0) -> Callable[[bytes, bytes], int]:
        """Return vb(buf, expected) -> -1 if every block of ``buf`` hashes to its
        entry in ``expected`` (the concatenated hashes), else the index of the
        first block that does not.

        ``buf`` must be whole blocks and ``expected`` exactly one digest per
        block (ValueError otherwise).  Natively this is one call with the GIL
        released, split across two cores for large buffers; ``threads`` as
        for blocks_hasher.
        """
        bs, ds = self.block_size, self.alg.digest_size
        if NATIVE:
            alg, prefix, vb = self.alg.number, padded_salt(self), _hashblocks.verify_blocks
            return lambda buf, expected: vb(alg, prefix, buf, bs, expected, threads)
        h = self.block_hasher()

        def verify_all(buf, expected):
            mv, exp = memoryview(buf), memoryview(expected)
            n, rest = divmod(len(mv), bs)
            if rest:
                raise ValueError(f"data ({len(mv)} bytes) is not a whole number of "
                                 f"{bs}-byte blocks")
            if len(exp) != n * ds:
                raise ValueError(f"expected hashes are {len(exp)} bytes, but {n} blocks "
                                 f"need {n * ds} bytes of hashes")
            for i in range(n):
                if h(mv[i * bs:(i + 1) * bs]) != exp[i * ds:(i + 1) * ds]:
                    return i
            return -1

        return verify_all

    def describe(self) -> str:
        return f"{self.alg.name}, block size {self.block_size}, salt {self.salt.hex() or '(none)'}"


def padded_salt(params: Params) -> bytes:
    """The salt zero-padded to a multiple of the hash's compression block."""
    if not params.salt:
        return b""
    n = -(-len(params.salt) // params.alg.block_size) * params.alg.block_size
    return params.salt.ljust(n, b"\0")


@dataclass(frozen=True)
class Geometry:
    """Where every level of a file's tree lives.

    ``level_start[i]`` is the index (in tree blocks, from the start of the
    serialized tree) of level i's first block; level 0 hashes the data and is
    stored last, the top level is stored first.
    """

    params: Params
    data_size: int
    num_data_blocks: int
    level_blocks: tuple  # blocks per level, level 0 first
    level_start: tuple

    @classmethod
    def compute(cls, params: Params, data_size: int) -> "Geometry":
        if data_size < 0:
            raise InvalidParameters(f"negative file size {data_size}")
        bs = params.block_size
        hpb = params.hashes_per_block
        n = -(-data_size // bs)
        data_blocks = n
        level_blocks = []
        while n > 1:
            n = -(-n // hpb)
            level_blocks.append(n)
            if len(level_blocks) > MAX_LEVELS:
                raise FileTooLarge(
                    f"file of {data_size} bytes needs more than {MAX_LEVELS} tree levels "
                    f"with {params.describe()}"
                )
        starts = [0] * len(level_blocks)
        offset = 0
        for level in reversed(range(len(level_blocks))):
            starts[level] = offset
            offset += level_blocks[level]
        return cls(params, data_size, data_blocks, tuple(level_blocks), tuple(starts))

    @property
    def num_levels(self) -> int:
        return len(self.level_blocks)

    @property
    def tree_blocks(self) -> int:
        return sum(self.level_blocks)

    @property
    def tree_size(self) -> int:
        return self.tree_blocks * self.params.block_size


def make_descriptor(params: Params, data_size: int, root_hash: bytes, sig_size: int = 0) -> bytes:
    """The 256-byte fsverity_descriptor (sig_size must be 0 for hashing)."""
    return uapi.DESCRIPTOR_STRUCT.pack(
        1, params.alg.number, params.log_blocksize, len(params.salt), sig_size,
        data_size, root_hash, params.salt, b"",
    )


@dataclass(frozen=True)
class Descriptor:
    params: Params
    data_size: int
    root_hash: bytes
    raw: bytes  # exactly 256 bytes, sig_size 0: what the digest covers

    @property
    def digest(self) -> bytes:
        return file_digest(self.params.alg, self.raw)

    @property
    def geometry(self) -> Geometry:
        return Geometry.compute(self.params, self.data_size)


def parse_descriptor(raw: bytes) -> Descriptor:
    """Validate a descriptor as the kernel does on open; InvalidDescriptor if not."""
    if len(raw) != uapi.FS_VERITY_DESCRIPTOR_SIZE:
        raise InvalidDescriptor(f"descriptor is {len(raw)} bytes, expected 256")
    (version, alg_no, log_bs, salt_size, sig_size, data_size,
     root, salt, reserved) = uapi.DESCRIPTOR_STRUCT.unpack(raw)
    if version != 1:
        raise InvalidDescriptor(f"unsupported descriptor version {version}")
    if sig_size != 0 or any(reserved):
        raise InvalidDescriptor("reserved descriptor bytes are not zero")
    if salt_size > uapi.FS_VERITY_MAX_SALT_SIZE or any(salt[salt_size:]):
        raise InvalidDescriptor(f"invalid salt size {salt_size}")
    if log_bs > 31:
        raise InvalidDescriptor(f"invalid log_blocksize {log_bs}")
    try:
        params = Params(hash_alg(alg_no), 1 << log_bs, salt[:salt_size])
    except InvalidParameters as e:
        raise InvalidDescriptor(f"invalid descriptor parameters: {e}") from None
    if any(root[params.alg.digest_size:]):
        raise InvalidDescriptor("root hash padding is not zero")
    return Descriptor(params, data_size, root[: params.alg.digest_size], bytes(raw))


def file_digest(alg: HashAlg, descriptor: bytes) -> bytes:
    """The fs-verity file digest: H(descriptor), never salted."""
    h = alg.new()
    h.update(descriptor)
    return h.digest()


def format_digest(alg: HashAlg, digest: bytes) -> str:
    """``sha256:<hex>``, the form `fsverity digest` and `measure` print."""
    return f"{alg.name}:{digest.hex()}"


def formatted_digest(alg: HashAlg, digest: bytes) -> bytes:
    """struct fsverity_formatted_digest, what built-in signatures sign."""
    return b"FSVerity" + uapi.DIGEST_HEADER_STRUCT.pack(alg.number, len(digest)) + digest


class Cancelled(Exception):
    """A build stopped because its cancel callback said so."""


# One read is this many bytes (rounded to whole blocks): large enough that the
# per-chunk overhead vanishes, small enough that a few in flight stay cheap.
CHUNK_SIZE = 1 << 20


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


def read_full(fd: int, buf: bytearray, offset: int) -> int:
    """pread until ``buf`` is full or EOF; returns the bytes read."""
    mv = memoryview(buf)
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [mv[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _read_buffer(size: int) -> memoryview:
    """A page-aligned buffer to pread into.

    Alignment matters: a bytearray this large comes from mmap with a 16-byte
    header, and the kernel's copy into a destination 8-24 bytes past a page
    boundary runs at 1.6 GB/s instead of 7-8 GB/s on this project's AMD
    machine (measured with bench/hashspeed.py's read test), more than the
    hashing itself costs.
    """
    import mmap
    return memoryview(mmap.mmap(-1, size))


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

    The file is cut into CHUNK_SIZE chunks.  With ``threads`` > 1, each of
    that many worker threads reads its own chunks into its own buffer and
    hashes them (the native hasher and hashlib release the GIL); the calling
    thread consumes the hashes in file order.  ``write_block(offset, block)``
    receives the tree.  ``progress(bytes_done)`` is called per chunk;
    ``cancel()`` returning True stops the build with ``Cancelled``.  Both are
    called from the calling thread.  A file that turns out shorter or longer
    than ``data_size`` raises OSError.
    """
    if data_size is None:
        data_size = os.fstat(fd).st_size
    geo = Geometry.compute(params, data_size)
    bs = params.block_size
    if geo.num_data_blocks == 0:
        return Descriptor(params, 0, bytes(params.alg.digest_size),
                          make_descriptor(params, 0, bytes(params.alg.digest_size)))

    builder = TreeBuilder(geo, write_block)
    chunk = max(bs, CHUNK_SIZE // bs * bs)
    nchunks = -(-data_size // chunk)
    threads = threads or default_threads()

    def read_chunk(k: int, buf: memoryview) -> memoryview:
        """Chunk k into ``buf``, its last block zero-padded; a view of the used part."""
        offset = k * chunk
        want = min(chunk, data_size - offset)
        padded = -(-want // bs) * bs
        mv = buf[:padded]
        got = read_full(fd, mv[:want], offset)
        if got != want:
            raise OSError(f"file shrank while hashing: expected {data_size} bytes, "
                          f"got {offset + got}")
        if padded != want:
            mv[want:] = bytes(padded - want)  # the buffer is reused: clear the padding
        return mv

    def check_not_grown():
        if os.pread(fd, 1, data_size):
            raise OSError(f"file grew while hashing: more than {data_size} bytes")

    if geo.num_data_blocks == 1:
        # One block: no tree, the root is that block's hash.
        if cancel is not None and cancel():
            raise Cancelled()
        block = bytes(read_chunk(0, memoryview(bytearray(bs))))
        check_not_grown()
        root = builder.hasher(block)
    elif threads == 1 or nchunks == 1:
        # One thread: no workers.  The native module may still share a lone
        # chunk with its helper thread unless the caller asked for one thread.
        hash_chunk = params.blocks_hasher(threads=1 if threads == 1 else 0)
        buf = _read_buffer(min(chunk, geo.num_data_blocks * bs))
        for k in range(nchunks):
            if cancel is not None and cancel():
                raise Cancelled()
            builder.add_hashes(0, hash_chunk(read_chunk(k, buf)))
            if progress:
                progress(min((k + 1) * chunk, data_size))
        check_not_grown()
        root = builder.finish()
    else:
        _hash_chunks_in_workers(min(threads, nchunks), nchunks, read_chunk,
                                params.blocks_hasher(threads=1), chunk, data_size,
                                builder, progress, cancel)
        check_not_grown()
        root = builder.finish()

    raw = make_descriptor(params, data_size, root)
    return Descriptor(params, data_size, root, raw)


# How many chunks the workers may run ahead of the consumer, per worker: a
# few, so a worker never waits for the consumer, and memory stays bounded
# (one buffer per worker, plus small hash lists).
AHEAD_PER_WORKER = 2


def _hash_chunks_in_workers(nworkers, nchunks, read_chunk, hash_chunk, chunk, data_size,
                            builder, progress, cancel):
    """Worker w reads and hashes chunks w, w + nworkers, ... into its own
    buffer; this thread feeds their hashes to ``builder`` in chunk order.

    No buffer crosses threads: a worker hands over only the chunk's hashes
    (1/128 of its size), so the data is read and hashed on the same core.
    """
    import threading  # here: only multi-chunk, multi-thread builds pay for it

    cond = threading.Condition()
    results = {}          # chunk index -> hashes, or the exception that stopped its worker
    state = {"consumed": 0, "stop": False}
    ahead = AHEAD_PER_WORKER * nworkers

    def worker(w):
        buf = _read_buffer(chunk)
        for k in range(w, nchunks, nworkers):
            with cond:
                while not state["stop"] and k >= state["consumed"] + ahead:
                    cond.wait()
                if state["stop"]:
                    return
            try:
                res = hash_chunk(read_chunk(k, buf))
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
