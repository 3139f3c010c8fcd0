"""Offline operations on a source tree and its store: seal, verify, record a manifest."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Dict, Iterator, Optional

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


class ManifestRecorder:
    """Records SOURCE into manifest entries (format 2), sealing every regular file.

    ``report(entry_dict, full_path)`` is called for each sealed file; ``warn``
    for what is left out (other file types, names that are not UTF-8).
    """

    def __init__(self, source: str, store: Store, params: merkle.Params, skip_paths=(),
                 warn=print, report=None, progress=None, **seal_kw):
        self.source, self.store, self.params = source, store, params
        self.warn, self.report, self.seal_kw = warn, report, seal_kw
        self.progress = progress  # progress(label, size) -> callable with .close()
        self.failed = 0
        st = os.stat(store.path)
        self._skip = {(st.st_dev, st.st_ino)}
        for p in skip_paths:
            try:
                s = os.stat(p)
                self._skip.add((s.st_dev, s.st_ino))
            except FileNotFoundError:
                pass
        self.entries: Dict[str, dict] = {}

    def skip(self, rel: str, st: os.stat_result) -> bool:
        return (st.st_dev, st.st_ino) in self._skip

    def _entry(self, rel: str, st: os.stat_result) -> Optional[dict]:
        from . import manifest_tree

        full = os.path.join(self.source, rel)
        if stat.S_ISREG(st.st_mode):
            try:
                fd = open_regular(full)
                try:
                    st = os.fstat(fd)  # what is sealed is what is recorded
                    prog = self.progress(full, st.st_size) if self.progress else None
                    try:
                        e = seal_fd(self.store, fd, rel, self.params, progress=prog, **self.seal_kw)
                    finally:
                        if prog is not None:
                            prog.close()
                finally:
                    os.close(fd)
            except OSError as err:
                self.warn(f"can't seal '{full}': {err.strerror or err}")
                self.failed += 1
                return None
            entry = manifest_tree.entry_of(rel, st, sealed=(e.alg, e.digest, self.params))
            if self.report:
                self.report(entry, full)
            return entry
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(full)
            try:
                target.encode("utf-8")
            except UnicodeEncodeError:
                self.warn(f"skipping {full!r}: its target is not UTF-8")
                return None
            return manifest_tree.entry_of(rel, st, target=target)
        return manifest_tree.entry_of(rel, st)

    def add(self, rel: str = "."):
        """Record ``rel`` and, for a directory, everything under it."""
        from . import manifest_tree

        full = self.source if rel == "." else os.path.join(self.source, rel)
        if rel != ".":
            st = os.lstat(full)
            if self.skip(rel, st):
                return
            if not stat.S_ISDIR(st.st_mode):
                e = self._entry(rel, st) if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode) else None
                if e is not None:
                    self.entries[rel] = e
                elif not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                    self.warn(f"skipping {full}: not a directory, regular file or symlink")
                return
        for sub, st in manifest_tree.scan(full, self.skip, self.warn):
            path = rel if sub == "." else (sub if rel == "." else f"{rel}/{sub}")
            e = self._entry(path, st)
            if e is not None:
                self.entries[path] = e

    def update(self, existing, rels):
        """Start from ``existing`` entries, re-record ``rels`` (removing those
        gone from SOURCE), keep every other entry."""
        from . import manifest_tree

        self.entries = {e["path"]: e for e in existing}
        for rel in rels:
            prefix = rel + "/"
            for p in [p for p in self.entries if p == rel or p.startswith(prefix)]:
                del self.entries[p]
            full = os.path.join(self.source, rel)
            if not os.path.lexists(full):
                continue
            parts = rel.split("/")
            for n in range(len(parts)):
                anc = "/".join(parts[:n]) or "."
                if anc not in self.entries:
                    st = os.stat(self.source) if anc == "." else os.lstat(os.path.join(self.source, anc))
                    if not stat.S_ISDIR(st.st_mode):
                        raise NotADirectoryError(20, "not a directory", os.path.join(self.source, anc))
                    self.entries[anc] = manifest_tree.entry_of(anc, st)
            self.add(rel)
