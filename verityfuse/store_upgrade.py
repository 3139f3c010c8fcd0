"""Converting a format-1 store (verity indexed by path) to format 2 (by inode).

Each format-1 entry names a path under SOURCE; the file there now is opened
(never through a symlink) and its inode indexed with the entry's digest and
signature.  Objects are shared by both formats and stay as they are.  Entries
whose file is gone are reported and dropped.  The format-2 VERSION is written
last: a crash midway leaves a format-1 store that the command can finish.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Callable, Tuple

from . import identity
from .errors import StoreCorrupt
from .sealing import open_regular
from .store import VERSION_1_TEXT, VERSION_TEXT, Store, normalize_relpath, parse_digest

V1_INDEX = "index"


def upgrade(source: str, store: Store, warn: Callable[[str], None]) -> Tuple[int, int]:
    """(entries converted, entries dropped).  ``store`` is opened objects_only."""
    if store.version == 2:
        return 0, 0
    converted = dropped = 0
    v1 = os.path.join(store.path, V1_INDEX)
    for shard in sorted(os.listdir(v1)) if os.path.isdir(v1) else ():
        dirfd = store._open_dirs((V1_INDEX, shard))
        try:
            names = sorted(os.listdir(dirfd))
        finally:
            os.close(dirfd)
        for n in names:
            where = os.path.join(v1, shard, n)
            fd = store._open_file((V1_INDEX, shard, n))
            if fd is None:  # removed meanwhile
                continue
            try:
                doc = json.loads(os.read(fd, 1 << 16))
                path = normalize_relpath(doc["path"])
                alg, digest = parse_digest(doc["digest"])
                sig = bytes.fromhex(doc.get("signature", ""))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise StoreCorrupt(f"{where}: malformed format-1 index entry: {e}") from None
            finally:
                os.close(fd)
            try:
                ffd = open_regular(os.path.join(source, path))
            except OSError as e:
                warn(f"{path}: {e.strerror}; its entry is dropped")
                dropped += 1
                continue
            try:
                store.set_entry(identity.key_of(ffd), alg, digest, sig, path)
                converted += 1
            finally:
                os.close(ffd)
    store._atomic_write((), "VERSION", VERSION_TEXT)
    shutil.rmtree(v1, ignore_errors=True)
    store.version = 2
    return converted, dropped


__all__ = ["upgrade", "VERSION_1_TEXT"]
