"""Offline operations on a source tree and its store: seal, verify, record a manifest."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Iterator, Optional

from . import fsutil, identity, merkle, treebuild
from .errors import IntegrityError, VerityError
from .reader import VerifiedReader
from .store import IndexEntry, Store
from .store_batch import Batch
from .verifier import TreeBlockCache, Verifier


def open_regular(path: str) -> int:
    """A regular file for reading, never through a final symlink, never blocking."""
    try:
        return fsutil.open_regular(path)
    except fsutil.NotRegular as e:
        raise IsADirectoryError(21, e.strerror, path) from None


def seal_fd(store: Store, fd: int, relpath: str, params: merkle.Params, signature: bytes = b"",
            check=None, batch: Optional[Batch] = None, **build_kw) -> IndexEntry:
    """Build the tree of open file ``fd`` into ``store`` and index its inode.

    ``relpath`` is recorded for messages only.  ``check(descriptor)`` may refuse
    the result (a signature that does not verify) before anything is committed.
    Without ``batch``, the object is committed before the index entry, each
    atomically and durably: a crash leaves the file unsealed or sealed, never
    half.  With one, both are staged and the batch publishes them (in the same
    order, see store_batch.py): the file is sealed once the batch is committed.
    """
    key = identity.key_of(fd)  # before hashing: a filesystem without handles costs nothing
    with store.new_object() as obj:
        desc = treebuild.build_tree(fd, params, data_size=os.fstat(fd).st_size,
                                    write_block=obj.write_block, **build_kw)
        if check is not None:
            check(desc)
        if batch is None:
            obj.commit(desc)
        else:
            tmp_object = obj.stage(desc)
    if batch is None:
        store.set_entry(key, params.alg, desc.digest, signature, relpath)
    else:
        batch.add(tmp_object, params.alg, desc.digest, desc.data_size, key, signature, relpath)
    return IndexEntry(key, params.alg, desc.digest, signature, relpath)


def seal_path(store: Store, source: str, relpath: str, params: merkle.Params, **kw) -> IndexEntry:
    """Seal the regular file SOURCE/relpath (never through a final symlink)."""
    fd = open_regular(os.path.join(source, relpath))
    try:
        return seal_fd(store, fd, relpath, params, **kw)
    finally:
        os.close(fd)


def entry_of_path(store: Store, path: str) -> Optional[IndexEntry]:
    """The index entry of the regular file at ``path`` (never through a symlink)."""
    fd = open_regular(path)
    try:
        return store.get_entry(identity.key_of(fd))
    finally:
        os.close(fd)


def walk_files(source: str, store: Store) -> Iterator[str]:
    """Relative paths of every regular file under ``source``, store excluded."""
    st = os.stat(store.path)
    store_id = (st.st_dev, st.st_ino)
    for dirpath, dirnames, filenames in os.walk(source):
        keep = []
        for d in sorted(dirnames):
            s = os.lstat(os.path.join(dirpath, d))
            if (s.st_dev, s.st_ino) != store_id:
                keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            full = os.path.join(dirpath, f)
            if stat.S_ISREG(os.lstat(full).st_mode):
                yield os.path.relpath(full, source)


@dataclass
class VerifyResult:
    path: str                            # relative to SOURCE
    key: Optional[str] = None            # its inode's index key
    sealed: bool = False                 # it has an index entry (maybe a malformed one)
    entry: Optional[IndexEntry] = None
    error: Optional[Exception] = None    # VerityError or OSError; None = intact (or unsealed)

    @property
    def status(self) -> str:
        """ok, corrupt (sealed, and something does not match), unsealed, or error (could
        not be read): protocol/cli-json.md."""
        if self.error is None:
            return "ok" if self.sealed else "unsealed"
        return "corrupt" if self.sealed and isinstance(self.error, VerityError) else "error"


def describe_failure(e: BaseException) -> str:
    """One line for a verify failure: a hash mismatch in full, an OSError's strerror."""
    if isinstance(e, IntegrityError):
        return f"{e.what} {e.offset}: expected {e.expected.hex()}, actual {e.actual.hex()}"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)


def verify_file(store: Store, source: str, rel: str, cache: TreeBlockCache,
                chunk: int = treebuild.CHUNK_SIZE) -> VerifyResult:
    """Read SOURCE/rel whole through a VerifiedReader if it is sealed; report the first failure."""
    label = os.path.join(source, rel)
    res = VerifyResult(rel)
    try:
        fd = open_regular(label)
    except OSError as e:
        res.error = e
        return res
    try:
        res.key = identity.key_of(fd)
        try:
            entry = res.entry = store.get_entry(res.key)
        except VerityError:
            res.sealed = True  # an entry, but a malformed one
            raise
        res.sealed = entry is not None
        if entry is None:
            return res
        with store.open_object(entry.alg, entry.digest) as tree:
            reader = VerifiedReader(fd, Verifier(tree, cache, label), label)
            off = 0
            # The read at EOF returns nothing and checks nothing follows it.
            while reader.read(off, chunk):
                off += chunk
    except (VerityError, OSError) as e:
        res.error = e
    finally:
        os.close(fd)
    return res
