"""Trees made from a small file's bytes instead of read from its store object.

A file of at most one block has no tree (its root hash is the hash of its one block,
zero-padded), and one of up to SMALL_TREE_BYTES has one tree block, the hashes of its
blocks.  Whatever reads a file by a trusted digest (a manifest mount, an oci:// mount,
``verify --manifest``, ``push``, ``open_verified(digest=)``) can make that tree from the
bytes it reads and use it only if its descriptor hashes to the digest, which then
vouches for the root hash, and so for the tree block that hashes to it: no object to
open (on a virtio-fs share, host round trips; from a registry, a request), and none at
all for a manifest's file of one block, which is sealed without one.
"""

from __future__ import annotations

from typing import Optional, Tuple

from . import merkle, treebuild
from .errors import StoreCorrupt
from .store_object import StoredTree, TreeRef, inline_tree


# The largest file whose tree small_tree makes from its bytes at open instead of reading
# its object: hashing 16 KiB (~5 us) costs less than an object's open and read, which on
# a virtio-fs share are round trips to the host.
SMALL_TREE_BYTES = 16 << 10


def small_tree_fits(params: merkle.Params, size: int) -> bool:
    """Whether small_tree serves a file of ``size`` bytes: one of at most one block (no
    tree, whatever the block size), or one of at most SMALL_TREE_BYTES whose tree is one
    block of its blocks' hashes."""
    bs = params.block_size
    return size <= bs or (size <= SMALL_TREE_BYTES and -(-size // bs) <= params.hashes_per_block)


class MemoryTree(StoredTree):
    """A tree of one block made from its file's bytes (small_tree), held in memory.  The
    verifier still hashes the block up to the root hash before it trusts it."""

    def __init__(self, name: str, descriptor: merkle.Descriptor, digest: bytes, block: bytes):
        super().__init__(-1, name, descriptor, digest)
        self.block = block

    def read_tree_block(self, index: int) -> bytes:
        if index != 0:
            raise StoreCorrupt(f"{self.name}: no tree block {index} in a tree of one block")
        return self.block

    def read_tree(self, offset: int, length: int) -> bytes:
        return self.block[offset: offset + length]


def small_descriptor(params: merkle.Params, data: bytes
                     ) -> Tuple[merkle.Descriptor, Optional[bytes]]:
    """The descriptor of a small file (small_tree_fits) whose bytes are ``data``, and its
    one tree block (None for a file of at most one block, which has no tree).  The same
    bytes as ``fsverity digest`` builds."""
    bs = params.block_size
    if len(data) <= bs:
        return treebuild.one_block_descriptor(params, data), None
    if not small_tree_fits(params, len(data)):
        raise ValueError(f"a file of {len(data)} bytes is not small (small_tree_fits)")
    tail = -len(data) % bs
    hashes = params.blocks_hasher(threads=1)(data + bytes(tail) if tail else data)
    block = hashes.ljust(bs, b"\0")
    return merkle.Descriptor.build(params, len(data), params.block_hasher()(block)), block


def small_tree(name: str, params: merkle.Params, data: bytes,
               digest: bytes) -> Optional[TreeRef]:
    """The tree of a file whose bytes are ``data`` (small_tree_fits: none, or one block
    of hashes), if the descriptor it gives with ``params`` hashes to the trusted
    ``digest``, which then vouches for the root hash and so for the tree block that
    hashes to it; None if it does not."""
    desc, block = small_descriptor(params, data)
    if desc.digest != digest:
        return None
    if block is None:
        return inline_tree(name, desc, digest)
    return TreeRef(MemoryTree(name, desc, digest, block), lambda: None)


def small_file_differs(params: merkle.Params, data: bytes, size: int, digest: bytes) -> str:
    """How a small file whose bytes are ``data`` (treebuild.read_upto) differs from the one sealed
    as ``digest`` with ``params`` and ``size`` bytes (small_tree gave no tree), to finish
    a message about it, after its name: its size, or the digest its bytes give, and
    what the manifest says."""
    if len(data) != size:
        return (f"is {'more than ' + str(size) if len(data) > size else len(data)} bytes, "
                f"the manifest says {size}")
    alg = params.alg
    return (f"gives {merkle.format_digest(alg, small_descriptor(params, data)[0].digest)}, "
            f"the manifest says {merkle.format_digest(alg, digest)}")
