"""The sidecar store: descriptors, Merkle trees and signatures kept beside the data.

Layout (documented in protocol/store-format.md)::

    STORE/VERSION                      "verityfuse-store 3\n"
    STORE/objects/<alg>/<hh>/<digest>  header(64) || descriptor(256) || tree
    STORE/inodes/<hh>/<key>            JSON: {"version": 2, "digest", "path", "signature"?,
                                              "descriptor"?}
    STORE/tmp/                         half-written files; never read

Objects are content-addressed by the fs-verity file digest, so an object
proves itself: H(descriptor) must equal its name, and every tree block hashes
up to the descriptor's root hash.  The index maps an inode's identity (its
filesystem and file handle, see identity.py) to a digest: verity belongs to
the inode, so renames and links keep it and nothing is ever walked.  A file of
one block has no tree: in format 3 its entry keeps its descriptor, no object.
Every write goes to tmp/, is made durable and renamed into place, then the
directory is made durable: a crash leaves either the old entry or the new one,
never half of one.  One file is fsynced on its own (``set_entry``,
``ObjectWriter.commit``); a batch of files is synced once (store_batch.py).
Every open resolves from the store's root fd and follows no symlink (a read: one
openat2 with RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS; a write: each directory with
O_NOFOLLOW), so a symlink planted inside the store is refused instead of followed.
The index's entries and methods are store_index.py's, tree objects store_object.py's.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from operator import itemgetter
from typing import Optional, Tuple

from . import fsutil, merkle
from .errors import RESOURCE_ERRNOS, MissingObject, StoreCorrupt, VerityError
from .store_index import INDEX_ENTRY_MAX, IndexEntry, StoreIndex
from .store_object import TREE_OFFSET, ObjectWriter, SharedTrees, StoredTree, TreeRef, open_stored_tree
from .store_tmp import remove_if_dead, tmp_names as _names

__all__ = ["INDEX_ENTRY_MAX", "IndexEntry", "ObjectWriter", "Store", "StoredTree", "TreeRef"]

STORE_DIRNAME = ".verityfuse"
VERSION_TEXT = b"verityfuse-store 3\n"
VERSION_2_TEXT = b"verityfuse-store 2\n"  # every file has an object; entries keep no descriptor
VERSION_1_TEXT = b"verityfuse-store 1\n"  # index by path; objects are the same
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_libc = ctypes.CDLL(None, use_errno=True)


def default_store(source: str) -> str:
    """The store used when no --store is given: SOURCE/.verityfuse.

    Inside the source tree so that it travels with it (a virtio-fs share, a
    tarball); the mount hides it.
    """
    return os.path.join(source, STORE_DIRNAME)


def store_of(source: str, store: Optional[str] = None, **kw) -> "Store":
    """SOURCE's store: ``store`` as named (a symlink the user chose is followed), or the
    default one, which a symlink planted in SOURCE must not send elsewhere (refused)."""
    return Store(store, **kw) if store else Store(default_store(source), in_source=True, **kw)


class StoreFormat(VerityError):
    """A store of another format than this operation needs."""


class Store(StoreIndex):
    """A store rooted at ``path``.  ``create=True`` makes it if missing.

    ``objects_only=True`` (manifest mode) reads tree objects only, which format
    1 stores have too; every other use needs the index of format 2 or 3 (a
    format-2 store stays one: what is written to it has an object per file).  ``lazy=True``
    (a local mount's default store): a missing store reads as empty and is
    created by the first write, so that mounting writes nothing to SOURCE.
    Only the store's own directory is ever created: its parent must exist.
    """

    def __init__(self, path: str, create: bool = False, objects_only: bool = False,
                 lazy: bool = False, in_source: bool = False):
        self.path = os.path.abspath(path)
        # The root is SOURCE's own (store_of): whoever writes in SOURCE (a share's host)
        # could have planted it as a symlink, so it is never reached through one.
        self.in_source = in_source
        self.rootfd = -1
        self._tmpfd = -1  # tmp/, opened by the first write
        self._tmp_lock = threading.Lock()
        self.version = 3
        self._trees = SharedTrees()  # open tree objects by digest
        if create:
            self._make_root()
        if not self._open_root():
            if not lazy:
                raise StoreCorrupt(f"store {self.path} does not exist (seal a file first)")
            return
        try:
            self.version = self._check_version(create, objects_only)
        except BaseException:
            self.close()
            raise

    def _make_root(self):
        try:
            os.mkdir(self.path, 0o700)
        except FileExistsError:
            pass
        except FileNotFoundError:
            raise StoreCorrupt(f"store {self.path}: its parent directory does not exist") from None

    def _open_root(self) -> bool:
        try:
            # The root itself may be reached through a symlink the user chose (not one
            # planted as SOURCE's default store); nothing below it is.
            nofollow = os.O_NOFOLLOW if self.in_source else 0
            self.rootfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | nofollow)
            return True
        except FileNotFoundError:
            return False
        except OSError as e:
            if self.in_source and e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise StoreCorrupt(f"store {self.path}: a symlink or not a directory (refused "
                                   f"as SOURCE's own store; name the store's own path with "
                                   f"--store)") from None
            raise

    @property
    def exists(self) -> bool:
        return self.rootfd >= 0

    def inline(self) -> bool:
        """Whether a file of one block is sealed without an object (format 3), asked
        before writing one: a lazy store is created first, or found as another process
        created it meanwhile (format 2 perhaps)."""
        self._ensure()
        return self.version >= 3

    def _ensure(self):
        """Before a write: a lazy store that does not exist yet is created now."""
        if self.rootfd < 0:
            self._make_root()
            if not self._open_root():  # mkdir found a name that open does not: a dangling symlink
                raise StoreCorrupt(f"store {self.path}: it exists but cannot be opened (a "
                                   f"symlink to nothing?)")
            self.version = self._check_version(True, False)

    # -- plumbing -------------------------------------------------------

    def close(self):
        self._trees.close()
        for name in ("_tmpfd", "rootfd"):
            if getattr(self, name) >= 0:
                os.close(getattr(self, name))
                setattr(self, name, -1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _where(self, *parts) -> str:
        return "/".join((self.path,) + parts)  # parts are single names: no os.path.join needed

    def _check_version(self, create: bool, objects_only: bool) -> int:
        got = self._read_file(("VERSION",), 64)
        if got is None:
            if not create:
                raise StoreCorrupt(f"{self._where('VERSION')}: missing; not a verityfuse store "
                                   f"(`verityfuse seal SOURCE --store {self.path}` makes one)")
            self._atomic_write((), "VERSION", VERSION_TEXT)
            return 3
        text = got[2]
        if text in (VERSION_TEXT, VERSION_2_TEXT):
            return 3 if text == VERSION_TEXT else 2
        if text == VERSION_1_TEXT:
            if objects_only:
                return 1
            raise StoreFormat(
                f"store {self.path} is format 1 (verity indexed by path); this verityfuse keeps "
                f"verity with the inode (format 3). Convert it with: verityfuse upgrade-store "
                f"SOURCE --store {self.path}")
        raise StoreCorrupt(
            f"{self._where('VERSION')}: unsupported store version {text[:32]!r}, "
            f"expected {VERSION_TEXT!r}"
        )

    def _refused(self, parts, e: OSError) -> StoreCorrupt:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            return StoreCorrupt(f"{self._where(*parts)}: refusing a symlink or non-directory inside the store")
        return StoreCorrupt(f"{self._where(*parts)}: {e.strerror}")

    def _open_dirs(self, parts, create: bool = False, at=None) -> int:
        """Open STORE/parts... as a new directory fd, never following a symlink; ``at``:
        (fd, its parts) of a directory already open, which ``parts`` continue (kept
        open: a batch opens objects/<alg> once for all its shards)."""
        if create:
            self._ensure()
        elif self.rootfd < 0:
            raise FileNotFoundError(2, "store does not exist yet", self.path)
        fd, above = (self.rootfd, ()) if at is None else at
        try:
            for i, part in enumerate(parts):
                try:
                    nfd = os.open(part, _O_DIR, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    try:
                        os.mkdir(part, 0o700, dir_fd=fd)
                    except FileExistsError:
                        pass
                    except OSError as e:  # a full disk: named in the store, not as "objects"
                        raise OSError(e.errno, e.strerror,
                                      self._where(*above, *parts[: i + 1])) from None
                    nfd = os.open(part, _O_DIR, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise self._refused((*above, *parts[: i + 1]), e) from None
                    raise
                if i:  # the first fd is the root's or the caller's
                    os.close(fd)
                fd = nfd
            return fd if parts else os.dup(fd)
        except BaseException:
            if parts and fd not in (self.rootfd, at and at[0]):
                os.close(fd)
            raise

    def _read_file(self, parts, nbytes: int, keep: bool = False):
        """``(fd, size, head)`` of the regular file STORE/parts and its first ``nbytes``
        (``fd`` -1 unless ``keep``); None if absent, StoreCorrupt if odd.

        One openat2 from the root fd, O_PATH, following no symlink anywhere below
        the root (fsutil.read_beneath: a symlinked shard or object is refused, not
        followed), instead of a walk of one open and close per directory; then the
        regular-file check: a FIFO or device planted in the store is refused without
        blocking on it or running a driver's open.
        """
        if self.rootfd < 0:
            return None  # a lazy store not created yet: nothing in it
        try:
            fd, mode, size, head = fsutil.read_beneath(
                self.rootfd, "/".join(parts).encode(), nbytes, keep)
        except fsutil.ReadFailed as e:  # the file's read failed, not its content
            raise OSError(e.errno, e.strerror, self._where(*parts)) from None
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno in RESOURCE_ERRNOS:
                raise  # out of fds or memory: not a damaged store
            raise self._refused(parts, e) from None
        if head is None:
            raise StoreCorrupt(fsutil.not_regular(mode, self._where(*parts)).strerror)
        return fd, size, head

    def _tmp_dir(self) -> int:
        if self._tmpfd < 0:
            # A lazy store's first write creates it, which writes VERSION through here:
            # before the lock, which that nested call takes too.
            self._ensure()
            with self._tmp_lock:  # threads stage files at once (seal_pool): open it once
                if self._tmpfd < 0:
                    self._tmpfd = self._open_dirs(("tmp",), create=True)
        return self._tmpfd

    # -- writing: the interface of ObjectWriter and store_batch ------------------

    def create_tmp(self):
        """(name, fd) of a new empty file in tmp/, for ``place`` or ``discard_tmp``."""
        name = _names.next()
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=self._tmp_dir())
        return name, fd

    def tmp_chunk(self) -> Tuple[int, bytes]:
        """(tmp/'s fd, a new prefix of names there) for files written natively (sealing):
        the prefix followed by any hex number.  A name of its own followed by "-",
        which no other name holds: unique, and still ``<pid>.<unique>``."""
        return self._tmp_dir(), (_names.next() + "-").encode()

    def discard_tmp(self, name: str):
        try:
            os.unlink(name, dir_fd=self._tmp_dir())
        except FileNotFoundError:
            pass

    def open_dir(self, parts, create: bool = True, at=None) -> int:
        """A new fd of directory STORE/parts..., created if missing (for ``place``); ``at``
        as for ``_open_dirs``."""
        return self._open_dirs(parts, create=create, at=at)

    def open_file(self, parts) -> Optional[int]:
        """A regular file STORE/parts... for reading (no symlink followed); None if absent,
        StoreCorrupt if odd."""
        got = self._read_file(parts, 0, keep=True)
        return None if got is None else got[0]

    def mark_current(self):
        """Record that the store is in the current format (after store_upgrade converted it)."""
        self._atomic_write((), "VERSION", VERSION_TEXT)
        self.version = 3

    def place(self, tmpname: str, dirfd: int, name: str, sync: bool = True):
        """Rename tmp/``tmpname`` to ``name`` in ``dirfd``; ``sync``: fsync the directory
        (the caller made the file durable first).  Without it, the caller syncs later."""
        os.rename(tmpname, name, src_dir_fd=self._tmp_dir(), dst_dir_fd=dirfd)
        if sync:
            os.fsync(dirfd)

    def sync(self):
        """Everything written to the store's filesystem, durable: one syncfs(2), which
        reports writeback errors (Linux 5.8 and later) where fsync of each file would."""
        self._ensure()
        if _libc.syncfs(self.rootfd) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"syncfs: {os.strerror(e)}", self.path)

    def _atomic_write(self, dirparts, name: str, data: bytes):
        tmpname, fd = self.create_tmp()
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            dirfd = self._open_dirs(dirparts, create=True)
            try:
                self.place(tmpname, dirfd, name)
            finally:
                os.close(dirfd)
        except BaseException:
            self.discard_tmp(tmpname)
            raise

    def cleanup_tmp(self, own: bool = False) -> int:
        """Remove tmp files left by dead processes (a crash mid-write); ``own``: this
        process's too (an interrupted seal's, once nothing of it writes any more)."""
        try:
            tmpfd = self._open_dirs(("tmp",))
        except FileNotFoundError:
            return 0
        removed = 0
        try:
            for name in os.listdir(tmpfd):
                pid = name.split(".", 1)[0]
                removed += pid.isdigit() and remove_if_dead(tmpfd, name, pid, own)
        finally:
            os.close(tmpfd)
        return removed

    # -- objects --------------------------------------------------------

    def new_object(self) -> ObjectWriter:
        return ObjectWriter(self)

    def object_parts(self, alg: merkle.HashAlg, digest: bytes):
        """(directory parts, name) of the object of ``digest``, for ``open_dir`` and ``place``."""
        parts = self._object_parts(alg, digest)
        return parts[:-1], parts[-1]

    def _object_parts(self, alg: merkle.HashAlg, digest: bytes):
        hexd = digest.hex()
        return ("objects", alg.name, hexd[:2], hexd)

    def object_places(self, alg: merkle.HashAlg, named):
        """(directory parts, [(tmp name, shard, name)] sorted by shard) of the objects
        ``named`` ((tmp name, digest) of each) of ``alg``, for store_batch.place_all."""
        items = [(tmp, *self._object_parts(alg, digest)[2:]) for tmp, digest in named]
        items.sort(key=itemgetter(1))
        return ("objects", alg.name), items

    def object_path(self, alg: merkle.HashAlg, digest: bytes) -> str:
        """Where the tree object of ``digest`` lives (for messages and tools)."""
        return self._where(*self._object_parts(alg, digest))

    def open_object(self, alg: merkle.HashAlg, digest: bytes) -> TreeRef:
        """The validated object for ``digest`` (StoreCorrupt if it is not right), shared
        with every other holder of the same digest: however many handles are open on a
        file, its tree costs one fd.  The caller closes its reference."""
        return self._trees.open((alg.name, digest), lambda: self._open_object(alg, digest))

    def _open_object(self, alg: merkle.HashAlg, digest: bytes) -> StoredTree:
        parts = self._object_parts(alg, digest)
        got = self._read_file(parts, TREE_OFFSET, keep=True)
        if got is None:
            raise MissingObject(f"{self._where(*parts)}: missing tree object for "
                                f"{merkle.format_digest(alg, digest)}")
        fd, size, head = got
        return open_stored_tree(fd, self._where(*parts), alg, digest, head, size)
