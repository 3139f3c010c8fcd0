"""Index entries of the store (protocol/store-format.md, "The index"): an inode's key to
its digest, as one small JSON file each."""

from __future__ import annotations

import json
from dataclasses import dataclass

from . import merkle
from .errors import StoreCorrupt

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
    """The bytes of an index entry: sorted keys, one line."""
    doc = {"version": 2, "path": path, "digest": merkle.format_digest(alg, digest)}
    if signature:
        doc["signature"] = signature.hex()
    return json.dumps(doc, sort_keys=True).encode() + b"\n"


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
