"""The store's index (protocol/store-format.md, "The index"): an inode's key to its
digest, as one small JSON file each under STORE/inodes/<2 hex>/<key>."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional

from . import merkle
from .errors import StoreCorrupt

INDEX_DIR = "inodes"
_HEX = frozenset("0123456789abcdef")

INDEX_ENTRY_MAX = 64 * 1024  # a path (4 KiB) plus a hex signature (32 KiB) fit


@dataclass(frozen=True)
class IndexEntry:
    key: str                # the inode's identity (identity.key_of)
    alg: merkle.HashAlg
    digest: bytes
    signature: bytes = b""
    path: str = ""          # where the file was when it was sealed: for messages only

    @property
    def digest_text(self) -> str:
        return merkle.format_digest(self.alg, self.digest)


def entry_bytes(alg: merkle.HashAlg, digest: bytes, signature: bytes, path: str) -> bytes:
    """The bytes of an index entry: sorted keys, one line, as json.dumps(sort_keys=True)
    writes it (formatted here: a third of the cost, and this runs once per sealed file);
    only the path needs JSON's quoting."""
    sig = f', "signature": "{signature.hex()}"' if signature else ""
    return (f'{{"digest": "{alg.name}:{digest.hex()}", "path": {json.dumps(path)}{sig}, '
            f'"version": 2}}\n').encode()


def parse_entry(name: str, key: str, data: bytes) -> IndexEntry:
    """The entry of ``key`` read from file ``name``; StoreCorrupt naming it if malformed."""
    if len(data) > INDEX_ENTRY_MAX:
        raise StoreCorrupt(f"{name}: index entry larger than {INDEX_ENTRY_MAX} bytes")
    try:
        doc = json.loads(data.decode("utf-8"))
        if not isinstance(doc, dict) or doc.get("version") != 2:
            raise ValueError("unsupported or missing version")
        extra = set(doc) - {"version", "path", "digest", "signature"}
        if extra:
            raise ValueError(f"unknown keys {sorted(extra)}")
        path, digest, sig = doc.get("path"), doc.get("digest"), doc.get("signature", "")
        if not isinstance(path, str) or not isinstance(digest, str) or not isinstance(sig, str):
            raise ValueError("path, digest and signature must be strings")
        alg, raw = merkle.parse_digest(digest)
        signature = bytes.fromhex(sig)
    except UnicodeDecodeError as e:
        raise StoreCorrupt(f"{name}: malformed index entry: not UTF-8 at byte {e.start}") from None
    except (ValueError, RecursionError) as e:
        raise StoreCorrupt(f"{name}: malformed index entry: {e}") from None
    return IndexEntry(key, alg, raw, signature, path)


class StoreIndex:
    """Store's index methods: entries are read and written with Store's primitives
    (one openat2 without symlinks, atomic writes through tmp/)."""

    if TYPE_CHECKING:  # what Store provides
        def _where(self, *parts) -> str: ...
        def _read_file(self, parts, nbytes: int, keep: bool = False): ...
        def _open_dirs(self, parts, create: bool = False) -> int: ...
        def _atomic_write(self, dirparts, name: str, data: bytes) -> None: ...
        def create_tmp(self): ...
        def discard_tmp(self, name: str) -> None: ...

    @staticmethod
    def _index_parts(key: str):
        if len(key) != 64 or not _HEX.issuperset(key):
            raise ValueError(f"invalid index key {key!r}")
        return (INDEX_DIR, key[:2], key)

    def set_entry(self, key: str, alg: merkle.HashAlg, digest: bytes, signature: bytes = b"",
                  path: str = ""):
        """Write the index entry of ``key``, durably, now."""
        parts = self._index_parts(key)
        self._atomic_write(parts[:-1], parts[-1], entry_bytes(alg, digest, signature, path))

    def stage_entry(self, key: str, alg: merkle.HashAlg, digest: bytes, signature: bytes = b"",
                    path: str = ""):
        """The index entry of ``key`` written to tmp/, not synced, not yet in place:
        (tmp name, directory parts, name) for store_batch to publish."""
        parts = self._index_parts(key)
        tmpname, fd = self.create_tmp()
        try:
            os.write(fd, entry_bytes(alg, digest, signature, path))
        except BaseException:
            os.close(fd)
            self.discard_tmp(tmpname)
            raise
        os.close(fd)
        return tmpname, parts[:-1], parts[-1]

    def get_entry(self, key: str) -> Optional[IndexEntry]:
        parts = self._index_parts(key)
        got = self._read_file(parts, INDEX_ENTRY_MAX + 1)
        if got is None:
            return None
        return parse_entry(self._where(*parts), key, got[2])

    def remove_entry(self, key: str) -> bool:
        """False if there was no entry (or not even its shard)."""
        parts = self._index_parts(key)
        try:
            dirfd = self._open_dirs(parts[:-1])
        except FileNotFoundError:
            return False
        try:
            os.unlink(parts[-1], dir_fd=dirfd)
            os.fsync(dirfd)
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(dirfd)

    def keys(self) -> Iterator[str]:
        """Every index key (for verify's stale-entry count)."""
        try:
            idxfd = self._open_dirs((INDEX_DIR,))
        except FileNotFoundError:
            return
        try:
            shards = sorted(os.listdir(idxfd))
        finally:
            os.close(idxfd)
        for shard in shards:
            dirfd = self._open_dirs((INDEX_DIR, shard))
            try:
                names = sorted(os.listdir(dirfd))
            finally:
                os.close(dirfd)
            yield from (n for n in names if len(n) == 64)
