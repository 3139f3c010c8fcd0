"""Baseline for the benchmark: an *unverified* read-only pyfuse3 passthrough.

Written after the design of pyfuse3's examples/passthroughfs.py (paths keyed
by inode number), and configured exactly as verityfuse configures its own
mount, so that a ratio between the two measures verification and nothing else:

- the same mount options: ``default_permissions`` (pyfuse3's default, which
  verityfuse always passes), ``ro`` (the bench mounts verityfuse ``-o ro``;
  manifest mode is ``ro`` anyway), an ``fsname`` and a ``subtype``;
- the same FUSE_INIT negotiation: the same pyfuse3 and libfuse (so the same
  max_read / max_pages = 256, max_background), no writeback cache, and
  FUSE_POSIX_ACL on, as in verityfuse's local mode (``--no-acl`` turns it off,
  as in manifest mode);
- the same readahead: 1024 KiB written to /sys/class/bdi/<dev>/read_ahead_kb
  right after FUSE_INIT, by the same function (verityfuse.daemon.set_readahead)
  at the same moment, so the kernel sends 1 MiB reads to both;
- the same page-cache policy: keep_cache on open, direct_io off, and the same
  1 s entry and attribute timeouts as local mode;
- the same read path as verityfuse's verified reads when the backing file is in
  memory (tmpfs, as in the bench): every read answered on the trio thread with
  one preadv into a reused buffer, returned as a memoryview (no allocation per
  request); ``--thread-reads`` hands reads over 16 KiB to a worker thread
  instead (trio.to_thread, 4 at a time), as verityfuse does when the data would
  wait for a disk, and for files without verity;
- the same request loop: pyfuse3's, its workers taking turns at /dev/fuse with
  verityfuse.fuse_loop's lock (which saves a scheduler pass a request), so that
  the loop's cost is no part of the ratio;
- the same dispatch of lookups: answered through verityfuse's FUSE shim as a plain
  call (verityfuse.fast_lookups, ~10 us a lookup less than pyfuse3's coroutines),
  where the shim is built, as verityfuse answers its own (``--no-fast-lookup``:
  through pyfuse3's coroutines, as verityfuse with VERITYFUSE_NO_FAST_LOOKUP=1).

The reused buffer is page-aligned (mmap).  On this machine the kernel's copy
into a buffer 8 or 16 bytes past a page boundary (where a 1 MiB bytearray's
data starts) costs 3-4x as much as into an aligned one (~600 vs ~150 us per
MiB; bench/hashspeed.py table 3 measures it); the baseline does not pay that.

Only what the benchmark needs: lookup, getattr, readdir, open, read, release,
getxattr/listxattr (the kernel asks for POSIX ACLs).

    python plain_passthrough.py SOURCE MOUNTPOINT [--readahead-kb 1024]
                                [--thread-reads] [--no-acl] [--no-fast-lookup]
                                [--stats FILE]

``--stats FILE`` writes a JSON histogram of the read request sizes at exit
(to check what the kernel sends; off in timed runs).
"""

import argparse
import collections
import errno
import json
import mmap
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from verityfuse import fuseshim  # noqa: E402

SHIM, _ = fuseshim.load()  # before pyfuse3, as verityfuse.daemon: it hooks libfuse

import pyfuse3  # noqa: E402
import trio  # noqa: E402

from verityfuse import fuse_loop  # noqa: E402
from verityfuse.daemon import set_readahead  # noqa: E402
from verityfuse.fast_lookups import NativeLookups  # noqa: E402
from verityfuse.view import Attr  # noqa: E402

INLINE_READ = 16 * 1024  # as verityfuse.ops_read.INLINE_READ
TIMEOUT = 1.0            # as local mode's entry/attr timeout


