"""The local view's metadata requests: attributes (getattr, setattr and truncate),
verity state, xattrs, inode flags (chattr/lsattr).

view_local.LocalView holds one and hands these requests to it; enabling verity is enable.py's.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import time
from typing import Callable, Optional

from . import fsutil, uapi
from . import ioctl as vioctl
from .enable import backing_flags
from .errors import VerityError
from .inodes import Inode, InodeTable
from .local_verity import LocalVerity
from .verifier import TreeBlockCache, Verifier
from .view import Attr, FileHandle, Handle, VerityInfo


ACL_ACCESS = b"system.posix_acl_access"


class LocalMetadata:
    """``relpath(inode)`` names an inode in messages (never in a decision); ``timeout``
    is the attributes' (seconds)."""

    def __init__(self, inodes: InodeTable, verity: LocalVerity, cache: TreeBlockCache,
                 relpath: Callable[[Inode], str], timeout: float):
        self.inodes, self.verity, self.cache, self.relpath = inodes, verity, cache, relpath
        self.timeout = timeout

    # -- attributes -------------------------------------------------------------------

    def attr(self, inode: Inode, st: os.stat_result) -> Attr:
        size = None
        if inode.is_reg:
            try:
                v = self.verity.info(inode)
                size = v.size if v is not None else None  # the sealed size, whatever the disk says
            except (VerityError, OSError):
                # Damaged metadata (VerityError) or an unreadable store entry: stat works
                # with the disk's size, and open fails with the same error.
                pass
        return Attr.from_stat(inode.ino, st, self.timeout, size)

    def getattr(self, ino: int, fh=None) -> Attr:
        i = self.inodes[ino]
        return self.attr(i, os.stat(i.fd))

    def setattr(self, ino, attr, fields, fh: Optional[FileHandle], ctx,
                fd: Optional[int] = None) -> Attr:
        """``fd``: the file opened for a truncate by a WouldWait's ``finish`` (taken)."""
        try:
            i = self.inodes[ino]
            if fields.update_size:
                if self.verity.is_verity(i):
                    raise OSError(errno.EPERM, "a verity file cannot be truncated")
                if i.enabling:
                    raise OSError(errno.ETXTBSY, "enable running")  # as ext4
                if fh is not None:
                    os.ftruncate(fh.fd, attr.st_size)
                else:
                    given, fd = fd, None
                    self._truncate(i, attr.st_size, given)
        finally:
            if fd is not None:
                os.close(fd)
        if fields.update_mode:
            if stat.S_ISLNK(i.mode):
                raise OSError(errno.EOPNOTSUPP, "symlinks have no mode")
            os.chmod(i.proc_path, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            os.chown(i.proc_path, attr.st_uid if fields.update_uid else -1,
                     attr.st_gid if fields.update_gid else -1)
        if fields.update_atime or fields.update_mtime:
            st = os.stat(i.fd)
            times = (attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                     attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns)
            try:
                os.utime(i.proc_path, ns=times)
            except PermissionError:
                # pyfuse3 turns utimes(NULL) into explicit "now" times, which an
                # append-only file refuses; ask for "now" when that is what came.
                now = time.time_ns()
                if not (fields.update_atime and fields.update_mtime
                        and all(abs(t - now) < 1_000_000_000 for t in times)):
                    raise
                os.utime(i.proc_path)
        return self.attr(i, os.stat(i.fd))

    def _truncate(self, i: Inode, size: int, fd: Optional[int]):
        """truncate(2) without a handle.  By path it would wait on the request thread (up
        to lease-break-time, 45 s) for a lease on the file to be broken, stalling every
        request of the mount: the file is opened for writing without waiting (WouldWait,
        whose ``finish`` opens it in a worker thread; ``fd`` is then that, taken) and
        truncated through the fd.  Only a regular file is opened (never a device)."""
        if fd is None:
            if not i.is_reg:
                raise OSError(errno.EISDIR if stat.S_ISDIR(i.mode) else errno.EINVAL,
                              "not a regular file")  # as truncate(2)
            fd = fsutil.reopen_nowait(i.fd, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)



    # -- xattrs and flags -------------------------------------------------------------
    # Through the O_PATH fd's /proc link, which reaches a symlink itself: xattrs
    # on symlinks pass through where the backing filesystem allows them.

    def verity_info(self, ino: int) -> Optional[VerityInfo]:
        i = self.inodes[ino]
        return self.verity.info(i) if i.is_reg else None

    def tree_verifier(self, ino: int) -> Verifier:
        """The file's tree object, read only through a verifier (the caller closes
        ``.tree``): what the mount exports hashes up to the digest recorded at enable."""
        v = self.verity_info(ino)
        if v is None:
            raise OSError(errno.ENODATA, "not a verity file")
        label = self.relpath(self.inodes[ino])
        return Verifier(self.verity.tree(v, label), self.cache, label)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        return os.getxattr(self.inodes[ino].proc_path, name)

    def listxattr(self, ino: int, ctx=None):
        names = [os.fsencode(n) for n in os.listxattr(self.inodes[ino].proc_path)]
        if ctx is not None and ctx.uid != 0:  # as the kernel: trusted.* is for CAP_SYS_ADMIN
            names = [n for n in names if not n.startswith(b"trusted.")]
        return names

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0, ctx=None):
        i = self.inodes[ino]
        os.setxattr(i.proc_path, name, value, flags)
        if name == ACL_ACCESS and ctx is not None:
            self._acl_kill_sgid(i, ctx)

    def _acl_kill_sgid(self, i: Inode, ctx):
        """The kernel's posix_acl_update_mode: setting an access ACL clears S_ISGID
        unless the caller is in the file's group or has CAP_FSETID (generic/375).  The
        daemon set it with its own credentials, which keep the bit, so the caller's
        are checked here (the kernel would tell us with FUSE_SETXATTR_ACL_KILL_SGID,
        which needs FUSE_SETXATTR_EXT: pyfuse3 does not negotiate it)."""
        from .creds import groups_of

        st = os.stat(i.proc_path)
        if not st.st_mode & stat.S_ISGID or ctx.uid == 0:
            return
        if st.st_gid == ctx.gid or st.st_gid in groups_of(ctx.pid):
            return
        os.chmod(i.proc_path, stat.S_IMODE(st.st_mode) & ~stat.S_ISGID)

    def removexattr(self, ino: int, name: bytes):
        os.removexattr(self.inodes[ino].proc_path, name)

    def flags(self, ino: int, fh: Optional[Handle]) -> int:
        """FS_IOC_GETFLAGS: the backing file's flags (read through the open
        handle, if any), with FS_VERITY_FL ours alone."""
        i = self.inodes[ino]
        flags = backing_flags(fh.fd) & ~uapi.FS_VERITY_FL if fh is not None else 0
        if self.verity.is_verity(i):
            flags |= uapi.FS_VERITY_FL
        return flags

    def set_flags(self, ino: int, fh: Optional[Handle], flags: int):
        """FS_IOC_SETFLAGS: passed through; FS_VERITY_FL can be neither set nor cleared."""
        if fh is None:
            raise OSError(errno.EBADF, "no open file")
        fcntl.ioctl(fh.fd, uapi.FS_IOC_SETFLAGS, struct.pack("<I", flags & ~uapi.FS_VERITY_FL))

    def fsxattr(self, ino: int, fh: Optional[Handle], new: Optional[bytes] = None) -> bytes:
        """FS_IOC_FSGETXATTR (``new`` None) or FSSETXATTR, passed through; the
        verity xflag is reported, never taken."""
        if fh is None:
            raise OSError(errno.EBADF, "no open file")
        if new is not None:
            fcntl.ioctl(fh.fd, uapi.FS_IOC_FSSETXATTR, vioctl.with_xflag_verity(new, False))
            return b""
        buf = bytearray(uapi.FSXATTR_SIZE)
        fcntl.ioctl(fh.fd, uapi.FS_IOC_FSGETXATTR, buf)
        return vioctl.with_xflag_verity(bytes(buf), self.verity.is_verity(self.inodes[ino]))
