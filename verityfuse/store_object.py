"""Tree objects of the store: the on-disk format, validation, reading and writing.

An object is ``header(64) || descriptor(256) || tree`` (protocol/store-format.md),
named by the fs-verity digest of its descriptor, so it proves itself: the
descriptor must hash to the name, the sizes must be what the descriptor's
parameters give, and every tree block must hash up to the root hash (checked
by the verifier as each block is used).
"""

from __future__ import annotations

import os
import struct
import threading
from collections import OrderedDict
from typing import Callable, Dict, Hashable, List, Optional, Tuple

from . import merkle, uapi
from .errors import InvalidDescriptor, StoreCorrupt

OBJECT_MAGIC = b"VFSTREE1"
# magic[8], header_size u32, flags u32, tree_size u64, reserved[40]
OBJECT_HEADER = struct.Struct("<8sIIQ40s")
HEADER_SIZE = OBJECT_HEADER.size
TREE_OFFSET = HEADER_SIZE + uapi.FS_VERITY_DESCRIPTOR_SIZE
MAX_BLOCK_SIZE = merkle.MAX_BLOCK_SIZE  # larger trees are refused as corrupt


class StoredTree:
    """An open, validated object: descriptor in memory, tree read block by block."""

    def __init__(self, fd: int, name: str, descriptor: merkle.Descriptor, digest: bytes,
                 geometry: Optional[merkle.Geometry] = None):
        self.fd = fd
        self.name = name
        self.descriptor = descriptor
        self.digest = digest
        self.geometry = geometry or descriptor.geometry  # computed on each access: once here
        self.block_size = descriptor.params.block_size
        self.failed = False  # a block of it failed: never kept open once released

    def mark_failed(self, index: Optional[int] = None):
        """A tree block read through it (``index``, when it is known) failed (a hash
        mismatch, a truncation): when its last holder lets it go it is closed, not kept,
        so that the next open reads the store again (an object repaired by a rename over
        it is then seen)."""
        self.failed = True

    @property
    def tree_id(self) -> merkle.TreeId:
        """Its descriptor's record, with the digest it was opened by (which the
        descriptor hashes to: checked at open, not hashed again)."""
        d = self.descriptor
        return merkle.TreeId(d.params, d.data_size, self.digest)

    def read_tree_block(self, index: int) -> bytes:
        bs = self.block_size
        block = os.pread(self.fd, bs, TREE_OFFSET + index * bs)
        if len(block) != bs:
            self.failed = True
            raise StoreCorrupt(
                f"{self.name}: tree block {index} is truncated "
                f"({len(block)} of {bs} bytes)"
            )
        return block

    def read_tree_blocks(self, first: int, count: int, need: int) -> Tuple[int, bytes]:
        """(start, bytes) of the tree blocks from ``start`` on, within [first, first +
        count) and including ``need`` if the object holds it, that cost about one read
        of ``need`` (all of them here: one pread); fewer bytes where the object ends
        early (the caller checks each block it uses)."""
        bs = self.block_size
        return first, os.pread(self.fd, count * bs, TREE_OFFSET + first * bs)

    def read_tree(self, offset: int, length: int) -> bytes:
        """Bytes of the serialized tree, pread-like (short at the end)."""
        size = self.geometry.tree_size
        if offset >= size:
            return b""
        return os.pread(self.fd, min(length, size - offset), TREE_OFFSET + offset)

    def close(self):
        fd, self.fd = self.fd, -1  # first: a thread reading it meanwhile sees -1 (EBADF), not
        if fd >= 0:                # the number reused by another file's open
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TreeRef:
    """One holder's reference to a StoredTree that handles of the same digest share
    (one fd per digest, not one per open handle): ``close`` ends this reference
    only (once), and the last one closes the fd."""

    def __init__(self, tree: StoredTree, release):
        self._tree, self._release = tree, release
        self.name, self.descriptor, self.digest = tree.name, tree.descriptor, tree.digest
        self.geometry, self.block_size = tree.geometry, tree.block_size
        self.read_tree_block, self.read_tree = tree.read_tree_block, tree.read_tree
        self.read_tree_blocks = tree.read_tree_blocks
        self.mark_failed = tree.mark_failed

    @property
    def tree_id(self) -> merkle.TreeId:
        return self._tree.tree_id

    @property
    def fd(self) -> int:
        return self._tree.fd

    def close(self):
        release, self._release = self._release, None
        if release is not None:
            release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def inline_tree(name: str, desc: merkle.Descriptor, digest: bytes) -> TreeRef:
    """The tree of a file of one block whose index entry ``name`` keeps its descriptor,
    which hashes to ``digest`` (checked when the entry was read): no tree block, no fd."""
    return TreeRef(StoredTree(-1, name, desc, digest), lambda: None)


