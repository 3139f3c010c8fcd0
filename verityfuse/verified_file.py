"""Verified reads without FUSE: ``open_verified`` and ``VerifiedFile`` (the public API's
second half; see api.py and docs/api.md).
"""

from __future__ import annotations

import errno as _errno
import io
import os
import stat
import threading
from typing import TYPE_CHECKING, Optional, Tuple, Union

from . import fsutil, merkle
from .api_core import Digest, NotSealedError, PathArg, as_digest, digest_of, existing_store, fspath
from .errors import (RESOURCE_ERRNOS, ContentMismatch, Corruption, MissingObject, StoreCorrupt,
                     VerityError)

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

    from .reader import VerifiedReader
    from .store import StoredTree
    from .verifier import TreeBlockCache


_cache_lock = threading.Lock()
_shared_cache: Optional["TreeBlockCache"] = None


def _cache() -> "TreeBlockCache":
    """One bounded cache of verified tree blocks (32 MiB) for every VerifiedFile."""
    global _shared_cache
    with _cache_lock:
        if _shared_cache is None:
            from .verifier import TreeBlockCache

            _shared_cache = TreeBlockCache()
        return _shared_cache


def _why_untrusted(st: os.stat_result, me: int) -> Optional[str]:
    """Why no one but root and ``me`` is known to control this directory, or None."""
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid not in (0, me):
        who = "root" if me == 0 else f"root or uid {me}"
        return f"is owned by uid {st.st_uid} (only {who} may own it)"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _find_store(fd: int, label: str, trusted: bool) -> Optional[str]:
    """The implicit store of the file open as ``fd``: the nearest ``.verityfuse``
    directory beside it or in a parent directory, or None if there is none.

    With ``trusted`` (its index will say which digest to trust), trust never
    comes from a place an attacker can create: the store and every
    directory from the one holding it down to the file must be owned by root or
    the caller and not writable by group or others, else NotSealedError.  Whoever
    could write one of them could have made a nearer store or put another sealed
    inode under the file's name.  Those directories can then change only by root
    or the caller, so what is checked here is what ``Store`` opens next.
    """
    from .store import STORE_DIRNAME

    # The file that was opened, not whatever the caller's path names by now.
    d = os.path.dirname(os.readlink(f"/proc/self/fd/{fd}"))
    me = os.geteuid()
    way = []  # the directories from the file up to where the store is
    while d.startswith("/"):  # a deleted or unreachable file has no such path
        way.append(d)
        cand = os.path.join(d, STORE_DIRNAME)
        try:
            st = os.lstat(cand)
        except OSError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):  # as store_of: never followed
            raise NotSealedError(f"{label}: the store {cand} is a symlink (refused as a "
                                 f"directory's own store); pass store=")
        if st is not None and stat.S_ISDIR(st.st_mode):
            # (Without ``trusted``, a pinned digest: only content-addressed objects are read.)
            checks = [("it", st)] + [(f"the directory {w} on the way to the file", os.lstat(w))
                                     for w in way] if trusted else []
            for what, s in checks:
                why = _why_untrusted(s, me)
                if why is not None:
                    raise NotSealedError(f"{label}: the store {cand} is not trusted: {what} "
                                         f"{why}; pass store= or digest=")
            return cand
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    return None


def _eio(e: VerityError) -> OSError:
    """The OSError a kernel read or open gives for corruption; raise it ``from e``."""
    return OSError(_errno.EIO, f"Input/output error: {e}")


