"""Verified reads answered in native code, from the FUSE request, without Python.

Most reads of a verity file are alike: data in memory, under leaf tree blocks
already verified.  For those a request's cost was mostly pyfuse3's and trio's
(a coroutine, a task, the handler: ~15-40 us), not the reading and hashing
(~3 us for 4 KiB).  The FUSE shim now hands each FUSE_READ to the native
``fast_read`` (``_fastread.c``) first; it answers what it can and declines the
rest, which pyfuse3 then serves through ``ops_read`` exactly as before.  What
it may answer is told here:

- a handle, when it has a ``reader.VerifiedReader`` (``register`` at its open;
  ``came_to_python`` at the first read of a handle that got its reader later,
  after an enable), until it is released (``forget``, before its fd is closed);
  or a handle the native open path opened (``fast_opens``), registered and
  released in C, and in ``registered`` once Python adopts it;
- each leaf tree block the verifier has verified up to the root hash: the tree
  block cache keeps leaf blocks in the native table (``use_leaf_table``), in a
  share of its budget (one copy, where the native path finds it and Python too).

It declines every failure (a mismatch, a truncated or extended file, data not in
memory, a missing leaf), so a failure is found again and reported by the Python
path, with its message, errno, log line and counters: one error boundary.  A
mismatch is not left to be found again: the bytes may be back by the time Python
reads them (a host that flips a byte for a moment), and the read that saw them
must fail and be measured all the same (``seen_mismatch``).

Pure: this module neither imports pyfuse3 nor trio (the shim is passed in).
"""

from __future__ import annotations

import os
from typing import Any, Optional

from . import merkle
from .errors import IntegrityError, VerityError
from .reader import VerifiedReader
from .verifier import leaf_table_key

# The native leaf table's share of the tree-block cache's budget (--cache-size): the
# leaves are all but 1/128 of a SHA-256 tree's blocks (4 KiB).  A 4 KiB leaf block covers
# 512 KiB of data, so 24 MiB of leaves (of the default 32) covers 3 GiB read at random.
LEAF_SHARE = 0.75


# The block sizes the native path serves (the kernel's fs-verity: 1 KiB up to the page
# size; the store's limit: 64 KiB); a file of another block size is read by Python.
MIN_BLOCK, MAX_BLOCK = 1024, 65536


class LeafTable:
    """The native leaf table, as the tree-block cache uses it."""

    def __init__(self, native: Any):
        self.get, self.put, self.info = native.fast_get_leaf, native.fast_put_leaf, native.fast_info


class FastReads:
    """The native read path of one mount (one per process: pyfuse3 serves one)."""

    def __init__(self, native: Any, shim, leaf_bytes: int = 16 << 20):
        self.native, self.shim = native, shim
        native.fast_configure(leaf_bytes=leaf_bytes)
        self.registered: dict = {}  # the handles the native table holds: fh -> read_mode
        # Handles a full table turned away: not offered again at each of their reads
        # (every one would come to Python and be turned away again) until a slot frees.
        self.refused: set = set()

    @classmethod
    def load(cls, shim, cache) -> "Optional[FastReads]":
        """Hook the shim's read to the native engine and feed it ``cache``'s leaf
        blocks; None when either is missing (or VERITYFUSE_NO_FAST_READ is set): then
        every read is Python's, as before."""
        native = merkle._hashblocks
        if (shim is None or native is None or not hasattr(native, "fast_entry")
                or os.environ.get("VERITYFUSE_NO_FAST_READ")):
            return None
        leaf_bytes = int(cache.max_bytes * LEAF_SHARE)
        fast = cls(native, shim, leaf_bytes=leaf_bytes)
        if not shim.set_fast_read(native.fast_entry()):
            return None
        cache.use_leaf_table(LeafTable(native), leaf_bytes)
        return fast

    def register(self, fh: int, h) -> None:
        """Let the native path answer reads of handle ``fh`` if it has a plain verified
        reader whose reads can be done without waiting (while the table is full, the
        handle stays Python's)."""
        reader = h.reader
        if fh in self.registered or fh in self.refused or type(reader) is not VerifiedReader:
            return
        v, how = reader.verifier, reader.read_mode()
        if reader.data_size == 0 or how is None or \
                not MIN_BLOCK <= v.params.block_size <= MAX_BLOCK:
            return
        root = v.root_hash if v.top < 0 else b""  # one block: its hash is the root hash
        if not self.native.fast_register(fh, reader.fd, v.params.alg.number,
                                         merkle.padded_salt(v.params), v.params.block_size,
                                         reader.data_size,
                                         leaf_table_key(v.params.alg.number, v.tree.digest),
                                         root, how):
            self.refused.add(fh)  # the table is full
            return
        self.registered[fh] = how
        if v.top == 0:
            # One leaf block holds every hash (a file of up to 512 KiB with SHA-256 and
            # 4 KiB blocks): verify it now, before any read of the handle, so that even
            # the first is answered natively (a small file is often read once, whole).
            # The read would fetch it anyway; a failure is left for the read to report.
            try:
                v.expected_hashes(0, 1)
            except (VerityError, OSError):
                pass
            except BaseException:  # out of memory: the open fails, and keeps no slot
                self.forget(fh)
                raise

    def seen_mismatch(self, fh: int, h) -> None:
        """Raise the IntegrityError of the block the native path found not hashing to its
        expected hash in this (declined) read of handle ``fh``, with the hash it had then,
        whatever the block holds now."""
        got = self.native.fast_take_mismatch(fh)
        if got is None or h.reader is None:
            return
        offset, actual = got
        v = h.reader.verifier
        expected = bytes(v.expected_hashes(offset // v.params.block_size, 1))
        raise IntegrityError(h.reader.label, offset, expected, actual)

    def came_to_python(self, fh: int, h) -> None:
        """A read of ``fh`` is Python's (declined, or never offered): register the handle
        if it got its reader after its open (an enable); when its file system turned
        out to refuse RWF_NOWAIT, register it again to ask the page cache instead
        (cachestat), or forget it if that cannot be told either (the reader then reads
        in a thread, and every native attempt would only fail)."""
        if fh in self.registered and self.registered[fh] != h.reader.read_mode():
            self.forget(fh)
        self.register(fh, h)

    def forget(self, fh: int) -> None:
        """Before the handle's fd is closed (the native table holds it)."""
        if self.registered.pop(fh, None) is not None:
            self.native.fast_forget(fh)
            self.refused.clear()  # a slot is free: each may try once more
        else:
            self.refused.discard(fh)

    def close(self) -> None:
        """Every read is Python's again; the table forgets every handle."""
        self.shim.set_fast_read(None)
        for fh in list(self.registered):
            self.forget(fh)

    def counts(self) -> dict:
        """What the native path answered and why it declined (``verityfuse status``);
        ``replies_apart``: answers the shim's reply thread sent (large ones)."""
        apart = self.shim.replies_sent_apart() if self.shim is not None else 0
        return dict(self.native.fast_info(), replies_apart=apart)
