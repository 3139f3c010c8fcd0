"""pyfuse3 request handlers: a passthrough over SOURCE that verifies verity files.

Every handler runs behind one error boundary (``_boundary``): core errors
become their errno, OSError its errno, anything unexpected is logged and
answered EIO.  Nothing escapes: in pyfuse3 an exception ends the daemon.

Caveats (documented in README): statx cannot report STATX_ATTR_VERITY through
FUSE; changes made to SOURCE behind the daemon's back are seen after the
attribute timeout; a file whose verity state was resolved stays so until the
kernel forgets its inode.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import inspect
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Optional

import pyfuse3
import trio

from . import fsverity_op
from . import ioctl as vioctl
from . import merkle, uapi
from .errors import Corruption, DigestMismatch, Errno, SizeMismatch, VerityError
from .fuseshim import Request
from .inodes import NOT_VERITY, UNKNOWN, Inode, InodeTable
from .reader import VerifiedReader
from .store import IndexEntry, Store, StoredTree
from .verify import TreeBlockCache, Verifier

log = logging.getLogger("verityfuse")

XATTR_PREFIX = b"user.fsverity."
_O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
# Never passed to the backing open: creation is done explicitly, and O_DIRECT
# reads fall back to buffered (verified) I/O as on ext4 with fs-verity.
_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_DIRECT | os.O_NOFOLLOW

# Reads up to this size are verified on the trio thread: ~4 us per block of
# hashing is cheaper than handing the request to a worker thread (~100 us).
INLINE_READ = 16 * 1024

_libc = ctypes.CDLL(None, use_errno=True)


def _renameat2(olddirfd, oldname, newdirfd, newname, flags):
    if _libc.renameat2(olddirfd, oldname, newdirfd, newname, flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


@dataclass
class VerityState:
    """A verity inode's trusted metadata, opened from the store."""

    entry: IndexEntry
    tree: StoredTree
    verifier: Verifier

    @property
    def descriptor(self) -> merkle.Descriptor:
        return self.tree.descriptor

    def close(self):
        self.verifier.close()
        self.tree.close()

    def metadata(self) -> fsverity_op.Metadata:
        return fsverity_op.Metadata(self.descriptor, self.entry.digest, self.tree.read_tree,
                                    self.entry.signature)

    def xattrs(self) -> Dict[bytes, bytes]:
        p = self.descriptor.params
        return {
            XATTR_PREFIX + b"digest": self.entry.digest_text.encode(),
            XATTR_PREFIX + b"hash_algorithm": p.alg.name.encode(),
            XATTR_PREFIX + b"block_size": str(p.block_size).encode(),
            XATTR_PREFIX + b"salt": p.salt.hex().encode(),
        }


# Control xattrs: READ_VERITY_METADATA's data for clients of today's kernels,
# which cannot forward that ioctl.  Not listed (binary, and a family of names).
XATTR_DESCRIPTOR = XATTR_PREFIX + b"descriptor"
XATTR_SIGNATURE = XATTR_PREFIX + b"signature"
XATTR_TREE = XATTR_PREFIX + b"merkle_tree."
XATTR_MAX = 65536  # the VFS's XATTR_SIZE_MAX


