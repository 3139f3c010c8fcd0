"""Recording SOURCE into manifest entries (format 2), sealing every regular file.

A whole tree is walked in payload order (the bytes of each path, the root
first) and each entry is produced as its file is sealed, so a caller can write
it at once (manifest_writer): memory is one directory listing per level of the
walk, not one entry per file.
"""

from __future__ import annotations

import os
import stat
from itertools import chain
from typing import (AbstractSet, Any, Callable, Dict, Iterable, Iterator, List, Optional, Set,
                    Tuple)

from . import manifest_tree, merkle
from .logs import escape
from .seal_pool import in_order
from .sealing import FileStager
from .source_dir import SourceDir
from .store import Store
from .store_batch import Batch, Staged


def scan_sorted(source: SourceDir, skip_ids: Set[Tuple[int, int]],
                warn: Callable[[str], None], base: str = ".",
                skip_names: AbstractSet[str] = frozenset()
                ) -> Iterator[Tuple[str, Optional[os.stat_result]]]:
    """(path, lstat) of ``base`` (relative to ``source``, "." for the root) and of every
    directory, file and symlink under it, in increasing order of the path's bytes, never
    following symlinks (a directory swapped for one while it is walked raises ELOOP:
    SourceDir); what is ``skip_ids`` ((st_dev, st_ino): the store, the manifest) is left
    out.  Other types and names that are not UTF-8 are reported through ``warn`` and left
    out.

    A regular file's lstat is None: what is recorded of it is the fstat of what sealing
    it opens, and its type comes from the directory entry, so the walk makes no system
    call for it (an lstat a file was a third of this walk's time).  A file is lstat'ed to
    tell whether it is one of ``skip_ids`` when its name is in ``skip_names`` (the
    basenames of what is skipped) or its directory entry's inode number is one of
    ``skip_ids``'s: the name, for a filesystem whose readdir numbers are not its stat's
    (a FUSE file system may number them apart); the number, for another link.

    A directory's subtree sorts where "name/" does among its siblings, which is not
    right after "name" ("name-2" and "name.txt" come between), so each listing is sorted
    with one key for the directory and one for what is below it."""
    st = source.lstat(base)
    if not stat.S_ISDIR(st.st_mode):
        if (st.st_dev, st.st_ino) in skip_ids:
            return
        if stat.S_ISREG(st.st_mode):
            yield base, None
        elif stat.S_ISLNK(st.st_mode):
            yield base, st
        else:
            warn(f"skipping {source.full(base)}: not a directory, regular file or symlink")
        return
    if base != "." and (st.st_dev, st.st_ino) in skip_ids:
        return
    yield base, st
    inos = {ino for _, ino in skip_ids}
    skip = (skip_ids, inos, skip_names)
    stack: List[Iterator] = [_listing(source, "" if base == "." else base, skip, warn)]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
        elif item[2] is _SUBTREE:
            stack.append(_listing(source, item[1], skip, warn))
        else:
            yield item[1], item[2]


_SUBTREE = object()  # in a listing: the place of a directory's subtree


def _listing(source: SourceDir, rel: str, skip, warn) -> Iterator[tuple]:
    skip_ids, inos, names = skip
    items: List[Tuple[bytes, str, Any]] = []
    with source.listing(rel) as found:
        for d in found:
            path = f"{rel}/{d.name}" if rel else d.name
            try:
                raw = path.encode("utf-8")
            except UnicodeEncodeError:
                warn(f"skipping '{escape(source.full(path))}': its name is not UTF-8")
                continue
            if d.is_file(follow_symlinks=False) and d.name not in names and d.inode() not in inos:
                items.append((raw, path, None))
                continue
            st = d.stat(follow_symlinks=False)
            if (st.st_dev, st.st_ino) in skip_ids:
                continue
            if stat.S_ISDIR(st.st_mode):
                items.append((raw + b"/", path, _SUBTREE))
            elif not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                warn(f"skipping {source.full(path)}: not a directory, regular file or symlink")
                continue
            items.append((raw, path, None if stat.S_ISREG(st.st_mode) else st))
    items.sort(key=lambda i: i[0])
    return iter(items)


def _payload_order(e: dict) -> bytes:
    return b"" if e["path"] == "." else e["path"].encode()


