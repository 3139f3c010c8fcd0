"""The daemon's fs-verity requests: FUSE_IOCTL (fs-verity ioctls, inode flags, enable) and
FUSE_FSVERITY (with the control xattrs that carry it to today's kernels).

pyfuse3 has no ioctl handler: the native shim (fuseshim.py, _fuseshim.c) calls ``ioctl``
synchronously on the trio thread.  ops.VerityOperations holds one ``IoctlHandlers`` and gives it
what it needs when it is made: the view, the table of open handles, its errno mapping and the
shim.  An enable outlives the ioctl callback: it runs as a task of ``run``, which the daemon
starts (``nursery.start``) before it serves.
"""

from __future__ import annotations

import errno
import logging
from typing import Callable, Dict, Mapping, Optional, Tuple

import pyfuse3
import trio

from . import fsutil, fsverity_op
from . import ioctl as vioctl
from . import creds, uapi
from .enable import Caller
from .errors import Errno, VerityError
from .fuseshim import Request, Shim
from .ops_boundary import unexpected
from .view import XATTR_PREFIX, FileHandle, Handle, View

log = logging.getLogger("verityfuse")

# Control xattrs: READ_VERITY_METADATA's data for clients of today's kernels,
# which cannot forward that ioctl.  Not listed (binary, and a family of names).
XATTR_DESCRIPTOR = XATTR_PREFIX + b"descriptor"
XATTR_SIGNATURE = XATTR_PREFIX + b"signature"
XATTR_TREE = XATTR_PREFIX + b"merkle_tree."
XATTR_MAX = 65536  # the VFS's XATTR_SIZE_MAX
MAX_OFFSET = (1 << 64) - 1


def _never() -> bool:
    return False


class _Target(fsverity_op.Target):
    """FUSE_FSVERITY requests about one inode; tree objects opened here are closed by
    ``close``.  An ENABLE is only recorded: the handler runs it off this thread."""

    def __init__(self, view: View, ino: int):
        self.view, self.ino = view, ino
        self.trees: list = []
        self.enable_arg: Optional[vioctl.EnableArg] = None

    def metadata(self):
        info = self.view.verity_info(self.ino)
        if info is None:
            return None
        # The tree is exported only as it verifies up to the trusted digest (a
        # block that does not: IntegrityError, EIO and one log line, as a read).
        verifier = self.view.tree_verifier(self.ino)
        self.trees.append(verifier.tree)
        # The descriptor hashes to info.digest: the view opened the tree object by it.
        return fsverity_op.Metadata(verifier.tree.descriptor, verifier.read_tree, info.signature)

    def enable(self, arg):
        self.enable_arg = arg

    def close(self):
        for t in self.trees:
            t.close()


