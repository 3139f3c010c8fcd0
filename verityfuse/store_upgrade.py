"""Converting a store of an older format to format 3.

Format 1 indexed verity by path: each of its entries names a path under SOURCE;
the file there now is opened (never through a symlink) and its inode indexed
with the entry's digest and signature.  Objects are shared by every format and
stay as they are.  Entries whose file is gone are reported and dropped.  The
new VERSION is written last: a crash midway leaves a format-1 store that the
command can finish.

Format 2 is format 3 without descriptors in index entries: every entry and
object of it is valid as it is, so only VERSION changes (files of one block
sealed from then on get no object).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from typing import Callable, Tuple

from . import fsutil, identity
from .errors import StoreCorrupt
from .merkle import parse_digest
from .store import INDEX_ENTRY_MAX, IndexEntry, Store

V1_INDEX = "index"


def upgrade(source: str, store: Store, warn: Callable[[str], None]) -> Tuple[int, int]:
    """(entries converted, entries dropped).  ``store`` is opened objects_only."""
    if store.version == 3:
        return 0, 0
    if store.version == 2:
        store.mark_current()
        return 0, 0
    srcfd = os.open(source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        converted, dropped = _convert(srcfd, store, warn)
    finally:
        os.close(srcfd)
    store.mark_current()
    shutil.rmtree(os.path.join(store.path, V1_INDEX), ignore_errors=True)
    return converted, dropped


def _convert(srcfd: int, store: Store, warn: Callable[[str], None]) -> Tuple[int, int]:
    converted = dropped = 0
    v1 = os.path.join(store.path, V1_INDEX)
    for shard in sorted(os.listdir(v1)) if os.path.isdir(v1) else ():
        dirfd = store.open_dir((V1_INDEX, shard), create=False)
        try:
            names = sorted(os.listdir(dirfd))
        finally:
            os.close(dirfd)
        for n in names:
            where = os.path.join(v1, shard, n)
            fd = store.open_file((V1_INDEX, shard, n))
            if fd is None:  # removed meanwhile
                continue
            try:
                doc = json.loads(os.read(fd, INDEX_ENTRY_MAX))
                path = normalize_relpath(doc["path"])
                alg, digest = parse_digest(doc["digest"])
                sig = bytes.fromhex(doc.get("signature", ""))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise StoreCorrupt(f"{where}: malformed format-1 index entry: {e}") from None
            finally:
                os.close(fd)
            try:  # the file at that path now, reached through no symlink at all
                ffd = fsutil.open_beneath(srcfd, os.fsencode(path))
            except OSError as e:
                warn(f"{path}: {e.strerror}; its entry is dropped")
                dropped += 1
                continue
            try:
                if not stat.S_ISREG(os.fstat(ffd).st_mode):
                    warn(f"{path}: not a regular file; its entry is dropped")
                    dropped += 1
                    continue
                store.set_entry(IndexEntry(identity.key_of(ffd), alg, digest, sig, path))
                converted += 1
            finally:
                os.close(ffd)
    return converted, dropped


def normalize_relpath(relpath: str) -> str:
    """A canonical relative path: no leading '/', no '.', '..' or empty parts, no NUL."""
    parts = [p for p in relpath.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts) or not parts or "\0" in relpath:
        raise ValueError(f"invalid relative path {relpath!r}")
    return "/".join(parts)