class Plain(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, source, thread_reads=False, acl=True, stats=None):
        super().__init__()
        self.enable_acl = acl
        self.paths = {pyfuse3.ROOT_INODE: source}
        self.thread_reads = thread_reads
        self._buf = mmap.mmap(-1, 1 << 20)  # reused by inline reads; page-aligned
        self.limiter = trio.CapacityLimiter(4)  # as verityfuse.ops.VerityOperations
        self.stats = stats
        self.initialized = False

    def init(self):
        self.initialized = True

    def _attrs(self, path):
        st = os.lstat(path)
        a = pyfuse3.EntryAttributes()
        for f in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size", "st_blksize",
                  "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(a, f, getattr(st, f))
        a.st_ino = st.st_ino
        a.entry_timeout = a.attr_timeout = TIMEOUT
        self.paths[st.st_ino] = path
        return a

    def _path(self, inode):
        try:
            return self.paths[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    async def lookup(self, parent, name, ctx):
        try:
            return self._attrs(os.path.join(self._path(parent), os.fsdecode(name)))
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None

    async def getattr(self, inode, ctx):
        return self._attrs(self._path(inode))

    async def getxattr(self, inode, name, ctx):
        try:
            return os.getxattr(self._path(inode), name, follow_symlinks=False)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None

    async def listxattr(self, inode, ctx):
        try:
            return [os.fsencode(n) for n in os.listxattr(self._path(inode), follow_symlinks=False)]
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, inode, start, token):
        names = sorted(os.listdir(self._path(inode)))
        for i, n in enumerate(names[start:], start):
            if not pyfuse3.readdir_reply(token, os.fsencode(n),
                                         self._attrs(os.path.join(self._path(inode), n)), i + 1):
                break

    async def open(self, inode, flags, ctx):
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        try:
            fd = os.open(self._path(inode), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        return pyfuse3.FileInfo(fh=fd, keep_cache=True, direct_io=False)

    async def read(self, fd, off, size):
        if self.stats is not None:
            self.stats[size] += 1
        if self.thread_reads and size > INLINE_READ:
            return await trio.to_thread.run_sync(os.pread, fd, size, off, limiter=self.limiter)
        if len(self._buf) < size:
            # Never resized in place: a reply may still hold a view of the old one.
            self._buf = mmap.mmap(-1, -(-size // mmap.PAGESIZE) * mmap.PAGESIZE)
        mv = memoryview(self._buf)[:size]
        return mv[:os.preadv(fd, [mv], off)]

    async def release(self, fd):
        os.close(fd)


class SyncLookups:
    """The lookup as a plain call, for the shim's hook (verityfuse.fast_lookups)."""

    def __init__(self, ops):
        self.ops = ops

    def lookup(self, parent, name, ctx=None):
        base = self.ops.paths.get(parent)
        if base is None:
            raise OSError(errno.ESTALE, "unknown inode")
        path = os.path.join(base, os.fsdecode(name))
        st = os.lstat(path)
        self.ops.paths[st.st_ino] = path
        return Attr.from_stat(st.st_ino, st, TIMEOUT)

    def unlookup(self, ino):
        pass  # lookups are not counted here: paths are never forgotten


async def serve(ops, mountpoint, readahead_kb):
    async with trio.open_nursery() as nursery:
        async def after_init():
            # As verityfuse.daemon._serve: libfuse has written the INIT reply
            # (whose max_readahead the kernel applies over the bdi setting)
            # once ops.init() has run on this thread.
            while not ops.initialized:
                await trio.sleep(0.01)
            set_readahead(mountpoint, readahead_kb)

        nursery.start_soon(after_init)
        fuse_loop.install(pyfuse3)  # as verityfuse.daemon._serve
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main():
    ap = argparse.ArgumentParser(description="unverified pyfuse3 passthrough (bench baseline)")
    ap.add_argument("source")
    ap.add_argument("mountpoint")
    ap.add_argument("--readahead-kb", type=int, default=1024)
    ap.add_argument("--thread-reads", action="store_true")
    ap.add_argument("--no-acl", action="store_true")
    ap.add_argument("--no-fast-lookup", action="store_true")
    ap.add_argument("--stats", metavar="FILE")
    args = ap.parse_args()
    stats = collections.Counter() if args.stats else None
    source = os.path.realpath(args.source)
    mountpoint = os.path.realpath(args.mountpoint)
    ops = Plain(source, thread_reads=args.thread_reads, acl=not args.no_acl, stats=stats)
    options = set(pyfuse3.default_options) | {f"fsname={source}", "subtype=plainpassthrough",
                                              "ro"}
    pyfuse3.init(ops, mountpoint, options)
    if SHIM is not None and not args.no_fast_lookup:
        NativeLookups.load(SHIM, SyncLookups(ops),
                           lambda e: getattr(e, "errno", None) or errno.EIO)
    try:
        trio.run(serve, ops, mountpoint, args.readahead_kb)
    finally:
        pyfuse3.close(unmount=True)
        if stats is not None:
            with open(args.stats, "w") as f:
                json.dump({str(k): v for k, v in sorted(stats.items())}, f)


if __name__ == "__main__":
    main()