class IoctlHandlers:
    """``handles`` is the adapter's table of open handles (the ioctl's ``fh`` names one);
    ``errno_of(e, what)`` its one mapping of an error to an errno; ``shim`` None when the
    ioctl shim is not loaded (no ioctl then reaches us)."""

    def __init__(self, view: View, handles: Mapping[int, Handle],
                 errno_of: Callable[[Exception, str], int], shim: Optional[Shim] = None):
        self.view, self.handles, self.errno_of, self.shim = view, handles, errno_of, shim
        self.stopping = False  # set at unmount: running enables stop and answer EINTR
        self._tasks: Optional[trio.Nursery] = None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
        """Hold the enables that outlive their ioctl callback, until cancelled (unmount):
        then the running ones see ``stopping``, stop and answer EINTR before this returns."""
        async with trio.open_nursery() as tasks:
            self._tasks = tasks
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self.stopping = True

    def ioctl(self, req, ino, cmd, fh, flags, data, out_size) -> int:
        """FUSE_IOCTL entry, called synchronously on the trio thread.

        Returns 0 once the request is answered (or will be, by an enable task),
        else the errno to answer with.  Never blocks: the tree build of an
        enable runs in a worker thread.
        """
        if self.shim is None:
            return errno.ENOTTY  # as libfuse without the shim
        request = Request(self.shim, req, out_size)
        try:
            h = self.handles.get(fh)  # a file or directory handle: the backing fd
            view = self.view
            if cmd in vioctl.GETFLAGS_CMDS:
                request.reply(vioctl.getflags_reply(view.flags(ino, h))[:out_size])
            elif cmd in vioctl.SETFLAGS_CMDS:
                view.set_flags(ino, h, int.from_bytes(data[:4], "little"))
                self._attrs_changed(ino)
                request.reply()
            elif cmd == uapi.FS_IOC_FSGETXATTR:
                request.reply(view.fsxattr(ino, h)[:out_size])
            elif cmd == uapi.FS_IOC_FSSETXATTR:
                view.fsxattr(ino, h, data)
                self._attrs_changed(ino)
                request.reply()
            elif cmd == uapi.FS_IOC_MEASURE_VERITY:
                v = view.verity_info(ino)
                if v is None:
                    return errno.ENODATA
                request.reply(vioctl.measure_reply(data, v.alg, v.digest, out_size))
            elif cmd == uapi.FS_IOC_ENABLE_VERITY:
                self._start_enable(self.shim, request, ino, h if isinstance(h, FileHandle) else None,
                                   data)
            else:
                # FS_IOC_READ_VERITY_METADATA included: its buffer is in the
                # caller's memory, which a FUSE server cannot write.
                return errno.ENOTTY
            return 0
        except (VerityError, OSError) as e:
            return self.errno_of(e, f"ioctl {cmd:#x} on inode {ino}")

    def _start_enable(self, shim: Shim, request: Request, ino: int, h: Optional[FileHandle],
                      data: bytes):
        """FS_IOC_ENABLE_VERITY: the argument, then the rules (enable.py) on this thread;
        the rest runs in a task, which answers the request."""
        arg = vioctl.parse_enable(data)                          # EINVAL, EMSGSIZE
        if self._tasks is None:  # run() not started: nothing could answer the request
            raise Errno(errno.EIO, "enable before the daemon started its enable tasks")
        uid, gid, pid = shim.ctx(request.req)
        caller: Caller = (uid, gid, set(creds.groups_of(pid)))
        job = self.view.enable_check(ino, h, arg, caller)
        self._tasks.start_soon(self._answer_enable, request, ino, job)

    async def _answer_enable(self, request: Request, ino: int, job):
        try:
            await self._complete_enable(ino, job, request.interrupted)
            request.reply()
        except (VerityError, OSError) as e:
            request.error(self.errno_of(e, f"enable of {job.rel}"))
        except Exception as e:  # a bug: answered, one line; it must not take the mount down
            request.error(unexpected("enable", e))
        except BaseException:  # cancelled (unmounting): answered, and let go on
            request.error(errno.EIO)
            raise

    async def _enable(self, ino: int, arg: vioctl.EnableArg, caller: Optional[Caller]):
        """FUSE_FSVERITY ENABLE, which brings no file (the view opens one): the same rules,
        build and commit as FS_IOC_ENABLE_VERITY, the permission rule for ``caller``."""
        try:
            job = self.view.enable_check(ino, None, arg, caller)
        except fsutil.WouldWait as w:  # a lease on the file: its open waits off this thread
            job = self.view.enable_check(ino, None, arg, caller,
                                         await trio.to_thread.run_sync(w.finish))
        await self._complete_enable(ino, job, _never)

    async def _complete_enable(self, ino: int, job, interrupted: Callable[[], bool]):
        """Build off the trio thread (EINTR once interrupted or unmounting), commit, and
        always finish the job."""
        view = self.view
        try:
            await trio.to_thread.run_sync(view.enable_build, job,
                                          lambda: self.stopping or interrupted())
            try:
                view.enable_commit(job)
            finally:
                # Pages cached before the commit were never verified: drop them before
                # the caller learns the outcome (also when commit failed half-way: the
                # inode may be verity already).  From a worker thread: the kernel may
                # wait on a page lock held by a reader that waits on us.
                await trio.to_thread.run_sync(self._invalidate, ino)
        finally:
            view.enable_finish(job)

    # -- FUSE_FSVERITY ------------------------------------------------------------------

    def _fsverity_now(self, inode: int, request: bytes) -> Tuple[bytes, Optional[vioctl.EnableArg]]:
        """A FUSE_FSVERITY request served on this thread: (the reply, the enable argument
        if it is an ENABLE, which the caller then runs)."""
        target = _Target(self.view, inode)
        try:
            return fsverity_op.handle(request, target), target.enable_arg
        finally:
            target.close()

    async def fsverity(self, inode: int, request: bytes, caller: Optional[Caller] = None) -> bytes:
        """The FUSE_FSVERITY operation on ``inode`` (bytes in, bytes out; Errno or another
        core error out): metadata on this thread, an ENABLE's build in a worker thread;
        ``caller`` as for ops.VerityOperations.fsverity."""
        reply, enable = self._fsverity_now(inode, request)
        if enable is not None:
            await self._enable(inode, enable, caller)
        return reply

    def control_xattr(self, inode: int, name: bytes) -> Optional[bytes]:
        """user.fsverity.{descriptor,signature,merkle_tree.<offset>} through FUSE_FSVERITY;
        None for any other name."""
        if name == XATTR_DESCRIPTOR:
            req = fsverity_op.encode_request(fsverity_op.OP_GET_DESCRIPTOR, 0, XATTR_MAX)
        elif name == XATTR_SIGNATURE:
            req = fsverity_op.encode_request(fsverity_op.OP_READ_SIGNATURE, 0, XATTR_MAX)
        elif name.startswith(XATTR_TREE) and name[len(XATTR_TREE):].isdigit():
            offset = int(name[len(XATTR_TREE):])
            if offset > MAX_OFFSET - XATTR_MAX:
                raise Errno(errno.EINVAL, "offset out of range")
            req = fsverity_op.encode_request(fsverity_op.OP_READ_MERKLE_TREE, offset, XATTR_MAX)
        else:
            return None
        return fsverity_op.decode_reply(self._fsverity_now(inode, req)[0])[0]

    def verity_xattrs(self, inode: int) -> Dict[bytes, bytes]:
        """The listed user.fsverity.* xattrs of a verity file (none otherwise)."""
        v = self.view.verity_info(inode)
        return {} if v is None else v.xattrs()

    @staticmethod
    def _attrs_changed(ino: int):
        """A flag change moved the inode's ctime (and maybe S_IMMUTABLE/S_APPEND): the
        kernel's cached attributes are stale until their timeout (generic/277), and the
        kernel does not drop them after a FUSE fileattr_set.  Attributes only: no page
        is locked, so this is safe on the trio thread, before the reply."""
        try:
            pyfuse3.invalidate_inode(ino, attr_only=True)
        except OSError as e:  # ENOENT: the kernel no longer caches it
            log.debug("invalidate attributes of inode %d: %s", ino, e)

    @staticmethod
    def _invalidate(ino: int):
        try:
            pyfuse3.invalidate_inode(ino, attr_only=False)
        except OSError as e:  # ENOENT: the kernel no longer caches it
            log.debug("invalidate inode %d: %s", ino, e)
