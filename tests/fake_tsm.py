"""A fake TDX measurement directory, mounted with FUSE, that behaves like the kernel's.

    python tests/fake_tsm.py MOUNTPOINT

serves rtmr0:sha384 ... rtmr3:sha384 as in Documentation/ABI/testing/
sysfs-devices-virtual-misc-tdx_guest: a read returns the register's 48 bytes; a write of
exactly 48 bytes at offset 0 extends it (new = SHA-384(old || data)); any other write is
EINVAL.  Registers start at zero.  Only tests use it (VERITYFUSE_TSM_MEASUREMENTS points the
rtmr backend here); nothing here can run real TDX.
"""

import errno
import hashlib
import os
import stat
import sys

import pyfuse3
import trio

NAMES = [f"rtmr{i}:sha384".encode() for i in range(4)]


class FakeTsm(pyfuse3.Operations):
    def __init__(self):
        super().__init__()
        self.values = [bytes(48) for _ in NAMES]

    def _attr(self, ino):
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        if ino == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
        else:
            a.st_mode = stat.S_IFREG | 0o600
            a.st_nlink = 1
            a.st_size = 4096  # as sysfs: a size that says nothing
        a.attr_timeout = a.entry_timeout = 0
        return a

    def _index(self, ino):
        i = ino - pyfuse3.ROOT_INODE - 1
        if not 0 <= i < len(NAMES):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return i

    async def getattr(self, ino, ctx=None):
        if ino != pyfuse3.ROOT_INODE:
            self._index(ino)
        return self._attr(ino)

    async def lookup(self, parent, name, ctx=None):
        if parent != pyfuse3.ROOT_INODE or name not in NAMES:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(pyfuse3.ROOT_INODE + 1 + NAMES.index(name))

    async def opendir(self, ino, ctx):
        return ino

    async def readdir(self, fh, start, token):
        for i in range(start, len(NAMES)):
            ino = pyfuse3.ROOT_INODE + 1 + i
            if not pyfuse3.readdir_reply(token, NAMES[i], self._attr(ino), i + 1):
                break

    async def open(self, ino, flags, ctx):
        self._index(ino)
        return pyfuse3.FileInfo(fh=ino, direct_io=True)  # every read and write reaches us

    async def read(self, fh, off, size):
        return self.values[self._index(fh)][off:off + size]

    async def write(self, fh, off, buf):
        i = self._index(fh)
        if off != 0 or len(buf) != 48:
            raise pyfuse3.FUSEError(errno.EINVAL)
        self.values[i] = hashlib.sha384(self.values[i] + buf).digest()
        return len(buf)

    async def setattr(self, ino, attr, fields, fh, ctx):  # O_TRUNC on open for writing
        return self._attr(ino)


def main(mountpoint):
    ops = FakeTsm()
    pyfuse3.init(ops, mountpoint, {"fsname=faketsm", "default_permissions"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    os.umask(0o022)
    main(sys.argv[1])
