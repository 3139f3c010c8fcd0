"""The block hashing engines of a tree's parameters (pure, stdlib only).

H(padded_salt || block) for one block, for every block of a buffer, and the
verified read (pread + hash + compare): natively (``_hashblocks``: the same
bytes, the GIL released, large buffers shared by two cores) where it is
built, else hashlib.  ``merkle.Params`` hands these out as its methods;
``NATIVE`` says which engine they use (tests switch it).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    from .merkle import Params


# The native batch hasher (same bytes, GIL released per batch); hashlib if absent.
def _load_native() -> Any:
    try:
        from . import _hashblocks as native
    except ImportError:  # not built: no compiler or OpenSSL headers at install time
        return None
    return None if os.environ.get("VERITYFUSE_PURE_PYTHON") else native


_hashblocks: Any = _load_native()
NATIVE = _hashblocks is not None


def digest(name: str, data: bytes) -> bytes:
    """H(data) with hash ``name``, unsalted: natively for SHA-256 where built, so that a
    command hashing with the native engine never starts OpenSSL's hashlib (~3 ms of
    `digest`'s start-up, measured with -X importtime), else hashlib: the same bytes."""
    if NATIVE and name == "sha256":
        return _hashblocks.sha256(data)
    import hashlib

    return hashlib.new(name, data).digest()


def _check_blocks(data_len: int, bs: int, expected_len: int, ds: int) -> None:
    """The native module's argument checks, with its messages."""
    if data_len % bs:
        raise ValueError(f"data ({data_len} bytes) is not a whole number of {bs}-byte blocks")
    n = data_len // bs
    if expected_len != n * ds:
        raise ValueError(f"expected hashes are {expected_len} bytes, but {n} blocks "
                         f"need {n * ds} bytes of hashes")


def padded_salt(params: Params) -> bytes:
    """The salt zero-padded to a multiple of the hash's compression block."""
    if not params.salt:
        return b""
    n = -(-len(params.salt) // params.alg.block_size) * params.alg.block_size
    return params.salt.ljust(n, b"\0")


def block_hasher(params: Params) -> Callable[[bytes], bytes]:
    """Return h(block) -> H(padded_salt || block).

    The salted prefix is hashed once; each block copies that state, which
    costs the same as hashing from scratch but skips the prefix.
    """
    if not params.salt:
        if NATIVE and params.alg.name == "sha256":
            return _hashblocks.sha256  # the same bytes; no OpenSSL start-up (``digest``)
        import hashlib

        ctor = getattr(hashlib, params.alg.name)
        return lambda block: ctor(block).digest()
    base = params.alg.new()
    base.update(padded_salt(params))

    def h(block):
        c = base.copy()
        c.update(block)
        return c.digest()

    return h

def _check_threads(threads: int) -> None:
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 = the configured default), not {threads}")


def blocks_hasher(params: Params, threads: int = 0) -> Callable[[Any], bytes]:
    """Return hb(buf) -> the concatenated block hashes of the blocks of ``buf``, which
    must be whole blocks (ValueError otherwise, as a negative ``threads``).

    ``threads``: 0 lets the native module share a large buffer with its
    helper thread (its configured default), 1 keeps the work in the
    calling thread (for callers that run their own threads).
    """
    bs = params.block_size
    _check_threads(threads)
    if NATIVE:
        alg, prefix, hb = params.alg.number, padded_salt(params), _hashblocks.hash_blocks
        return lambda buf: hb(alg, prefix, buf, bs, threads)
    h = block_hasher(params)

    def hash_all(buf):
        mv = memoryview(buf)
        if len(mv) % bs:  # as the native module: a partial block is refused, not dropped
            raise ValueError(f"data ({len(mv)} bytes) is not a whole number of {bs}-byte blocks")
        return b"".join(h(mv[off: off + bs]) for off in range(0, len(mv), bs))

    return hash_all


