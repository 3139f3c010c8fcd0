"""VerifiedReader: the one place where backing file, tree and verifier meet."""

from __future__ import annotations

import os

from .errors import SizeMismatch
from .merkle import read_full


class VerifiedReader:
    """pread-like reads of a verity file that never return unverified bytes.

    Reads are widened to whole blocks, checked, then sliced.  A backing file
    that was truncated or extended after sealing fails the reads that touch
    its end (the sealed size is authoritative).
    """

    def __init__(self, fd: int, verifier, label: str, stats=None):
        self.fd = fd
        self.verifier = verifier
        self.label = label
        self.stats = stats  # a stats.Stats, or None
        self.data_size = verifier.tree.descriptor.data_size
        self.bs = verifier.params.block_size

    def _check_eof(self):
        if os.pread(self.fd, 1, self.data_size):
            raise SizeMismatch(f"{self.label}: backing file was extended past its sealed size {self.data_size}")

    def read(self, offset: int, size: int):
        """Verified bytes [offset, offset+size) clipped to the sealed size.

        Returns a memoryview over the bytes read (no copy when the request is
        block-aligned, as kernel readahead always is).
        """
        bs, data_size = self.bs, self.data_size
        if offset >= data_size or size <= 0:
            if offset >= data_size:
                self._check_eof()
            return b""
        end = min(offset + size, data_size)
        first = offset // bs
        start = first * bs
        stop = min(-(-end // bs) * bs, data_size)
        data = os.pread(self.fd, stop - start, start)
        if len(data) != stop - start:
            # Regular files only read short at EOF, unless interrupted: retry once fully.
            buf = bytearray(stop - start)
            got = read_full(self.fd, buf, start)
            if got != stop - start:
                raise SizeMismatch(f"{self.label}: backing file was truncated to {start + got} "
                                   f"bytes, sealed size {data_size}")
            data = bytes(buf)
        if stop == data_size:
            self._check_eof()
        tail = len(data) % bs
        # The last block of the file is hashed zero-padded (that copy is at EOF only).
        self.verifier.verify(first, data if not tail else data + bytes(bs - tail))
        if self.stats is not None:
            self.stats.verified(-(-len(data) // bs), end - offset)
        return memoryview(data)[offset - start: end - start]
