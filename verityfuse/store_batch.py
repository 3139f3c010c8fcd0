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

import errno
import os
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import groupby
from operator import itemgetter
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

from . import fsutil, merkle
from .store import Store

MAX_FILES = 4096
MAX_BYTES = 256 << 20  # data sealed: the dirty pages the first sync writes are a fraction of it


class Staged(NamedTuple):
    """A file sealed into tmp/ (any thread or seal_pool worker may stage), waiting for
    a batch: its digest, its size, the tmp/ names of its object (None: its index entry
    keeps its descriptor, or a manifest's file of one block needs none) and of its
    index entry, and its index key (both None: a manifest's file, found by digest
    alone).  Only what publishing and reporting need: a worker's results cross a pipe,
    and these pickle and unpickle in a third of the time an index entry with its
    descriptor took (1.4 against 4.0 us a file)."""

    alg: merkle.HashAlg
    digest: bytes
    data_size: int
    obj_tmp: Optional[str]
    index_tmp: Optional[str]
    key: Optional[str]

    @property
    def digest_text(self) -> str:
        return merkle.format_digest(self.alg, self.digest)

    def drop(self, store: Store):
        """Remove its tmp/ files (it will never be published)."""
        if self.obj_tmp is not None:
            store.discard_tmp(self.obj_tmp)
        if self.index_tmp is not None:
            store.discard_tmp(self.index_tmp)


class Batch:
    """Objects and index entries staged in ``store``'s tmp/, published by ``commit``
    (here, now) or ``commit_soon`` (in the batch's own thread, while the caller stages
    the next files: publishing, a batch's three syncs and up to 8,192 renames, took
    three quarters of seal's own thread, 0.95 of its 1.28 s of CPU for 100,000 files).

    ``then(callback, *args)`` runs callback(*args) after the batch's files are
    durable (in the order added), then ``flush()``; ``full`` says when the caller
    should commit.  Callbacks always run in the caller's thread: one published in the
    background runs them at the next commit, or when the batch ends.  At most one
    batch is in flight, so memory holds two batches at most.
    What a batch holds per file is kept small (names and a callback's arguments,
    no closures), as it holds up to ``max_files`` of them."""

    def __init__(self, store: Store, max_files: Optional[int] = None,
                 max_bytes: Optional[int] = None, flush: Optional[Callable[[], None]] = None):
        self.store = store
        self.flush = flush  # run after each commit's callbacks: their output, written at once
        self.max_files = max_files or MAX_FILES
        self.max_bytes = max_bytes or MAX_BYTES
        self._staged: List[Staged] = []
        self._after: List[tuple] = []  # (callback, args)
        self._bytes = 0
        self._thread: Optional[ThreadPoolExecutor] = None
        self._pending: Optional[Tuple[List[Staged], List[tuple], Future]] = None
        self._unpublished: List[Staged] = []  # of a publish that failed in the thread

    def add(self, staged: Staged):
        """Publish ``staged`` with this batch (called in file order, from one thread)."""
        self._staged.append(staged)
        self._bytes += staged.data_size

    def then(self, callback: Callable[..., None], *args):
        self._after.append((callback, args))

    @property
    def full(self) -> bool:
        return len(self._staged) >= self.max_files or self._bytes >= self.max_bytes

    def _publish(self, staged: List[Staged]):
        """Make ``staged`` durable in the crash-safe order above.  Each parent of shards
        (objects/<alg>, inodes) gets its files in one place_all call, sorted by shard."""
        store = self.store
        objects: Dict[str, Tuple[merkle.HashAlg, list]] = {}
        for s in staged:
            if s.obj_tmp is not None:  # none when an entry keeps the file's descriptor
                objects.setdefault(s.alg.name, (s.alg, []))[1].append((s.obj_tmp, s.digest))
        # None for a manifest's files (found by digest), which may have no object either;
        # laid out (every key checked) before anything is synced or renamed
        index_dir, entries = store.index_places([(s.index_tmp, s.key) for s in staged
                                                 if s.key is not None])
        if not (objects or entries):
            return
        store.sync()
        if objects:
            for alg, named in objects.values():
                place_all(store, *store.object_places(alg, named))
            store.sync()
        if entries:
            place_all(store, index_dir, entries)
            store.sync()

    def _run(self, after: List[tuple]):
        for callback, args in after:
            callback(*args)
        if self.flush is not None:
            self.flush()

    def _finish(self):
        """Wait for the batch in flight, if any, and run its callbacks; its error is
        raised here (its tmp/ files then go with ``discard``)."""
        if self._pending is None:
            return
        staged, after, fut = self._pending
        try:
            fut.result()
        except BaseException:
            if fut.done():  # it failed (not this wait, interrupted: still in flight)
                self._pending = None
                self._unpublished.extend(staged)
            raise
        self._pending = None
        self._run(after)

    def commit(self):
        """Publish everything added so far, then run its callbacks: all durable when
        it returns."""
        self._finish()
        if not (self._staged or self._after):
            return  # nothing more to publish or report (and flushed already)
        self._publish(self._staged)
        self._staged, self._bytes = [], 0
        after, self._after = self._after, []
        self._run(after)

    def commit_soon(self):
        """Publish everything added so far in the batch's thread, once the batch in
        flight is done (its callbacks run here first)."""
        self._finish()
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="verityfuse-publish")
        staged, after = self._staged, self._after
        self._staged, self._after, self._bytes = [], [], 0
        self._pending = (staged, after, self._thread.submit(self._publish, staged))

    def discard(self):
        """Forget the batch, its tmp/ files removed (after an error: what a commit that
        failed half way renamed into place stays, durable or not, and its tmp/ names are
        simply gone; a tmp/ name is never reused, so none names another file now)."""
        for staged in self._unpublished + self._staged:
            staged.drop(self.store)
        self._staged, self._after, self._bytes, self._unpublished = [], [], 0, []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        try:
            if exc_type is None:
                self.commit()
            else:  # what is in flight ends published (its files reported) or discarded
                try:
                    self._finish()
                except BaseException:
                    pass  # the first error goes on
        finally:
            try:
                if self._thread is not None:
                    self._thread.shutdown(wait=True)
            finally:
                self.discard()  # nothing left after a commit; what was not published after an error


