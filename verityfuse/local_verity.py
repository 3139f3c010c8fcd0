"""Verity state of backing inodes in local mode, and enabling it (no pyfuse3/trio).

Verity belongs to the inode, as on ext4: the store indexes inodes by identity
(filesystem and file handle), so hard links, renames through the mount or
directly in SOURCE, and renames during an enable all keep it, and nothing is
walked.  An inode's state is resolved once and kept on the inode.  Enabling
runs in steps so the daemon can build off its request loop: ``check`` (every
rule of fs/verity/enable.c, in its order; marks the inode busy), ``build``
(in a worker thread, on a dup of the caller's fd: the same inode whatever
happens to its names), ``commit``, and always ``finish``.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any, Callable, Optional

from . import ioctl as vioctl
from . import identity, merkle, uapi
from .errors import Errno, StoreCorrupt, VerityError
from .inodes import NOT_VERITY, UNKNOWN, Inode
from .logs import escape
from .logs import requests as ratelog
from .store import IndexEntry, Store
from .view import VerityInfo


class EnableJob:
    """One FS_IOC_ENABLE_VERITY (or FUSE_FSVERITY ENABLE) in flight."""

    def __init__(self, inode: Inode, fd: int, label: str, params: merkle.Params, signature: bytes):
        self.inode, self.fd, self.rel = inode, fd, label
        self.params, self.signature = params, signature
        self.entry: Optional[IndexEntry] = None


class LocalVerity:
    def __init__(self, store: Store, label: Callable, trust_certs=(), require_signatures=False):
        self.store = store
        self.label = label  # inode -> a name for messages
        self.trust_certs = list(trust_certs)
        self.require_signatures = require_signatures

    # -- state --------------------------------------------------------------------

    def info(self, inode: Inode) -> Optional[VerityInfo]:
        """The inode's verity state, loaded on first use; None if it has none.

        Raises the error that makes its metadata unusable (every open then
        fails with it, as on ext4 with a corrupt descriptor).
        """
        v: Any = inode.verity
        if v is UNKNOWN:
            v = NOT_VERITY
            if inode.is_reg:
                try:
                    key = inode.store_key
                    entry = self.store.get_entry(key) if key else None
                    if entry is not None:
                        v = self._load(entry)
                except StoreCorrupt as e:  # every open fails with it: name the file too
                    v = StoreCorrupt(f"{self.label(inode)}: {e}")
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

    def tree(self, info: VerityInfo, label: str):
        """The tree object of ``info``; a corrupt one names the file ``label`` too."""
        try:
            return self.store.open_object(info.alg, info.digest)
        except StoreCorrupt as e:
            raise StoreCorrupt(f"{label}: {e}") from None

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

    def dropped(self, fd: int):
        """The inode behind O_PATH ``fd`` lost its last name: forget its entry."""
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 0:
                self.store.remove_entry(identity.key_of(fd))
        except OSError:
            pass  # no handle, no entry; a stale entry is harmless (never matches)

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
        if flags & (uapi.FS_APPEND_FL | uapi.FS_IMMUTABLE_FL):
            raise Errno(errno.EPERM, "append-only or immutable")
        if read_only:
            raise Errno(errno.EROFS, "read-only mount")
        if any(f.writable for f in inode.files):
            raise Errno(errno.ETXTBSY, "open for writing")
        if self.is_verity(inode):
            raise Errno(errno.EEXIST, "already a verity file")
        params = vioctl.enable_params(arg)                       # EINVAL
        if inode.enabling:
            raise Errno(errno.EBUSY, "enable already running")
        if inode.store_key is None:
            raise Errno(errno.EOPNOTSUPP, "the backing filesystem has no file handles to "
                                          "keep verity with the inode")
        inode.enabling = True
        return EnableJob(inode, os.dup(fd), self.label(inode), params, arg.signature)

    def build(self, job: EnableJob, cancel=None) -> IndexEntry:
        """Build and store the tree (any thread); a signature that does not verify
        commits nothing."""
        from .sealing import seal_fd

        job.entry = seal_fd(self.store, job.fd, job.rel, job.params, job.signature, cancel=cancel,
                            check=lambda d: self.check_signature(job.signature, d.params.alg,
                                                                 d.digest))
        return job.entry

    def commit(self, job: EnableJob) -> VerityInfo:
        """The inode is verity from now on."""
        e = job.entry
        if e is None:
            raise RuntimeError("commit before build")
        info = self._load(e)
        job.inode.verity = info
        ratelog.info(None, f"verity enabled on {escape(job.rel)}: {e.digest_text}")
        return info

    @staticmethod
    def finish(job: EnableJob):
        """Always, after commit or failure."""
        job.inode.enabling = False
        if job.fd >= 0:
            os.close(job.fd)
            job.fd = -1
