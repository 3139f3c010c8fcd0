"""The local view's metadata requests: xattrs, inode flags (chattr/lsattr), enable.

A mixin of view_local.LocalView, which provides ``inodes`` (InodeTable),
``verity`` (LocalVerity), ``read_only``, ``remounted_ro`` and ``_attach_reader``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from typing import Any, Callable, Optional

from . import ioctl as vioctl
from . import uapi
from .errors import Errno
from .inodes import Inode
from .verifier import Verifier
from .view import FileHandle


ACL_ACCESS = b"system.posix_acl_access"


class LocalMetadata:
    inodes: Any
    verity: Any
    cache: Any
    relpath: Callable
    read_only: bool
    remounted_ro: Callable[[], bool]
    _attach_reader: Callable

    # -- xattrs and flags -------------------------------------------------------------
    # Through the O_PATH fd's /proc link, which reaches a symlink itself: xattrs
    # on symlinks pass through where the backing filesystem allows them.

    def verity_info(self, ino: int):
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

    def flags(self, ino: int, fh) -> int:
        """FS_IOC_GETFLAGS: the backing file's flags (read through the open
        handle, if any), with FS_VERITY_FL ours alone."""
        i = self.inodes[ino]
        flags = 0
        if fh is not None:
            buf = bytearray(4)
            try:
                fcntl.ioctl(fh.fd, uapi.FS_IOC_GETFLAGS, buf)
                flags = int.from_bytes(buf, "little") & ~uapi.FS_VERITY_FL
            except OSError:
                pass  # a filesystem without flags: none to report
        if self.verity.is_verity(i):
            flags |= uapi.FS_VERITY_FL
        return flags

    def set_flags(self, ino: int, fh, flags: int):
        """FS_IOC_SETFLAGS: passed through; FS_VERITY_FL can be neither set nor cleared."""
        if fh is None:
            raise OSError(errno.EBADF, "no open file")
        fcntl.ioctl(fh.fd, uapi.FS_IOC_SETFLAGS, struct.pack("<I", flags & ~uapi.FS_VERITY_FL))

    def fsxattr(self, ino: int, fh, new: Optional[bytes] = None) -> bytes:
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
        return self.verity.check(i, fh.fd if fh is not None else None, arg, self.flags(ino, fh),
                                 self.read_only or self.remounted_ro())

    def enable_build(self, job, cancel=None):
        self.verity.build(job, cancel)

    def enable_commit(self, job):
        """The inode is verity from now on, files already open included."""
        v = self.verity.commit(job)
        try:
            for fh in list(job.inode.files):
                if fh.reader is None:
                    self._attach_reader(fh, v)
        except BaseException:
            # Fail closed: a handle of a verity file never reads unverified bytes (EBADF).
            for fh in job.inode.files:
                if fh.reader is None:
                    fh.close()
            raise

    def enable_finish(self, job):
        self.verity.finish(job)

    def enable_sync(self, ino: int, arg):
        """FUSE_FSVERITY ENABLE: the same checks, build and commit, synchronously."""
        i = self.inodes[ino]
        if not (i.is_reg or stat.S_ISDIR(i.mode)):  # never open a FIFO or a device
            raise Errno(errno.EINVAL, "not a regular file")  # what enable_check says of them
        fh = FileHandle(os.open(i.proc_path, os.O_RDONLY | os.O_CLOEXEC), None)
        try:
            job = self.enable_check(ino, fh, arg)
            try:
                self.enable_build(job)
                self.enable_commit(job)
            finally:
                self.enable_finish(job)
        finally:
            fh.close()
