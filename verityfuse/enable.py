"""Enabling fs-verity on a local inode: the rules, the build, the commit (no pyfuse3/trio).

Both wire paths come here: FS_IOC_ENABLE_VERITY (ops_ioctl, with the caller's file and
credentials) and FUSE_FSVERITY ENABLE (which brings neither: the file is opened here,
read-only).  The adapter runs the steps on its terms: ``check`` on the request thread (cheap;
marks the inode busy), ``build`` in a worker thread (cancellable), ``commit`` back on the
request thread, and ``finish`` always.

``check`` applies the rules of fs/verity/enable.c in its order (fsverity_ioctl_enable, then
enable_verity; /work/shared/reference/fsverity.md §1.5), so a request that breaks two rules
gets the first one's errno.  ``ioctl.parse_enable`` has already answered EINVAL (version,
reserved fields, block size not a power of 2) and EMSGSIZE (salt, signature):

1. EOPNOTSUPP if the backing filesystem cannot keep verity with the inode (no handles
   that last): a filesystem without verity says so before anything else;
2. file_permission(MAY_WRITE), asked of the backing filesystem as the caller: EROFS on a
   read-only mount (a file or directory), EPERM if immutable, EACCES without write
   permission (mode bits and ACLs);
3. EBADF if the caller's file is not open for reading (access mode 3 is not);
4. EPERM if append-only;  5. EISDIR;  6. EINVAL if not a regular file;
7. ETXTBSY while anything has it open for writing;
8. EINVAL for an unknown hash algorithm or block size, EFBIG if the tree is too deep;
9. EEXIST if already verity;  10. EBUSY while another enable runs.

The build then answers EINTR when cancelled (nothing committed) and the signature rules
(LocalVerity.check_signature: EPERM when signatures are required and none was given, and
what signature.verify refuses) before anything is committed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from typing import Callable, Optional, Set, Tuple

from . import creds, fsutil, merkle, treebuild, uapi
from .errors import Errno
from .inodes import Inode
from .ioctl import EnableArg, enable_params
from .local_verity import LocalVerity
from .logs import escape
from .logs import requests as ratelog
from .sealing import seal_fd
from .store import IndexEntry
from .view import FileHandle, VerityInfo

# The caller of FS_IOC_ENABLE_VERITY: uid, gid and supplementary groups.
Caller = Tuple[int, int, Set[int]]


def backing_flags(fd: int) -> int:
    """FS_IOC_GETFLAGS of the backing file ``fd`` (0 on a filesystem without flags)."""
    buf = bytearray(4)
    try:
        fcntl.ioctl(fd, uapi.FS_IOC_GETFLAGS, buf)
    except OSError:
        return 0
    return int.from_bytes(buf, "little")


def write_permission(fd: int, caller: Caller) -> int:
    """The kernel's file_permission(MAY_WRITE) for ``caller`` on the file ``fd``: 0, or
    EROFS (a read-only file system), EPERM (immutable) or EACCES, in the kernel's order.
    The backing file system is asked, with the caller's credentials, rather than a rule
    of mode bits rebuilt here, which gave an ACL's denial no weight: a user an ACL kept
    from writing someone else's file could make it read-only for good."""
    uid, gid, groups = caller
    with creds.as_ids(uid, gid, groups):
        return creds.access_errno(f"/proc/self/fd/{fd}", os.W_OK)


class EnableJob:
    """One enable in flight: the inode, its own read-only fd, the parameters, the result."""

    def __init__(self, inode: Inode, fd: int, label: str, params: merkle.Params, signature: bytes):
        self.inode, self.fd, self.rel = inode, fd, label
        self.params, self.signature = params, signature
        self.entry: Optional[IndexEntry] = None


