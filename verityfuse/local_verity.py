"""Verity state of backing inodes in local mode, and enabling it (no pyfuse3/trio).

Verity belongs to the inode, as on ext4: an inode's state is resolved once
from the store and kept on the inode (hard links and renames see the same
state).  Enabling runs in three steps so the daemon can build off its request
loop: ``check`` (every rule of fs/verity/enable.c, in its order; marks the
inode busy), ``build`` (in a worker thread), ``commit`` or ``abort``.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from typing import Callable, Optional

from . import ioctl as vioctl
from . import merkle
from .errors import Errno, VerityError
from .inodes import NOT_VERITY, UNKNOWN, Inode
from .store import IndexEntry, Store
from .view import VerityInfo

log = logging.getLogger("verityfuse")


class EnableJob:
    """One FS_IOC_ENABLE_VERITY (or FUSE_FSVERITY ENABLE) in flight."""

    def __init__(self, inode: Inode, fd: int, rel: str, params: merkle.Params, signature: bytes):
        self.inode, self.fd, self.rel = inode, fd, rel
        self.params, self.signature = params, signature
        self.entry: Optional[IndexEntry] = None


class LocalVerity:
    def __init__(self, store: Store, relpath: Callable, trust_certs=(), require_signatures=False):
        self.store = store
        self.relpath = relpath  # inode -> path under SOURCE, or None
        self.trust_certs = list(trust_certs)
        self.require_signatures = require_signatures

    # -- state --------------------------------------------------------------------

    def info(self, inode: Inode) -> Optional[VerityInfo]:
        """The inode's verity state, loaded on first use; None if it has none.

        Raises the error that makes its metadata unusable (every open then
        fails with it, as on ext4 with a corrupt descriptor).
        """
        v = inode.verity
        if v is UNKNOWN:
            v = NOT_VERITY
            rel = self.relpath(inode) if inode.is_reg else None
            if rel:
                try:
                    entry = self.store.get_entry(rel)
                    if entry is not None:
                        v = self._load(entry)
                except VerityError as e:
                    v = e
            inode.verity = v
        if isinstance(v, Exception):
            raise v
        return v

    def _load(self, entry: IndexEntry) -> VerityInfo:
        with self.store.open_object(entry.alg, entry.digest) as tree:
            d = tree.descriptor
        self.check_signature(entry.signature, entry.alg, entry.digest)
        return VerityInfo(entry.alg, entry.digest, d.params, d.data_size, entry.signature)

    def is_verity(self, inode: Inode) -> bool:
        """Verity, even if its metadata is damaged (it stays read-only)."""
        if not inode.is_reg:
            return False
        try:
            return self.info(inode) is not None
        except VerityError:
            return True

    def tree(self, info: VerityInfo):
        return self.store.open_object(info.alg, info.digest)

    def check_signature(self, sig: bytes, alg, digest: bytes):
        """Built-in signature rules, as the kernel applies them on open."""
        if not sig:
            if self.require_signatures:
                raise Errno(errno.EPERM, "unsigned verity file and signatures are required")
            return
        if self.trust_certs:
            from . import signature
            signature.verify(sig, alg, digest, self.trust_certs)
        # Without trusted certificates the signature is kept unverified, as a
        # kernel without CONFIG_FS_VERITY_BUILTIN_SIGNATURES does.

    # -- the path index follows the namespace -------------------------------------------

    def forget_path(self, rel: Optional[str]):
        if rel:
            self.store.remove_entry(rel)

    def entries_under(self, source: str, rel: Optional[str]):
        """Index entries of the file at ``rel``, or of every file under directory ``rel``."""
        if not rel:
            return {}
        full = os.path.join(source, rel)
        paths = [rel]
        if os.path.isdir(full) and not os.path.islink(full):
            paths = [os.path.relpath(os.path.join(d, f), source)
                     for d, _, files in os.walk(full) for f in files]
        return {r: e for r in paths if (e := self.store.get_entry(r)) is not None}

    def move(self, moving: dict, old: str, new: Optional[str]):
        for r, e in moving.items():
            if new is not None:
                self.store.set_entry(new + r[len(old):], e.alg, e.digest, e.signature)

    def link(self, inode: Inode, rel: Optional[str]):
        if not rel:
            return
        v = self.info(inode) if inode.is_reg else None
        if v is None:
            self.store.remove_entry(rel)
        else:
            self.store.set_entry(rel, v.alg, v.digest, v.signature)

    # -- enable -------------------------------------------------------------------------

    def check(self, inode: Inode, fd: Optional[int], arg: vioctl.EnableArg, flags: int,
              read_only: bool) -> EnableJob:
        """enable.c's checks after permission, in its order; ``fd`` is the caller's
        file open for reading (None if the request has none), ``flags`` its
        FS_IOC_GETFLAGS.  Returns the job, with the inode marked busy and its own fd."""
        if stat.S_ISDIR(inode.mode):
            raise Errno(errno.EISDIR, "is a directory")
        if not inode.is_reg or fd is None:
            raise Errno(errno.EINVAL, "not a regular file")
        if flags & (vioctl.FS_APPEND_FL | vioctl.FS_IMMUTABLE_FL):
            raise Errno(errno.EPERM, "append-only or immutable")
        if read_only:
            raise Errno(errno.EROFS, "read-only mount")
        if inode.writers:
            raise Errno(errno.ETXTBSY, "open for writing")
        if self.is_verity(inode):
            raise Errno(errno.EEXIST, "already a verity file")
        params = vioctl.enable_params(arg)                       # EINVAL
        if inode.enabling:
            raise Errno(errno.EBUSY, "enable already running")
        rel = self.relpath(inode)
        if not rel:
            raise Errno(errno.ENOENT, "file has no name under the source")
        inode.enabling = True
        return EnableJob(inode, os.dup(fd), rel, params, arg.signature)

    def build(self, job: EnableJob, cancel=None) -> IndexEntry:
        """Build and store the tree (any thread); a signature that does not verify
        commits nothing."""
        from .seal import seal_fd

        job.entry = seal_fd(self.store, job.fd, job.rel, job.params, job.signature, cancel=cancel,
                            check=lambda d: self.check_signature(job.signature, d.params.alg,
                                                                 d.digest))
        return job.entry

    def commit(self, job: EnableJob) -> VerityInfo:
        """The inode is verity from now on."""
        e = job.entry
        info = self._load(e)
        job.inode.verity = info
        log.info("verity enabled on %s: %s", e.path, e.digest_text)
        return info

    @staticmethod
    def finish(job: EnableJob):
        """Always, after commit or failure."""
        job.inode.enabling = False
        if job.fd >= 0:
            os.close(job.fd)
            job.fd = -1