def object_head(desc: merkle.Descriptor) -> bytes:
    """The first TREE_OFFSET bytes of ``desc``'s object, its tree's size in the header:
    the whole object of a file of one block, which has no tree (most of a container
    image's files: no geometry to compute)."""
    tree_size = 0 if desc.data_size <= desc.params.block_size else desc.geometry.tree_size
    return OBJECT_HEADER.pack(OBJECT_MAGIC, HEADER_SIZE, 0, tree_size, b"") + desc.raw


# How many released objects stay open (the most recently released): the lookup that
# reads a file's descriptor and the open that follows it, or a file opened again
# soon, cost one object open.  Bounded: these fds come out of the daemon's FD_RESERVE.
KEEP_IDLE = 16


class SharedTrees:
    """Open StoredTrees by key, each shared by its holders (thread-safe).

    The last holder's release keeps the tree open among the ``keep`` most recently
    released (closed when it falls out, or on ``close``).  That is safe because a
    tree is validated once, when it is opened, against the digest it is looked up
    by: its descriptor is in memory, and every tree block read through it is still
    hashed up to that descriptor's root hash.  So an object changed on disk after it
    was opened (a flipped tree block, a truncation) still fails each read it
    touches, as it does under a handle held open; one replaced or removed is read
    from the inode that was validated; one whose header or descriptor bytes are
    changed later is not read again while it is kept, as under an open handle.
    A tree a block of which failed is not kept: the next open reads the store again
    (and finds a repaired object, or fails again).
    """

    def __init__(self, keep: int = KEEP_IDLE):
        self.keep = keep
        self._held: Dict[Hashable, List] = {}  # key -> [tree, references]
        self._idle: "OrderedDict[Hashable, StoredTree]" = OrderedDict()  # no references
        self._lock = threading.Lock()

    def _take(self, key: Hashable) -> Optional[TreeRef]:
        """A new reference to an open tree of ``key`` (caller holds the lock)."""
        held = self._held.get(key)
        if held is None:
            tree = self._idle.pop(key, None)
            if tree is None:
                return None
            held = self._held[key] = [tree, 0]
        held[1] += 1
        return TreeRef(held[0], lambda: self._release(key))

    def open(self, key: Hashable, opener: Callable[[], StoredTree]) -> TreeRef:
        """A reference to the tree of ``key``, opened (and validated) by ``opener``
        when no holder has it open and it is not kept."""
        with self._lock:
            ref = self._take(key)
        if ref is not None:
            return ref
        tree = opener()  # it reads: outside the lock
        with self._lock:
            ref = self._take(key)
            if ref is None:
                self._held[key] = [tree, 1]
                return TreeRef(tree, lambda: self._release(key))
        tree.close()  # another thread opened it meanwhile: keep one
        return ref

    def _release(self, key: Hashable):
        closing = None
        with self._lock:
            held = self._held[key]
            held[1] -= 1
            if held[1] == 0:
                del self._held[key]
                if held[0].failed:
                    closing = held[0]  # read from the store again at the next open
                else:
                    self._idle[key] = held[0]
                    if len(self._idle) > self.keep:
                        closing = self._idle.popitem(last=False)[1]
        if closing is not None:
            closing.close()

    def drop_idle(self):
        """Close the kept trees (held ones close with their last holder)."""
        with self._lock:
            idle, self._idle = list(self._idle.values()), OrderedDict()
        for tree in idle:
            tree.close()

    def close(self):
        """Close the kept trees and keep none from now on."""
        with self._lock:
            self.keep = 0
        self.drop_idle()