class ManifestRecorder:
    """Records SOURCE into manifest entries, sealing every regular file into ``batch``
    (by ``threads`` worker processes at once, seal_pool): the objects a manifest mount
    finds by digest and, with ``local``, each inode's index entry as ``seal`` makes it.

    ``report(digest_text, full_path)`` is called for each sealed file once its batch
    is durable; ``progress`` is the run's seal_progress.Progress; ``warn`` for what is
    left out (other file types, names that are not UTF-8).  What ``skip_paths`` name
    (the manifest, its temporary file) is left out.  ``source`` stays the caller's
    to close (seal's workers inherit it).
    """

    def __init__(self, source: SourceDir, store: Store, params: merkle.Params, batch: Batch,
                 skip_paths=(), warn=print, report=None, progress=None,
                 threads: Optional[int] = None, not_sealed=None, local: bool = False):
        self.source, self.store, self.params, self.batch = source, store, params, batch
        self.warn, self.report, self.threads = warn, report, threads
        # (full path, why) of a file that could not be sealed: a warning, or --json's object
        self.not_sealed = not_sealed or (lambda full, why: warn(f"can't seal '{full}': {why}"))
        self.progress = progress if progress is not None and progress.enabled else None
        self.failed = 0
        self._stage_file = FileStager(store, source, params, manifest=True, index=local,
                                      threads=threads, progress=self.progress)
        st = os.stat(store.path)
        self._skip = {(st.st_dev, st.st_ino)}
        self._skip_names = {os.path.basename(p) for p in skip_paths}
        for p in skip_paths:
            try:
                s = os.stat(p)
                self._skip.add((s.st_dev, s.st_ino))
            except FileNotFoundError:
                pass

    @staticmethod
    def _shipped(item) -> Optional[str]:
        """What a seal_pool worker is given for (path, lstat): the path of a regular file
        (lstat None: a worker's fstat is what is recorded), None for anything else."""
        return item[0] if item[1] is None else None

    def _stage(self, rel: Optional[str], here: bool
               ) -> Optional[Tuple[Staged, Optional[manifest_tree.Recorded]]]:
        """Seal regular file ``rel`` (None, what ``_shipped`` gives for anything else, is
        nothing to seal); with it, what the manifest records of the fstat of what was
        sealed (sealing.FileStager)."""
        return None if rel is None else self._stage_file(rel, here)

    def _worker_done(self, result):
        if result is not None and self.progress is not None:
            self.progress.worker_done(result[0])

    def _abandon(self, result):
        if result is not None:
            result[0].drop(self.store)

    def _entries(self, items) -> Iterator[dict]:
        for (rel, st), done, err in in_order(items, self._stage, self.threads, self._abandon,
                                             self._worker_done, shipped=self._shipped,
                                             work_many=self._stage_file.many):
            e = self._entry(rel, st, done, err)
            if e is not None:
                yield e

    def _entry(self, rel: str, st: Optional[os.stat_result], done, err) -> Optional[dict]:
        full = self.source.full(rel)
        if st is None:  # a regular file (scan_sorted)
            if err is not None:
                self.not_sealed(full, err.strerror or str(err))
                self.failed += 1
                return None
            staged, sealed_st = done  # what is sealed is what is recorded
            assert sealed_st is not None  # FileStager(manifest=True) gives it
            self.batch.add(staged)
            entry = manifest_tree.entry_of(rel, sealed_st, sealed=(staged.alg, staged.digest,
                                                                   self.params))
            if self.report:
                self.batch.then(self.report, entry["digest"], full)
            if self.batch.full:
                self.batch.commit_soon()
            return entry
        if stat.S_ISLNK(st.st_mode):
            try:
                target = self.source.readlink(rel)
            except OSError as e:
                self.warn(f"can't record '{full}': {e.strerror}")
                self.failed += 1
                return None
            try:
                target.encode("utf-8")
            except UnicodeEncodeError:
                self.warn(f"skipping '{escape(full)}': its target is not UTF-8")
                return None
            return manifest_tree.entry_of(rel, st, target=target)
        return manifest_tree.entry_of(rel, st)

    def walk(self, rel: str = ".") -> Iterator[dict]:
        """The entries of ``rel`` and, for a directory, of everything under it, in
        payload order, each file sealed as it comes."""
        return self._entries(self._items(rel))

    def _items(self, rel: str) -> Iterator[Tuple[str, Optional[os.stat_result]]]:
        """scan_sorted's (path, lstat) of ``rel`` and of everything under it."""
        return scan_sorted(self.source, self._skip, self.warn, rel, self._skip_names)

    def update(self, existing: Iterable[dict], rels) -> List[dict]:
        """``existing`` entries with ``rels`` re-recorded (removing those gone from
        SOURCE), every other entry kept, in payload order.  This holds every entry: an
        update starts from a manifest read whole (at most manifest.MAX_BYTES)."""
        entries: Dict[str, dict] = {e["path"]: e for e in existing}
        walked = []
        for rel in rels:
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:  # as the walk says of such a name (never a traceback)
                self.warn(f"skipping '{escape(self.source.full(rel))}': its name is not UTF-8")
                continue
            prefix = rel + "/"
            for p in [p for p in entries if p == rel or p.startswith(prefix)]:
                del entries[p]
            try:
                self.source.lstat(rel)
            except FileNotFoundError:
                continue
            parts = rel.split("/")
            for n in range(len(parts)):
                anc = "/".join(parts[:n]) or "."
                if anc not in entries:
                    st = self.source.lstat(anc)
                    if not stat.S_ISDIR(st.st_mode):
                        raise NotADirectoryError(20, "not a directory", self.source.full(anc))
                    entries[anc] = manifest_tree.entry_of(anc, st)
            walked.append(rel)
        # Every path's files in one stream (one pool of workers, not one for each path);
        # overlapping paths end as they would one after the other: all were removed above.
        for e in self._entries(chain.from_iterable(self._items(rel) for rel in walked)):
            entries[e["path"]] = e
        return sorted(entries.values(), key=_payload_order)
