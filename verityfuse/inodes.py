"""Inode table: identity by (st_dev, st_ino), one O_PATH fd each, lookup counts.

As in libfuse's passthrough_hp: an inode is what the kernel remembers by
lookup count; it holds an O_PATH fd to the backing inode, so renames on either
side never confuse it with another file, and the backing inode number cannot
be reused while we know it.  Verity state belongs here, to the inode, so
every hard link and every name after a rename sees the same state.
"""

from __future__ import annotations

import os
import stat
from typing import Dict, Tuple

# Verity state of an inode: UNKNOWN until first needed, then NOT_VERITY, a
# verity state object, or the exception that made its metadata unusable.
UNKNOWN = "unknown"
NOT_VERITY = None


class Inode:
    __slots__ = ("ino", "fd", "key", "mode", "lookups", "handles", "writers", "verity",
                 "enabling", "files")

    def __init__(self, ino: int, fd: int, st: os.stat_result):
        self.ino = ino
        self.fd = fd  # O_PATH
        self.key = (st.st_dev, st.st_ino)
        self.mode = st.st_mode
        self.lookups = 0
        self.handles = 0   # open file handles
        self.writers = 0   # of which open for writing
        self.verity = UNKNOWN
        self.enabling = False  # an FS_IOC_ENABLE_VERITY build is running
        self.files = set()     # its open FileHandles

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def proc_path(self) -> str:
        """A path that reopens this inode (the O_PATH fd's /proc magic link)."""
        return f"/proc/self/fd/{self.fd}"

    def __repr__(self):
        return f"<Inode {self.ino} dev/ino={self.key} lookups={self.lookups} handles={self.handles}>"


class InodeTable:
    """FUSE inode numbers <-> Inodes.  The root has number ``root_ino``."""

    def __init__(self, root_fd: int, root_ino: int, on_drop=None):
        st = os.stat(root_fd)
        self.root = Inode(root_ino, root_fd, st)
        self.root.lookups = 1  # never forgotten
        self.by_ino: Dict[int, Inode] = {root_ino: self.root}
        self.by_key: Dict[Tuple[int, int], Inode] = {self.root.key: self.root}
        self._next = root_ino + 1
        self.on_drop = on_drop  # called with an inode when it is dropped

    def __getitem__(self, ino: int) -> Inode:
        return self.by_ino[ino]

    def remember(self, fd: int, st: os.stat_result) -> Inode:
        """Count one lookup of the backing inode open as O_PATH ``fd``.

        Takes ownership of ``fd``: closed if the inode was already known.
        """
        key = (st.st_dev, st.st_ino)
        inode = self.by_key.get(key)
        if inode is not None:
            os.close(fd)
        else:
            inode = Inode(self._next, fd, st)
            self._next += 1
            self.by_ino[inode.ino] = inode
            self.by_key[key] = inode
        inode.lookups += 1
        return inode

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
        del self.by_ino[inode.ino]
        del self.by_key[inode.key]
        if self.on_drop:
            self.on_drop(inode)
        os.close(inode.fd)
        inode.fd = -1

    def outstanding(self) -> int:
        """Inodes (other than the root) the kernel still holds lookups on."""
        return sum(1 for i in self.by_ino.values() if i is not self.root and i.lookups > 0)

    def close_all(self):
        for inode in list(self.by_ino.values()):
            if inode is not self.root:
                inode.lookups = inode.handles = 0
                self.maybe_drop(inode)
        os.close(self.root.fd)
