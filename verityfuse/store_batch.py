"""Many objects and index entries made durable together: one sync per step of a batch,
not four fsyncs per file.

The crash-ordering rule (protocol/store-format.md, "Guarantees"): a name that
refers to something is never durable before what it refers to.

1. Every object and index entry of the batch is written under tmp/, unsynced
   (nothing outside tmp/ names them: a crash now leaves only tmp/ files, which
   the next seal or mount removes).
2. ``Store.sync`` (syncfs): their bytes are on disk.
3. The objects are renamed into objects/, then synced: an object's name is
   durable only with its bytes, so an index entry or manifest written later
   never names a missing or half-written object.
4. The index entries are renamed into inodes/, then synced.
5. Only then is the batch reported done (its files printed); a manifest naming
   the objects is written after the last batch.

A batch is bounded (files and bytes), so memory and the work a crash can lose
stay bounded whatever the number of files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from . import merkle
from .store import IndexEntry, Store

MAX_FILES = 4096
MAX_BYTES = 256 << 20  # data sealed: the dirty pages the first sync writes are a fraction of it


@dataclass
class Staged:
    """A file sealed into tmp/ (any thread may stage), waiting for a batch: its entry,
    its size, and (tmp name, directory parts, name) of its object (None: its entry
    keeps its descriptor) and of its index entry."""

    entry: IndexEntry
    data_size: int
    obj: Optional[Tuple[str, tuple, str]]
    index: Tuple[str, tuple, str]

    def drop(self, store: Store):
        """Remove its tmp/ files (it will never be published)."""
        if self.obj is not None:
            store.discard_tmp(self.obj[0])
        store.discard_tmp(self.index[0])

    def __reduce__(self):
        # A seal_pool worker's result crosses a pipe: as one flat tuple it pickles in
        # a quarter of the time the dataclasses take by default (which was ~10 us of a
        # sealed file's ~100 us of CPU, in the worker and in the caller).  The hash
        # parameters are the same object in every file of a chunk: pickled once.
        e, d = self.entry, self.entry.descriptor
        return _staged, (e.key, e.alg, e.digest, e.signature, e.path,
                         None if d is None else (d.params, d.data_size, d.root_hash, d.raw),
                         self.data_size, self.obj, self.index)


def _staged(key, alg, digest, signature, path, desc, data_size, obj, index) -> Staged:
    """A Staged from ``Staged.__reduce__``'s tuple (what one of our own workers made:
    its descriptor was built there, not read from anywhere)."""
    descriptor = None if desc is None else merkle.Descriptor(*desc)
    return Staged(IndexEntry(key, alg, digest, signature, path, descriptor), data_size, obj, index)


class Batch:
    """Objects and index entries staged in ``store``'s tmp/, published by ``commit``.

    ``then(callback, *args)`` runs callback(*args) after the batch's files are
    durable (in the order added), then ``flush()``; ``full`` says when the caller
    should commit.
    What a batch holds per file is kept small (names and a callback's arguments,
    no closures), as it holds up to ``max_files`` of them."""

    def __init__(self, store: Store, max_files: Optional[int] = None,
                 max_bytes: Optional[int] = None, flush: Optional[Callable[[], None]] = None):
        self.store = store
        self.flush = flush  # run after each commit's callbacks: their output, written at once
        self.max_files = max_files or MAX_FILES
        self.max_bytes = max_bytes or MAX_BYTES
        self._objects: List[Tuple[str, tuple, str]] = []  # (tmp name, dir parts, name)
        self._entries: List[Tuple[str, tuple, str]] = []
        self._after: List[tuple] = []  # (callback, args)
        self._bytes = 0

    def add(self, staged: Staged):
        """Publish ``staged`` with this batch (called in file order, from one thread)."""
        if staged.obj is not None:
            self._objects.append(staged.obj)
        self._entries.append(staged.index)
        self._bytes += staged.data_size

    def then(self, callback: Callable[..., None], *args):
        self._after.append((callback, args))

    @property
    def full(self) -> bool:
        return len(self._entries) >= self.max_files or self._bytes >= self.max_bytes

    def _place_all(self, staged):
        """Rename each staged file into place, opening each directory once (and the
        shards' parent, objects/<alg> or inodes, once)."""
        staged.sort(key=lambda s: s[1])
        dirparts, dirfd, upparts, upfd = None, -1, None, -1
        try:
            while staged:
                tmpname, parts, name = staged[-1]
                if parts != dirparts:
                    if dirfd >= 0:
                        os.close(dirfd)
                        dirfd = -1
                    if parts[:-1] != upparts:
                        if upfd >= 0:
                            os.close(upfd)
                            upfd = -1
                        upfd, upparts = self.store.open_dir(parts[:-1]), parts[:-1]
                    dirfd = self.store.open_dir(parts[-1:], at=(upfd, upparts))
                    dirparts = parts
                self.store.place(tmpname, dirfd, name, sync=False)
                staged.pop()
        finally:
            for fd in (dirfd, upfd):
                if fd >= 0:
                    os.close(fd)

    def commit(self):
        """Publish the batch in the crash-safe order above, then run its callbacks."""
        if self._entries:
            self.store.sync()
            if self._objects:  # none when every file's entry keeps its descriptor
                self._place_all(self._objects)
                self.store.sync()
            self._place_all(self._entries)
            self.store.sync()
        self._bytes = 0
        after, self._after = self._after, []
        for callback, args in after:
            callback(*args)
        if self.flush is not None:
            self.flush()

    def discard(self):
        """Forget the batch, its tmp/ files removed (after an error: nothing is published)."""
        for tmpname, _, _ in self._objects + self._entries:
            self.store.discard_tmp(tmpname)
        self._objects, self._entries, self._after, self._bytes = [], [], [], 0

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        try:
            if exc_type is None:
                self.commit()
        finally:
            self.discard()  # nothing left after a commit; what was not published after an error
