"""The manifest view of a tree served from an OCI registry (``mount oci://REF``).

Everything but opening a file is ``ManifestView``'s: names, attributes and
listings come from the authenticated manifest alone.  Opening a file fetches
its tree object from the registry (validated against the manifest digest) and
gives the handle an ``OciReader``, which fetches and verifies blocks on read.
There is no share: a handle has no backing fd.
"""

from __future__ import annotations

import os
import stat

from .oci_reader import OciReader
from .oci_source import Remote
from .small_trees import small_tree_fits
from .verifier import Verifier
from .view import FileHandle, erofs
from .view_manifest import ManifestView


class OciView(ManifestView):
    # Opening fetches a tree object: the daemon runs open in a worker thread.
    open_blocks = True
    # Reads wait on the network (each bounded by a timeout): more worker threads, so
    # that reads stalled on the registry leave threads for the others.
    threads = 32  # ops_read.PER_BLOB_THREADS of them at most wait on one blob
    # The reads the kernel keeps in flight to the daemon (12 by default): reads waiting on
    # a stalled blob, at most PER_BLOB_THREADS of them in threads, must leave room for
    # the reads of other files.
    max_background = 64

    def __init__(self, remote: Remote, cache, stats=None):
        # No share: the registry is the store and the source of bytes.
        super().__init__(None, remote.manifest.tree, remote, cache, remote.manifest.digest, stats)
        self.remote = remote

    def _fetch_tree(self, node):
        return self.remote.open_tree(node, node.path)

    def wait_key(self, ino: int):
        """What opening ``ino`` (or exporting its metadata) waits on: its tree object,
        apart from its reads' data blob (``OciReader.wait_key``), so that a stalled data
        blob holds up no open of the file and a stalled tree no read; a small file's
        open fetches its bytes (``Remote.open_tree``): its data blob."""
        node = self.tree.node(ino)
        if node is None or node.kind != stat.S_IFREG:
            return None
        blob = "data" if small_tree_fits(node.params, node.size) else "tree"
        return (blob, node.digest_text)

    def open(self, ino: int, flags: int, caller=None, fd=None) -> FileHandle:
        assert fd is None  # no backing file: an OCI open never raises WouldWait
        node = self._file(ino)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            erofs()
        fh = FileHandle(-1, node)
        tree = self.open_tree(node)
        fh.closers.append(tree)
        fh.reader = OciReader(self.remote, node, Verifier(tree, self.cache, node.path),
                              node.path, self.stats)
        return fh

    def status(self) -> dict:
        return self.remote.status()
