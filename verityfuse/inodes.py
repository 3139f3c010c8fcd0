"""Local mode's inode table: backing identity, stable numbers, a bounded number of fds.

As in libfuse's passthrough_hp, an inode is what the kernel remembers by
lookup count, identified by the backing inode, never by a path.  Three
choices make it a kernel-like filesystem at any tree size:

- **Identity** is (st_dev, file handle) (identity.py): the handle carries the
  inode's generation, so a deleted inode whose number is reused is a different
  file, even while the kernel still remembers the old one.
- **Inode numbers** are the backing ones: the FUSE node id (which pyfuse3
  also reports as st_ino) is the backing st_ino, stable across the kernel
  forgetting and looking up again, as tar, rsync -H and git expect.  Only when
  that number is taken (the root is 1; another filesystem under SOURCE, or a
  reused number still remembered) does an inode get a synthetic one, from 2^63 up.
- **File descriptors** are bounded: O_PATH fds live in an LRU of ``max_fds``;
  an evicted inode is reopened by handle (open_by_handle_at).  Without
  CAP_DAC_READ_SEARCH, or on a filesystem without handles, fds stay pinned
  (one per remembered inode, as before) and the daemon says so at start.
"""

from __future__ import annotations

import errno
import os
import resource
import stat
from collections import OrderedDict
from typing import Any, Callable, Dict, Optional, Set, Tuple, Union

from . import identity

# Verity state of an inode: UNKNOWN until first needed, then NOT_VERITY, a
# VerityInfo, or the exception that made its metadata unusable.
UNKNOWN = "unknown"
NOT_VERITY = None
ROOT_INO = 1
SYNTHETIC = 1 << 63
_O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


# Descriptors the daemon keeps for itself whatever its clients do: /dev/fuse, its
# log, the store's root and the directories an open walks, worker threads, ...
FD_RESERVE = 64


