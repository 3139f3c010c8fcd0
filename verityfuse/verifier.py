"""Block verification against a trusted root hash, with a bounded cache.

As in the kernel (fs/verity/verify.c), a data block's hash is checked against
its leaf tree block, and tree blocks are checked upward only until one that
was already verified: a sequential read hashes each leaf block once, not the
whole path per data block.  Verified tree blocks live in one LRU shared by all
files with a byte budget, so memory is bounded however large or many the
files are.  A block is keyed by (hash algorithm, file digest, level, index):
the digest names exactly one tree, so the key is safe to share between files
with the same content and outlives any one open file or inode.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Optional

from .errors import IntegrityError, StoreCorrupt

DEFAULT_CACHE_BYTES = 32 << 20
# verify reads each file once, start to end: a tree block is needed while its file is
# read, then never again.  The mount's 32 MiB in each of verify's worker processes
# was memory for nothing (verify --manifest of 100,000 files: 239 -> 165 MiB in all,
# the same time).
ONE_PASS_CACHE_BYTES = 4 << 20
# Leaf tree blocks verified per miss: the aligned group of this many around the one a
# read needs (under one parent block; 64 KiB of 4 KiB blocks), read in one pread and
# hashed in one native call.  A read whose leaf is not verified yet goes to Python
# (the native path declines it); random 4 KiB reads of a 1 GiB file met 2,048 such
# misses in 20,000 reads, ~50 us each, and a sequential one every 512 KiB.
LEAF_GROUP = 16


def leaf_table_key(alg_number: int, digest: bytes) -> bytes:
    """How the leaf table names a tree: the hash algorithm's number, then the file digest
    (the cache's own keys start with the same two, as a tuple)."""
    return bytes((alg_number,)) + digest


class TreeBlockCache:
    """Thread-safe LRU of verified tree blocks, bounded by total bytes.

    With a leaf table (``use_leaf_table``: the native read path's, fast_reads) the
    leaf blocks (level 0, one in 128 of a SHA-256 tree's blocks is above them) live
    there instead, in a share of the same budget, where native reads find them: one
    copy of each block, and the whole stays within ``max_bytes``.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.max_bytes = max_bytes
        self._own_max = max_bytes  # this LRU's share of the budget
        self.leaves = None  # the leaf table, if any
        self.bytes = 0
        self.hits = self.misses = 0
        self._d: "OrderedDict[tuple, bytes]" = OrderedDict()
        self._lock = threading.Lock()

    def use_leaf_table(self, table, leaf_bytes: int) -> None:
        """Keep leaf blocks in ``table`` from now on (``get(tree_key, index)``,
        ``put(tree_key, index, block)`` -> False if it did not keep it (then this LRU
        does), ``info()`` with its ``leaves`` and ``leaf_bytes``; tree_key is the
        algorithm's number then the file digest), which holds at most ``leaf_bytes``;
        this LRU keeps the rest of the budget."""
        with self._lock:
            self.leaves = table
            self._own_max = max(0, self.max_bytes - leaf_bytes)
            for key in [k for k in self._d if k[2] == 0]:
                self.bytes -= len(self._d.pop(key))
            self._shrink()

    def get(self, key):
        with self._lock:
            block = None
            if key[2] == 0 and self.leaves is not None:
                block = self.leaves.get(leaf_table_key(key[0], key[1]), key[3])
            if block is None:
                block = self._d.get(key)
                if block is not None:
                    self._d.move_to_end(key)
            if block is not None:
                self.hits += 1
            else:
                self.misses += 1
            return block

    def snapshot(self) -> dict:
        with self._lock:
            blocks, nbytes = len(self._d), self.bytes
            if self.leaves is not None:
                info = self.leaves.info()
                blocks, nbytes = blocks + info["leaves"], nbytes + info["leaf_bytes"]
            return {"hits": self.hits, "misses": self.misses, "blocks": blocks,
                    "bytes": nbytes, "max_bytes": self.max_bytes}

    def put(self, key, block: bytes):
        with self._lock:
            if key[2] == 0 and self.leaves is not None and \
                    self.leaves.put(leaf_table_key(key[0], key[1]), key[3], block):
                return  # else a block size the table does not take: kept here
            if key in self._d:
                return
            self._d[key] = block
            self.bytes += len(block)
            self._shrink()

    def _shrink(self):
        while self.bytes > self._own_max and self._d:
            _, old = self._d.popitem(last=False)
            self.bytes -= len(old)

    def __len__(self):
        return len(self._d)


class Verifier:
    """Verifies data blocks of one file against ``tree`` (a store.StoredTree)."""

    def __init__(self, tree, cache: TreeBlockCache, label: str):
        self.tree = tree
        self.cache = cache
        self.label = label  # the file, for messages
        desc = tree.descriptor
        self.root_hash = desc.root_hash
        self.params = desc.params
        self.geo = tree.geometry
        self.hasher = self.params.block_hasher()
        self.verify_blocks = self.params.blocks_verifier()
        self.ds = self.params.alg.digest_size
        self.hpb = self.params.hashes_per_block
        self.top = self.geo.num_levels - 1
        self._key = (self.params.alg.number, tree.digest)

    def _verified_tree_block(self, level: int, index: int) -> bytes:
        key = self._key + (level, index)
        block = self.cache.get(key)
        if block is not None:
            return block
        if level == 0 and self.top > 0:
            block = self._verified_leaf_group(index)
            if block is not None:
                return block
        pos = self.geo.level_start[level] + index
        try:
            block = self.tree.read_tree_block(pos)
        except StoreCorrupt as e:  # a truncated object: its message names the store file
            name = str(self.label)
            raise StoreCorrupt(f"{name}: {e}", name) from None
        actual = self.hasher(block)
        if level == self.top:
            expected = self.root_hash
        else:
            parent = self._verified_tree_block(level + 1, index // self.hpb)
            slot = (index % self.hpb) * self.ds
            expected = parent[slot: slot + self.ds]
        if actual != expected:
            self.tree.mark_failed(pos)
            raise IntegrityError(
                self.label, pos * self.params.block_size, expected, actual,
                what=f"Merkle tree block (level {level}, index {index}) at tree offset",
            )
        self.cache.put(key, block)
        return block

    def _verified_leaf_group(self, index: int) -> Optional[bytes]:
        """Leaf block ``index``, verified with what the tree reads cheaply beside it in
        its aligned group (LEAF_GROUP; read_tree_blocks) against their parent in one
        native call; each that hashes to its slot is cached.  None if ``index`` was not
        read (a truncated object) or does not hash: the caller reads it alone, and that
        read says what is wrong.  A bad neighbour is not cached, and fails only the read
        that needs it, as it would without the group."""
        bs, ds, base = self.params.block_size, self.ds, self.geo.level_start[0]
        group = min(LEAF_GROUP, self.hpb)  # powers of two: a group never spans two parents
        first = index - index % group
        count = min(group, self.geo.level_blocks[0] - first)
        start, data = self.tree.read_tree_blocks(base + first, count, base + index)
        lo, n = start - base, len(data) // bs  # data holds leaves [lo, lo + n)
        parent = self._verified_tree_block(1, lo // self.hpb)
        expected = memoryview(parent)[(lo % self.hpb) * ds:]
        view = memoryview(data)
        k, block = 0, None
        while k < n:
            bad = self.verify_blocks(view[k * bs:n * bs], expected[k * ds:n * ds])
            end = n if bad < 0 else k + bad
            for j in range(k, end):
                verified = bytes(view[j * bs:(j + 1) * bs])
                self.cache.put(self._key + (0, lo + j), verified)
                if lo + j == index:
                    block = verified
            k = end + 1  # past the block that does not hash
        return block

    def _tree_block_at(self, pos: int) -> bytes:
        """The verified tree block at position ``pos`` of the serialized tree."""
        geo = self.geo
        for level in range(self.top + 1):
            index = pos - geo.level_start[level]
            if 0 <= index < geo.level_blocks[level]:
                return self._verified_tree_block(level, index)
        raise ValueError(f"tree block {pos} is past the end of the tree")

    def read_tree(self, offset: int, length: int) -> bytes:
        """Bytes of the serialized tree, pread-like (short at its end), for what a mount
        exports (xattrs, FUSE_FSVERITY, dump-metadata): only the tree blocks the range
        touches are verified, each with its path to the root (stopping, as reads do, at
        a block the cache already holds verified), never the whole tree."""
        end = min(offset + length, self.geo.tree_size)
        if offset >= end:
            return b""
        bs = self.params.block_size
        first = offset // bs
        blocks = [self._tree_block_at(pos) for pos in range(first, -(-end // bs))]
        start = offset - first * bs
        return b"".join(blocks)[start:start + end - offset]

    def expected_hashes(self, first_block: int, n: int):
        """The trusted hashes of data blocks [first_block, first_block + n), from their
        verified leaf tree blocks (the root hash for a one-block file)."""
        if self.top < 0:
            if first_block != 0 or n != 1:
                raise IntegrityError(self.label, first_block * self.params.block_size,
                                     self.root_hash, b"", what="data block past the end at offset")
            return self.root_hash
        hpb, ds = self.hpb, self.ds
        leaf_index, slot = divmod(first_block, hpb)
        if slot + n <= hpb:  # under one leaf tree block: most reads
            return memoryview(self._verified_tree_block(0, leaf_index))[slot * ds:(slot + n) * ds]
        parts, b, end = [], first_block, first_block + n
        while b < end:  # a 1 MiB read of 4 KiB blocks touches at most 3 leaf blocks
            leaf_index, slot = divmod(b, hpb)
            count = min(end - b, hpb - slot)
            leaf = self._verified_tree_block(0, leaf_index)
            parts.append(memoryview(leaf)[slot * ds:(slot + count) * ds])
            b += count
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def verify(self, first_block: int, data) -> None:
        """Check whole blocks ``data`` (zero-padded) starting at data block ``first_block``:
        one native call hashes and compares them all (GIL released, both cores)."""
        bs = self.params.block_size
        expected = self.expected_hashes(first_block, len(data) // bs)
        bad = self.verify_blocks(data, expected)
        if bad >= 0:
            self.mismatch(first_block, data, expected, bad)

    def mismatch(self, first_block: int, data, expected, bad: int):
        """Raise the IntegrityError for block ``bad`` of ``data`` (a native call found it
        does not hash to its entry of ``expected``): offset and both hashes."""
        bs, ds = self.params.block_size, self.ds
        block = memoryview(data)[bad * bs:(bad + 1) * bs]
        raise IntegrityError(self.label, (first_block + bad) * bs,
                             bytes(expected[bad * ds:(bad + 1) * ds]), self.hasher(block))
