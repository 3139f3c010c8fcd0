"""The local view: a read-write passthrough of SOURCE whose verity files are checked.

Inodes are the backing inodes (see inodes.py); verity belongs to the inode
(local_verity.py), so every hard link and every name after a rename sees the
same state.  A verity file is read-only (EPERM for write opens and
truncation), as on ext4; everything else passes through to SOURCE.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import stat
from typing import Optional

from . import ioctl as vioctl
from . import uapi
from .errors import Errno, SizeMismatch
from .inodes import NOT_VERITY, Inode, InodeTable
from .local_verity import LocalVerity
from .reader import VerifiedReader
from .verify import Verifier
from .view import XATTR_PREFIX, Attr, DirHandle, FileHandle

log = logging.getLogger("verityfuse")

_O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
# Never passed to the backing open: creation is done explicitly, and O_DIRECT
# reads fall back to buffered (verified) I/O as on ext4 with fs-verity.
_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_DIRECT | os.O_NOFOLLOW
RENAME_EXCHANGE = 2

_libc = ctypes.CDLL(None, use_errno=True)


def _renameat2(olddirfd, oldname, newdirfd, newname, flags):
    if _libc.renameat2(olddirfd, oldname, newdirfd, newname, flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class LocalView:
    def __init__(self, source: str, store, cache, policy: str = "enforce", timeout: float = 1.0,
                 trust_certs=(), require_signatures: bool = False, read_only: bool = False):
        if policy not in ("enforce", "require"):
            raise ValueError(f"unknown policy {policy!r}")
        self.source = os.path.realpath(source)
        self.store = store
        self.cache = cache
        self.policy = policy
        self.timeout = timeout
        self.read_only = read_only
        root_fd = os.open(self.source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.inodes = InodeTable(root_fd, 1)
        self.verity = LocalVerity(store, self.relpath, trust_certs, require_signatures)
        # The store is hidden when it lives inside SOURCE: (parent dev/ino, name).
        self.hidden = None
        sp = os.path.realpath(store.path)
        if sp.startswith(self.source + "/"):
            pst = os.stat(os.path.dirname(sp))
            self.hidden = ((pst.st_dev, pst.st_ino), os.fsencode(os.path.basename(sp)))

    def close(self) -> int:
        outstanding = self.inodes.outstanding()
        self.inodes.close_all()
        return outstanding

    # -- helpers ------------------------------------------------------------------------

    def _check_name(self, parent: Inode, name: bytes, err=errno.ENOENT):
        if self.hidden and parent.key == self.hidden[0] and name == self.hidden[1]:
            raise OSError(err, "reserved for the store")

    def _attr(self, inode: Inode, st: os.stat_result) -> Attr:
        size = None
        if inode.is_reg:
            try:
                v = self.verity.info(inode)
                size = v.size if v is not None else None
            except OSError:
                pass  # damaged metadata: stat still works, open fails
            except Exception as e:  # noqa: BLE001 -- a VerityError, reported at open
                log.debug("%s: %s", inode, e)
        return Attr.from_stat(inode.ino, st, self.timeout, size)

    def _lookup(self, parent: Inode, name: bytes) -> Attr:
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
        return self._attr(inode, st)

    def relpath(self, parent: Inode, name: Optional[bytes] = None) -> Optional[str]:
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

    def _chown_to_caller(self, dirfd: int, name: bytes, ctx):
        if os.geteuid() == 0:
            os.chown(name, ctx.uid, ctx.gid, dir_fd=dirfd, follow_symlinks=False)

    # -- lookups and attributes --------------------------------------------------------

    def lookup(self, parent: int, name: bytes, ctx=None) -> Attr:
        return self._lookup(self.inodes[parent], name)

    def forget(self, ino: int, n: int):
        self.inodes.forget(ino, n)

    def unlookup(self, ino: int):
        self.inodes.forget(ino, 1)

    def getattr(self, ino: int, fh=None) -> Attr:
        i = self.inodes[ino]
        return self._attr(i, os.stat(i.fd))

    def setattr(self, ino, attr, fields, fh: Optional[FileHandle], ctx) -> Attr:
        i = self.inodes[ino]
        path = i.proc_path
        if fields.update_size:
            if self.verity.is_verity(i):
                raise OSError(errno.EPERM, "a verity file cannot be truncated")
            if fh is not None:
                os.ftruncate(fh.fd, attr.st_size)
            else:
                os.truncate(path, attr.st_size)
        if fields.update_mode:
            if stat.S_ISLNK(i.mode):
                raise OSError(errno.EOPNOTSUPP, "symlinks have no mode")
            os.chmod(path, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            os.chown(path, attr.st_uid if fields.update_uid else -1,
                     attr.st_gid if fields.update_gid else -1)
        if fields.update_atime or fields.update_mtime:
            st = os.stat(i.fd)
            os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                               attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns))
        return self._attr(i, os.stat(i.fd))

    def readlink(self, ino: int) -> bytes:
        return os.fsencode(os.readlink("", dir_fd=self.inodes[ino].fd))

    def statfs(self):
        s = os.statvfs(self.source)
        return {f: getattr(s, f) for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                                           "f_files", "f_ffree", "f_favail", "f_namemax")}

    # -- namespace --------------------------------------------------------------------

    def _make(self, parent: int, name: bytes, ctx, create) -> Attr:
        """mknod/mkdir/symlink: ``create(dirfd)`` makes ``name``, owned by the caller."""
        p = self.inodes[parent]
        self._check_name(p, name, errno.EEXIST)
        create(p.fd)
        self._chown_to_caller(p.fd, name, ctx)
        self.verity.forget_path(self.relpath(p, name))
        return self._lookup(p, name)

    def mknod(self, parent, name, mode, rdev, ctx):
        return self._make(parent, name, ctx, lambda d: os.mknod(name, mode, rdev, dir_fd=d))

    def mkdir(self, parent, name, mode, ctx):
        return self._make(parent, name, ctx, lambda d: os.mkdir(name, mode, dir_fd=d))

    def symlink(self, parent, name, target, ctx):
        return self._make(parent, name, ctx, lambda d: os.symlink(target, name, dir_fd=d))

    def unlink(self, parent: int, name: bytes):
        p = self.inodes[parent]
        self._check_name(p, name)
        rel = self.relpath(p, name)
        os.unlink(name, dir_fd=p.fd)
        self.verity.forget_path(rel)

    def rmdir(self, parent: int, name: bytes):
        p = self.inodes[parent]
        self._check_name(p, name)
        os.rmdir(name, dir_fd=p.fd)

    def rename(self, parent_old, name_old, parent_new, name_new, flags):
        po, pn = self.inodes[parent_old], self.inodes[parent_new]
        self._check_name(po, name_old)
        self._check_name(pn, name_new, errno.EACCES)
        old, new = self.relpath(po, name_old), self.relpath(pn, name_new)
        moving = self.verity.entries_under(self.source, old)
        replaced = self.verity.entries_under(self.source, new)
        _renameat2(po.fd, name_old, pn.fd, name_new, flags)
        # Index entries follow their files: the moved tree's entries get new
        # paths; a replaced file's entries go (or, for an exchange, swap).
        for r in list(moving) + list(replaced):
            self.verity.forget_path(r)
        self.verity.move(moving, old, new)
        if flags & RENAME_EXCHANGE:
            self.verity.move(replaced, new, old)

    def link(self, ino: int, parent: int, name: bytes) -> Attr:
        i, p = self.inodes[ino], self.inodes[parent]
        self._check_name(p, name, errno.EEXIST)
        os.link(i.proc_path, name, dst_dir_fd=p.fd, follow_symlinks=True)
        self.verity.link(i, self.relpath(p, name))
        return self._lookup(p, name)

    # -- files ------------------------------------------------------------------------

    def _open(self, i: Inode, flags: int, fd: Optional[int] = None) -> FileHandle:
        acc = flags & os.O_ACCMODE
        writing = acc != os.O_RDONLY or bool(flags & os.O_TRUNC)
        v = self.verity.info(i) if i.is_reg else NOT_VERITY
        if v is not NOT_VERITY:
            if writing:
                raise OSError(errno.EPERM, "a verity file is read-only")
        elif i.is_reg:
            if self.policy == "require":
                log.warning("policy require: refusing %s, which has no fs-verity metadata",
                            self.relpath(i) or f"inode {i.ino}")
                raise OSError(errno.EPERM, "not a verity file")
            if writing and i.enabling:
                raise OSError(errno.ETXTBSY, "enable running")  # as the kernel
        if fd is None:
            fd = os.open(i.proc_path, (flags & ~_STRIP) | os.O_CLOEXEC)
        try:
            fh = FileHandle(fd, i, writable=acc != os.O_RDONLY)
            if v is not NOT_VERITY:
                self._attach_reader(fh, v)
        except BaseException:
            os.close(fd)
            raise
        i.handles += 1
        if fh.writable:
            i.writers += 1
        i.files.add(fh)
        return fh

    def _attach_reader(self, fh: FileHandle, v):
        size = os.fstat(fh.fd).st_size
        label = self.relpath(fh.node) or f"inode {fh.node.ino}"
        if size != v.size:
            raise SizeMismatch(f"{label}: backing file is {size} bytes, sealed size {v.size}")
        tree = self.verity.tree(v)
        fh.reader = VerifiedReader(fh.fd, Verifier(tree, self.cache, label), label)
        fh.closers.append(tree)
        fh.keep_cache = True

    def open(self, ino: int, flags: int, ctx=None) -> FileHandle:
        return self._open(self.inodes[ino], flags)

    def create(self, parent: int, name: bytes, mode: int, flags: int, ctx):
        p = self.inodes[parent]
        self._check_name(p, name, errno.EACCES)
        if self.policy == "require":
            log.warning("policy require: refusing to create %s", self.relpath(p, name))
            raise OSError(errno.EPERM, "policy require")
        fd = os.open(name, (flags & ~_STRIP) | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode, dir_fd=p.fd)
        try:
            self._chown_to_caller(p.fd, name, ctx)
            self.verity.forget_path(self.relpath(p, name))
            attrs = self._lookup(p, name)
            i = self.inodes[attrs.ino]
            i.verity = NOT_VERITY
        except BaseException:
            os.close(fd)
            raise
        return self._open(i, flags, fd), attrs

    def release(self, fh: FileHandle):
        i = fh.node
        fh.close()
        i.handles -= 1
        if fh.writable:
            i.writers -= 1
        i.files.discard(fh)
        self.inodes.maybe_drop(i)

    def enabled(self, i: Inode, v):
        """After an enable commits: files already open become verified."""
        for fh in list(i.files):
            if fh.reader is None:
                self._attach_reader(fh, v)

    # -- directories --------------------------------------------------------------------

    def opendir(self, ino: int, ctx=None) -> DirHandle:
        i = self.inodes[ino]
        fd = os.open(i.proc_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        i.handles += 1
        return DirHandle(i, fd)

    def readdir(self, dh: DirHandle, start: int):
        if dh.entries is None or start == 0:
            # A snapshot per listing: offsets stay stable while entries change.
            names = sorted(os.fsencode(n) for n in os.listdir(dh.fd))
            if self.hidden and dh.node.key == self.hidden[0]:
                names = [n for n in names if n != self.hidden[1]]
            dh.entries = names
        for idx in range(start, len(dh.entries)):
            try:
                attr = self._lookup(dh.node, dh.entries[idx])
            except FileNotFoundError:
                continue  # removed since the snapshot
            yield dh.entries[idx], attr, idx + 1

    def releasedir(self, dh: DirHandle):
        dh.close()
        dh.node.handles -= 1
        self.inodes.maybe_drop(dh.node)

    # -- xattrs and flags -------------------------------------------------------------

    def verity_info(self, ino: int):
        i = self.inodes[ino]
        return self.verity.info(i) if i.is_reg else None

    def verity_tree(self, ino: int):
        v = self.verity_info(ino)
        if v is None:
            raise OSError(errno.ENODATA, "not a verity file")
        return self.verity.tree(v)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        i = self.inodes[ino]
        if stat.S_ISLNK(i.mode):
            raise OSError(errno.ENODATA, "no xattrs on symlinks")
        return os.getxattr(i.proc_path, name)

    def listxattr(self, ino: int):
        i = self.inodes[ino]
        if stat.S_ISLNK(i.mode):
            return []
        return [os.fsencode(n) for n in os.listxattr(i.proc_path)]

    def setxattr(self, ino: int, name: bytes, value: bytes):
        i = self.inodes[ino]
        if stat.S_ISLNK(i.mode):
            raise OSError(errno.EPERM, "no xattrs on symlinks")
        os.setxattr(i.proc_path, name, value)

    def removexattr(self, ino: int, name: bytes):
        i = self.inodes[ino]
        if stat.S_ISLNK(i.mode):
            raise OSError(errno.EPERM, "no xattrs on symlinks")
        os.removexattr(i.proc_path, name)

    def flags(self, ino: int, fh: Optional[FileHandle]) -> int:
        """FS_IOC_GETFLAGS: the backing file's classic flags (read through the open
        handle, if any), plus FS_VERITY_FL."""
        i = self.inodes[ino]
        flags = 0
        if fh is not None:
            buf = bytearray(8)
            try:
                fcntl.ioctl(fh.fd, uapi.FS_IOC_GETFLAGS, buf)
                flags = int.from_bytes(buf[:4], "little") & vioctl.PASSTHROUGH_FLAGS
            except OSError:
                pass  # tmpfs and others have no flags: none to report
        if self.verity.is_verity(i):
            flags |= uapi.FS_VERITY_FL
        return flags

    def _may_write(self, i: Inode, uid: int, gid: int, groups) -> bool:
        """The kernel's inode_permission(MAY_WRITE), from the mode bits."""
        if uid == 0:
            return True
        st = os.stat(i.fd)
        if uid == st.st_uid:
            return bool(st.st_mode & stat.S_IWUSR)
        if st.st_gid == gid or st.st_gid in groups:
            return bool(st.st_mode & stat.S_IWGRP)
        return bool(st.st_mode & stat.S_IWOTH)

    # -- enable ----------------------------------------------------------------------

    def enable_check(self, ino: int, fh: Optional[FileHandle], arg, caller=None):
        """Permission (``caller`` = (uid, gid, groups)), then enable.c's other checks."""
        i = self.inodes[ino]
        if caller is not None and not self._may_write(i, *caller):
            raise Errno(errno.EACCES, "no write permission")
        return self.verity.check(i, fh.fd if fh is not None else None, arg,
                                 self.flags(ino, fh), self.read_only)

    def enable_build(self, job, cancel=None):
        self.verity.build(job, cancel)

    def enable_commit(self, job):
        v = self.verity.commit(job)
        self.enabled(job.inode, v)

    def enable_finish(self, job):
        self.verity.finish(job)

    def enable_sync(self, ino: int, arg):
        """FUSE_FSVERITY ENABLE: the same checks, build and commit, synchronously."""
        fh = FileHandle(os.open(self.inodes[ino].proc_path, os.O_RDONLY | os.O_CLOEXEC), None)
        try:
            job = self.enable_check(ino, fh, arg)
            try:
                self.enable_build(job)
                self.enable_commit(job)
            finally:
                self.enable_finish(job)
        finally:
            fh.close()
