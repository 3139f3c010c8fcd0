"""The store's index (protocol/store-format.md, "The index"): an inode's key to its
digest, as one small JSON file each under STORE/inodes/<2 hex>/<key>.

In a format-3 store the entry of a file of at most one block (most of a container
image's files) also holds the file's descriptor: such a file has no tree, so the
descriptor is all its object would hold, and sealing it writes one store file, a
lookup reads one.  The descriptor proves itself as an object does: it must hash
to the entry's digest (``_inline_descriptor``)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING, Iterator, Optional

from . import merkle
from .errors import InvalidDescriptor, StoreCorrupt
from .store_object import inline_tree

INDEX_DIR = "inodes"
_KEY = re.compile("[0-9a-f]{64}").fullmatch  # a third of a set check's time: once per sealed file

INDEX_ENTRY_MAX = 64 * 1024  # a path (4 KiB) plus a hex signature (32 KiB) fit


@dataclass(frozen=True)
class IndexEntry:
    key: str                # the inode's identity (identity.key_of)
    alg: merkle.HashAlg
    digest: bytes
    signature: bytes = b""
    path: str = ""          # where the file was when it was sealed: for messages only
    descriptor: Optional[merkle.Descriptor] = None  # kept inline: a file of one block at most

    @property
    def digest_text(self) -> str:
        return merkle.format_digest(self.alg, self.digest)


def inline(desc: merkle.Descriptor) -> bool:
    """Whether a format-3 store keeps ``desc`` in its index entry instead of an object:
    a file of one block at most, which has no tree."""
    return desc.data_size <= desc.params.block_size


def entry_bytes(alg: merkle.HashAlg, digest: bytes, signature: bytes, path: str,
                descriptor: Optional[merkle.Descriptor] = None) -> bytes:
    """The bytes of an index entry: sorted keys, one line, as json.dumps(sort_keys=True)
    writes it (formatted here: a third of the cost, and this runs once per sealed file);
    only the path needs JSON's quoting."""
    desc = f'"descriptor": "{descriptor.raw.hex()}", ' if descriptor is not None else ""
    sig = f', "signature": "{signature.hex()}"' if signature else ""
    return (f'{{{desc}"digest": "{alg.name}:{digest.hex()}", "path": {json.dumps(path)}{sig}, '
            f'"version": 2}}\n').encode()


def _inline_descriptor(text, alg: merkle.HashAlg, digest: bytes) -> merkle.Descriptor:
    """The descriptor an entry keeps, checked as an object's is: it must parse, hash to
    the entry's digest, describe a file of one block (a larger one has a tree, which
    only an object holds) and have a block size of at most MAX_BLOCK_SIZE.  ValueError
    says what is wrong."""
    if not isinstance(text, str) or len(text) != 2 * 256:
        raise ValueError("descriptor must be 256 bytes in hex")
    try:
        desc = merkle.parse_descriptor(bytes.fromhex(text))
    except InvalidDescriptor as e:
        raise ValueError(f"descriptor: {e}") from None
    if desc.params.alg != alg or desc.digest != digest:
        raise ValueError(f"descriptor does not match the digest: expected "
                         f"{merkle.format_digest(alg, digest)}, actual "
                         f"{merkle.format_digest(desc.params.alg, desc.digest)}")
    if not inline(desc):
        raise ValueError(f"descriptor of {desc.data_size} bytes in blocks of "
                         f"{desc.params.block_size}: a file with a tree needs an object")
    if desc.params.block_size > merkle.MAX_BLOCK_SIZE:  # as in an object: read whole per read
        raise ValueError(f"descriptor: block size {desc.params.block_size} is larger than "
                         f"{merkle.MAX_BLOCK_SIZE}")
    return desc


# Exactly what entry_bytes writes when the path needs no escaping (printable ASCII but
# '"' and '\\'): such an entry is the JSON object of these members and no other, so its
# fields are taken from the match and checked as the decoder's would be, without the
# decoder (an entry is read at every first lookup of a sealed file: 4.5 -> 2.6 us for
# one naming an object, 11.1 -> 9.6 for one keeping a descriptor).  Anything else,
# valid or not, goes through the JSON decoder.
_CANONICAL = re.compile(
    rb'\{(?:"descriptor": "([0-9a-f]*)", )?"digest": "([0-9a-z:]*)", "path": "([ !#-\[\]-~]*)"'
    rb'(?:, "signature": "([0-9a-f]*)")?, "version": 2\}\n').fullmatch


# The same canonical entries, parsed and checked natively where built: one call for
# what the match and its checks below do (an entry keeping a descriptor: 5.9 -> 3.1 us
# hot, with the IndexEntry and Descriptor made; it was ~12 us of a daemon's lookup).
# It answers None for all it does not accept: the Python parser below reads that.
_native_entry = getattr(merkle._hashblocks, "index_entry", None)


