"""What a view is: the filesystem one trust mode serves (no pyfuse3, no trio).

``ops`` adapts pyfuse3 to a view.  Two views exist:

- ``view_local.LocalView``: a read-write passthrough of SOURCE keyed by the
  backing inode; verity belongs to the inode, as on ext4.
- ``view_manifest.ManifestView``: the tree a signed manifest describes, keyed
  by manifest path; the share is only a source of bytes, each one checked.

Both hand out the same ``VerifiedReader`` for verity files.  Views raise
OSError or a ``VerityError``; ``ops`` turns them into errnos in one place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

# Verity state of a regular file: the descriptor, the trusted digest, the tree
# reader and the signature, as fsverity_op.Metadata carries them.
from . import merkle
from .reader import VerifiedReader
from .verifier import Verifier

XATTR_PREFIX = b"user.fsverity."


@dataclass(frozen=True)
class VerityInfo:
    """A verity file's trusted identity: what MEASURE, GETFLAGS and the xattrs report."""

    alg: merkle.HashAlg
    digest: bytes
    params: merkle.Params
    size: int               # the sealed size: st_size of a verity file
    signature: bytes = b""

    @property
    def digest_text(self) -> str:
        return merkle.format_digest(self.alg, self.digest)

    def xattrs(self) -> dict:
        return {
            XATTR_PREFIX + b"digest": self.digest_text.encode(),
            XATTR_PREFIX + b"hash_algorithm": self.alg.name.encode(),
            XATTR_PREFIX + b"block_size": str(self.params.block_size).encode(),
            XATTR_PREFIX + b"salt": self.params.salt.hex().encode(),
        }


class Attr:
    """Attributes of one inode as the kernel will see them."""

    __slots__ = ("ino", "mode", "nlink", "uid", "gid", "rdev", "size", "blksize", "blocks",
                 "atime_ns", "mtime_ns", "ctime_ns", "timeout")

    def __init__(self, ino, mode, nlink, uid, gid, size, atime_ns, mtime_ns, ctime_ns,
                 rdev=0, blksize=4096, blocks=None, timeout=1.0):
        self.ino, self.mode, self.nlink, self.uid, self.gid = ino, mode, nlink, uid, gid
        self.size, self.rdev, self.blksize = size, rdev, blksize
        self.blocks = -(-size // 512) if blocks is None else blocks
        self.atime_ns, self.mtime_ns, self.ctime_ns = atime_ns, mtime_ns, ctime_ns
        self.timeout = timeout

    @classmethod
    def from_stat(cls, ino: int, st: os.stat_result, timeout: float, size: Optional[int] = None):
        return cls(ino, st.st_mode, st.st_nlink, st.st_uid, st.st_gid,
                   st.st_size if size is None else size, st.st_atime_ns, st.st_mtime_ns,
                   st.st_ctime_ns, st.st_rdev, st.st_blksize, st.st_blocks, timeout)


class FileHandle:
    """An open file: its backing fd and, for a verity file, the reader that checks it."""

    __slots__ = ("fd", "node", "reader", "writable", "closers")

    def __init__(self, fd: int, node, writable: bool = False) -> None:
        self.fd, self.node, self.writable = fd, node, writable
        self.reader: Optional[VerifiedReader] = None
        self.closers: list = []  # what else to close with it (a tree object)

    @property
    def keep_cache(self) -> bool:
        # Verified pages may stay cached: they were verified when filled.
        return self.reader is not None

    def verify_with(self, tree, cache, label: str, stats) -> None:
        """From now on every read is checked against ``tree`` (closed with the handle)."""
        self.closers.append(tree)
        self.reader = VerifiedReader(self.fd, Verifier(tree, cache, label), label, stats)

    def close(self):
        for c in self.closers:
            c.close()
        self.closers = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class DirHandle:
    """An open directory: an offset into a listing that stays stable.  A manifest
    view's ``entries`` is the directory's shared index; a local view's ``stream``
    reads the backing directory (``fd``, which the stream then owns) in place."""

    __slots__ = ("node", "fd", "entries", "stream")

    def __init__(self, node, fd=-1):
        self.node, self.fd, self.entries, self.stream = node, fd, None, None

    def close(self):
        if self.stream is not None:
            self.stream.close()  # and its fd
            self.stream, self.fd = None, -1
        elif self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
