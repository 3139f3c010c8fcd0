"""Directories of the local view: opened on the backing directory and listed from it in
place (no pyfuse3, no trio).

A listing is read from the backing directory as the kernel asks for it (dirstream.py): the
offsets are the backing filesystem's cookies, and a handle holds no copy of the listing
however big the directory is.  Every name listed is looked up (the kernel counts it), except
``.`` and ``..``, which the kernel links to nothing; ``..`` of the root is the root (never
above SOURCE).  The store, when it lives inside SOURCE, is never listed.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator, Optional, Tuple

from .dirstream import DirStream
from .inodes import ROOT_INO, Inode, InodeTable
from .view import Attr, DirHandle

_O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


class LocalDirs:
    """The directory requests of a ``LocalView``, which binds them as its own.

    ``hidden``: the store's (parent identity, name) when it lives inside SOURCE;
    ``lookup(parent, name)``: the view's lookup (name checks, one counted kernel lookup);
    ``open_backing(path, flags)``: the view's open of a backing file (its noatime rule).
    """

    def __init__(self, inodes: InodeTable, timeout: float, hidden: Optional[Tuple[object, bytes]],
                 lookup: Callable[[Inode, bytes], Attr],
                 open_backing: Callable[[str, int], int]):
        self.inodes, self.timeout, self.hidden = inodes, timeout, hidden
        self.lookup, self.open_backing = lookup, open_backing

    def opendir(self, ino: int, ctx=None) -> DirHandle:
        i = self.inodes[ino]
        fd = self.open_backing(i.proc_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        i.handles += 1
        return DirHandle(i, fd)

    def _dots(self, dh: DirHandle) -> Iterator[Tuple[bytes, Attr]]:
        """``.`` and ``..``, not counted as lookups (the kernel links neither)."""
        d = dh.node
        yield b".", Attr.from_stat(d.ino, os.stat(d.fd), self.timeout)
        if d.ino == ROOT_INO:  # never above SOURCE
            yield b"..", Attr.from_stat(ROOT_INO, os.stat(d.fd), self.timeout)
            return
        pfd = os.open("..", _O_PATH, dir_fd=dh.fd)
        try:
            st = os.fstat(pfd)
            known = self.inodes.by_key.get(self.inodes._identify(pfd, st)[0])
        finally:
            os.close(pfd)
        yield b"..", Attr.from_stat(known.ino if known else st.st_ino, st, self.timeout)

    def readdir(self, dh: DirHandle, start: int):
        """(name, Attr, next offset) from ``start``, read from the backing directory in
        place: the offsets are its cookies."""
        if dh.stream is None:
            dh.stream = DirStream(dh.fd)
        stream = dh.stream
        stream.seek(start)
        hidden = self.hidden[1] if self.hidden and dh.node.key == self.hidden[0] else None
        dots = None
        for name, off in stream.entries():
            if name in (b".", b".."):
                dots = dots or dict(self._dots(dh))
                attr = dots[name]
            elif name == hidden:
                stream.pos = off
                continue
            else:
                try:
                    attr = self.lookup(dh.node, name)
                except FileNotFoundError:
                    stream.pos = off
                    continue  # removed since it was read
            yield name, attr, off
            stream.pos = off  # delivered: the next listing goes on from here

    def releasedir(self, dh: DirHandle):
        dh.close()
        dh.node.handles -= 1
        self.inodes.maybe_drop(dh.node)
