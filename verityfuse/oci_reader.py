"""The reads of a file served from an OCI registry (``mount oci://REF``); pure.

On read (in a worker thread, never on the request thread), the blocks not in
the cache are fetched by HTTP range from the data blob, verified against the
tree, and only then cached and served; ``VerifiedReader`` verifies them once
more on the way out, so the read path itself is unchanged.  Concurrent readers
of one block fetch it once (in-flight claims in the block cache); sequential
reads are read ahead.
"""

from __future__ import annotations

import threading
from typing import Dict, List, Optional

from .errors import IntegrityError, VerityError, replayed
from .logs import requests as ratelog
from .oci_block_cache import DiskBlockCache
from .oci_client import RegistryError, TooSlow
from .oci_source import MAX_RUN, Remote
from .reader import VerifiedReader


class OciReader(VerifiedReader):
    """A VerifiedReader whose bytes come from the registry instead of a backing fd.

    ``_pread`` is the one hook: the reader asks for block-aligned bytes, this
    fills them with verified blocks (cache, else range requests).  Inline reads
    (the request thread) are always declined, so the daemon runs every read in
    a worker thread: network I/O never blocks the request loop."""

    def __init__(self, remote: Remote, node, verifier, label: str, stats=None):
        super().__init__(-1, verifier, label, stats)
        self.nowait = False  # no inline attempt: read_one and read_steps return None
        self.remote = remote
        self.fsv = node.digest_text
        self.wait_key = ("data", self.fsv)  # its data blob, which the registry may stall
        self.blob = remote.artifact.data.get(self.fsv)
        self._local = threading.local()  # the blocks of each thread's current read
        self._next = -1  # the block after the last read: the next read is sequential there

    def _check_eof(self):
        pass  # the sealed size is authoritative; bytes past it are never fetched

    def read(self, offset: int, size: int):
        """A verified read; one whose blocks, read back from a disk cache, no longer
        verify (its storage was changed or damaged since they were cached) forgets them
        and fetches them once more, instead of failing until they are evicted."""
        self._local.hits = set()
        try:
            return self._read(offset, size)
        except IntegrityError as e:
            hits = self._local.hits
            if (not isinstance(self.remote.blocks, DiskBlockCache) or e.data_offset is None
                    or (self.fsv, e.data_offset // self.bs) not in hits):
                # Fetched for this read (verified as it came: the registry's fault), or a
                # block in memory, verified when it was fetched.
                raise
            self._forget(hits, offset)
            return self._read(offset, size)

    def _forget(self, keys, offset: int):
        """Blocks read back from a disk cache that no longer verify: dropped, to be
        fetched again."""
        with self.remote.blocks.cond:
            self.remote.blocks.drop(sorted(keys))
        ratelog.warning(("cache", self.fsv, offset),
                        f"{self.label}: blocks of the disk cache at offset {offset} no "
                        f"longer verify (its storage changed): fetched again")

    def read_cached(self, offset: int, size: int):
        """The read, if every block it needs is cached (verified when it was fetched);
        None if one is not.  Never a request: the adapter serves it without a place
        among the few threads one blob may hold (ops_read.ThreadGates), so a stalled
        blob leaves what is cached of it readable.  Blocks of a disk cache that no
        longer verify are forgotten (None: the read fetches them)."""
        span = self._span(offset, size)
        if not span:
            return VerifiedReader.read(self, offset, size)  # nothing to fetch
        keys = [(self.fsv, b) for b in span]
        cache = self.remote.blocks
        with cache.cond:
            got = cache.peek(keys)
        if got is None:
            return None
        self._local.got = got
        try:
            return VerifiedReader.read(self, offset, size)
        except IntegrityError:
            if not isinstance(cache, DiskBlockCache):
                raise  # blocks in memory, verified when fetched
            self._forget(got, offset)
            return None
        finally:
            self._local.got = {}

    def _span(self, offset: int, size: int) -> range:
        """The blocks a read of ``size`` bytes at ``offset`` needs (none past the end)."""
        if size <= 0 or offset >= self.data_size:
            return range(0)
        return range(offset // self.bs, (min(offset + size, self.data_size) - 1) // self.bs + 1)

    def _read(self, offset: int, size: int):
        """The reader verifies a read piece by piece (``STEP``); the blocks of the whole
        read are fetched first, in as few range requests as possible (one for a 1 MiB
        read), since a request's latency costs more than its bytes."""
        span = self._span(offset, size)
        if span:
            self._local.got = self._blocks(span.start, len(span))
            self._read_ahead(span.start, len(span))
        try:
            return super().read(offset, size)
        finally:
            self._local.got = {}

    def _pread(self, mv: memoryview, start: int, inline: bool) -> Optional[int]:
        if inline:
            return None
        bs = self.bs
        first = start // bs
        count = -(-len(mv) // bs)
        got = getattr(self._local, "got", {})
        if any((self.fsv, b) not in got for b in range(first, first + count)):
            got = self._blocks(first, count)
        for i in range(count):
            block = got[(self.fsv, first + i)]
            mv[i * bs: i * bs + len(block)] = block
        return len(mv)

    def _read_ahead(self, first: int, count: int):
        """A read that starts where the previous one ended: the next as many blocks (at
        most MAX_RUN bytes) are fetched in the background, into the cache."""
        sequential, self._next = first == self._next, first + count
        left = -(-self.data_size // self.bs) - (first + count)
        n = min(count, MAX_RUN // self.bs, left)
        if sequential and n > 0:
            self.remote.readahead.submit(self._quietly, first + count, n)

    def _quietly(self, first: int, count: int):
        """Readahead: fetch what nobody fetches yet; a failure is nobody's (not raised,
        not logged): the read that needs the blocks fetches, and reports, again.  The
        handle may have been closed meanwhile: then its tree cannot be read, and nothing
        is cached."""
        try:
            self._blocks(first, count, quiet=True)
        except Exception:
            pass

    def _blocks(self, first: int, count: int, quiet: bool = False) -> Dict[tuple, bytes]:
        """Verified blocks [first, first+count): from the cache, else fetched (once, however
        many readers want them); raises the error of the first block that cannot be had.
        ``quiet`` (readahead): only the blocks nobody fetches, no errors."""
        keys = [(self.fsv, b) for b in range(first, first + count)]
        got: Dict[tuple, bytes] = {}
        cache = self.remote.blocks
        waited_from = None  # cache.fail_seq when this reader began waiting on others' fetches
        while len(got) < count:
            hits = None if quiet else getattr(self._local, "hits", None)
            before = set(got) if hits is not None else ()
            with cache.cond:
                failed = cache.failed_since(waited_from, keys, got)
                if failed is not None:  # the fetch it waited on failed (or a stall cools)
                    if quiet:
                        return got
                    raise replayed(failed)
                mine, waiting = cache.take(keys, got)
                if hits is not None:  # from the cache: a failing read drops only these
                    hits.update(k for k in got if k not in before)
                if quiet and not mine:
                    return got
                if not mine:
                    if waiting:
                        # Another reader fetches them; its request has a timeout.
                        if waited_from is None:
                            waited_from = cache.fail_seq
                        cache.cond.wait(self.remote.client.timeout)
                    continue
            errors: Dict[int, VerityError] = {}
            try:
                errors = self._fetch([k[1] for k in mine], got, quiet)
            finally:
                with cache.cond:
                    cache.inflight.difference_update(mine)
                    if not quiet:  # readahead's failures are nobody's (_quietly)
                        for k in mine:
                            if k not in got and k[1] in errors:
                                e = errors[k[1]]
                                cache.fetch_failed(k, e, self.remote.client.timeout
                                                   if isinstance(e, TooSlow) else 0)
                    cache.cond.notify_all()
            if quiet:
                return got
            for k in mine:
                if k not in got:
                    raise errors[k[1]]
        return got

    def _fetch(self, blocks: List[int], got: Dict[tuple, bytes],
               quiet: bool = False) -> Dict[int, VerityError]:
        """Fetch ``blocks`` (sorted) in runs of consecutive ones, verify, cache the good
        ones into ``got``; the error of each block that could not be had."""
        errors: Dict[int, VerityError] = {}
        bs, size = self.bs, self.data_size
        runs: List[List[int]] = []
        for b in blocks:
            if runs and runs[-1][-1] == b - 1 and len(runs[-1]) * bs < MAX_RUN:
                runs[-1].append(b)
            else:
                runs.append([b])
        for run in runs:
            start = run[0] * bs
            end = min((run[-1] + 1) * bs, size)
            try:
                if self.blob is None:
                    raise RegistryError(f"the artifact names no data blob for {self.fsv}")
                if self.blob.size != size:
                    raise RegistryError(f"the artifact says the data blob for {self.fsv} is "
                                        f"{self.blob.size} bytes, the manifest {size}")
                data = self.remote.client.get_range(
                    self.blob.digest, start, end - start,
                    f"bytes {start}-{end - 1} of blob {self.blob.digest}")
            except RegistryError as e:
                err = e if quiet else self.remote.failed(e, self.label, start)
                errors.update((b, err) for b in run)
                continue
            self._verify_run(run, data, got, errors)
        return errors

    def _verify_run(self, run: List[int], data: bytes, got, errors):
        bs = self.bs
        padded = data + bytes(-len(data) % bs)
        try:
            self.verifier.verify(run[0], padded)
            good = run
        except IntegrityError:
            good = []  # find which blocks are bad: the others are still good
            for i, b in enumerate(run):
                try:
                    self.verifier.verify(b, padded[i * bs:(i + 1) * bs])
                    good.append(b)
                except IntegrityError as e:
                    errors[b] = e
        cache = self.remote.blocks
        with cache.cond:
            for b in good:
                i = b - run[0]
                block = data[i * bs:(i + 1) * bs]
                cache.put((self.fsv, b), block, b * bs)
                got[(self.fsv, b)] = block
