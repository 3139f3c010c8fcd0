"""Offline operations on a source tree and its store: seal, verify, record a manifest."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Set, Tuple, Union

from . import fsutil, hashers, identity, merkle, treebuild
from .errors import IntegrityError, VerityError
from .reader import attach_reader
from .seal_pool import SMALL, Here
from .source_dir import SourceDir, opened, unlistable
from .store import IndexEntry, Store
from .store_index import inline
from .store_batch import Staged
from .manifest_tree import Recorded
from .verifier import TreeBlockCache


def seal_fd(store: Store, fd: int, relpath: str, params: merkle.Params, signature: bytes = b"",
            check=None, **build_kw) -> IndexEntry:
    """Build the tree of open file ``fd`` into ``store`` and index its inode, durably.

    ``relpath`` is recorded for messages only.  ``check(descriptor)`` may refuse
    the result (a signature that does not verify) before anything is committed.
    The object is committed before the index entry, each atomically: a crash
    leaves the file unsealed or sealed, never half.  A file of one block in a
    format-3 store has no object: its entry keeps the descriptor.  (Many files:
    stage_fd.)
    """
    key = identity.key_of(fd, lasting=True)  # first: a filesystem without them costs nothing
    size = os.fstat(fd).st_size
    if _inline(store, params, size):
        desc = treebuild.build_tree(fd, params, data_size=size, **build_kw)
        if check is not None:
            check(desc)
    else:
        with store.new_object() as obj:
            desc = treebuild.build_tree(fd, params, data_size=size, write_block=obj.write_block,
                                        **build_kw)
            if check is not None:
                check(desc)
            obj.commit(desc)
    entry = _entry(store, key, desc, signature, relpath)
    store.set_entry(entry)
    return entry


def _inline(store: Store, params: merkle.Params, size: int) -> bool:
    """Whether a file of ``size`` bytes gets no object, its descriptor kept in its index
    entry: a file of one block in a format-3 store, a manifest's too (whatever reads it
    by its manifest entry makes its descriptor from its bytes: small_trees.small_tree)."""
    return size <= params.block_size and store.inline()


def _entry(store: Store, key: str, desc: merkle.Descriptor, signature: bytes,
           relpath: str) -> IndexEntry:
    """The index entry of a file sealed as ``desc``: with the descriptor where the store
    keeps it (a file of one block in a format-3 store, which has no object)."""
    kept = desc if inline(desc) and store.inline() else None
    return IndexEntry(key, desc.params.alg, desc.digest, signature, relpath, kept)


def stage_fd(store: Store, fd: int, relpath: str, params: merkle.Params, size: int,
             signature: bytes = b"", threads: Optional[int] = None, key: Optional[str] = None,
             index: bool = True, **build_kw) -> Staged:
    """seal_fd without publishing: the object and the index entry are left in tmp/,
    unsynced, for a store_batch.Batch (seal_pool's workers stage files at once).
    ``size`` is the file's fstat size, ``key`` its inode's (default: asked here).
    Without ``index`` (a manifest's file, found by its digest) there is neither key
    nor index entry: only the object, and for a file of one block in a format-3 store
    nothing at all.  A file of one chunk is hashed in this thread (the other files in
    flight keep the other cores busy); a larger one with ``threads``."""
    if key is None and index:
        key = identity.key_of(fd)
    tmp_object = None
    if _inline(store, params, size):
        desc = treebuild.build_tree(fd, params, data_size=size, **build_kw)
    else:
        with store.new_object() as obj:
            desc = treebuild.build_tree(fd, params, data_size=size, write_block=obj.write_block,
                                        threads=1 if size <= treebuild.CHUNK_SIZE else threads,
                                        **build_kw)
            tmp_object = obj.stage(desc)
    if key is None:  # not indexed
        return Staged(params.alg, desc.digest, size, tmp_object, None, None)
    entry = _entry(store, key, desc, signature, relpath)
    try:
        index_tmp = store.stage_entry(entry)
    except BaseException:
        if tmp_object is not None:
            store.discard_tmp(tmp_object)
        raise
    return Staged(params.alg, entry.digest, size, tmp_object, index_tmp, key)


def seal_path(store: Store, source: Union[str, SourceDir], relpath: str, params: merkle.Params,
              **kw) -> IndexEntry:
    """Seal the regular file SOURCE/relpath (through no symlink: SourceDir)."""
    with opened(source) as src:
        fd = src.open_regular(relpath)
    try:
        return seal_fd(store, fd, relpath, params, **kw)
    finally:
        os.close(fd)


def stage_path(store: Store, source: Union[str, SourceDir], relpath: str, params: merkle.Params,
               progress=None, keys: Optional[identity.Keys] = None,
               max_size: Optional[int] = None, **kw) -> Tuple[Staged, os.stat_result]:
    """Stage the regular file SOURCE/relpath (through no symlink: SourceDir); its fstat
    too (what is sealed is what a manifest records).  ``progress(label, size)`` gives
    the file's progress callable (closed when it is staged); ``keys``, the run's
    identity.Keys (one statfs per filesystem).  A file over ``max_size`` bytes raises
    seal_pool.Here (a pool's worker leaves it to the caller)."""
    if isinstance(source, SourceDir):  # seal's many files: no context manager per file
        fd = source.open_regular(relpath)
        full = source.full
    else:
        with opened(source) as src:
            fd = src.open_regular(relpath)
            full = src.full
    try:
        st = os.fstat(fd)
        if max_size is not None and st.st_size > max_size:
            raise Here()
        key = keys.of(fd, st.st_dev) if keys is not None else None
        prog = progress(full(relpath), st.st_size) if progress is not None else None
        try:
            return stage_fd(store, fd, relpath, params, st.st_size, progress=prog, key=key,
                            **kw), st
        finally:
            if prog is not None:
                prog.close()
    finally:
        os.close(fd)


# A file staged (with what a manifest records of it), or None: left to stage_path.
StageResult = Optional[Tuple[Staged, Optional[Recorded]]]


def native_stager(store: Store, source: SourceDir, params: merkle.Params, manifest: bool = False,
                  index: bool = True
                  ) -> Optional[Callable[[List[Optional[str]]], List[StageResult]]]:
    """stage_path's common case, a chunk of files in one native call (``_sealsmall.c``);
    None without the native module.  The stager takes a list of paths relative to SOURCE
    and gives for each the Staged stage_path would give, with the same bytes
    (tests/test_seal_native.py), and with ``manifest`` (a manifest's files) what a
    manifest records of its fstat; or None when it declines the file (not regular, on
    another filesystem, over seal_pool.SMALL bytes, changed while it was read, any
    error; and a path that is None): stage_path then seals it, and says what is wrong.
    Without ``index``, stage_fd's: no key, no index entry.  SOURCE's device and fsid are
    asked once, here."""
    seal_small = getattr(hashers._hashblocks, "seal_small", None)
    if seal_small is None or not 1024 <= params.block_size <= 65536 or len(params.salt) > 32:
        return None
    st = os.fstat(source.fd)
    fsid = 0
    if index:
        try:  # local verity needs handles that last (identity)
            fsid = identity.lasting_fsid(source.fd) & (2**64 - 1)
        except OSError:  # none that last, no statfs: stage_path says so, file by file
            return None
    dev = st.st_dev
    inline_store = store.inline()
    alg = params.alg
    fixed = (alg.number, params.log_blocksize, params.salt, hashers.padded_salt(params))

    def stage(rels: List[Optional[str]]) -> List[StageResult]:
        tmp_fd, names = store.tmp_chunk()
        return [None if g is None else
                (Staged(alg, g[2], g[0], g[3], g[4], g[1]),
                 Recorded(g[5], g[6], g[7], g[0], g[8] * 10**9 + g[9]) if manifest else None)
                for g in seal_small(source.fd, rels, dev, fsid, *fixed, tmp_fd, names,
                                    not inline_store, inline_store, alg.name, index)]

    return stage


class FileStager:
    """seal_pool's work for the regular files of SOURCE: ``stager(rel, here)`` stages one
    and gives its Staged, and with ``manifest`` (a manifest's files) what a manifest
    records of the fstat of what was sealed; with ``index`` (default) each file's inode
    is indexed too, for local mode (stage_fd).  ``many(rels)``: a worker's
    chunk of files, natively (None for a file it leaves to ``stager(rel, False)``): it
    is the pool's work_many.  Here (``here`` True) a small file natively where it can
    be, else stage_path; in a worker, only for what ``many`` declined, stage_path
    alone (the native call is not made twice), and a file over seal_pool.SMALL raises
    Here.  ``progress``: the run's seal_progress.Progress when it draws (a file done
    here counts on it)."""

    def __init__(self, store: Store, source: SourceDir, params: merkle.Params, *,
                 manifest: bool = False, index: bool = True, threads: Optional[int] = None,
                 progress=None):
        self.store, self.source, self.params = store, source, params
        self.manifest, self.index, self.threads, self.progress = manifest, index, threads, progress
        self.small = native_stager(store, source, params, manifest, index)
        self.keys = identity.Keys(lasting=True) if index else None

    def many(self, rels: List[Optional[str]]) -> List[StageResult]:
        return [None] * len(rels) if self.small is None else self.small(rels)

    def __call__(self, rel: str, here: bool) -> Tuple[Staged, Optional[Recorded]]:
        if here and self.small is not None:
            got = self.small([rel])[0]
            if got is not None:
                if self.progress is not None:
                    self.progress.worker_done(got[0])
                return got
        progress = self.progress.for_file if here and self.progress else None
        staged, st = stage_path(self.store, self.source, rel, self.params, threads=self.threads,
                                keys=self.keys, progress=progress, index=self.index,
                                max_size=None if here else SMALL)
        return staged, Recorded.of(st) if self.manifest else None


def entry_of_path(store: Store, path: str) -> Optional[IndexEntry]:
    """The index entry of the regular file at ``path`` (never through a symlink)."""
    fd = fsutil.open_regular(path)
    try:
        return store.get_entry(identity.key_of(fd))
    finally:
        os.close(fd)


def walk_files(source: SourceDir, store: Store, top: str = "",
               unreadable: Optional[Callable[[str, OSError], None]] = None) -> Iterator[str]:
    """Paths (relative to SOURCE) of every regular file under SOURCE/top, store
    excluded: a directory's files, then each subdirectory's, in name order (os.walk's
    order).  File types come from the directory entries, without a stat per file.

    A directory that cannot be listed (unreadable, a path too long, swapped for a
    symlink while it is walked) is ``unreadable(its path, the error saying so)``'s to
    report, or raised without it: what is under it would otherwise be left out
    unsaid.  One gone meanwhile (ENOENT) holds nothing to seal."""
    st = os.stat(store.path)
    store_id = (st.st_dev, st.st_ino)
    top = top.rstrip("/") if top not in ("", ".") else ""
    parts = top.split("/") if top else []
    for n in range(1, len(parts) + 1):  # a top in the store (named as a PATH): nothing
        try:
            s = source.lstat("/".join(parts[:n]))
        except OSError:
            break  # listing it says what is wrong
        if (s.st_dev, s.st_ino) == store_id:
            return
    stack = [top + "/" if top else ""]
    while stack:
        rel = stack.pop()
        subdirs, files = [], []
        try:
            with source.listing(rel) as found:
                for d in sorted(found, key=lambda d: d.name):
                    try:
                        if d.is_dir(follow_symlinks=False):
                            s = d.stat(follow_symlinks=False)
                            if (s.st_dev, s.st_ino) != store_id:
                                subdirs.append(rel + d.name + "/")
                        elif d.is_file(follow_symlinks=False):
                            files.append(rel + d.name)
                    except FileNotFoundError:
                        pass  # gone since the directory was listed
        except FileNotFoundError:
            continue
        except OSError as e:
            if unreadable is None:
                raise
            unreadable(rel.rstrip("/") or ".", unlistable(e))
            continue
        yield from files
        stack.extend(reversed(subdirs))


@dataclass
class VerifyResult:
    path: str                            # relative to SOURCE
    key: Optional[str] = None            # its inode's index key
    sealed: bool = False                 # it has an index entry (maybe a malformed one)
    entry: Optional[IndexEntry] = None
    error: Optional[Exception] = None    # VerityError or OSError; None = intact (or unsealed)
    links: int = 1                       # its inode's link count, for StaleCount

    @property
    def status(self) -> str:
        """ok, corrupt (sealed, and something does not match), unsealed, or error (could
        not be read): protocol/cli-json.md."""
        if self.error is None:
            return "ok" if self.sealed else "unsealed"
        return "corrupt" if self.sealed and isinstance(self.error, VerityError) else "error"


class StaleCount:
    """The index entries a verify walk did not reach: every entry less the inodes it
    reached that have one.  An inode of one link is reached once, so it is only
    counted; the keys of inodes of more links are kept, to count each once (as ``du``
    keeps theirs): memory grows with the hard-linked files of SOURCE, never with all."""

    def __init__(self):
        self.single = 0
        self.linked: Set[str] = set()

    def add(self, res: VerifyResult) -> None:
        if res.sealed and res.key is not None:
            if res.links > 1:
                self.linked.add(res.key)
            else:
                self.single += 1

    def of(self, store: Store) -> int:
        # A file renamed during the walk may be reached twice: never below zero.
        return max(0, store.count_entries() - self.single - len(self.linked))


def describe_failure(e: BaseException) -> str:
    """One line for a verify failure: a hash mismatch in full, an OSError's strerror."""
    if isinstance(e, IntegrityError):
        return f"{e.what} {e.offset}: expected {e.expected.hex()}, actual {e.actual.hex()}"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)


def verify_file(store: Store, source: Union[str, SourceDir], rel: str, cache: TreeBlockCache,
                chunk: int = treebuild.CHUNK_SIZE) -> VerifyResult:
    """Read SOURCE/rel whole through a VerifiedReader if it is sealed; report the first failure."""
    res = VerifyResult(rel)
    try:
        with opened(source) as src:
            label = src.full(rel)
            fd = src.open_regular(rel)
    except OSError as e:
        res.error = e
        return res
    try:
        res.links = os.fstat(fd).st_nlink
        res.key = identity.key_of(fd)
        try:
            entry = res.entry = store.get_entry(res.key)
        except VerityError:
            res.sealed = True  # an entry, but a malformed one
            raise
        res.sealed = entry is not None
        if entry is None:
            return res
        with store.open_tree(entry) as tree:
            # The whole file is read: a changed block before a truncation is reported first.
            reader = attach_reader(fd, tree, cache, label, check_size=False)
            off = 0
            # The read at EOF returns nothing and checks nothing follows it.
            while reader.read(off, chunk):
                off += chunk
    except (VerityError, OSError) as e:
        res.error = e
    finally:
        os.close(fd)
    return res