class VerifiedFile(io.RawIOBase):
    """A sealed file open for reading, every byte verified before it is returned.

    Made by :func:`open_verified`.  An ``io.RawIOBase``: ``read``, ``readinto``,
    ``readall``, ``seek``, ``tell``, ``close``, iteration and ``with`` work as on a
    file opened ``"rb", buffering=0``; wrap it in ``io.BufferedReader`` (and
    ``io.TextIOWrapper``) for buffered or text reads.  ``read_at(offset, size)``
    reads without moving the position and may be called from several threads.

    A read that touches a block whose hash does not match (data or tree), or a
    file truncated or extended since it was sealed, raises ``OSError`` with errno
    ``EIO``, its ``__cause__`` the ``verityfuse.errors.Corruption`` that says where
    and what (an ``IntegrityError`` with the offset, expected and actual hash): what
    a read of that block through a mount gives.  Nothing of that read is returned,
    the position does not move, and reads of other blocks still work.

    ``fileno()`` is not supported: reading the descriptor directly would bypass
    verification.  Not writable.
    """

    name: str
    """The path it was opened with."""
    digest: Digest
    """The trusted digest every read is checked against (with its descriptor)."""
    size: int
    """The sealed size in bytes."""
    mode = "rb"

    def __init__(self, name: str, fd: int, tree: "StoredTree", reader: "VerifiedReader",
                 digest: Digest) -> None:
        super().__init__()
        self.name = name
        self.digest = digest
        self.size = reader.data_size
        self._fd = fd
        self._tree = tree
        self._reader = reader
        self._pos = 0
        # The block peek() verified last, (offset, bytes): readline() peeks, then reads
        # what it peeked; that read is served from here instead of verifying again.
        self._peeked: Tuple[int, bytes] = (0, b"")

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"position {self._pos}"
        return f"<VerifiedFile {self.name!r} {self.digest} size {self.size}, {state}>"

    def readable(self) -> bool:
        self._check_open()
        return True

    def seekable(self) -> bool:
        self._check_open()
        return True

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file")

    def read_at(self, offset: int, size: int) -> bytes:
        """Up to ``size`` verified bytes at ``offset`` (fewer only at the end of the
        file; ``b""`` at or past it), like ``os.pread``.  The position is not used
        or moved.  Raises ``OSError(EIO)`` as described in the class."""
        self._check_open()
        if offset < 0:
            raise OSError(_errno.EINVAL, "Invalid argument: negative offset")
        size = max(0, min(size, self.size - offset))
        start, data = self._peeked
        if start <= offset and offset + size <= start + len(data) and size:
            return data[offset - start: offset - start + size]
        return self._chunk(offset, size)  # the reader works in pieces itself

    def _chunk(self, offset: int, size: int) -> bytes:
        try:
            return bytes(self._reader.read(offset, size))
        except Corruption as e:
            raise _eio(e) from e

    def read(self, size: Optional[int] = -1) -> bytes:
        """Up to ``size`` bytes from the position (all the rest if ``size`` is negative
        or ``None``), and move past them; ``b""`` at the end."""
        self._check_open()
        if size is None or size < 0:
            return self.readall()
        data = self.read_at(self._pos, size)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        """Everything from the position to the end."""
        self._check_open()
        return self.read(max(0, self.size - self._pos))

    def peek(self, size: int = 0) -> bytes:
        """Verified bytes from the position without moving it: at least one (unless at
        the end), to the end of the current block or ``size`` bytes, whichever is more.
        (``readline`` and line iteration use it instead of reading byte by byte.)"""
        self._check_open()
        bs, pos = self._reader.bs, self._pos
        data = self.read_at(pos, max(size, bs - pos % bs))
        self._peeked = (pos, data)
        return data

    def readinto(self, buffer: "WriteableBuffer") -> int:
        """Read into a writable bytes-like object; returns the number of bytes read."""
        self._check_open()
        with memoryview(buffer) as mv, mv.cast("B") as view:
            data = self.read_at(self._pos, len(view))
            view[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Move the position (``SEEK_SET``, ``SEEK_CUR``, ``SEEK_END``); returns it.
        Seeking past the end is allowed (reads there give ``b""``)."""
        self._check_open()
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._pos + offset
        elif whence == os.SEEK_END:
            pos = self.size + offset
        else:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        if pos < 0:
            raise OSError(_errno.EINVAL, "Invalid argument: negative seek position")
        self._pos = pos
        return pos

    def tell(self) -> int:
        self._check_open()
        return self._pos

    def write(self, data: "ReadableBuffer") -> int:
        """Not supported: a sealed file is read-only (``io.UnsupportedOperation``)."""
        self._check_open()
        raise io.UnsupportedOperation("write: a verified file is read-only")

    def close(self) -> None:
        """Release the file and its tree; idempotent."""
        if not self.closed:
            try:
                self._tree.close()
                if self._fd >= 0:
                    os.close(self._fd)
                    self._fd = -1
            finally:
                super().close()


def open_verified(path: PathArg, *, store: Optional[PathArg] = None,
                  digest: Union[Digest, str, None] = None) -> VerifiedFile:
    """Open a sealed file for reading without a mount: every read is verified by the
    same reader and verifier the mount uses, against a trusted digest.

    The trusted digest is the store's: the one recorded for the file's inode when it
    was sealed (``seal``, ``verityfuse seal``, ``fsverity enable`` on a mount).  With
    ``digest=``, it is yours instead: only the tree object named by that digest is used
    (objects are content-addressed, so the store need not be trusted), or, without it,
    for a small file (at most one block, which has no tree, or at most 16 KiB with a tree
    of one block) the tree of its bytes if its descriptor hashes to ``digest``: the file
    reads only if its bytes hash to ``digest``.  Its parameters are tried from the
    Digest's descriptor (when it carries one), the file's index entry, or the defaults.

    :param path: the file (symlinks are followed).
    :param store: the store directory; default: the nearest ``.verityfuse`` directory
        beside the file or in a parent directory (``SOURCE/.verityfuse``, where ``seal``
        puts it); without ``digest=`` it is trusted only if it and every directory from
        the one holding it down to the file are owned by root or the caller and not
        writable by group or others.
    :param digest: a trusted digest (a :class:`Digest` or ``"sha256:<hex>"``) to check
        against instead of the store's index.
    :returns: a :class:`VerifiedFile` (close it, or use ``with``).
    :raises NotSealedError: the store has no digest for this file, or no store was
        found, or the store found is not trusted (without ``store=``).
    :raises OSError: ``path`` or the given store cannot be opened, or ``path`` is not a
        regular file; errno ``EIO`` (with the ``verityfuse.errors.Corruption`` as
        ``__cause__``) when the file's store entry or tree object is missing or corrupt
        or its size is not the sealed size: what opening it on a mount gives.
    :raises ValueError: ``digest`` is malformed.
    :raises verityfuse.errors.VerityError: the store is malformed or of format 1
        without ``digest=`` (``verityfuse upgrade-store``).
    """
    from . import identity
    from .reader import attach_reader
    from .store import Store

    label = fspath(path)
    pinned = as_digest(digest) if digest is not None else None
    fd = fsutil.open_regular(label, follow=True)
    try:
        if store is not None:
            store_path = existing_store(fspath(store))
        else:
            found = _find_store(fd, label, trusted=pinned is None)
            if found is None:
                raise NotSealedError(f"{label}: no verityfuse store in its directory or any parent "
                                     f"(pass store=)")
            store_path = found
        # A malformed store (its VERSION) raises its VerityError, as documented; what is
        # wrong with this file's entry, tree or size is EIO, as on a mount.
        with Store(store_path, objects_only=pinned is not None) as st:
            try:
                if pinned is None:
                    entry = st.get_entry(identity.key_of(fd))
                    if entry is None:
                        raise NotSealedError(f"{label} is not sealed in the store {st.path}")
                    tree = st.open_tree(entry)
                else:
                    tree = _pinned_tree(st, fd, label, merkle.hash_alg(pinned.algorithm),
                                        pinned.digest, pinned.descriptor)
            except Corruption as e:
                raise _eio(e) from e
        try:
            reader = attach_reader(fd, tree, _cache(), label)
        except BaseException as e:
            tree.close()
            if isinstance(e, Corruption):
                raise _eio(e) from e
            raise
        return VerifiedFile(label, fd, tree, reader, digest_of(tree.descriptor))
    except BaseException:
        os.close(fd)
        raise


def _pinned_tree(st, fd: int, label: str, alg, digest: bytes, hint: Optional[bytes] = None):
    """The tree of the pinned ``digest``: its object, or, for a small file without one
    (one of at most one block sealed into a format-3 store, a copy of a small file, a
    store without its objects), the tree of its bytes now if it gives ``digest`` with
    the parameters tried (``_small_tree``, ``hint`` among them: a file of more than one
    block sealed with other than the defaults needs its object)."""
    try:
        return st.open_object(alg, digest)
    except StoreCorrupt as e:
        tree = _small_tree(st, fd, label, alg, digest, hint)
        if tree is not None:
            return tree
        from .small_trees import small_tree_fits
        if isinstance(e, MissingObject) and small_tree_fits(merkle.Params(alg),
                                                            os.fstat(fd).st_size):
            # Not a damaged store: a small file needs no object, and its bytes say no.
            raise ContentMismatch(f"{label}: its bytes do not give "
                                  f"{merkle.format_digest(alg, digest)} (with the sealing "
                                  f"parameters tried), and the store has no tree object "
                                  f"for that digest", label) from None
        raise


def _small_tree(st, fd: int, label: str, alg, digest: bytes, hint: Optional[bytes] = None):
    """The tree of the small file at ``fd`` (small_trees.small_tree_fits) if its
    descriptor hashes to ``digest``, made from its bytes with the parameters of ``hint``
    (the pinned Digest's descriptor, when it has one), those its inode's index entry
    names (a manifest's file has none), or the defaults, as a manifest mount does; None
    otherwise.  Neither hint nor store is trusted: their parameters are only tried."""
    from . import identity, treebuild
    from .small_trees import small_tree, small_tree_fits

    candidates = [merkle.Params(alg)]
    if hint is not None:
        try:
            candidates.insert(0, merkle.parse_descriptor(hint).params)
        except (VerityError, ValueError):  # not a descriptor: the other candidates
            pass
    try:
        entry = st.get_entry(identity.key_of(fd))
        if entry is not None and entry.descriptor is not None:
            candidates.insert(0, entry.descriptor.params)
    except (OSError, VerityError):  # no file handles, a damaged entry: the defaults only
        pass
    try:
        size = os.fstat(fd).st_size
        data = None  # read once, for the first parameters it fits
        for params in dict.fromkeys(candidates):  # each set once (a hint is often the entry's)
            if small_tree_fits(params, size):
                if data is None:
                    data = treebuild.read_small(fd, size)
                tree = small_tree(label, params, data, digest)
                if tree is not None:
                    return tree
    except OSError as e:  # unreadable, or changing as it is read: no descriptor
        if e.errno in RESOURCE_ERRNOS:  # the process's own want: never a mismatch
            raise
    return None
