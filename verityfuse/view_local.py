"""The local view: a read-write passthrough of SOURCE whose verity files are checked.

Inodes are the backing inodes (inodes.py): identity by file handle, the
backing inode numbers, a bounded number of fds.  Verity belongs to the inode
(local_verity.py).  A verity file is read-only (EPERM for write opens and
truncation), as on ext4; everything else passes through to SOURCE with the
caller's ownership and the kernel's modes (the daemon runs with umask 0: the
kernel already applied the caller's).  Directories are listed in place
(view_local_dirs.py).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from typing import Any, Callable, Optional

from . import creds, fsutil
from .inodes import NOT_VERITY, Inode, InodeTable
from .enable import Caller, EnableJob, Enabler
from .ioctl import EnableArg
from .local_verity import LocalVerity
from .view_local_dirs import LocalDirs
from .view_local_meta import LocalMetadata
from .logs import escape
from .logs import requests as ratelog
from .verifier import Verifier
from .view import Attr, FileHandle

_O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
# Never passed to the backing open: creation is done explicitly, and O_DIRECT
# reads fall back to buffered (verified) I/O as on ext4 with fs-verity.
_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_DIRECT | os.O_NOFOLLOW
_IOCTL_ONLY = 3  # open(2)'s access mode 3: permission to read and write, an fd for neither
RENAME_EXCHANGE = 2

_libc = ctypes.CDLL(None, use_errno=True)


def _renameat2(olddirfd, oldname, newdirfd, newname, flags):
    if _libc.renameat2(olddirfd, oldname, newdirfd, newname, flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class _NameOnDemand:
    """A handle's name for messages, looked up the first time a message needs it.

    Most opens never say anything, and the readlink was ~7 us of each open in a
    container start.  Every message about a handle is made while one of its
    requests runs (IntegrityError keeps ``str(path)``), so its fd is still open.
    """

    __slots__ = ("_view", "_fd", "_name")

    def __init__(self, view, fd: int):
        self._view, self._fd = view, fd
        self._name: Optional[str] = None

    def __str__(self) -> str:
        name = self._name
        if name is None:
            name = self._name = self._view.fd_relpath(self._fd)
        return name

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


class LocalView:
    posix_acl = True  # the kernel enforces the backing files' ACLs (FUSE_POSIX_ACL)

    def __init__(self, source: str, store, cache, policy: str = "enforce", timeout: float = 1.0,
                 trust_certs=(), require_signatures: bool = False, read_only: bool = False,
                 remounted_ro: Callable[[], bool] = lambda: False, max_fds: Optional[int] = None,
                 stats=None, noatime: bool = False):
        if policy not in ("enforce", "require"):
            raise ValueError(f"unknown policy {policy!r}")
        self.source = os.path.realpath(source)
        self._prefix = self.source.rstrip("/") + "/"  # what relpath cuts off
        self.store = store
        self.cache = cache
        self.policy = policy
        self.timeout = timeout
        self.read_only = read_only
        self.remounted_ro = remounted_ro  # the mount's current flags (remount,ro)
        self.stats = stats
        # -o noatime: the kernel updates no atime on the mount, and the reads the daemon
        # makes for it must not update the backing files' either (generic/120).
        self.noatime = noatime
        self.opens: Any = None  # fast_opens.NativeOpens, when the shim answers opens
        self.inodes = InodeTable(os.open(self.source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC),
                                 max_fds)
        self.verity = LocalVerity(store, self.relpath, trust_certs, require_signatures)
        # The metadata requests, enable and the directories (below) are objects of their
        # own: these members are theirs.
        self.meta = m = LocalMetadata(self.inodes, self.verity, cache, self.relpath, timeout)
        self.getattr = m.getattr
        self.setattr = m.setattr
        self.verity_info = m.verity_info
        self.tree_verifier = m.tree_verifier
        self.getxattr = m.getxattr
        self.listxattr = m.listxattr
        self.setxattr = m.setxattr
        self.removexattr = m.removexattr
        self.flags = m.flags
        self.set_flags = m.set_flags
        self.fsxattr = m.fsxattr
        self.enabler = e = Enabler(self.verity, lambda: self.read_only or self.remounted_ro(),
                                   self._attach_reader)
        self.enable_build = e.build
        self.enable_commit = e.commit
        self.enable_finish = e.finish
        # The store is hidden when it lives inside SOURCE: (its parent's identity, its name).
        self.hidden = None
        sp = os.path.realpath(store.path)
        store_dir = os.path.dirname(sp)
        if fsutil.within(store_dir, self.source):  # also for SOURCE /
            pfd = os.open(store_dir, _O_PATH)
            try:
                key, _ = self.inodes._identify(pfd, os.fstat(pfd))
            finally:
                os.close(pfd)
            self.hidden = (key, os.fsencode(os.path.basename(sp)))
        self.dirs = d = LocalDirs(
            self.inodes, timeout, self.hidden, self._lookup,
            lambda path, flags: fsutil.open_noatime(path, flags, self.noatime))
        self.opendir = d.opendir
        self.readdir = d.readdir
        self.releasedir = d.releasedir

    def close(self) -> int:
        outstanding = self.inodes.outstanding()
        self.inodes.close_all()
        return outstanding

    # -- helpers ------------------------------------------------------------------------

    def _check_name(self, parent: Inode, name: bytes, err=errno.ENOENT):
        if self.hidden and parent.key == self.hidden[0] and name == self.hidden[1]:
            raise OSError(err, "reserved for the store")

    def _lookup(self, parent: Inode, name: bytes) -> Attr:
        """Look ``name`` up in ``parent`` and count one kernel lookup."""
        self._check_name(parent, name)
        inode, st = self.inodes.lookup(parent, name)
        attr = self.meta.attr(inode, st)
        if self.opens is not None and inode.is_reg:
            self.opens.offer(inode, inode.fd)
        return attr

    def relpath(self, inode: Inode, name: Optional[bytes] = None) -> str:
        """A name for messages (never for a decision): the inode's path under SOURCE now."""
        try:
            path = os.readlink(inode.proc_path)
        except OSError:
            return f"inode {inode.ino}"
        if name is not None:
            path = os.path.join(path, os.fsdecode(name))
        return self._under_source(path)

    def fd_relpath(self, fd: int) -> str:
        """relpath of the file open as ``fd``: a handle's own fd, which no other thread
        closes while a read on it is reported (an inode's O_PATH fd may be evicted)."""
        try:
            return self._under_source(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            return f"fd {fd}"

    def _under_source(self, path: str) -> str:
        # Every open named its file: a prefix cut, not os.path.relpath (~8 us a call).
        if path == self.source:
            return "."
        return path[len(self._prefix):] if path.startswith(self._prefix) else path

    # -- lookups and attributes --------------------------------------------------------

    def lookup(self, parent: int, name: bytes, ctx=None) -> Attr:
        return self._lookup(self.inodes[parent], name)

    def forget(self, ino: int, n: int):
        self.inodes.forget(ino, n)

    def unlookup(self, ino: int):
        self.inodes.forget(ino, 1)

    def readlink(self, ino: int) -> bytes:
        return os.fsencode(os.readlink("", dir_fd=self.inodes[ino].fd))

    def statfs(self):
        s = os.statvfs(self.inodes.root.fd)  # the root we serve, not whatever the path names now
        return {f: getattr(s, f) for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                                           "f_files", "f_ffree", "f_favail", "f_namemax")}

    # -- namespace --------------------------------------------------------------------

    def _make(self, parent: int, name: bytes, ctx, create) -> Attr:
        """mknod/mkdir/symlink: ``create(dirfd)`` makes ``name`` as the caller would."""
        p = self.inodes[parent]
        self._check_name(p, name, errno.EEXIST)
        dirfd = p.fd  # before the credentials change: a reopen by handle needs ours
        with creds.as_caller(ctx):
            create(dirfd)
        return self._lookup(p, name)

    def _refuse_new_file(self, p: Inode, name: bytes):
        """--policy require: no unsealed regular file is made through the mount, whichever
        request makes it (create, mknod)."""
        if self.policy == "require":
            ratelog.warning(None, "policy require: refusing to create "
                                  f"{escape(self.relpath(p, name))}")
            raise OSError(errno.EPERM, "policy require")

    def mknod(self, parent, name, mode, rdev, ctx):
        if stat.S_IFMT(mode) in (0, stat.S_IFREG):  # mknod(2) makes a regular file of both
            p = self.inodes[parent]
            self._check_name(p, name, errno.EEXIST)
            self._refuse_new_file(p, name)
        return self._make(parent, name, ctx, lambda d: os.mknod(name, mode, rdev, dir_fd=d))

    def mkdir(self, parent, name, mode, ctx):
        return self._make(parent, name, ctx, lambda d: os.mkdir(name, mode, dir_fd=d))

    def symlink(self, parent, name, target, ctx):
        return self._make(parent, name, ctx, lambda d: os.symlink(target, name, dir_fd=d))

    def _victim(self, dirfd: int, name: bytes) -> int:
        """An O_PATH fd of what ``name`` is now (-1 if nothing), to forget its
        verity entry should it lose its last link."""
        try:
            return os.open(name, _O_PATH, dir_fd=dirfd)
        except OSError:
            return -1

    def _dropped(self, fd: int):
        if fd >= 0:
            self.verity.dropped(fd)
            os.close(fd)

    def unlink(self, parent: int, name: bytes):
        p = self.inodes[parent]
        self._check_name(p, name)
        victim = self._victim(p.fd, name)
        try:
            os.unlink(name, dir_fd=p.fd)
        finally:
            self._dropped(victim)

    def rmdir(self, parent: int, name: bytes):
        p = self.inodes[parent]
        self._check_name(p, name)
        os.rmdir(name, dir_fd=p.fd)

    def rename(self, parent_old, name_old, parent_new, name_new, flags):
        """Verity stays with the inodes: nothing to move, nothing walked."""
        po, pn = self.inodes[parent_old], self.inodes[parent_new]
        self._check_name(po, name_old)
        self._check_name(pn, name_new, errno.EACCES)
        victim = -1 if flags & RENAME_EXCHANGE else self._victim(pn.fd, name_new)
        try:
            _renameat2(po.fd, name_old, pn.fd, name_new, flags)
        finally:
            self._dropped(victim)

    def link(self, ino: int, parent: int, name: bytes) -> Attr:
        i, p = self.inodes[ino], self.inodes[parent]
        self._check_name(p, name, errno.EEXIST)
        os.link(i.proc_path, name, dst_dir_fd=p.fd, follow_symlinks=True)
        return self._lookup(p, name)

    # -- files ------------------------------------------------------------------------

    def _open(self, i: Inode, flags: int, fd: Optional[int] = None) -> FileHandle:
        """``fd``: the backing file, opened already: taken (closed if the open fails)."""
        acc = flags & os.O_ACCMODE
        writable = acc in (os.O_WRONLY, os.O_RDWR)
        if acc == _IOCTL_ONLY:  # neither read nor write: the kernel sends it ioctls only
            flags &= ~os.O_ACCMODE  # and O_RDONLY serves those without counting as a writer
        try:
            v = self._may_open(i, writable or bool(flags & os.O_TRUNC))
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        if fd is None:  # (FUSE opens only regular files: the kernel serves FIFOs, devices)
            fd = fsutil.reopen_nowait(i.fd, (flags & ~_STRIP) | os.O_CLOEXEC, self.noatime)
        fh = FileHandle(fd, i, writable=writable, readable=acc in (os.O_RDONLY, os.O_RDWR))
        try:
            if v is not NOT_VERITY:
                self._attach_reader(fh, v)
        except BaseException:
            fh.close()  # the fd, and the tree if it was opened
            raise
        i.handles += 1
        i.add_file(fh)
        return fh

    def _may_open(self, i: Inode, writing: bool):
        """The open's rules (its verity state, or the error that refuses it)."""
        v = self.verity.info(i) if i.is_reg else NOT_VERITY
        if v is not NOT_VERITY:
            if writing:
                raise OSError(errno.EPERM, "a verity file is read-only")
        elif i.is_reg:
            if self.policy == "require":
                name = escape(self.relpath(i))
                ratelog.warning(("require", name),
                                f"policy require: refusing {name}, which has no fs-verity metadata")
                raise OSError(errno.EPERM, "not a verity file")
            if writing and i.enabling:
                raise OSError(errno.ETXTBSY, "enable running")  # as the kernel
        return v

    def _attach_reader(self, fh: FileHandle, v, check_size: bool = True):
        label: Any = _NameOnDemand(self, fh.fd)  # every label is only formatted: as a str
        fh.verify_with(self.verity.tree(v, label), self.cache, label, self.stats,
                       check_size=check_size)

    def open(self, ino: int, flags: int, ctx=None, fd: Optional[int] = None) -> FileHandle:
        """``fd``: what a WouldWait's ``finish`` opened (taken)."""
        return self._open(self.inodes[ino], flags, fd)

    def create(self, parent: int, name: bytes, mode: int, flags: int, ctx):
        p = self.inodes[parent]
        self._check_name(p, name, errno.EACCES)
        self._refuse_new_file(p, name)
        dirfd = p.fd
        with creds.as_caller(ctx):
            fd = os.open(name, (flags & ~_STRIP) | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, mode, dir_fd=dirfd)
        try:
            attrs = self._lookup(p, name)
            i = self.inodes[attrs.ino]
            if self.inodes._identify(fd, os.fstat(fd))[0] != i.key:
                # Renamed over by another process between the open and the lookup:
                # the name is not the file this request made.
                self.unlookup(i.ino)
                raise OSError(errno.EIO, f"{self.relpath(p, name)} was replaced while created")
            i.verity = NOT_VERITY  # the file this request just made: no verity yet
        except BaseException:
            os.close(fd)
            raise
        return self._open(i, flags, fd), attrs

    def use_native_opens(self, opens) -> None:
        """Offer sealed files to ``opens`` (fast_opens.NativeOpens) at each lookup."""
        self.opens = opens
        self.inodes.closing = opens.drop

    def leaf_verifier(self, i: Inode, v) -> Verifier:
        """A verifier of sealed inode ``i``'s tree ``v`` (the caller closes ``.tree``)."""
        label: Any = _NameOnDemand(self, i.fd)
        return Verifier(self.verity.tree(v, label), self.cache, label)

    def adopt(self, ino: int, fd: int) -> FileHandle:
        """The handle the native path opened read-only as ``fd`` (fast_opens), made
        this view's: its reader attached now.  If that fails, ``fd`` stays the native
        handle's (its release closes it)."""
        i = self.inodes[ino]
        v = self.verity.info(i)
        if v is None:  # a native handle is only ever opened on a sealed file
            raise OSError(errno.EIO, f"inode {ino}: native handle of a file without verity")
        fh = FileHandle(fd, i)
        try:
            # Its size was checked at the native open, as a Python open checks it; a later
            # change is the reads' to find, as for a handle Python opened.
            self._attach_reader(fh, v, check_size=False)
        except BaseException:
            for c in fh.closers:
                c.close()
            raise
        i.handles += 1
        i.add_file(fh)
        return fh

    def release(self, fh: FileHandle):
        i = fh.node
        fh.close()
        i.handles -= 1
        i.drop_file(fh)
        self.inodes.maybe_drop(i)

    # -- enable (enable.py; the metadata and directory requests are bound in __init__) ---

    def enable_check(self, ino: int, fh: Optional[FileHandle], arg: EnableArg,
                     caller: Optional[Caller] = None, opened: Optional[int] = None) -> EnableJob:
        """``opened``: what a WouldWait's ``finish`` opened (taken, closed on failure)."""
        try:
            inode = self.inodes[ino]
        except BaseException:
            if opened is not None:
                os.close(opened)
            raise
        return self.enabler.check(inode, fh, arg, caller, opened)

    def enable_sync(self, ino: int, arg: EnableArg):
        self.enabler.enable(self.inodes[ino], arg)
