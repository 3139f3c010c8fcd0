"""What a view is: the filesystem one trust mode serves (no pyfuse3, no trio).

``ops`` adapts pyfuse3 to a view.  Two views exist:

- ``view_local.LocalView``: a read-write passthrough of SOURCE keyed by the
  backing inode; verity belongs to the inode, as on ext4.
- ``view_manifest.ManifestView``: the tree a signed manifest describes, keyed
  by manifest path; the share is only a source of bytes, each one checked.

Both hand out the same ``VerifiedReader`` for verity files.  Views raise
OSError or a ``VerityError``; ``ops`` turns them into errnos in one place.
``View`` declares what a view implements; ``ReadOnlyView`` is the half a
read-only view shares (every change answers EROFS).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Any, NoReturn, Optional, Protocol, Union

from . import merkle
from .reader import VerifiedReader, attach_reader
from .verifier import TreeBlockCache, Verifier

XATTR_PREFIX = b"user.fsverity."


@dataclass(frozen=True, slots=True)  # slots: one per sealed inode the kernel remembers
class VerityInfo:
    """A verity file's trusted identity: what MEASURE, GETFLAGS and the xattrs report.

    ``tree`` is the one record of which tree the file has (``merkle.TreeId``); the view
    adds only what travels with it: the signature given at enable and, in local mode,
    the root hash of a file of one block whose index entry keeps its descriptor (it
    has no object to open: local_verity rebuilds the descriptor from these).
    """

    tree: merkle.TreeId
    signature: bytes = b""
    inline_root: bytes = b""

    @property
    def alg(self) -> merkle.HashAlg:
        return self.tree.alg

    @property
    def digest(self) -> bytes:
        return self.tree.digest

    @property
    def params(self) -> merkle.Params:
        return self.tree.params

    @property
    def size(self) -> int:
        """The sealed size: st_size of a verity file."""
        return self.tree.data_size

    @property
    def digest_text(self) -> str:
        return self.tree.text

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

    __slots__ = ("fd", "node", "reader", "writable", "readable", "closers", "inline_reads")

    def __init__(self, fd: int, node, writable: bool = False, readable: bool = True) -> None:
        # What the kernel lets the caller do with it: access mode 3 ("ioctl only") is
        # neither (its backing fd is opened read-only).
        self.fd, self.node, self.writable, self.readable = fd, node, writable, readable
        self.reader: Optional[VerifiedReader] = None
        self.closers: list = []  # what else to close with it (a tree object)
        # Without a reader: how a small read may be served on the request thread
        # (ops_read decides on the first one).
        self.inline_reads: Optional[str] = None

    @property
    def keep_cache(self) -> bool:
        # Verified pages may stay cached: they were verified when filled.
        return self.reader is not None

    def verify_with(self, tree, cache, label: str, stats, **size_words) -> None:
        """From now on every read is checked against ``tree`` (closed with the handle);
        ``reader.attach_reader`` checks the file's size first."""
        self.closers.append(tree)
        self.reader = attach_reader(self.fd, tree, cache, label, stats, **size_words)

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


# An open file or directory: what an ioctl's ``fh`` names.
Handle = Union[FileHandle, DirHandle]


