"""Baseline for the benchmark: an *unverified* read-only pyfuse3 passthrough.

Written here after the design of pyfuse3's examples/passthroughfs.py (paths
keyed by inode number, reads done with pread on the event loop), so that the
benchmark compares verityfuse against what a plain pyfuse3 daemon costs.
Only what the benchmark needs: lookup, getattr, readdir, open, read, release.

    python plain_passthrough.py SOURCE MOUNTPOINT
"""

import errno
import os
import sys

import pyfuse3
import trio


class Plain(pyfuse3.Operations):
    def __init__(self, source):
        super().__init__()
        self.paths = {pyfuse3.ROOT_INODE: source}
        self.fds = {}

    def _attrs(self, path):
        st = os.lstat(path)
        a = pyfuse3.EntryAttributes()
        for f in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime_ns",
                  "st_mtime_ns", "st_ctime_ns"):
            setattr(a, f, getattr(st, f))
        a.st_ino = st.st_ino
        a.entry_timeout = a.attr_timeout = 1
        self.paths[st.st_ino] = path
        return a

    async def lookup(self, parent, name, ctx):
        try:
            return self._attrs(os.path.join(self.paths[parent], os.fsdecode(name)))
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None

    async def getattr(self, inode, ctx):
        return self._attrs(self.paths[inode])

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, inode, start, token):
        names = sorted(os.listdir(self.paths[inode]))
        for i, n in enumerate(names[start:], start):
            if not pyfuse3.readdir_reply(token, os.fsencode(n),
                                         self._attrs(os.path.join(self.paths[inode], n)), i + 1):
                break

    async def open(self, inode, flags, ctx):
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        fd = os.open(self.paths[inode], os.O_RDONLY)
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    async def read(self, fd, off, size):
        return os.pread(fd, size, off)

    async def release(self, fd):
        os.close(fd)


def main():
    source, mnt = sys.argv[1:3]
    pyfuse3.init(Plain(os.path.realpath(source)), mnt, {"fsname=plainpassthrough", "ro"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