def mapped_hasher(params: Params) -> Optional[Callable[[int, int, int], Any]]:
    """Return hm(fd, offset, length) -> the hashes of the blocks of fd's bytes
    [offset, offset + length) (the last block zero-padded, ``offset`` a multiple of
    the page size), hashed from a mapping of the page cache rather than a copy; or
    None without the native module.

    hm returns None where the range could not be hashed mapped (fd cannot be mapped,
    its pages cannot be read, the file is shorter than the range or was cut short
    while it was hashed: a SIGBUS caught, never one that ends the process; a sparse
    file, whose holes a mapping of tmpfs would allocate; another SIGBUS handler in the
    guard's place): read it instead, which says what is wrong.  Only for building
    trees: nothing it hashes is returned to a reader.
    """
    if not NATIVE:
        return None
    alg, prefix, bs, hm = params.alg.number, padded_salt(params), params.block_size, \
        _hashblocks.hash_mapped
    return lambda fd, offset, length: hm(alg, prefix, fd, offset, length, bs)


def blocks_verifier(params: Params, threads: int = 0) -> Callable[[Any, Any], int]:
    """Return vb(buf, expected) -> -1 if every block of ``buf`` hashes to its
    entry in ``expected`` (the concatenated hashes), else the index of the
    first block that does not.

    ``buf`` must be whole blocks and ``expected`` exactly one digest per
    block (ValueError otherwise).  Natively this is one call with the GIL
    released, split across two cores for large buffers; ``threads`` as
    for blocks_hasher.
    """
    bs, ds = params.block_size, params.alg.digest_size
    _check_threads(threads)
    if NATIVE:
        alg, prefix, vb = params.alg.number, padded_salt(params), _hashblocks.verify_blocks
        return lambda buf, expected: vb(alg, prefix, buf, bs, expected, threads)
    h = block_hasher(params)

    def verify_all(buf, expected):
        mv, exp = memoryview(buf), memoryview(expected)
        _check_blocks(len(mv), bs, len(exp), ds)
        for i in range(len(mv) // bs):
            if h(mv[i * bs:(i + 1) * bs]) != exp[i * ds:(i + 1) * ds]:
                return i
        return -1

    return verify_all

def read_verifier(params: Params, threads: int = 0) -> Callable[..., int]:
    """Return rv(buf, expected, fd, offset, length, flags=0) -> -1 or the index of
    the first block of ``buf`` that does not hash to its entry in ``expected``,
    after reading ``length`` bytes of ``fd`` at ``offset`` into ``buf`` (preadv2
    ``flags``, e.g. os.RWF_NOWAIT) and zeroing the rest of ``buf``.

    The common verified read in one native call (GIL released, the copy and the
    hashing shared by two cores).  A failed read raises OSError
    (BlockingIOError when RWF_NOWAIT finds the data not cached) and a file that
    ends before offset + length raises EOFError, whatever the hashes say;
    ValueError as for blocks_verifier, or if ``length`` exceeds ``buf``.
    """
    _check_threads(threads)
    if NATIVE:
        alg, prefix, bs, rv = (params.alg.number, padded_salt(params), params.block_size,
                               _hashblocks.read_verify)
        return lambda buf, expected, fd, offset, length, flags=0: rv(
            alg, prefix, buf, bs, expected, fd, offset, length, flags, threads)
    verify_all = blocks_verifier(params, threads)

    def read_verify(buf, expected, fd, offset, length, flags=0):
        mv = memoryview(buf)
        if mv.readonly:
            raise TypeError("read_verify() needs a writable buffer")
        _check_blocks(len(mv), params.block_size, len(memoryview(expected)),
                      params.alg.digest_size)
        if not 0 <= length <= len(mv):
            raise ValueError(f"length {length} is not between 0 and the buffer's "
                             f"{len(mv)} bytes")
        if not 0 <= offset <= (1 << 63) - 1 - len(mv):
            raise ValueError(f"offset {offset} is out of range")
        pos = 0
        while pos < length:
            got = os.preadv(fd, [mv[pos:length]], offset + pos, flags)
            if got == 0:
                raise EOFError(f"end of file at byte {offset + pos}: {length} bytes "
                               f"wanted at offset {offset}")
            pos += got
        mv[length:] = bytes(len(mv) - length)
        return verify_all(mv, expected)

    return read_verify
