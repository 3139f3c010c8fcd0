"""A large tree object read from the registry by range, as it is used; pure.

A tree object is about 1/128 of its file: 8 MiB for a 1 GiB file.  Fetching it
whole at open would make the first byte of a large file wait for all of it.
So for a large object only its header and descriptor (320 bytes) are fetched
at open, into a sparse memfd of the object's full size, and validated by
``store_object.open_stored_tree`` exactly as a store object is (descriptor
hashes to the manifest digest, sizes as its parameters give).  Tree blocks are
then fetched in aligned chunks when the verifier first asks for them, written
into the memfd (memory only for what was fetched) and, as for any store
object, checked up to the root hash before they are trusted.

At most MAX_BYTES of chunks stay in the memfd (plus a page each where one
straddles pages), the least recently used let go (a hole punched): a pass over a
large file would otherwise keep its whole tree, per open handle, counted by no
budget.  The blocks the verifier checked stay in its tree-block cache; a chunk let
go is fetched again when a block of it is needed once more.  A block is read from
the memfd under the lock that fetches and lets go, so a read never sees the hole of
a chunk let go meanwhile.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Tuple

from .oci_block_cache import punch_hole
from .store_object import TREE_OFFSET, StoredTree

CHUNK_BLOCKS = 16  # tree blocks per range request: 64 KiB of 4 KiB blocks
MAX_BYTES = 4 << 20  # fetched tree bytes one open tree keeps (at least two chunks)
PAGE = os.sysconf("SC_PAGE_SIZE")


class LazyTree(StoredTree):
    def __init__(self, tree: StoredTree, remote, blob, label: str):
        super().__init__(tree.fd, tree.name, tree.descriptor, tree.digest)
        tree.fd = -1  # this object owns the fd now
        self.remote, self.blob, self.label = remote, blob, label
        self.have: "OrderedDict[int, None]" = OrderedDict()  # chunks in the memfd, LRU first
        self.max_chunks = max(2, MAX_BYTES // (CHUNK_BLOCKS * self.block_size))
        self.lock = threading.Lock()

    def _ensure(self, first: int, last: int):
        """Tree blocks [first, last] are in the memfd (fetched if not yet); the caller
        holds ``lock`` until it has read them."""
        from .oci_client import RegistryError

        bs, size = self.block_size, self.geometry.tree_size
        for chunk in range(first // CHUNK_BLOCKS, last // CHUNK_BLOCKS + 1):
            if chunk in self.have:
                self.have.move_to_end(chunk)
                continue
            start = chunk * CHUNK_BLOCKS * bs
            end = min(start + CHUNK_BLOCKS * bs, size)
            try:
                data = self.remote.client.get_range(
                    self.blob.digest, TREE_OFFSET + start, end - start,
                    f"tree bytes {start}-{end - 1} of blob {self.blob.digest}")
            except RegistryError as e:
                raise self.remote.failed(e, self.label, None) from None
            os.pwrite(self.fd, data, TREE_OFFSET + start)
            self.have[chunk] = None
            while len(self.have) > self.max_chunks:
                self._let_go(self.have.popitem(last=False)[0])

    def _let_go(self, chunk: int):
        """Punch chunk ``chunk`` out of the memfd.  The tree starts TREE_OFFSET into it, so
        a chunk's ends share pages with its neighbours: such a page is freed only when the
        neighbour is not held (never the first page, which holds the header)."""
        span = CHUNK_BLOCKS * self.block_size
        lo = TREE_OFFSET + chunk * span
        hi = TREE_OFFSET + min((chunk + 1) * span, self.geometry.tree_size)
        if chunk > 0 and chunk - 1 not in self.have:
            lo = max(lo - lo % PAGE, PAGE)
        if chunk + 1 not in self.have:
            hi += -hi % PAGE
        punch_hole(self.fd, lo, hi - lo)

    def mark_failed(self, index=None):
        """A block fetched into the memfd did not hash: its chunk is let go, so that the
        next read fetches it again (a registry's answer damaged once would otherwise fail
        every read under that chunk for as long as the file is open)."""
        super().mark_failed(index)
        if index is None:
            return
        with self.lock:
            chunk = index // CHUNK_BLOCKS
            if chunk in self.have:
                del self.have[chunk]
                self._let_go(chunk)

    def read_tree_block(self, index: int) -> bytes:
        with self.lock:  # one fetch per chunk, however many readers want it
            self._ensure(index, index)
            return super().read_tree_block(index)

    def read_tree_blocks(self, first: int, count: int, need: int) -> Tuple[int, bytes]:
        # Only ``need``'s range request: the blocks beside it in the same chunk come free,
        # a neighbouring chunk would be a request more.
        lo = max(first, need - need % CHUNK_BLOCKS)
        hi = min(first + count, need - need % CHUNK_BLOCKS + CHUNK_BLOCKS)
        with self.lock:
            self._ensure(need, need)
            return super().read_tree_blocks(lo, hi - lo, need)

    def read_tree(self, offset: int, length: int) -> bytes:
        size, bs = self.geometry.tree_size, self.block_size
        out = []
        end = min(offset + max(length, 0), size)
        while offset < end:  # a chunk at a time: a long range never lets go of its start
            piece = min(end, (offset // (CHUNK_BLOCKS * bs) + 1) * CHUNK_BLOCKS * bs) - offset
            with self.lock:
                self._ensure(offset // bs, offset // bs)
                out.append(super().read_tree(offset, piece))
            offset += piece
        return b"".join(out)  # short at the end of the tree, as a store object's