def place_all(store: Store, base_parts, items):
    """Rename each (tmp/ name, shard, name) of the list ``items``, sorted by shard, to
    STORE/base_parts/shard/name, unsynced (a batch: the caller syncs).  Shards are made if
    missing and never followed through a symlink (StoreCorrupt).  In one native call
    where it is built: the GIL released once, not at every rename.  The first failure
    raises, naming the file's place in the store; what was renamed before it stays."""
    base = store.open_dir(base_parts)
    try:
        if fsutil.native_sys is None:
            for shard, group in groupby(items, key=itemgetter(1)):
                dirfd = store.open_dir((shard,), at=(base, base_parts))
                try:
                    for tmpname, _, name in group:
                        try:
                            store.place(tmpname, dirfd, name, sync=False)
                        except OSError as e:
                            raise _not_placed(store, base_parts, shard, name, e) from None
                finally:
                    os.close(dirfd)
            return
        try:
            fsutil.native_sys.place_all(store._tmp_dir(), base, items)
        except OSError as e:
            if e.filename2 is None:  # a shard's error names it alone
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise store._refused((*base_parts, e.filename), e) from None
                raise
            shard = next(s for t, s, n in items if t == e.filename and n == e.filename2)
            raise _not_placed(store, base_parts, shard, e.filename2, e) from None
    finally:
        os.close(base)


def _not_placed(store: Store, base_parts, shard: str, name: str, e: OSError) -> OSError:
    """A rename's error naming where in the store the file was going (its tmp/ name said
    nothing: "ERROR: 5232.38bd5a9-1: Is a directory")."""
    return OSError(e.errno, e.strerror, store._where(*base_parts, shard, name))