class View(Protocol):
    """What ``ops`` and ``ops_ioctl`` call on a view: every view implements all of it.

    Node ids are the view's; names are bytes; ``ctx`` is pyfuse3's RequestContext (the
    caller's uid, gid, pid and umask), passed through untouched. Methods raise OSError (its
    errno is the answer) or a ``VerityError``; ``ops`` maps both in one place. Parameters are
    positional-only: the adapter passes them by position and the views name them as they like.

    Besides these, the adapter probes three optional members with ``getattr``: ``open_blocks``
    (opening may wait on the network: run ``open`` in a worker thread, at most a few at
    once per ``wait_key(ino)``, which such a view has), ``path_of(ino)`` (the
    manifest path a failure is measured under) and ``status()`` (extra ``verityfuse status``
    fields); the daemon probes ``threads``, ``max_background`` and ``inodes.max_fds``.
    """

    posix_acl: bool  # the kernel enforces ACLs (FUSE_POSIX_ACL); creates keep the caller's umask
    cache: TreeBlockCache  # the verified tree blocks: `verityfuse status` reports it

    # -- names and attributes
    # ``lookup`` never waits and counts a lookup only when it returns: the shim's hook
    # calls it as a plain function (fast_lookups) and, for an integrity failure it
    # raises, lets pyfuse3's handler call it again.
    def lookup(self, parent: int, name: bytes, ctx: Any, /) -> Attr: ...
    def forget(self, ino: int, n: int, /) -> Any: ...
    def unlookup(self, ino: int, /) -> Any: ...
    def getattr(self, ino: int, /) -> Attr: ...
    # ``fd`` (local view): what a WouldWait's ``finish`` opened for its truncate.
    def setattr(self, ino: int, attr: Any, fields: Any, fh: Optional[FileHandle], ctx: Any,
                fd: Optional[int] = None, /) -> Attr: ...
    def readlink(self, ino: int, /) -> bytes: ...
    def statfs(self) -> Any: ...

    # -- changing the tree
    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, ctx: Any, /) -> Attr: ...
    def mkdir(self, parent: int, name: bytes, mode: int, ctx: Any, /) -> Attr: ...
    def symlink(self, parent: int, name: bytes, target: bytes, ctx: Any, /) -> Attr: ...
    def unlink(self, parent: int, name: bytes, /) -> Any: ...
    def rmdir(self, parent: int, name: bytes, /) -> Any: ...
    def rename(self, parent_old: int, name_old: bytes, parent_new: int, name_new: bytes,
               flags: int, /) -> Any: ...
    def link(self, ino: int, parent: int, name: bytes, /) -> Attr: ...

    # -- files and directories
    def open(self, ino: int, flags: int, ctx: Any, /,
             fd: Optional[int] = None) -> FileHandle: ...
    def create(self, parent: int, name: bytes, mode: int, flags: int, ctx: Any, /) -> Any: ...
    def release(self, fh: FileHandle, /) -> Any: ...
    def opendir(self, ino: int, ctx: Any, /) -> DirHandle: ...
    def readdir(self, dh: DirHandle, start: int, /) -> Any: ...
    def releasedir(self, dh: DirHandle, /) -> Any: ...

    # -- extended attributes
    def getxattr(self, ino: int, name: bytes, /) -> bytes: ...
    def listxattr(self, ino: int, ctx: Any, /) -> Any: ...
    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int, ctx: Any, /) -> Any: ...
    def removexattr(self, ino: int, name: bytes, /) -> Any: ...

    # -- fs-verity and inode flags (ioctls, FUSE_FSVERITY)
    def verity_info(self, ino: int, /) -> Optional[VerityInfo]: ...
    def tree_verifier(self, ino: int, /) -> Verifier: ...
    # ``fh``: the handle the ioctl came through; lsattr/chattr of a directory bring a DirHandle.
    def flags(self, ino: int, fh: Optional[Handle], /) -> int: ...
    def set_flags(self, ino: int, fh: Optional[Handle], flags: int, /) -> Any: ...
    def fsxattr(self, ino: int, fh: Optional[Handle], new: Optional[bytes] = None, /) -> bytes: ...
    def enable_check(self, ino: int, fh: Optional[FileHandle], arg: Any, caller: Any,
                     opened: Optional[int] = None, /) -> Any: ...
    def enable_build(self, job: Any, cancel: Any, /) -> Any: ...
    def enable_commit(self, job: Any, /) -> Any: ...
    def enable_finish(self, job: Any, /) -> Any: ...
    def enable_sync(self, ino: int, arg: Any, /) -> Any: ...

    def close(self) -> int: ...


def erofs() -> NoReturn:
    raise OSError(errno.EROFS, "read-only: the manifest defines this tree")


class ReadOnlyView:
    """The mutating half of ``View`` for a tree nothing may change: each answers EROFS.

    A subclass supplies the rest (names, attributes, opens, verity). FS_IOC_FSSETXATTR
    arrives as ``fsxattr(..., new)``, which the subclass refuses the same way (``erofs``).
    """

    read_only = True

    def setattr(self, ino: int, attr: Any, fields: Any, fh: Optional[FileHandle], ctx: Any,
                fd: Optional[int] = None) -> NoReturn:
        erofs()

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, ctx: Any) -> NoReturn:
        erofs()

    def mkdir(self, parent: int, name: bytes, mode: int, ctx: Any) -> NoReturn:
        erofs()

    def symlink(self, parent: int, name: bytes, target: bytes, ctx: Any) -> NoReturn:
        erofs()

    def unlink(self, parent: int, name: bytes) -> NoReturn:
        erofs()

    def rmdir(self, parent: int, name: bytes) -> NoReturn:
        erofs()

    def rename(self, parent_old: int, name_old: bytes, parent_new: int, name_new: bytes,
               flags: int) -> NoReturn:
        erofs()

    def link(self, ino: int, parent: int, name: bytes) -> NoReturn:
        erofs()

    def create(self, parent: int, name: bytes, mode: int, flags: int, ctx: Any) -> NoReturn:
        erofs()

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0, ctx: Any = None) -> NoReturn:
        erofs()

    def removexattr(self, ino: int, name: bytes) -> NoReturn:
        erofs()

    def set_flags(self, ino: int, fh: Optional[Handle], flags: int) -> NoReturn:
        erofs()

    def enable_check(self, ino: int, fh: Optional[FileHandle], arg: Any, caller: Any = None,
                     opened: Optional[int] = None) -> NoReturn:
        erofs()

    def enable_sync(self, ino: int, arg: Any) -> NoReturn:
        erofs()

    # enable_check refuses first, so no job ever reaches these; they are here because a
    # View has them.
    def enable_build(self, job: Any, cancel: Any = None) -> NoReturn:
        erofs()

    def enable_commit(self, job: Any) -> NoReturn:
        erofs()

    def enable_finish(self, job: Any) -> NoReturn:
        erofs()
