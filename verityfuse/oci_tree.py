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
"""

from __future__ import annotations

import os
import threading
from typing import Tuple

from .store_object import TREE_OFFSET, StoredTree

CHUNK_BLOCKS = 16  # tree blocks per range request: 64 KiB of 4 KiB blocks


class LazyTree(StoredTree):
    def __init__(self, tree: StoredTree, remote, blob, label: str):
        super().__init__(tree.fd, tree.name, tree.descriptor, tree.digest)
        tree.fd = -1  # this object owns the fd now
        self.remote, self.blob, self.label = remote, blob, label
        self.have: set = set()  # chunks fetched
        self.lock = threading.Lock()

    def _ensure(self, first: int, last: int):
        """Tree blocks [first, last] are in the memfd (fetched if not yet)."""
        from .oci_client import RegistryError

        bs, size = self.block_size, self.geometry.tree_size
        for chunk in range(first // CHUNK_BLOCKS, last // CHUNK_BLOCKS + 1):
            if chunk in self.have:
                continue
            with self.lock:  # one fetch per chunk, however many readers want it
                if chunk in self.have:
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
                self.have.add(chunk)

    def read_tree_block(self, index: int) -> bytes:
        self._ensure(index, index)
        return super().read_tree_block(index)

    def read_tree_blocks(self, first: int, count: int, need: int) -> Tuple[int, bytes]:
        # Only ``need``'s range request: the blocks beside it in the same chunk come free,
        # a neighbouring chunk would be a request more.
        lo = max(first, need - need % CHUNK_BLOCKS)
        hi = min(first + count, need - need % CHUNK_BLOCKS + CHUNK_BLOCKS)
        self._ensure(need, need)
        return super().read_tree_blocks(lo, hi - lo, need)

    def read_tree(self, offset: int, length: int) -> bytes:
        size = self.geometry.tree_size
        if offset < size and length > 0:
            bs = self.block_size
            self._ensure(offset // bs, (min(offset + length, size) - 1) // bs)
        return super().read_tree(offset, length)