class InodeTarget(fsverity_op.Target):
    """FUSE_FSVERITY requests about one inode of the mount."""

    def __init__(self, ops: "VerityOperations", inode: Inode):
        self.ops, self.inode = ops, inode

    def metadata(self):
        v = self.ops._resolve(self.inode) if self.inode.is_reg else NOT_VERITY
        return None if v is NOT_VERITY else v.metadata()

    def enable(self, arg):
        """Synchronous enable (the bytes handler); clients use FS_IOC_ENABLE_VERITY,
        which runs the same checks, build and commit off the trio thread."""
        i, ops = self.inode, self.ops
        fd = os.open(i.proc_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            params, rel = ops._check_enable(i, fd, arg)
            i.enabling = True
            try:
                ops._finish_enable(i, ops._seal(fd, rel, params, arg.signature))
            finally:
                i.enabling = False
        finally:
            os.close(fd)


class Handle:
    __slots__ = ("fd", "inode", "reader", "writable")

    def __init__(self, fd, inode, reader, writable):
        self.fd, self.inode, self.reader, self.writable = fd, inode, reader, writable


class DirHandle:
    __slots__ = ("fd", "inode", "names")

    def __init__(self, fd, inode):
        self.fd, self.inode, self.names = fd, inode, None


class RateLimitedLog:
    """Log each integrity failure once (per file and offset), at most ``per_sec`` a second."""

    def __init__(self, per_sec=20, remember=4096):
        self.seen = OrderedDict()
        self.per_sec, self.remember = per_sec, remember
        self.window, self.count = 0, 0
        self.lock = threading.Lock()

    def warn(self, key, msg):
        with self.lock:
            if key in self.seen:
                return
            self.seen[key] = True
            if len(self.seen) > self.remember:
                self.seen.popitem(last=False)
            now = int(time.monotonic())
            if now != self.window:
                self.window, self.count = now, 0
            self.count += 1
            if self.count > self.per_sec:
                return
        log.warning("%s", msg)


def _fail(err: int):
    raise pyfuse3.FUSEError(err)


def _boundary(fn):
    """Every handler's errors become errnos here (see ``_errno_of``)."""

    @functools.wraps(fn)
    async def wrapper(self, *args):
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except (VerityError, OSError) as e:
            raise pyfuse3.FUSEError(self._errno_of(e, fn.__name__)) from None
        except Exception:
            log.exception("unexpected error in %s%r", fn.__name__, args)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def with_boundary(cls):
    for name, fn in list(vars(cls).items()):
        if inspect.iscoroutinefunction(fn) and not name.startswith("_"):
            setattr(cls, name, _boundary(fn))
    return cls


@with_boundary
class VerityOperations(pyfuse3.Operations):
    """Passthrough of ``source``; files indexed in ``store`` are verity files."""

    enable_writeback_cache = False  # writes go straight to SOURCE

    def __init__(self, source: str, store: Store, policy: str = "enforce",
                 cache_bytes: Optional[int] = None, threads: int = 4, timeout: float = 1.0,
                 manifest=None, trust_certs=(), require_signatures: bool = False):
        super().__init__()
        # Where trusted digests come from: the manifest when given (the store
        # then only supplies trees), else the store's index.
        self.manifest = manifest
        self.trust_certs = list(trust_certs)
        self.require_signatures = require_signatures
        self.source = os.path.realpath(source)
        self.store = store
        if policy not in ("enforce", "require"):
            raise ValueError(f"unknown policy {policy!r}")
        self.policy = policy
        self.timeout = timeout
        self.cache = TreeBlockCache(cache_bytes) if cache_bytes else TreeBlockCache()
        self.limiter = trio.CapacityLimiter(threads)
        self.integrity_log = RateLimitedLog()
        root_fd = os.open(self.source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.inodes = InodeTable(root_fd, pyfuse3.ROOT_INODE, on_drop=self._drop_verity)
        self.handles: Dict[int, object] = {}
        self._next_fh = 1
        # The store is hidden when it lives inside SOURCE: (parent dev/ino, name).
        self.hidden = None
        sp = os.path.realpath(store.path)
        if sp.startswith(self.source + "/"):
            pst = os.stat(os.path.dirname(sp))
            self.hidden = ((pst.st_dev, pst.st_ino), os.fsencode(os.path.basename(sp)))

    # -- helpers ----------------------------------------------------------

    def _errno_of(self, e: Exception, what: str) -> int:
        """The one mapping from a core error or OSError to an errno.

        Integrity failures are logged here, once per block, whichever request
        (read, open, ioctl, enable) ran into them.
        """
        if isinstance(e, Corruption):
            self.integrity_log.warn((type(e).__name__, str(e)), f"integrity failure: {e}")
        elif isinstance(e, VerityError):
            log.debug("%s: %s", what, e)
        return e.errno or errno.EIO

    def _drop_verity(self, inode: Inode):
        if isinstance(inode.verity, VerityState):
            inode.verity.close()
        inode.verity = UNKNOWN

    def _check_name(self, parent: Inode, name: bytes, err=errno.ENOENT):
        if self.hidden and parent.key == self.hidden[0] and name == self.hidden[1]:
            _fail(err)

    def _attrs(self, inode: Inode, st: os.stat_result) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode.ino
        a.generation = 0
        a.entry_timeout = a.attr_timeout = self.timeout
        a.st_mode = st.st_mode
        a.st_nlink = st.st_nlink
        a.st_uid = st.st_uid
        a.st_gid = st.st_gid
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        a.st_blksize = st.st_blksize
        a.st_blocks = st.st_blocks
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        return a

    def _lookup(self, parent: Inode, name: bytes) -> pyfuse3.EntryAttributes:
        """Look ``name`` up in ``parent`` and count one kernel lookup."""
        self._check_name(parent, name)
        fd = os.open(name, _O_PATH, dir_fd=parent.fd)
        try:
            st = os.stat(fd)
        except BaseException:
            os.close(fd)
            raise
        inode = self.inodes.remember(fd, st)
        inode.mode = st.st_mode
        return self._attrs(inode, st)

    def _relpath(self, parent: Inode, name: Optional[bytes] = None) -> Optional[str]:
        """The path of ``parent``[/``name``] relative to SOURCE, as the kernel tracks it now."""
        path = os.readlink(parent.proc_path)
        if path.endswith(" (deleted)"):
            return None
        if name is not None:
            path = os.path.join(path, os.fsdecode(name))
        if path == self.source:
            return ""
        if not path.startswith(self.source + "/"):
            return None
        return path[len(self.source) + 1:]

    def _resolve(self, inode: Inode):
        """The inode's verity state, loading it from the store on first use.

        Returns NOT_VERITY or a VerityState; raises the error that makes its
        metadata unusable (every open then fails with it).
        """
        v = inode.verity
        if v is UNKNOWN:
            v = NOT_VERITY
            rel = self._relpath(inode) if inode.is_reg else None
            if rel:
                try:
                    entry = self._trusted_entry(rel)
                    if entry is not None:
                        tree = self.store.open_object(entry.alg, entry.digest)
                        v = VerityState(entry, tree, Verifier(tree, self.cache, rel))
                        try:
                            self._check_signature(entry.signature, entry.alg, entry.digest)
                        except BaseException:
                            v.close()
                            raise
                except VerityError as e:
                    v = e
            inode.verity = v
        if isinstance(v, Exception):
            raise v
        return v

    def _trusted_entry(self, rel: str) -> Optional[IndexEntry]:
        """The digest ``rel`` must have, or None if it is not a verity file."""
        entry = self.store.get_entry(rel)
        if self.manifest is None:
            return entry
        m = self.manifest.entries.get(rel)
        if m is None:
            return None  # not in the manifest: refused under --policy require
        if entry is not None and (entry.alg, entry.digest) != (m.alg, m.digest):
            raise DigestMismatch(f"{rel}: fs-verity digest differs from the manifest: expected "
                                 f"{m.digest_text}, actual {entry.digest_text} (store)")
        # The manifest's digest names the tree object; the index is only needed
        # for a signature given at enable.
        return IndexEntry(rel, m.alg, m.digest, entry.signature if entry else b"")

    def _check_signature(self, sig: bytes, alg, digest: bytes):
        """Built-in signature rules: checked on every open, as the kernel does."""
        if not sig:
            if self.require_signatures:
                raise Errno(errno.EPERM, "unsigned verity file and signatures are required")
            return
        if self.trust_certs:
            from . import signature
            signature.verify(sig, alg, digest, self.trust_certs)
        # Without trusted certificates the signature is kept unverified, as a
        # kernel without CONFIG_FS_VERITY_BUILTIN_SIGNATURES does.

    def make_verity(self, inode: Inode, entry: IndexEntry):
        """Turn ``inode`` into a verity inode (after sealing it)."""
        tree = self.store.open_object(entry.alg, entry.digest)
        self._drop_verity(inode)
        inode.verity = VerityState(entry, tree, Verifier(tree, self.cache, entry.path))

    def _new_fh(self, h) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = h
        return fh

    def _chown_to_caller(self, dirfd: int, name: bytes, ctx):
        if os.geteuid() == 0:
            os.chown(name, ctx.uid, ctx.gid, dir_fd=dirfd, follow_symlinks=False)

    async def _run(self, fn, *args):
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    def _entries_under(self, rel: Optional[str]) -> Dict[str, IndexEntry]:
        """Index entries of the file at ``rel``, or of every file under directory ``rel``."""
        if not rel:
            return {}
        full = os.path.join(self.source, rel)
        paths = [rel]
        if os.path.isdir(full) and not os.path.islink(full):
            paths = [os.path.relpath(os.path.join(d, f), self.source)
                     for d, _, files in os.walk(full) for f in files]
        return {r: e for r in paths if (e := self.store.get_entry(r)) is not None}

    # -- lookups and attributes -------------------------------------------

    async def lookup(self, parent_inode, name, ctx):
        return self._lookup(self.inodes[parent_inode], name)

    async def forget(self, inode_list):
        for ino, n in inode_list:
            self.inodes.forget(ino, n)

    async def getattr(self, inode, ctx):
        i = self.inodes[inode]
        return self._attrs(i, os.stat(i.fd))

    async def setattr(self, inode, attr, fields, fh, ctx):
        i = self.inodes[inode]
        path = i.proc_path
        if fields.update_size:
            if i.is_reg and self._resolve(i) is not NOT_VERITY:
                _fail(errno.EPERM)
            h = self.handles.get(fh) if fh is not None else None
            if isinstance(h, Handle):
                os.ftruncate(h.fd, attr.st_size)
            else:
                os.truncate(path, attr.st_size)
        if fields.update_mode:
            if stat.S_ISLNK(i.mode):
                _fail(errno.EOPNOTSUPP)
            os.chmod(path, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            os.chown(path, attr.st_uid if fields.update_uid else -1,
                     attr.st_gid if fields.update_gid else -1)
        if fields.update_atime or fields.update_mtime:
            st = os.stat(i.fd)
            os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                               attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns))
        return self._attrs(i, os.stat(i.fd))

    async def readlink(self, inode, ctx):
        return os.fsencode(os.readlink("", dir_fd=self.inodes[inode].fd))

    async def statfs(self, ctx):
        s = os.statvfs(self.source)
        out = pyfuse3.StatvfsData()
        for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                  "f_ffree", "f_favail", "f_namemax"):
            setattr(out, f, getattr(s, f))
        return out

    # -- namespace --------------------------------------------------------

    def _make(self, parent_inode, name, ctx, create):
        """mknod/mkdir/symlink: ``create(dirfd)`` makes ``name``, owned by the caller."""
        p = self.inodes[parent_inode]
        self._check_name(p, name, errno.EEXIST)
        create(p.fd)
        self._chown_to_caller(p.fd, name, ctx)
        self._forget_path(p, name)
        return self._lookup(p, name)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return self._make(parent_inode, name, ctx, lambda d: os.mknod(name, mode, rdev, dir_fd=d))

    async def mkdir(self, parent_inode, name, mode, ctx):
        return self._make(parent_inode, name, ctx, lambda d: os.mkdir(name, mode, dir_fd=d))

    async def symlink(self, parent_inode, name, target, ctx):
        return self._make(parent_inode, name, ctx, lambda d: os.symlink(target, name, dir_fd=d))

    def _forget_path(self, parent: Inode, name: bytes):
        """A new file at this path is not the sealed one: drop a stale index entry."""
        rel = self._relpath(parent, name)
        if rel:
            self.store.remove_entry(rel)

    async def unlink(self, parent_inode, name, ctx):
        p = self.inodes[parent_inode]
        self._check_name(p, name)
        rel = self._relpath(p, name)
        os.unlink(name, dir_fd=p.fd)
        if rel:
            self.store.remove_entry(rel)

    async def rmdir(self, parent_inode, name, ctx):
        p = self.inodes[parent_inode]
        self._check_name(p, name)
        os.rmdir(name, dir_fd=p.fd)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        po, pn = self.inodes[parent_inode_old], self.inodes[parent_inode_new]
        self._check_name(po, name_old)
        self._check_name(pn, name_new, errno.EACCES)
        old, new = self._relpath(po, name_old), self._relpath(pn, name_new)
        moving, replaced = self._entries_under(old), self._entries_under(new)
        _renameat2(po.fd, name_old, pn.fd, name_new, flags)
        # Index entries follow their files: the moved tree's entries get new
        # paths; a replaced file's entries go (or, for an exchange, swap).
        for r in list(moving) + list(replaced):
            self.store.remove_entry(r)

        def put(entries, src, dst):
            for r, e in entries.items():
                if dst is None:
                    continue
                nr = dst + r[len(src):]
                self.store.set_entry(nr, e.alg, e.digest, e.signature)

        put(moving, old, new)
        if flags & pyfuse3.RENAME_EXCHANGE:
            put(replaced, new, old)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        i, p = self.inodes[inode], self.inodes[new_parent_inode]
        self._check_name(p, new_name, errno.EEXIST)
        v = self._resolve(i) if i.is_reg else NOT_VERITY
        os.link(i.proc_path, new_name, dst_dir_fd=p.fd, follow_symlinks=True)
        rel = self._relpath(p, new_name)
        if rel:
            if v is NOT_VERITY:
                self.store.remove_entry(rel)
            else:
                self.store.set_entry(rel, v.entry.alg, v.entry.digest, v.entry.signature)
        return self._lookup(p, new_name)

    # -- files ------------------------------------------------------------

    def _open_handle(self, i: Inode, flags: int, fd: Optional[int] = None) -> pyfuse3.FileInfo:
        acc = flags & os.O_ACCMODE
        writing = acc != os.O_RDONLY or bool(flags & os.O_TRUNC)
        v = self._resolve(i) if i.is_reg else NOT_VERITY
        if v is not NOT_VERITY:
            if writing:
                _fail(errno.EPERM)
        elif i.is_reg:
            if self.policy == "require":
                log.warning("policy require: refusing %s, which %s", self._relpath(i) or f"inode {i.ino}",
                            "is not in the manifest" if self.manifest else "has no fs-verity metadata")
                _fail(errno.EPERM)
            if writing and i.enabling:
                _fail(errno.ETXTBSY)  # as the kernel, while an enable runs
        if fd is None:
            fd = os.open(i.proc_path, (flags & ~_STRIP) | os.O_CLOEXEC)
        try:
            reader = None
            if v is not NOT_VERITY:
                size = os.fstat(fd).st_size
                if size != v.descriptor.data_size:
                    raise SizeMismatch(f"{v.entry.path}: backing file is {size} bytes, "
                                       f"sealed size {v.descriptor.data_size}")
                reader = VerifiedReader(fd, v.verifier, v.entry.path)
        except BaseException:
            os.close(fd)
            raise
        i.handles += 1
        if acc != os.O_RDONLY:
            i.writers += 1
        fh = self._new_fh(Handle(fd, i, reader, acc != os.O_RDONLY))
        # Verified pages may stay cached: they were verified when filled.
        return pyfuse3.FileInfo(fh=fh, keep_cache=reader is not None, direct_io=False)

    async def open(self, inode, flags, ctx):
        return self._open_handle(self.inodes[inode], flags)

    async def create(self, parent_inode, name, mode, flags, ctx):
        p = self.inodes[parent_inode]
        self._check_name(p, name, errno.EACCES)
        if self.policy == "require":
            log.warning("policy require: refusing to create %s", self._relpath(p, name))
            _fail(errno.EPERM)
        fd = os.open(name, (flags & ~_STRIP) | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode, dir_fd=p.fd)
        try:
            self._chown_to_caller(p.fd, name, ctx)
            self._forget_path(p, name)
            attrs = self._lookup(p, name)
            i = self.inodes[attrs.st_ino]
            i.verity = NOT_VERITY
        except BaseException:
            os.close(fd)
            raise
        return self._open_handle(i, flags, fd), attrs

    async def read(self, fh, off, size):
        h = self.handles[fh]
        if size <= INLINE_READ:
            # A thread round trip costs more than a few blocks of hashing.
            return h.reader.read(off, size) if h.reader else os.pread(h.fd, size, off)
        if h.reader is not None:
            return await self._run(h.reader.read, off, size)
        return await self._run(os.pread, h.fd, size, off)

    async def write(self, fh, off, buf):
        h = self.handles[fh]
        return await self._run(os.pwrite, h.fd, buf, off)

    async def flush(self, fh):
        # Report close-time errors of the backing fs (as passthrough_hp does).
        os.close(os.dup(self.handles[fh].fd))

    async def fsync(self, fh, datasync):
        fd = self.handles[fh].fd
        await self._run(os.fdatasync if datasync else os.fsync, fd)

    async def release(self, fh):
        h = self.handles.pop(fh)
        os.close(h.fd)
        i = h.inode
        i.handles -= 1
        if h.writable:
            i.writers -= 1
        self.inodes.maybe_drop(i)

    # -- directories ------------------------------------------------------

    async def opendir(self, inode, ctx):
        i = self.inodes[inode]
        fd = os.open(i.proc_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        i.handles += 1
        return self._new_fh(DirHandle(fd, i))

    async def readdir(self, fh, start_id, token):
        d = self.handles[fh]
        if d.names is None or start_id == 0:
            # A snapshot per listing: offsets stay stable while entries change.
            names = sorted(os.fsencode(n) for n in os.listdir(d.fd))
            if self.hidden and d.inode.key == self.hidden[0]:
                names = [n for n in names if n != self.hidden[1]]
            d.names = names
        for idx in range(start_id, len(d.names)):
            name = d.names[idx]
            try:
                attrs = self._lookup(d.inode, name)
            except FileNotFoundError:
                continue  # removed since the snapshot
            if not pyfuse3.readdir_reply(token, name, attrs, idx + 1):
                # Not sent: undo the lookup we counted for it.
                self.inodes.forget(attrs.st_ino, 1)
                return

    async def releasedir(self, fh):
        d = self.handles.pop(fh)
        os.close(d.fd)
        d.inode.handles -= 1
        self.inodes.maybe_drop(d.inode)

    async def fsyncdir(self, fh, datasync):
        os.fsync(self.handles[fh].fd)

    # -- extended attributes ----------------------------------------------

    def _verity_xattrs(self, i: Inode) -> Dict[bytes, bytes]:
        if not i.is_reg:
            return {}
        v = self._resolve(i)
        return {} if v is NOT_VERITY else v.xattrs()

    def fsverity(self, inode: int, request: bytes) -> bytes:
        """The FUSE_FSVERITY operation on ``inode`` (bytes in, bytes out)."""
        return fsverity_op.handle(request, InodeTarget(self, self.inodes[inode]))

    def _control_xattr(self, inode: int, name: bytes) -> Optional[bytes]:
        """user.fsverity.{descriptor,signature,merkle_tree.<offset>} through FUSE_FSVERITY."""
        if name == XATTR_DESCRIPTOR:
            req = fsverity_op.encode_request(fsverity_op.OP_GET_DESCRIPTOR, 0, XATTR_MAX)
        elif name == XATTR_SIGNATURE:
            req = fsverity_op.encode_request(fsverity_op.OP_READ_SIGNATURE, 0, XATTR_MAX)
        elif name.startswith(XATTR_TREE) and name[len(XATTR_TREE):].isdigit():
            offset = int(name[len(XATTR_TREE):])
            req = fsverity_op.encode_request(fsverity_op.OP_READ_MERKLE_TREE, offset, XATTR_MAX)
        else:
            return None
        return fsverity_op.decode_reply(self.fsverity(inode, req))[0]

    async def getxattr(self, inode, name, ctx):
        i = self.inodes[inode]
        if name.startswith(XATTR_PREFIX):
            value = self._control_xattr(inode, name)
            if value is not None:
                return value
            value = self._verity_xattrs(i).get(name)
            if value is None:
                _fail(errno.ENODATA)
            return value
        if stat.S_ISLNK(i.mode):
            _fail(errno.ENODATA)
        return os.getxattr(i.proc_path, name)

    async def listxattr(self, inode, ctx):
        i = self.inodes[inode]
        names = [] if stat.S_ISLNK(i.mode) else [
            os.fsencode(n) for n in os.listxattr(i.proc_path)]
        names = [n for n in names if not n.startswith(XATTR_PREFIX)]
        return names + sorted(self._verity_xattrs(i))

    async def setxattr(self, inode, name, value, ctx):
        i = self.inodes[inode]
        if name.startswith(XATTR_PREFIX) or stat.S_ISLNK(i.mode):
            _fail(errno.EPERM)
        os.setxattr(i.proc_path, name, value)

    async def removexattr(self, inode, name, ctx):
        i = self.inodes[inode]
        if name.startswith(XATTR_PREFIX) or stat.S_ISLNK(i.mode):
            _fail(errno.EPERM)
        os.removexattr(i.proc_path, name)

    # -- ioctls (through the native shim, see fuseshim.py) -----------------

    shim = None       # set by the daemon when the shim is active
    nursery = None    # the daemon's nursery, for enables that outlive the callback
    stopping = False  # set at unmount: running enables stop and answer EINTR
    read_only = False

    def ioctl(self, req, ino, cmd, fh, flags, data, out_size) -> int:
        """FUSE_IOCTL entry, called synchronously on the trio thread.

        Returns 0 once the request is answered (or will be, by an enable task),
        else the errno to answer with.  Never blocks: the tree build of an
        enable runs in a worker thread.
        """
        request = Request(self.shim, req, out_size)
        try:
            i = self.inodes[ino]
            if cmd in vioctl.GETFLAGS_CMDS:
                h = self.handles.get(fh)
                flags = self._flags(i, h.fd if h is not None else None)
                request.reply(vioctl.getflags_reply(flags)[:out_size])
            elif cmd == uapi.FS_IOC_MEASURE_VERITY:
                v = self._resolve(i) if i.is_reg else NOT_VERITY
                if v is NOT_VERITY:
                    return errno.ENODATA
                d = v.descriptor
                request.reply(vioctl.measure_reply(data, d.params.alg, v.entry.digest))
            elif cmd == uapi.FS_IOC_ENABLE_VERITY:
                self._start_enable(request, i, fh, data)
            else:
                # FS_IOC_READ_VERITY_METADATA included: its buffer is in the
                # caller's memory, which a FUSE server cannot write.
                return errno.ENOTTY
            return 0
        except (VerityError, OSError) as e:
            return self._errno_of(e, f"ioctl {cmd:#x} on inode {ino}")

    def _flags(self, i: Inode, fd: Optional[int]) -> int:
        """FS_IOC_GETFLAGS: the backing file's classic flags (read through the open
        ``fd``, if any), plus FS_VERITY_FL."""
        flags = 0
        if fd is not None:
            buf = bytearray(8)
            try:
                fcntl.ioctl(fd, uapi.FS_IOC_GETFLAGS, buf)
                flags = int.from_bytes(buf[:4], "little") & vioctl.PASSTHROUGH_FLAGS
            except OSError:
                pass  # tmpfs and others have no flags: none to report
        if i.is_reg and self._resolve(i) is not NOT_VERITY:
            flags |= uapi.FS_VERITY_FL
        return flags

    def _may_write(self, i: Inode, uid: int, gid: int, pid: int) -> bool:
        """The kernel's inode_permission(MAY_WRITE), from the mode bits."""
        if uid == 0:
            return True
        st = os.stat(i.fd)
        if uid == st.st_uid:
            return bool(st.st_mode & stat.S_IWUSR)
        groups = {gid}
        try:
            groups.update(pyfuse3.get_sup_groups(pid))
        except (OSError, ValueError):
            pass
        if st.st_gid in groups:
            return bool(st.st_mode & stat.S_IWGRP)
        return bool(st.st_mode & stat.S_IWOTH)

    def _start_enable(self, request: Request, i: Inode, fh, data: bytes):
        """FS_IOC_ENABLE_VERITY: every check of fs/verity/enable.c, in its order,
        then the build in a worker thread; the request is answered from there."""
        arg = vioctl.parse_enable(data)                          # EINVAL, EMSGSIZE
        if not self._may_write(i, *self.shim.ctx(request.req)):
            raise Errno(errno.EACCES, "no write permission")
        h = self.handles.get(fh)
        params, rel = self._check_enable(i, h.fd if isinstance(h, Handle) else None, arg)
        i.enabling = True
        fd = os.dup(h.fd)  # the caller's fd may be released once we reply
        self.nursery.start_soon(self._enable, request, i, fd, rel, params, arg.signature)

    def _check_enable(self, i: Inode, fd: Optional[int], arg: vioctl.EnableArg):
        """enable.c's checks after permission, in its order; returns (params, path).

        ``fd`` is the file open for reading (None if the request has none).
        """
        if stat.S_ISDIR(i.mode):
            raise Errno(errno.EISDIR, "is a directory")
        if not i.is_reg or fd is None:
            raise Errno(errno.EINVAL, "not a regular file")
        if self._flags(i, fd) & (vioctl.FS_APPEND_FL | vioctl.FS_IMMUTABLE_FL):
            raise Errno(errno.EPERM, "append-only or immutable")
        if self.read_only:
            raise Errno(errno.EROFS, "read-only mount")
        if i.writers:
            raise Errno(errno.ETXTBSY, "open for writing")
        try:
            is_verity = self._resolve(i) is not NOT_VERITY
        except VerityError:
            is_verity = True  # sealed, with damaged metadata: still verity
        if is_verity:
            raise Errno(errno.EEXIST, "already a verity file")
        params = vioctl.enable_params(arg)                       # EINVAL
        if i.enabling:
            raise Errno(errno.EBUSY, "enable already running")
        rel = self._relpath(i)
        if not rel:
            raise Errno(errno.ENOENT, "file has no name under the source")
        return params, rel

    def _seal(self, fd: int, rel: str, params: merkle.Params, signature: bytes, cancel=None):
        """Build and commit the tree; a signature that does not verify commits nothing."""
        from .seal import seal_fd

        return seal_fd(self.store, fd, rel, params, signature, cancel=cancel,
                       check=lambda d: self._check_signature(signature, d.params.alg, d.digest))

    def _finish_enable(self, i: Inode, entry: IndexEntry):
        """The inode is verity from now on, files already open included."""
        self.make_verity(i, entry)
        for h in self.handles.values():
            if isinstance(h, Handle) and h.inode is i and h.reader is None:
                h.reader = VerifiedReader(h.fd, i.verity.verifier, entry.path)
        log.info("verity enabled on %s: %s", entry.path, entry.digest_text)

    async def _enable(self, request: Request, i: Inode, fd: int, rel: str,
                      params: merkle.Params, signature: bytes):
        """Build the tree off the trio thread, commit, answer (exactly once)."""
        def cancel():
            return self.stopping or request.interrupted()

        try:
            entry = await trio.to_thread.run_sync(self._seal, fd, rel, params, signature, cancel)
            self._finish_enable(i, entry)
            request.reply()
        except merkle.Cancelled:
            log.info("enable of %s interrupted; nothing committed", rel)
            request.error(errno.EINTR)
        except (VerityError, OSError) as e:
            request.error(self._errno_of(e, f"enable of {rel}"))
        except BaseException:
            request.error(errno.EIO)
            raise
        finally:
            i.enabling = False
            os.close(fd)

    # -- lifecycle --------------------------------------------------------

    initialized = False

    def init(self):
        self.initialized = True

    def shutdown(self) -> int:
        """Close everything; returns how many inodes still had kernel lookups."""
        outstanding = self.inodes.outstanding()
        for h in list(self.handles.values()):
            os.close(h.fd)
        self.handles.clear()
        self.inodes.close_all()
        return outstanding