class Enabler:
    """The enable rules of a local view.  ``read_only()`` is the mount's state now (ro, or
    remounted ro); ``attach_reader(fh, info)`` gives an open file its verified reader."""

    def __init__(self, verity: LocalVerity, read_only: Callable[[], bool],
                 attach_reader: Callable[[FileHandle, VerityInfo], None]):
        self.verity = verity
        self.read_only = read_only
        self.attach_reader = attach_reader

    def check(self, inode: Inode, fh: Optional[FileHandle], arg: EnableArg,
              caller: Optional[Caller] = None, opened: Optional[int] = None) -> EnableJob:
        """Every rule, in the kernel's order; returns the job with the inode marked busy.

        ``fh`` is the caller's open file (FS_IOC_ENABLE_VERITY), None when the request
        brings none (FUSE_FSVERITY): the file is then opened here, read-only, without
        waiting for a lease on it to be broken (fsutil.WouldWait; ``opened`` is then what
        its ``finish`` opened, taken).  ``caller`` None skips the permission rule
        (FUSE_FSVERITY carries no credentials).  The job builds from its own fd: the
        same inode, whatever happens to its names.
        """
        if fh is not None:
            fd = os.dup(fh.fd)
        elif opened is not None:
            fd = opened
        elif inode.is_reg or stat.S_ISDIR(inode.mode):
            fd = fsutil.reopen_nowait(inode.fd, os.O_RDONLY | os.O_CLOEXEC)
        else:  # never open a FIFO or a device (it could block): rule 5 answers for it
            raise Errno(errno.EINVAL, "not a regular file")
        try:
            params = self._rules(inode, fd, fh, arg, caller)
        except BaseException:
            os.close(fd)
            raise
        inode.enabling = True
        return EnableJob(inode, fd, self.verity.label(inode), params, arg.signature)

    def _rules(self, inode: Inode, fd: int, callers_fh: Optional[FileHandle], arg: EnableArg,
               caller: Optional[Caller]) -> merkle.Params:
        if inode.store_key is None:
            raise Errno(errno.EOPNOTSUPP, "the backing filesystem has no file handles that "
                                          "last, to keep verity with the inode")
        # A read-only mount is a read-only superblock: the first thing file_permission
        # says, for a file, directory or symlink (a FIFO gets EINVAL below first).
        if self.read_only() and (inode.is_reg or stat.S_ISDIR(inode.mode)
                                 or stat.S_ISLNK(inode.mode)):
            raise Errno(errno.EROFS, "read-only mount")
        flags = backing_flags(fd)
        err = write_permission(fd, caller) if caller is not None else 0
        if err == errno.EPERM or (caller is None and flags & uapi.FS_IMMUTABLE_FL):
            raise Errno(errno.EPERM, "immutable")
        if err:
            raise Errno(err, "no write permission")
        if callers_fh is not None and not callers_fh.readable:
            raise Errno(errno.EBADF, "the file is not open for reading")
        if flags & uapi.FS_APPEND_FL:
            raise Errno(errno.EPERM, "append-only")
        if stat.S_ISDIR(inode.mode):
            raise Errno(errno.EISDIR, "is a directory")
        if not inode.is_reg:
            raise Errno(errno.EINVAL, "not a regular file")
        if any(f.writable for f in inode.files):
            raise Errno(errno.ETXTBSY, "open for writing")
        params = enable_params(arg)                                  # EINVAL
        merkle.Geometry.compute(params, os.fstat(fd).st_size)       # EFBIG: too many levels
        if self.verity.is_verity(inode):
            raise Errno(errno.EEXIST, "already a verity file")
        if inode.enabling:
            raise Errno(errno.EBUSY, "enable already running")
        return params

    def build(self, job: EnableJob, cancel: Optional[Callable[[], bool]] = None) -> None:
        """Build and store the tree (any thread).  EINTR once ``cancel()`` says so; a
        signature that does not verify commits nothing."""
        try:
            job.entry = seal_fd(self.verity.store, job.fd, job.rel, job.params, job.signature,
                                cancel=cancel, check=lambda d: self.verity.check_signature(
                                    job.signature, d.params.alg, d.digest))
        except treebuild.Cancelled:
            ratelog.info(None, f"enable of {escape(job.rel)} interrupted; nothing committed")
            raise Errno(errno.EINTR, "enable interrupted; nothing committed") from None

    def commit(self, job: EnableJob) -> VerityInfo:
        """The inode is verity from now on, files already open included."""
        if job.entry is None:
            raise RuntimeError("commit before build")
        info = self.verity.load(job.entry)
        job.inode.verity = info
        ratelog.info(None, f"verity enabled on {escape(job.rel)}: {job.entry.digest_text}")
        try:
            for fh in list(job.inode.files):
                if fh.reader is None:
                    self.attach_reader(fh, info)
        except BaseException:
            # Fail closed: a handle of a verity file never reads unverified bytes (EBADF).
            for fh in job.inode.files:
                if fh.reader is None:
                    fh.close()
            raise
        return info

    @staticmethod
    def finish(job: EnableJob) -> None:
        """Always, after commit or failure: the inode is free, the job's fd closed."""
        job.inode.enabling = False
        if job.fd >= 0:
            os.close(job.fd)
            job.fd = -1

    def enable(self, inode: Inode, arg: EnableArg) -> VerityInfo:
        """All of it on the calling thread, the file opened here: for a caller with no
        request loop to keep answering (a request handler runs the steps itself)."""
        try:
            job = self.check(inode, None, arg)
        except fsutil.WouldWait as w:  # a lease on the file: this caller may wait for it
            job = self.check(inode, None, arg, opened=w.finish())
        try:
            self.build(job)
            return self.commit(job)
        finally:
            self.finish(job)