def default_max_fds() -> int:
    """A fixed share of the fd limit (which the daemon raises to its hard limit)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, min(1024, soft // 8))


def handle_limits(per_uid: Optional[int] = None, max_fds: Optional[int] = None) -> Tuple[int, int]:
    """(open handles in all, open handles per uid) the fd limit affords.

    A handle costs at most two fds (its backing file, and its tree object while no
    other handle of that digest shares it); the inode LRU's ``max_fds`` and
    ``FD_RESERVE`` are kept out of reach of handles, so the daemon's own work never
    runs out.  One uid gets a quarter of the total by default."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    total = max(8, (soft - (max_fds or default_max_fds()) - FD_RESERVE) // 2)
    return total, per_uid or max(4, total // 4)


class Inode:
    __slots__ = ("ino", "key", "handle", "dev", "mode", "lookups", "handles", "verity",
                 "enabling", "files", "_fd", "table")

    def __init__(self, table: "InodeTable", ino: int, key, handle, st: os.stat_result):
        self.table, self.ino, self.key, self.handle = table, ino, key, handle
        self.dev = st.st_dev
        self.mode = st.st_mode
        self._fd = -1
        self.lookups = 0
        self.handles = 0   # open file and directory handles
        # UNKNOWN, NOT_VERITY, a view.VerityInfo, or the VerityError that made it unusable
        self.verity: Any = UNKNOWN
        self.enabling = False  # an FS_IOC_ENABLE_VERITY build is running
        # Its open view.FileHandles: a set only while it has some.  An empty set per
        # inode the kernel remembers was 216 bytes and one more object for every full
        # garbage collection to walk (a stall of every request, growing with them).
        self.files: Union[Set[Any], Tuple[()]] = ()

    def add_file(self, fh) -> None:
        if isinstance(self.files, set):
            self.files.add(fh)
        else:
            self.files = {fh}

    def drop_file(self, fh) -> None:
        if isinstance(self.files, set):
            self.files.discard(fh)
            if not self.files:
                self.files = ()

    @property
    def fd(self) -> int:
        """An O_PATH fd of the backing inode (reopened if it was evicted)."""
        return self.table.fd_of(self)

    @property
    def proc_path(self) -> str:
        """A path that reopens this inode (the O_PATH fd's /proc magic link)."""
        return f"/proc/self/fd/{self.fd}"

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def store_key(self) -> Optional[str]:
        """The store index's name for this inode (None without a file handle, or on a
        filesystem whose handles do not last: identity.NoLastingHandles)."""
        if self.handle is None:
            return None
        return self.table.store_key(self)

    def __repr__(self):
        return f"<Inode {self.ino} lookups={self.lookups} handles={self.handles}>"


class InodeTable:
    """FUSE node ids <-> Inodes.  The root is ``ROOT_INO``; its fd is never closed."""

    def __init__(self, root_fd: int, max_fds: Optional[int] = None):
        st = os.fstat(root_fd)
        self.max_fds = max_fds or default_max_fds()
        self.by_ino: Dict[int, Inode] = {}
        self.by_key: Dict[tuple, Inode] = {}
        self.lru: "OrderedDict[Inode, None]" = OrderedDict()
        # Where handles resolve, per filesystem (open_by_handle_at refuses O_PATH fds).
        self.mount_fds: Dict[int, int] = {}
        self._add_mount(st.st_dev, root_fd)
        self.reopen = identity.can_reopen(self.mount_fds[st.st_dev])
        self.keys = identity.Keys(lasting=True)  # verity stays with the inode: keys that last
        self._next_synthetic = SYNTHETIC
        # Called with an inode before its O_PATH fd is closed (fast_opens.NativeOpens.drop).
        self.closing: Optional[Callable[[Inode], None]] = None
        self.root = self._new(ROOT_INO, root_fd, st)
        self.root.lookups = 1  # never forgotten (and its fd is pinned: see _cache)

    # -- identity ---------------------------------------------------------------------

    def _identify(self, fd: int, st: os.stat_result) -> Tuple[tuple, Optional[tuple]]:
        try:
            handle = identity.handle_of(fd)
            return (st.st_dev, handle), handle
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EOVERFLOW, errno.ENOSYS):
                raise
            return (st.st_dev, st.st_ino), None  # no handle: this inode's fd stays pinned

    def _add_mount(self, dev: int, dir_fd: int):
        self.mount_fds[dev] = os.open(f"/proc/self/fd/{dir_fd}",
                                      os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def store_key(self, inode: Inode) -> Optional[str]:
        try:
            return self.keys.of(inode.fd, inode.dev, inode.handle)
        except identity.NoLastingHandles:
            return None  # no key that lasts, so no local verity here (enable: EOPNOTSUPP)

    def _node_id(self, st: os.stat_result) -> int:
        n = st.st_ino
        if n <= ROOT_INO or n >= SYNTHETIC or n in self.by_ino:
            n = self._next_synthetic
            self._next_synthetic += 1
        return n

    def _new(self, ino: int, fd: int, st: os.stat_result, ident=None) -> Inode:
        """``ident``: what ``_identify`` said of ``fd`` (asked here if not given)."""
        key, handle = ident or self._identify(fd, st)
        inode = Inode(self, ino, key, handle, st)
        self.by_ino[ino] = inode
        self.by_key[key] = inode
        self._cache(inode, fd)
        return inode

    # -- lookups ------------------------------------------------------------------------

    def __getitem__(self, ino: int) -> Inode:
        try:
            return self.by_ino[ino]
        except KeyError:
            raise OSError(errno.ESTALE, f"no inode {ino}") from None

    def lookup(self, parent: Inode, name: bytes) -> Tuple[Inode, os.stat_result]:
        """Look ``name`` up under ``parent`` and count one kernel lookup."""
        fd = os.open(name, _O_PATH, dir_fd=parent.fd)
        try:
            st = os.fstat(fd)
            ident = self._identify(fd, st)  # one name_to_handle_at per lookup
        except BaseException:
            os.close(fd)
            raise
        if st.st_dev not in self.mount_fds and stat.S_ISDIR(st.st_mode):
            self._add_mount(st.st_dev, fd)
        inode = self.by_key.get(ident[0])
        if inode is None:
            inode = self._new(self._node_id(st), fd, st, ident)
        elif inode._fd < 0:
            self._cache(inode, fd)  # saves a reopen
        else:
            os.close(fd)
        inode.mode = st.st_mode
        inode.lookups += 1
        return inode, st

    # -- the fd LRU -----------------------------------------------------------------------

    def fd_of(self, inode: Inode) -> int:
        if inode._fd >= 0:
            if inode in self.lru:
                self.lru.move_to_end(inode)
            return inode._fd
        if inode.handle is None or inode.ino not in self.by_ino:
            raise OSError(errno.ESTALE, "inode is gone")
        fd = identity.open_by_handle(self.mount_fds[inode.dev], inode.handle, os.O_PATH)
        self._cache(inode, fd)
        return fd

    def _cache(self, inode: Inode, fd: int):
        inode._fd = fd
        if (inode.handle is None or not self.reopen or inode.ino == ROOT_INO
                or inode.dev not in self.mount_fds):
            return  # pinned: it could not be reopened
        self.lru[inode] = None
        while len(self.lru) > self.max_fds:
            old, _ = self.lru.popitem(last=False)
            self._close_fd(old)

    def _close_fd(self, inode: Inode):
        """The one place an inode's O_PATH fd is closed: ``closing`` is told first."""
        if self.closing is not None:
            self.closing(inode)
        os.close(inode._fd)
        inode._fd = -1

    # -- forgetting -----------------------------------------------------------------------

    def forget(self, ino: int, n: int):
        inode = self.by_ino.get(ino)
        if inode is None or inode is self.root:
            return
        inode.lookups -= n
        self.maybe_drop(inode)

    def maybe_drop(self, inode: Inode):
        """Drop an inode nobody refers to any more: no lookups, no open handles."""
        if inode.lookups > 0 or inode.handles > 0 or inode is self.root:
            return
        if self.by_ino.get(inode.ino) is inode:
            del self.by_ino[inode.ino]
        if self.by_key.get(inode.key) is inode:
            del self.by_key[inode.key]
        self.lru.pop(inode, None)
        if inode._fd >= 0:
            self._close_fd(inode)

    def outstanding(self) -> int:
        """Inodes (other than the root) the kernel still holds lookups on."""
        return sum(1 for i in self.by_ino.values() if i is not self.root and i.lookups > 0)

    def close_all(self):
        for inode in list(self.by_ino.values()):
            if inode is not self.root:
                inode.lookups = inode.handles = 0
                self.maybe_drop(inode)
        for fd in self.mount_fds.values():
            os.close(fd)
        self.mount_fds.clear()
        self._close_fd(self.root)