class ObjectWriter:
    """A tree being built into the store's tmp/.  ``commit`` makes it an object now,
    durably; ``stage`` leaves it in tmp/, unsynced, for a store_batch.Batch to
    publish with others.  Only the store's public writing interface is used."""

    # The first this many bytes of a tree are kept and written with the header in one
    # write: a small file's object costs one write, not one per block.
    BUFFERED = 64 << 10

    def __init__(self, store):
        self.store = store
        self.tmpname, self.fd = store.create_tmp()
        self._head = bytearray()  # tree bytes [0, BUFFERED)
        self._end = 0             # the end of the tree bytes written so far

    def write_block(self, offset: int, block: bytes):
        end = offset + len(block)
        self._end = max(self._end, end)
        if end <= self.BUFFERED:
            if len(self._head) < end:
                self._head.extend(bytes(end - len(self._head)))
            self._head[offset:end] = block
        else:
            os.pwrite(self.fd, block, TREE_OFFSET + offset)

    def _finish(self, desc: merkle.Descriptor, durable: bool):
        head = object_head(desc)
        os.pwrite(self.fd, head + self._head, 0)
        tree_size = OBJECT_HEADER.unpack_from(head)[3]
        if self._end != tree_size:  # never after a whole build; the size is the format's
            os.ftruncate(self.fd, TREE_OFFSET + tree_size)
        if durable:
            os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1

    def commit(self, desc: merkle.Descriptor) -> str:
        self._finish(desc, durable=True)
        dirparts, name = self.store.object_parts(desc.params.alg, desc.digest)
        dirfd = self.store.open_dir(dirparts)
        try:
            self.store.place(self.tmpname, dirfd, name)
        finally:
            os.close(dirfd)
        self.tmpname = None
        return name

    def stage(self, desc: merkle.Descriptor) -> str:
        """The tmp name of the finished object, now the caller's to place or discard."""
        self._finish(desc, durable=False)
        name, self.tmpname = self.tmpname, None
        return name

    def abort(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.tmpname:
            self.store.discard_tmp(self.tmpname)
            self.tmpname = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if self.tmpname:
            self.abort()


# What every right header starts with (magic, header size, flags) and ends with.
_HEADER_START = OBJECT_HEADER.pack(OBJECT_MAGIC, HEADER_SIZE, 0, 0, b"")[:16]
_RESERVED = bytes(40)


def _bad_header(name: str, magic: bytes, hsize: int, flags: int):
    for field, actual, expected in (("magic", magic, OBJECT_MAGIC),
                                    ("header size", hsize, HEADER_SIZE), ("flags", flags, 0)):
        if actual != expected:
            raise StoreCorrupt(f"{name}: bad object header: {field} {actual!r}, "
                               f"expected {expected!r}")
    raise StoreCorrupt(f"{name}: bad object header: reserved bytes are not zero")


def open_stored_tree(fd: int, name: str, alg: merkle.HashAlg, digest: bytes,
                     head: Optional[bytes] = None, size: Optional[int] = None) -> StoredTree:
    """Validate the object open as ``fd`` (consumed) against ``digest``; ``head`` and
    ``size``: its first TREE_OFFSET bytes and its size, when the caller has them."""
    try:
        if head is None:
            head = os.pread(fd, TREE_OFFSET, 0)
        if len(head) != TREE_OFFSET:
            raise StoreCorrupt(f"{name}: truncated header ({len(head)} of {TREE_OFFSET} bytes)")
        magic, hsize, flags, tree_size, reserved = OBJECT_HEADER.unpack_from(head)
        if head[:16] != _HEADER_START or reserved != _RESERVED:  # one compare when right
            _bad_header(name, magic, hsize, flags)
        try:
            desc = merkle.parse_descriptor(head[HEADER_SIZE:])
        except InvalidDescriptor as e:
            raise StoreCorrupt(f"{name}: {e}") from None
        if desc.params.block_size > MAX_BLOCK_SIZE:
            # Every read would cost a whole tree block of memory.
            raise StoreCorrupt(f"{name}: block size {desc.params.block_size} is larger "
                               f"than {MAX_BLOCK_SIZE}")
        actual = desc.digest
        if desc.params.alg != alg or actual != digest:
            raise StoreCorrupt(
                f"{name}: descriptor does not match its digest: expected "
                f"{merkle.format_digest(alg, digest)}, actual "
                f"{merkle.format_digest(desc.params.alg, actual)}"
            )
        geometry = desc.geometry
        want = geometry.tree_size
        if size is None:
            size = os.fstat(fd).st_size
        if tree_size != want or size != TREE_OFFSET + want:
            raise StoreCorrupt(
                f"{name}: tree is {size - TREE_OFFSET} bytes (header says {tree_size}), "
                f"expected {want}"
            )
        return StoredTree(fd, name, desc, digest, geometry)
    except BaseException:
        os.close(fd)
        raise
