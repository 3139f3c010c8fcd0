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
- except for a small file (of one block, which has no tree, or of up to 16 KiB
  whose tree is one block): its bytes are fetched instead, and the tree made from
  them (small_trees.small_tree) is used only if its descriptor hashes to the
  manifest digest (the bytes are then the root hash's preimage, and cached for the
  reads that follow): one request per small file instead of two (a registry that
  fails to send the bytes fails the open, as it would the read);
- on read, ``oci_reader.OciReader`` fetches the blocks not in the cache (by
  HTTP range from the data blob), verifies, caches and serves them.

Every request has a timeout, so a stalled registry fails the opens and reads
that wait on it and nothing else.  Each failure is logged once per file and
offset.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from typing import Dict, Optional

from . import manifest, merkle, oci_artifact
from .errors import ManifestError, VerityError
from .logs import requests as ratelog
from .oci_block_cache import BlockCache, DiskBlockCache
from .oci_client import Client, RegistryError
from .oci_ref import parse_ref
from .small_trees import small_tree, small_tree_fits
from .store_object import TREE_OFFSET, open_stored_tree
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
        """The tree object for ``node``'s digest, validated as a store object (for a small
        file, the tree its bytes give, when that does)."""
        fsv = node.digest_text
        if small_tree_fits(node.params, node.size):
            tree = self._small_tree(node, label)
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

    def _small_tree(self, node, label: str):
        """A small file (small_trees.small_tree_fits: of one block, or of up to 16 KiB
        with one tree block): the tree made from its blocks (cached, or fetched now in one
        request), used only if its descriptor hashes to the manifest digest; then the
        blocks are cached, verified, and the reads that follow fetch nothing.  None when
        the blocks do not match, or the artifact names no blob of its size for it: the
        tree object is fetched as for any file, and the read reports what is wrong (EIO
        on a mismatch, as on ext4).  A registry that fails to send the blocks fails the
        open (EIO, logged at offset 0), as it would the read right after.

        The blocks are claimed in the block cache while they are fetched and checked, so
        that concurrent opens and reads of them wait for this fetch instead of repeating
        it."""
        bs, fsv = node.params.block_size, node.digest_text
        cache, keys = self.blocks, [(fsv, b) for b in range(-(-node.size // bs))]
        got: Dict[tuple, bytes] = {}
        with cache.cond:
            mine, waiting = cache.take(keys, got)
            if waiting:  # another open or read fetches some; its request has a timeout
                cache.cond.wait(self.client.timeout)
                # Again for what is neither had nor claimed here (a claim of ours would
                # look like another reader's fetch).
                more, waiting = cache.take([k for k in keys if k not in mine], got)
                mine += more
        try:
            if len(got) == len(keys):  # an empty file too: no block, no request
                return small_tree(label, node.params, b"".join(got[k] for k in keys),
                                  node.digest)
            blob = self.artifact.data.get(fsv)
            if waiting or blob is None or blob.size != node.size:
                return None
            try:
                data = self.client.get_range(blob.digest, 0, node.size,
                                             f"bytes 0-{node.size - 1} of blob {blob.digest}")
            except RegistryError as e:
                raise self.failed(e, label, 0) from None
            tree = small_tree(label, node.params, data, node.digest)
            if tree is not None:
                with cache.cond:
                    for b, key in enumerate(keys):
                        cache.put(key, data[b * bs:(b + 1) * bs], b * bs)
            return tree
        finally:
            if mine:
                with cache.cond:
                    cache.inflight.difference_update(mine)
                    cache.cond.notify_all()

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