def parse_entry(name: str, key: str, data: bytes) -> IndexEntry:
    """The entry of ``key`` read from file ``name``; StoreCorrupt naming it if malformed."""
    if len(data) > INDEX_ENTRY_MAX:
        raise StoreCorrupt(f"{name}: index entry larger than {INDEX_ENTRY_MAX} bytes")
    if _native_entry is not None:
        got = _native_entry(data, merkle.MAX_BLOCK_SIZE)
        if got is not None:
            alg_no, raw, path, signature, d = got
            desc = None if d is None else merkle.checked_descriptor(alg_no, *d)
            return IndexEntry(key, merkle.hash_alg(alg_no), raw, signature, path, desc)
    m = _CANONICAL(data)
    if m is not None:
        desc_hex, digest_text, path, sig = m.groups()
        try:
            alg, raw = merkle.parse_digest(digest_text.decode())
            signature = bytes.fromhex(sig.decode()) if sig else b""
            desc = None if desc_hex is None else \
                _inline_descriptor(desc_hex.decode(), alg, raw)
        except ValueError as e:
            raise StoreCorrupt(f"{name}: malformed index entry: {e}") from None
        return IndexEntry(key, alg, raw, signature, path.decode(), desc)
    try:
        doc = json.loads(data.decode("utf-8"))
        if not isinstance(doc, dict) or doc.get("version") != 2:
            raise ValueError("unsupported or missing version")
        extra = set(doc) - {"version", "path", "digest", "signature", "descriptor"}
        if extra:
            raise ValueError(f"unknown keys {sorted(extra)}")
        path, digest, sig = doc.get("path"), doc.get("digest"), doc.get("signature", "")
        if not isinstance(path, str) or not isinstance(digest, str) or not isinstance(sig, str):
            raise ValueError("path, digest and signature must be strings")
        alg, raw = merkle.parse_digest(digest)
        signature = bytes.fromhex(sig)
        desc = None
        if "descriptor" in doc:
            desc = _inline_descriptor(doc["descriptor"], alg, raw)
    except UnicodeDecodeError as e:
        raise StoreCorrupt(f"{name}: malformed index entry: not UTF-8 at byte {e.start}") from None
    except (ValueError, RecursionError) as e:
        raise StoreCorrupt(f"{name}: malformed index entry: {e}") from None
    return IndexEntry(key, alg, raw, signature, path, desc)


def _bytes_of(e: IndexEntry) -> bytes:
    return entry_bytes(e.alg, e.digest, e.signature, e.path, e.descriptor)


def _check_keys(keys) -> None:
    """ValueError naming the first of ``keys`` that is no index key (a name in inodes/)."""
    if not all(map(_KEY, keys)):
        bad = next(key for key in keys if _KEY(key) is None)
        raise ValueError(f"invalid index key {bad!r}")


class StoreIndex:
    """Store's index methods: entries are read and written with Store's primitives
    (one openat2 without symlinks, atomic writes through tmp/)."""

    if TYPE_CHECKING:  # what Store provides
        version: int
        def _where(self, *parts) -> str: ...
        def _read_file(self, parts, nbytes: int, keep: bool = False): ...
        def _open_dirs(self, parts, create: bool = False) -> int: ...
        def _atomic_write(self, dirparts, name: str, data: bytes) -> None: ...
        def create_tmp(self): ...
        def discard_tmp(self, name: str) -> None: ...
        def open_object(self, alg: merkle.HashAlg, digest: bytes): ...

    @staticmethod
    def _index_parts(key: str):
        _check_keys((key,))
        return (INDEX_DIR, key[:2], key)

    def set_entry(self, entry: IndexEntry):
        """Write ``entry``, durably, now."""
        parts = self._index_parts(entry.key)
        self._atomic_write(parts[:-1], parts[-1], _bytes_of(entry))

    @staticmethod
    def index_places(named):
        """(directory parts, [(tmp name, shard, name)] sorted by shard) of the index
        entries ``named`` ((tmp name, key) of each), for store_batch.place_all: the layout
        of _index_parts, every key checked in one pass (a call per key was most of a
        publishing thread's Python)."""
        _check_keys([key for _, key in named])
        return (INDEX_DIR,), sorted(((tmp, key[:2], key) for tmp, key in named),
                                    key=itemgetter(1))

    def stage_entry(self, entry: IndexEntry):
        """``entry`` written to tmp/, not synced, not yet in place: its tmp name, for
        store_batch to publish (``index_places``)."""
        tmpname, fd = self.create_tmp()
        try:
            os.write(fd, _bytes_of(entry))
        except BaseException:
            os.close(fd)
            self.discard_tmp(tmpname)
            raise
        os.close(fd)
        return tmpname

    def get_entry(self, key: str) -> Optional[IndexEntry]:
        parts = self._index_parts(key)
        got = self._read_file(parts, INDEX_ENTRY_MAX + 1)
        if got is None:
            return None
        entry = parse_entry(self._where(*parts), key, got[2])
        if entry.descriptor is not None and self.version < 3:
            raise StoreCorrupt(f"{self._where(*parts)}: malformed index entry: a descriptor in "
                               f"a format-2 store (format 3 only)")
        return entry

    def open_tree(self, entry: IndexEntry):
        """The tree of ``entry`` (a store_object.TreeRef): the descriptor it keeps, or
        its object."""
        if entry.descriptor is None:
            return self.open_object(entry.alg, entry.digest)
        return inline_tree(self._where(*self._index_parts(entry.key)), entry.descriptor,
                           entry.digest)

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
        """Every index key, in no order, listed one directory entry at a time: no list of
        a shard's names is held."""
        try:
            idxfd = self._open_dirs((INDEX_DIR,))
        except FileNotFoundError:
            return
        try:
            shards = [e.name for e in os.scandir(idxfd) if len(e.name) == 2]  # at most 256
        finally:
            os.close(idxfd)
        for shard in shards:
            dirfd = self._open_dirs((INDEX_DIR, shard))
            try:
                with os.scandir(dirfd) as it:
                    yield from (e.name for e in it if len(e.name) == 64)
            finally:
                os.close(dirfd)

    def count_entries(self) -> int:
        """How many index entries there are (verify's stale-entry count)."""
        return sum(1 for _ in self.keys())
