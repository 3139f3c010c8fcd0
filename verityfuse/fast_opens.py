"""Read-only opens of sealed local files answered in native code, without Python.

In local mode, opening a verity file cost the daemon's Python ~40 us (the reopen, a
FileHandle, the tree, the verified reader, the native read registration) and its
release ~8 us, against ~7 and ~3 for a passthrough: with the lookup, most of what a
container start (open, read and close of each of many small files) paid beyond it.
Now the FUSE shim hands each FUSE_OPEN and FUSE_RELEASE to ``_fastopen.c`` first.
It answers the open of an inode offered here when the open is read-only and the
file's reads can be answered natively too (``fast_reads``); everything else goes to
Python as before.  What it needs comes from here:

- each looked-up sealed file whose verity state loaded is offered (``offer``) with
  its O_PATH fd, sealed size, hash parameters, tree key and read mode, and
  withdrawn before that fd is closed (``drop``, the inode table's hook);
- a native open asks the handle budget for a handle number for the caller's uid,
  which it refuses while the tripwire refuses opens or the uid holds its share (the
  open then goes to Python, which refuses it with its errno and log line);
- a file of one leaf block has that block verified at its first native open
  (``prepare``), not at its lookup, which a stat need not pay for;
- a read of a native handle that reaches Python (one the native path declined)
  makes the handle Python's first (``adopt``: the view attaches its reader to the
  handle's fd); a flush, an fsync or an ioctl uses its fd through a transient view
  (``peek``) and leaves it native.  ``OpenHandles`` does both for every handler.

The trust rule is unchanged: a native open registers what a Python open would
(the sealed size checked against the reopened file, the expected hashes from the
verified tree), and every read is still hashed before it is answered.

Pure: this module neither imports pyfuse3 nor trio (the shim is passed in).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional

from . import merkle
from .errors import VerityError
from .fast_reads import MAX_BLOCK, MIN_BLOCK, FastReads
from .reader import VerifiedReader
from .verifier import leaf_table_key
from .view import FileHandle, VerityInfo


class OpenHandles(dict):
    """fh -> the open handle.  A handle the native path opened becomes Python's the
    first time a handler needs it whole (``h = handles[fh]``: ``adopt``, for a read);
    a handler that only needs its fd (a flush, an fsync, an ioctl) gets a transient
    view of it instead (``view``, ``get``: ``peek``), and the handle stays native."""

    adopt: Optional[Callable[[int], Any]] = None
    peek: Optional[Callable[[int], Any]] = None

    def __missing__(self, fh):
        h = self.adopt(fh) if self.adopt is not None else None
        if h is None:
            raise KeyError(fh)
        self[fh] = h
        return h

    def view(self, fh):
        """Python's handle ``fh``, or a FileHandle over a native handle's fd (never
        closed by its holder: the native path closes it); KeyError if neither."""
        h = dict.get(self, fh)
        if h is None and self.peek is not None:
            h = self.peek(fh)
        if h is None:
            raise KeyError(fh)
        return h

    def get(self, fh, default=None):
        try:
            return self.view(fh)
        except KeyError:
            return default


class NativeOpens:
    """The native open path of one local mount."""

    def __init__(self, native: Any, shim, fast: FastReads, view):
        self.native, self.shim, self.fast, self.view = native, shim, fast, view
        self.modes: Dict[int, Optional[int]] = {}  # st_dev -> read mode a Python open found
        self.offered: Dict[int, int] = {}  # ino -> the O_PATH fd it was offered with

    @classmethod
    def load(cls, shim, fast: Optional[FastReads], budget, tripwire,
             view) -> "Optional[NativeOpens]":
        """Hook the shim's open and release (None if the native read path is off, the
        engine or shim lacks it, or VERITYFUSE_NO_FAST_OPEN is set)."""
        native = merkle._hashblocks
        if (fast is None or native is None or not hasattr(native, "fast_open_entry")
                or os.environ.get("VERITYFUSE_NO_FAST_OPEN")):
            return None
        opens = cls(native, shim, fast, view)

        def admit(uid: int) -> Optional[int]:  # called by fast_open, on the request thread
            return None if tripwire.refusing else budget.offer(uid)

        def released(fh: int) -> None:
            budget.remove(fh)
            fast.refused.clear()  # a slot of the native read table is free: as fast.forget

        native.fast_open_set(admit, released, opens.prepare, view.noatime)
        if not shim.set_fast_open(native.fast_open_entry()):
            native.fast_open_set(None, None, None, False)
            return None
        view.use_native_opens(opens)
        return opens

    def learn(self, h) -> None:
        """After a Python open: how files of its file system are read without waiting;
        and the file offered again if it was withdrawn (its O_PATH fd evicted from the
        inode table's LRU, and cached again by this open), so that its next open is
        native even without a new lookup (a file opened often, its name cached)."""
        if type(h.reader) is VerifiedReader:
            self.modes[h.node.dev] = h.reader.read_mode()
            self.offer(h.node, h.node.fd)

    def offer(self, inode, path_fd: int) -> None:
        """At a lookup of ``inode`` (its O_PATH fd ``path_fd``): let the native path
        open it, if it is a sealed file it can serve.  Never fails the lookup (which
        the inode table has counted already): an error only leaves the file unoffered."""
        try:
            self._offer(inode, path_fd)
        except Exception:
            pass

    def _offer(self, inode, path_fd: int) -> None:
        if self.offered.get(inode.ino) == path_fd:
            return
        v = inode.verity
        mode = self.modes.get(inode.dev)
        if type(v) is not VerityInfo or mode is None:
            return  # not sealed, damaged, or no open of its file system has told yet
        params, size = v.params, v.tree.data_size
        bs = params.block_size
        if size == 0 or not MIN_BLOCK <= bs <= MAX_BLOCK:
            return
        single = size <= bs
        if single and not v.inline_root:
            return  # its root hash is in its store object: Python opens it
        alg = params.alg.number
        key = leaf_table_key(alg, v.digest)
        if size > bs * params.hashes_per_block and self.native.fast_get_leaf(key, 0) is None:
            return  # more leaves than one: a Python open (and read) verifies the first
        if self.native.fast_inode_put(inode.ino, path_fd, alg, merkle.padded_salt(params), bs,
                                      size, key, v.inline_root if single else b"", mode):
            self.offered[inode.ino] = path_fd

    def prepare(self, ino: int) -> bool:
        """Called by a native open of offered ``ino`` whose first leaf tree block is not in
        the native leaf table: verify it now if the file has no other leaf (up to 512 KiB
        with SHA-256 and 4 KiB blocks: most of a container's files of more than one
        block), as a Python open would (``FastReads.register``).  A failure is left for
        Python's open to meet."""
        inode = self.view.inodes.by_ino.get(ino)
        v = getattr(inode, "verity", None)
        if type(v) is not VerityInfo:
            return False
        p = v.params
        if v.tree.data_size > p.block_size * p.hashes_per_block:
            return False
        try:
            verifier = self.view.leaf_verifier(inode, v)
        except (VerityError, OSError):
            return False
        try:
            verifier.expected_hashes(0, 1)
        except (VerityError, OSError):
            return False
        finally:
            verifier.tree.close()
        return self.native.fast_get_leaf(leaf_table_key(p.alg.number, v.digest), 0) is not None

    def drop(self, inode) -> None:
        """Before ``inode``'s O_PATH fd is closed (evicted, or the inode forgotten)."""
        if self.offered.pop(inode.ino, None) is not None:
            self.native.fast_inode_drop(inode.ino)

    def adopt(self, fh: int):
        """The native handle ``fh`` made Python's (None if the native path holds no such
        handle); if the view cannot attach its reader, the error is raised and the
        handle stays native (its release closes it)."""
        got = self.native.fast_native(fh)
        if got is None:
            return None
        ino, fd, mode = got
        h = self.view.adopt(ino, fd)
        self.native.fast_adopted(fh)
        self.fast.registered[fh] = mode  # registered by fast_open (forgotten at its release)
        return h

    def peek(self, fh: int):
        """A transient FileHandle over native handle ``fh``'s fd (no reader; the native
        path keeps and closes the fd), or None."""
        got = self.native.fast_native(fh)
        if got is None:
            return None
        return FileHandle(got[1], self.view.inodes[got[0]])

    def close(self) -> None:
        """Every open is Python's again; every native handle is closed."""
        self.shim.set_fast_open(None)
        self.native.fast_open_set(None, None, None, False)
        self.native.fast_open_close()
        self.offered.clear()

    def counts(self) -> dict:
        """What the native path opened, released, handed over and declined."""
        return self.native.fast_open_info()
