"""The local view's metadata requests: verity state, xattrs, inode flags (chattr/lsattr).

view_local.LocalView holds one and hands these requests to it; enabling verity is enable.py's.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from typing import Callable, Optional

from . import ioctl as vioctl
from . import uapi
from .enable import backing_flags
from .inodes import Inode, InodeTable
from .local_verity import LocalVerity
from .verifier import TreeBlockCache, Verifier
from .view import Handle, VerityInfo


ACL_ACCESS = b"system.posix_acl_access"


class LocalMetadata:
    """``relpath(inode)`` names an inode in messages (never in a decision)."""

    def __init__(self, inodes: InodeTable, verity: LocalVerity, cache: TreeBlockCache,
                 relpath: Callable[[Inode], str]):
        self.inodes, self.verity, self.cache, self.relpath = inodes, verity, cache, relpath

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
