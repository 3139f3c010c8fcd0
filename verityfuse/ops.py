"""pyfuse3 request handlers: a thin adapter from pyfuse3 to a view (see view.py).

Every handler runs behind one error boundary (ops_boundary): core errors
become their errno, OSError its errno, anything unexpected is logged (one
line, rate-limited) and answered EIO.  Nothing escapes: in pyfuse3 an
exception ends the daemon.

Caveats (documented in README): statx cannot report STATX_ATTR_VERITY through
FUSE.
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
from typing import TYPE_CHECKING, Dict, Optional

import pyfuse3
import trio

from . import fsutil
from .errors import Corruption, Errno
from .fast_lookups import NativeLookups
from .fast_opens import NativeOpens, OpenHandles
from .fast_reads import FastReads
from .fuseshim import Shim
from .handle_budget import HandleBudget
from .ops_boundary import errno_of, fail, sync_errno, with_boundary
from .ops_ioctl import IoctlHandlers
from .ops_read import Reads, fuse_device_poll
from .tripwire import Tripwire
from .view import XATTR_PREFIX, Attr, FileHandle, ReadOnlyView, View

if TYPE_CHECKING:
    from .enable import Caller

log = logging.getLogger("verityfuse")

# The running mount's status, as JSON, on the mount root only (not listed).
XATTR_STATUS = b"user.verityfuse.status"
# Names the daemon owns: never passed through to SOURCE, never set or removed.
RESERVED = (XATTR_PREFIX, b"user.verityfuse.")
# Handlers whose first argument is a file handle, not an inode.
_FH_HANDLERS = {"read", "write", "flush", "fsync", "release"}


def _entry(a: Attr) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = a.ino
    e.generation = 0
    e.entry_timeout = e.attr_timeout = a.timeout
    e.st_mode, e.st_nlink, e.st_uid, e.st_gid = a.mode, a.nlink, a.uid, a.gid
    e.st_rdev, e.st_size, e.st_blksize, e.st_blocks = a.rdev, a.size, a.blksize, a.blocks
    e.st_atime_ns, e.st_mtime_ns, e.st_ctime_ns = a.atime_ns, a.mtime_ns, a.ctime_ns
    return e


@with_boundary
class VerityOperations(pyfuse3.Operations):
    """pyfuse3 operations over ``view`` (a LocalView or a ManifestView); ``ioctls`` serves
    the fs-verity requests (ops_ioctl), through ``shim`` when the ioctl shim is loaded."""

    enable_writeback_cache = False  # writes go straight to SOURCE

    def __init__(self, view: View, threads: int = 4, stats=None, info=None, tripwire=None,
                 max_handles_per_uid: Optional[int] = None, shim: Optional[Shim] = None):
        super().__init__()
        self.view = view
        # What an integrity failure does beyond EIO: measure it, maybe stop opens.
        self.tripwire = tripwire if tripwire is not None else Tripwire(None)
        self._measuring: Dict[str, trio.Event] = {}  # path -> set once its violation is extended
        self._untrusted = getattr(view, "untrusted_source", False)  # errnos: see errno_of
        self.stats = stats
        self.info = dict(info or {})  # what `verityfuse status` reports besides counters
        self.enable_acl = view.posix_acl  # read by pyfuse3 at FUSE_INIT
        self.limiter = trio.CapacityLimiter(threads)
        self.reads = Reads(self._run)  # inline or in a worker thread (ops_read)
        self.fast: Optional[FastReads] = None  # reads answered natively (use_fast_reads)
        # A handle the native path opened is made Python's when a handler asks for it.
        self.handles: OpenHandles = OpenHandles()
        self.opens: Optional[NativeOpens] = None  # opens answered natively (use_fast_reads)
        self.lookups: Optional[NativeLookups] = None  # lookups without coroutines (the same)
        self.ioctls = IoctlHandlers(view, self.handles, self._errno_of, shim)
        self.init_done = trio.Event()  # set when FUSE_INIT is answered
        # Bounded fds: open handles per uid (EMFILE beyond) and in all (ENFILE beyond).
        self.budget = HandleBudget(max_handles_per_uid,
                                   getattr(getattr(view, "inodes", None), "max_fds", None))

    # -- helpers ----------------------------------------------------------------------

    def _errno_of(self, e: Exception, what: str) -> int:
        return errno_of(e, what, self.stats, self._untrusted)

    async def _tripwire_hit(self, handler: str, args, e: Corruption):
        """The first integrity failure of a manifest path is measured (off this thread)
        before the request is answered, so a client that saw EIO can already be quoted;
        a failure of the same path meanwhile waits for that measurement too."""
        path = self._subject(handler, args)
        if self.tripwire.first_time(path):
            done = self._measuring[path] = trio.Event()
            try:
                await self._run(self.tripwire.record, path, getattr(e, "data_offset", None))
            finally:
                del self._measuring[path]
                done.set()
        else:
            pending = self._measuring.get(path)
            if pending is not None:
                await pending.wait()

    def _subject(self, handler: str, args) -> str:
        """The manifest path a failing request was about; in local mode (nothing is
        measured there) a name for the log only."""
        path_of = getattr(self.view, "path_of", None)
        if path_of is None or not args:
            return f"{handler} request"
        if handler in _FH_HANDLERS:
            h = self.handles.get(args[0])
            return getattr(getattr(h, "node", None), "path", None) or f"{handler} request"
        return path_of(args[0]) or f"{handler} request"

    def _new_fh(self, h, ctx) -> int:
        fh = self.budget.take(ctx.uid)
        self.handles[fh] = h
        return fh

    def _pop_fh(self, fh: int):
        self.budget.remove(fh)
        return self.handles.pop(fh)

    def _wait_key(self, inode) -> Optional[tuple]:
        """What opening ``inode`` waits on beyond the machine (an OCI view's tree object):
        ops_read.ThreadGates' key, None for a view that waits on nothing else."""
        wait_key = getattr(self.view, "wait_key", None)
        return wait_key(inode) if wait_key is not None else None

    async def _run(self, fn, *args):
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    # -- lookups and attributes ---------------------------------------------------------

    async def lookup(self, parent_inode, name, ctx):
        return _entry(self.view.lookup(parent_inode, name, ctx))

    async def forget(self, inode_list):
        for ino, n in inode_list:
            self.view.forget(ino, n)

    async def getattr(self, inode, ctx):
        return _entry(self.view.getattr(inode))

    async def setattr(self, inode, attr, fields, fh, ctx):
        h = self.handles.get(fh) if fh is not None else None
        h = h if isinstance(h, FileHandle) else None
        try:
            return _entry(self.view.setattr(inode, attr, fields, h, ctx))
        except fsutil.WouldWait as w:  # a truncate of a leased file: wait off this thread
            return _entry(self.view.setattr(inode, attr, fields, h, ctx, await self._run(w.finish)))

    async def readlink(self, inode, ctx):
        return self.view.readlink(inode)

    async def statfs(self, ctx):
        out = pyfuse3.StatvfsData()
        for k, v in self.view.statfs().items():
            setattr(out, k, v)
        return out

    # -- namespace ----------------------------------------------------------------------

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return _entry(self.view.mknod(parent_inode, name, mode, rdev, ctx))

    async def mkdir(self, parent_inode, name, mode, ctx):
        return _entry(self.view.mkdir(parent_inode, name, mode, ctx))

    async def symlink(self, parent_inode, name, target, ctx):
        return _entry(self.view.symlink(parent_inode, name, target, ctx))

    async def unlink(self, parent_inode, name, ctx):
        self.view.unlink(parent_inode, name)

    async def rmdir(self, parent_inode, name, ctx):
        self.view.rmdir(parent_inode, name)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self.view.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        return _entry(self.view.link(inode, new_parent_inode, new_name))

    # -- files --------------------------------------------------------------------------

    def _file_info(self, h: FileHandle, ctx) -> pyfuse3.FileInfo:
        fh = self._new_fh(h, ctx)
        if self.fast is not None:
            try:
                self.fast.register(fh, h)
                if self.opens is not None:
                    self.opens.learn(h)
            except BaseException:
                self.view.release(self._pop_fh(fh))  # the open fails: nothing kept
                raise
        return pyfuse3.FileInfo(fh=fh, keep_cache=h.keep_cache, direct_io=False)

    async def open(self, inode, flags, ctx):
        if self.tripwire.refusing:
            raise Errno(errno.EIO, "refusing every open after an integrity violation")
        self.budget.admit(ctx.uid)
        if getattr(self.view, "open_blocks", False):
            # An OCI view fetches the tree object at open: never on this thread, and in
            # no more of the threads than the reads of one blob may hold.
            h = await self.reads.gates.run(self._wait_key(inode), self._run,
                                           self.view.open, inode, flags, ctx)
            return self._file_info(h, ctx)
        try:
            h = self.view.open(inode, flags, ctx)
        except fsutil.WouldWait as w:  # a lease on the file: wait off this thread
            h = self.view.open(inode, flags, ctx, fd=await self._run(w.finish))
        return self._file_info(h, ctx)

    async def create(self, parent_inode, name, mode, flags, ctx):
        self.budget.admit(ctx.uid)
        h, attrs = self.view.create(parent_inode, name, mode, flags, ctx)
        return self._file_info(h, ctx), _entry(attrs)

    async def read(self, fh, off, size):
        h = self.handles[fh]
        if self.fast is not None:
            self.fast.seen_mismatch(fh, h)  # before came_to_python may forget the handle
            self.fast.came_to_python(fh, h)
        return await self.reads.read(h, off, size)

    async def write(self, fh, off, buf):
        return await self._run(os.pwrite, self.handles[fh].fd, buf, off)

    async def flush(self, fh):
        if isinstance(self.view, ReadOnlyView):
            # Nothing is written through it, so a close has no error to report: ENOSYS
            # tells the kernel to send no FLUSH again (one request less per close).
            raise pyfuse3.FUSEError(errno.ENOSYS)
        # Report close-time errors of the backing fs (as passthrough_hp does) for what
        # was written through this handle.  Nothing is written through a read-only one
        # (which the shim marks FOPEN_NOFLUSH, so the kernel sends no FLUSH for it).
        h = self.handles.view(fh)  # a native handle is read-only: not made Python's for this
        if h.writable and h.fd >= 0:  # an OCI view's handles have no backing fd
            os.close(os.dup(h.fd))

    def _syncable(self, h) -> bool:
        """Whether an fsync of handle ``h`` has anything to do.  Nothing is written through
        a read-only view, and its share is not asked: a host's answer (an errno it picks)
        would reach the guest's program; an OCI handle has no fd at all."""
        return not isinstance(self.view, ReadOnlyView) and h.fd >= 0

    async def fsync(self, fh, datasync):
        h = self.handles.view(fh)
        if self._syncable(h):
            await self._run(os.fdatasync if datasync else os.fsync, h.fd)

    async def release(self, fh):
        if self.fast is not None:
            self.fast.forget(fh)  # before the view closes the fd it holds
        self.view.release(self._pop_fh(fh))

    # -- directories --------------------------------------------------------------------

    async def opendir(self, inode, ctx):
        self.budget.admit(ctx.uid)
        return self._new_fh(self.view.opendir(inode, ctx), ctx)

    async def readdir(self, fh, start_id, token):
        for name, attr, next_id in self.view.readdir(self.handles[fh], start_id):
            if not pyfuse3.readdir_reply(token, name, _entry(attr), next_id):
                # Not sent: undo the lookup the view counted for it.
                if name not in (b".", b".."):
                    self.view.unlookup(attr.ino)
                return

    async def releasedir(self, fh):
        self.view.releasedir(self._pop_fh(fh))

    async def fsyncdir(self, fh, datasync):
        h = self.handles[fh]
        if self._syncable(h):  # a manifest view's directories have no fd either
            # As fsync: a slow disk must not stall the request loop.
            await self._run(os.fsync, h.fd)

    # -- extended attributes ------------------------------------------------------------

    def fsverity(self, inode: int, request: bytes, caller: Optional[Caller] = None) -> bytes:
        """The FUSE_FSVERITY operation on ``inode`` (bytes in, bytes out), for a caller
        outside the daemon's trio loop: it runs in a loop of its own, so an ENABLE
        builds in a worker thread, as FS_IOC_ENABLE_VERITY does.  ``caller``: the
        requester's (uid, gid, groups), which an ENABLE needs write permission for, as
        the ioctl's caller does; None for the daemon's own requests (root's)."""
        return trio.run(self.ioctls.fsverity, inode, request, caller)

    def status(self) -> dict:
        """The running mount's state and counters (`verityfuse status`)."""
        from . import __version__

        out = dict(self.info, version=__version__, open_files=sum(
            1 for h in self.handles.values() if isinstance(h, FileHandle)))
        if self.opens is not None:  # opened natively, not (yet) Python's
            out["fast_opens"] = self.opens.counts()
            out["open_files"] += out["fast_opens"]["open"]
        if self.lookups is not None:
            out["fast_lookups"] = self.lookups.counts()
        if self.stats is not None:
            out.update(self.stats.snapshot())
        out["tree_cache"] = self.view.cache.snapshot()
        if self.fast is not None:  # reads answered natively are verified reads too
            native = self.fast.counts()
            out["blocks_verified"] = out.get("blocks_verified", 0) + native["blocks"]
            out["bytes_served"] = out.get("bytes_served", 0) + native["bytes"]
            out["verified_reads"] = out.get("verified_reads", 0) + native["reads"]
            out["fast_reads"] = native
        if hasattr(self.view, "status"):  # an OCI view: registry requests and data cache
            out.update(self.view.status())
        out["tripwire"] = self.tripwire.snapshot()
        out["gc_frozen"] = gc.get_freeze_count()
        return out

    async def getxattr(self, inode, name, ctx):
        if name == XATTR_STATUS and inode == pyfuse3.ROOT_INODE:
            if ctx.uid not in (0, os.getuid()):
                fail(errno.EPERM)  # failure names and paths are for the owner and root
            return json.dumps(self.status(), sort_keys=True).encode()
        if name.startswith(RESERVED):
            # Exporting metadata opens and verifies a tree object, which an OCI view
            # fetches from the registry, and a small file's share file in manifest mode
            # (its tree is made from its bytes): an untrusted source's, which may wait
            # (a lease on it: 45 s), so in a worker thread, never stalling the loop.
            if self._untrusted:
                value = await self.reads.gates.run(self._wait_key(inode), self._run,
                                                   self.ioctls.control_xattr, inode, name)
            else:
                value = self.ioctls.control_xattr(inode, name)
            if value is not None:
                return value
            value = self.ioctls.verity_xattrs(inode).get(name)
            if value is None:
                fail(errno.ENODATA)
            return value
        return self.view.getxattr(inode, name)

    async def listxattr(self, inode, ctx):
        names = [n for n in self.view.listxattr(inode, ctx) if not n.startswith(RESERVED)]
        return names + sorted(self.ioctls.verity_xattrs(inode))

    async def setxattr(self, inode, name, value, ctx):
        if name.startswith(RESERVED):
            fail(errno.EPERM)
        self.view.setxattr(inode, name, value, 0, ctx)  # ctx: the ACL rule of S_ISGID

    async def removexattr(self, inode, name, ctx):
        if name.startswith(RESERVED):
            fail(errno.EPERM)
        self.view.removexattr(inode, name)

    # -- lifecycle ----------------------------------------------------------------------

    def init(self):
        """FUSE_INIT: libfuse writes its reply as soon as this returns, on this thread, so a
        task woken by ``init_done`` runs after it."""
        self.reads.fuse_poll = fuse_device_poll()
        self.init_done.set()

    def use_fast_reads(self, shim: Optional[Shim]) -> bool:
        """Let the shim answer the common verified reads natively (fast_reads), once
        pyfuse3 has hooked libfuse; False when it cannot (then Python serves all), or
        with --debug, which logs every request (a native read never reaches the log), or
        for an OCI view, whose reads fetch from a registry.  Under the same conditions
        its opens (local mode) and lookups are answered without pyfuse3's coroutines
        (fast_opens, fast_lookups)."""
        if log.isEnabledFor(logging.DEBUG) or getattr(self.view, "open_blocks", False):
            return False
        self.fast = FastReads.load(shim, self.view.cache)
        if hasattr(self.view, "use_native_opens"):  # a local view: its sealed files' opens
            self.opens = NativeOpens.load(shim, self.fast, self.budget, self.tripwire, self.view)
            if self.opens is not None:
                self.handles.adopt, self.handles.peek = self.opens.adopt, self.opens.peek
        self.lookups = NativeLookups.load(
            shim, self.view, lambda e: sync_errno(e, "lookup", self._errno_of))
        return self.fast is not None

    def shutdown(self) -> int:
        """Close every handle and the view; returns how many inodes the kernel
        still held (should be 0 after a clean unmount)."""
        if self.lookups is not None:
            self.lookups.close()
        if self.opens is not None:
            self.opens.close()
        if self.fast is not None:
            self.fast.close()
        for h in list(self.handles.values()):
            h.close()
        self.handles.clear()
        self.budget.clear()
        return self.view.close()
