"""A FUSE file system whose files read shorter than their size says, or answer one
operation with an errno of its choosing, for tests: a hostile host's share.

    python tests/short_read_fs.py MOUNTPOINT NAME=SIZE:LENGTH[:OP:ERRNO] ...

serves one directory of regular files: NAME's getattr says SIZE bytes (cached by the
kernel for a minute), and its reads return the first LENGTH bytes of
``conftest.pattern`` -- so a reader that trusts the size over what it read is caught
(a network or FUSE source can answer like this; so can a file truncated between a
stat and a read).  With OP (getattr, open, read or fsync), that request of NAME is answered
ERRNO instead, and NAME's attributes are not cached (every fstat of it asks again).
direct_io: every read reaches here, as asked; OP cachedread fails reads as read does,
through the page cache (no direct_io: the file can be mapped).  OP rewrite (ERRNO 0)
reads as asked but moves NAME's mtime on at every read: a file written while it is
read.  OP chunk (ERRNO: a count) answers every read of NAME with at most that many
bytes, all of them there: a source that reads short before the end, as a network or
FUSE file system may.  Only tests use it.
"""

import errno
import os
import stat
import sys

import pyfuse3
import trio

from conftest import pattern


class ShortReads(pyfuse3.Operations):
    def __init__(self, files):
        super().__init__()
        self.names = [f[0] for f in files]
        self.sizes = [f[1] for f in files]
        self.data = [pattern(f[2]) for f in files]
        self.fails = [f[3] for f in files]  # (op, errno) or None
        self.reads = [0] * len(files)  # op rewrite: NAME's mtime is its count of reads

    def _fail(self, ino, op):
        if ino != pyfuse3.ROOT_INODE and self.fails[self._index(ino)] is not None:
            what, err = self.fails[self._index(ino)]
            if what == op:
                raise pyfuse3.FUSEError(err)

    def _index(self, ino):
        i = ino - pyfuse3.ROOT_INODE - 1
        if not 0 <= i < len(self.names):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return i

    def _attr(self, ino):
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        if ino == pyfuse3.ROOT_INODE:
            a.st_mode, a.st_nlink = stat.S_IFDIR | 0o755, 2
        else:
            a.st_mode, a.st_nlink = stat.S_IFREG | 0o644, 1
            a.st_size = self.sizes[self._index(ino)]
            a.st_blocks = -(-a.st_size // 512)  # not sparse: a mapping of it may be tried
            a.st_mtime_ns = a.st_ctime_ns = self.reads[self._index(ino)] * 10**9
        a.attr_timeout = a.entry_timeout = 60  # the size said stays what the kernel knows
        if ino != pyfuse3.ROOT_INODE and self.fails[self._index(ino)] is not None:
            a.attr_timeout = 0
        return a

    async def getattr(self, ino, ctx=None):
        self._fail(ino, "getattr")
        return self._attr(ino)

    async def lookup(self, parent, name, ctx=None):
        if parent != pyfuse3.ROOT_INODE or name not in self.names:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(pyfuse3.ROOT_INODE + 1 + self.names.index(name))

    async def opendir(self, ino, ctx):
        return ino

    async def readdir(self, fh, start, token):
        for i in range(start, len(self.names)):
            if not pyfuse3.readdir_reply(token, self.names[i],
                                         self._attr(pyfuse3.ROOT_INODE + 1 + i), i + 1):
                break

    async def open(self, ino, flags, ctx):
        self._fail(ino, "open")
        fail = self.fails[self._index(ino)]
        return pyfuse3.FileInfo(fh=ino, direct_io=fail is None or fail[0] != "cachedread")

    async def read(self, fh, off, size):
        self._fail(fh, "read")
        self._fail(fh, "cachedread")
        fail = self.fails[self._index(fh)]
        if fail == ("rewrite", 0):
            self.reads[self._index(fh)] += 1
        if fail is not None and fail[0] == "chunk":
            size = min(size, fail[1])
        return self.data[self._index(fh)][off:off + size]

    async def fsync(self, fh, datasync):
        self._fail(fh, "fsync")

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s


def main(mountpoint, specs):
    files = []
    for spec in specs:
        name, _, sizes = spec.partition("=")
        size, length, *fail = sizes.split(":")
        files.append((os.fsencode(name), int(size), int(length),
                      (fail[0], int(fail[1])) if fail else None))
    pyfuse3.init(ShortReads(files), mountpoint, {"fsname=shortreads", "ro"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
