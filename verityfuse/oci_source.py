"""A verified tree served lazily from an OCI registry (``mount oci://REF``); pure.

``Remote`` fetches the OCI manifest and the signed verityfuse manifest it
names, and authenticates the latter exactly as ``manifest.load`` does a file
(signature or pin over the raw bytes, before parsing).  Nothing else the
registry says is trusted: the OCI manifest only maps each fs-verity digest to
the blobs that should hold its tree object and its bytes.  A wrong mapping,
wrong bytes, a wrong length or a failing registry therefore cost availability
(EIO for the affected blocks), never integrity:

- at open, the tree object is fetched (its size is what the manifest's size
  and parameters give, so it is bounded before it is read; a large one only
  its header, its blocks as they are used: oci_tree) and validated by
  ``store_object.open_stored_tree`` against the manifest digest, as a store
  object is; its tree blocks are verified as they are used;
- except for a file of at most one block, which has no tree: its one block is
  fetched instead, and the descriptor made from it is used only if it hashes to
  the manifest digest (the block is then the root hash's preimage, and cached
  for the read that follows): one request per small file instead of two;
- on read (in a worker thread, never on the request thread), the blocks not
  in the cache are fetched by HTTP range from the data blob, verified against
  the tree, and only then cached and served; ``VerifiedReader`` verifies them
  once more on the way out, so the read path itself is unchanged.

Concurrent readers of one block fetch it once (in-flight claims).  Every
request has a timeout, so a stalled registry fails the reads that wait on it
and nothing else.  Each failure is logged once per file and offset.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
from typing import Dict, List, Optional

from . import manifest, merkle, oci_artifact
from .errors import IntegrityError, ManifestError, VerityError
from .logs import requests as ratelog
from .oci_block_cache import BlockCache, DiskBlockCache
from .oci_client import Client, RegistryError
from .oci_ref import parse_ref
from .reader import VerifiedReader
from .store_object import TREE_OFFSET, inline_tree, open_stored_tree
from .treebuild import one_block_descriptor
from .verifier import TreeBlockCache

log = logging.getLogger("verityfuse")

DEFAULT_CACHE_BYTES = 64 << 20
MAX_RUN = 4 << 20  # bytes fetched by one range request at most
WHOLE_TREE = 256 << 10  # tree objects up to this size are fetched whole at open


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        raise
    return fd


class Remote:
    """The authenticated artifact behind an ``oci://`` mount, and its data cache.

    Plays the store's part for ``daemon.serve`` (``path``, ``close``)."""

    def __init__(self, source: str, client: Client, trust_keys, pinned_digest: Optional[str],
                 cache_bytes: int = DEFAULT_CACHE_BYTES, min_sequence: int = 0,
                 cache_dir: Optional[str] = None):
        self.path = source
        self.client = client
        ref = client.ref
        body = client.get_manifest(ref.reference, oci_artifact.MAX_OCI_MANIFEST)
        try:
            self.artifact = oci_artifact.parse(body)
        except oci_artifact.ArtifactError as e:
            raise ManifestError(f"{ref}: {e}") from None
        blob = self.artifact.manifest
        if blob.size > manifest.MAX_BYTES:
            raise ManifestError(f"{ref}: the manifest blob is {blob.size} bytes, more than "
                                f"{manifest.MAX_BYTES}")
        raw = client.get_blob(blob.digest, blob.size, f"{ref}: the signed manifest")
        self.manifest = _authenticate(raw, f"{ref} (manifest blob {blob.digest})",
                                      trust_keys, pinned_digest, min_sequence)
        room = max(cache_bytes, MAX_RUN)  # one read's blocks must fit
        self.blocks: BlockCache = (DiskBlockCache(cache_dir, room) if cache_dir
                                   else BlockCache(room))
        # Readahead of sequential reads runs here, so that the network works while a
        # read is answered (two workers: readahead never takes the request threads).
        self.readahead = concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="verityfuse-readahead")
        # Tree objects that validated, so that opening a file again fetches nothing:
        # an LRU of their bytes, a quarter of the cache budget.
        self.trees = TreeBlockCache(cache_bytes // 4)  # a byte-bounded LRU, keyed by digest

    def open_tree(self, node, label: str):
        """The tree object for ``node``'s digest, validated as a store object (for a file
        of one block, the descriptor its block gives, when that does)."""
        fsv = node.digest_text
        if node.size <= node.params.block_size:
            tree = self._one_block_tree(node, label)
            if tree is not None:
                return tree
        blob = self.artifact.trees.get(fsv)
        if blob is None:
            raise self.failed(RegistryError(f"the artifact names no tree object for {fsv}"),
                              label, None)
        size = TREE_OFFSET + merkle.Geometry.compute(node.params, node.size).tree_size
        if blob.size != size:
            raise self.failed(RegistryError(f"the artifact says the tree object for {fsv} is "
                                            f"{blob.size} bytes, its digest gives {size}"),
                              label, None)
        name = f"{label}: tree object (blob {blob.digest})"
        if size > WHOLE_TREE:
            return self._lazy_tree(node, blob, size, name, label)
        data = self.trees.get(fsv)
        if data is None:
            try:
                data = self.client.get_blob(blob.digest, size, "tree object")
            except RegistryError as e:
                raise self.failed(e, label, None) from None
        tree = open_stored_tree(_memfd("verityfuse-tree", data), name, node.alg, node.digest)
        self._keep_tree(fsv, data)
        return tree

    def _one_block_tree(self, node, label: str):
        """A file of at most one block: the descriptor made from its block (cached, or
        fetched now), used only if it hashes to the manifest digest; then the block is
        cached, verified, and the read that follows fetches nothing.  None when the block
        cannot be had or does not match: the tree object is fetched as for any file, and
        the read reports what is wrong with the block (EIO on a mismatch, as on ext4)."""
        data = self._first_block(node) if node.size else b""
        if data is None:
            return None
        desc = one_block_descriptor(node.params, data)
        if desc.digest != node.digest:
            return None
        if node.size:
            with self.blocks.cond:
                self.blocks.put((node.digest_text, 0), data, 0)
        return inline_tree(label, desc, node.digest)

    def _first_block(self, node) -> Optional[bytes]:
        """Block 0 of ``node`` as the cache has it, else as the registry sends it (not
        yet verified); None if it cannot be had.  Claimed while it is fetched, so that
        concurrent readers of the block wait for it instead of fetching it too."""
        fsv = node.digest_text
        key = (fsv, 0)
        got: Dict[tuple, bytes] = {}
        with self.blocks.cond:
            mine, _ = self.blocks.take([key], got)
        if key in got:
            return got[key]
        try:
            blob = self.artifact.data.get(fsv)
            if blob is None or blob.size != node.size:
                return None
            return self.client.get_range(blob.digest, 0, node.size,
                                         f"bytes 0-{node.size - 1} of blob {blob.digest}")
        except RegistryError:
            return None
        finally:
            if mine:
                with self.blocks.cond:
                    self.blocks.inflight.difference_update(mine)
                    self.blocks.cond.notify_all()

    def _lazy_tree(self, node, blob, size: int, name: str, label: str):
        """A large tree object: its header now, its blocks as they are used (oci_tree)."""
        from .oci_tree import LazyTree

        try:
            head = self.client.get_range(blob.digest, 0, TREE_OFFSET,
                                         f"tree object header of blob {blob.digest}")
        except RegistryError as e:
            raise self.failed(e, label, None) from None
        fd = _memfd("verityfuse-tree", head)
        try:
            os.ftruncate(fd, size)  # sparse: memory only for the blocks fetched
        except BaseException:
            os.close(fd)
            raise
        tree = open_stored_tree(fd, name, node.alg, node.digest)
        return LazyTree(tree, self, blob, label)

    def _keep_tree(self, fsv: str, data: bytes):
        if len(data) <= self.trees.max_bytes:  # one that does not fit would empty the cache
            self.trees.put(fsv, data)

    @staticmethod
    def failed(e: VerityError, label: str, offset: Optional[int]) -> VerityError:
        """Log a registry failure once per file and offset; the error to raise (EIO)."""
        where = label if offset is None else f"{label}: offset {offset}"
        ratelog.warning(("oci", label, offset), f"registry failure: {where}: {e}")
        return e

    def status(self) -> dict:
        with self.client.lock:
            requests = dict(self.client.requests)
            fetched = self.client.bytes_fetched
        return {"registry": {"source": self.path, "requests": requests, "bytes_fetched": fetched,
                             "data_cache": self.blocks.snapshot()}}

    def close(self):
        self.readahead.shutdown(wait=True, cancel_futures=True)
        self.blocks.close()
        self.client.close()


def _authenticate(raw: bytes, where: str, trust_keys, pinned: Optional[str], min_sequence: int):
    """manifest.load over bytes (authentication, then rollback and expiry checks, then
    parsing): the manifest code reads a file, so the bytes are handed to it as one (a
    memfd), and its messages name the registry instead."""
    fd = _memfd("verityfuse-manifest", raw)
    path = f"/proc/self/fd/{fd}"
    try:
        return manifest.load(path, trust_keys, pinned, min_sequence)
    except ManifestError as e:
        raise ManifestError(str(e).replace(path, where)) from None
    finally:
        os.close(fd)


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
        self.blob = remote.artifact.data.get(self.fsv)
        self._local = threading.local()  # the blocks of each thread's current read
        self._next = -1  # the block after the last read: the next read is sequential there

    def _check_eof(self):
        pass  # the sealed size is authoritative; bytes past it are never fetched

    def read(self, offset: int, size: int):
        """A verified read; one whose blocks, read back from a disk cache, no longer
        verify (its storage was changed or damaged since they were cached) forgets them
        and fetches them once more, instead of failing until they are evicted."""
        try:
            return self._read(offset, size)
        except IntegrityError:
            if not isinstance(self.remote.blocks, DiskBlockCache):
                raise  # blocks in memory were verified when fetched: a registry's fault
            bs = self.bs
            keys = [(self.fsv, b) for b in range(offset // bs, -(-(offset + size) // bs))]
            with self.remote.blocks.cond:
                self.remote.blocks.drop(keys)
            ratelog.warning(("cache", self.fsv, offset),
                            f"{self.label}: blocks of the disk cache at offset {offset} no "
                            f"longer verify (its storage changed): fetched again")
            return self._read(offset, size)

    def _read(self, offset: int, size: int):
        """The reader verifies a read piece by piece (``STEP``); the blocks of the whole
        read are fetched first, in as few range requests as possible (one for a 1 MiB
        read), since a request's latency costs more than its bytes."""
        if size > 0 and offset < self.data_size:
            bs = self.bs
            first = offset // bs
            last = (min(offset + size, self.data_size) - 1) // bs
            self._local.got = self._blocks(first, last - first + 1)
            self._read_ahead(first, last - first + 1)
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
        while len(got) < count:
            with cache.cond:
                mine, waiting = cache.take(keys, got)
                if quiet and not mine:
                    return got
                if not mine:
                    if waiting:
                        # Another reader fetches them; its request has a timeout.
                        cache.cond.wait(self.remote.client.timeout)
                    continue
            try:
                errors = self._fetch([k[1] for k in mine], got, quiet)
            finally:
                with cache.cond:
                    cache.inflight.difference_update(mine)
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


def remote_from_settings(source: str, s) -> Remote:
    """Fetch and authenticate what ``mount oci://REF`` serves, from its Settings."""
    from .cli_oci import make_client

    try:
        ref = parse_ref(source)
    except ValueError as e:
        raise ManifestError(str(e)) from None
    keys = [manifest.load_public_key(k) for k in s.trust_key]
    if not keys and not s.manifest_digest:
        raise ManifestError(f"{source}: a registry is never trusted: give --trust-key and/or "
                            f"--manifest-digest")
    client = make_client(ref, s.plain_http, s.registry_ca, s.registry_auth, s.registry_timeout)
    try:
        cache = (s.cache_size << 20) if s.cache_size else DEFAULT_CACHE_BYTES
        return Remote(source, client, keys, s.manifest_digest, cache, s.min_sequence or 0,
                      s.cache_dir)
    except BaseException:
        client.close()
        raise
