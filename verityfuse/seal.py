"""Offline operations on a source tree and its store: seal and verify."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Iterator, Optional

from . import merkle
from .errors import Corruption
from .reader import VerifiedReader
from .store import IndexEntry, Store, normalize_relpath
from .verify import TreeBlockCache, Verifier

_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_regular(path: str) -> int:
    """Open a regular file for reading without following a final symlink."""
    fd = os.open(path, _O_READ)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise IsADirectoryError(21, "not a regular file", path)
    return fd


def seal_fd(store: Store, fd: int, relpath: str, params: merkle.Params, signature: bytes = b"",
            check=None, **build_kw) -> IndexEntry:
    """Build the tree of open file ``fd`` into ``store`` and index it as ``relpath``.

    ``check(descriptor)`` may refuse the result (a signature that does not
    verify) before anything is committed.  The object is committed before the
    index entry, each atomically: a crash leaves the file unsealed or sealed,
    never half.
    """
    with store.new_object() as obj:
        desc = merkle.build_tree(fd, params, data_size=os.fstat(fd).st_size,
                                 write_block=obj.write_block, **build_kw)
        if check is not None:
            check(desc)
        obj.commit(desc)
    store.set_entry(relpath, params.alg, desc.digest, signature)
    return IndexEntry(normalize_relpath(relpath), params.alg, desc.digest, signature)


def seal_path(store: Store, source: str, relpath: str, params: merkle.Params, **kw) -> IndexEntry:
    """Seal the regular file SOURCE/relpath (never through a final symlink)."""
    fd = open_regular(os.path.join(source, relpath))
    try:
        return seal_fd(store, fd, relpath, params, **kw)
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
    entry: IndexEntry
    error: Optional[Exception] = None  # Corruption or OSError; None = intact


def verify_entry(store: Store, source: str, entry: IndexEntry, cache: TreeBlockCache,
                 chunk: int = merkle.CHUNK_SIZE) -> VerifyResult:
    """Read the whole file through a VerifiedReader; report the first failure."""
    label = os.path.join(source, entry.path)
    try:
        with store.open_object(entry.alg, entry.digest) as tree:
            verifier = Verifier(tree, cache, label)
            fd = open_regular(label)
            try:
                reader = VerifiedReader(fd, verifier, label)
                off = 0
                # The read at EOF returns nothing and checks nothing follows it.
                while reader.read(off, chunk):
                    off += chunk
            finally:
                os.close(fd)
                verifier.close()
    except (Corruption, OSError) as e:
        return VerifyResult(entry, e)
    return VerifyResult(entry)
