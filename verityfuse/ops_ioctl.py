"""FUSE_IOCTL handlers of the daemon: fs-verity ioctls, inode flags, enable.

pyfuse3 has no ioctl handler: the native shim (fuseshim.py, _fuseshim.c) calls
``ioctl`` synchronously on the trio thread.  A mixin of ops.VerityOperations,
which provides ``view``, ``handles`` and ``_errno_of``.
"""

from __future__ import annotations

import errno
import logging
from typing import Any, Callable, Optional

import pyfuse3
import trio

from . import ioctl as vioctl
from . import creds, uapi
from .errors import VerityError
from .fuseshim import Request
from .view import FileHandle, View

log = logging.getLogger("verityfuse")


class IoctlHandlers:
    view: View
    handles: dict
    _errno_of: Any  # ops.VerityOperations._errno_of: the one errno mapping

    shim: Any = None     # set by the daemon when the shim is active
    nursery: Any = None  # the daemon's nursery, for enables that outlive the callback
    stopping = False  # set at unmount: running enables stop and answer EINTR

    def ioctl(self, req, ino, cmd, fh, flags, data, out_size) -> int:
        """FUSE_IOCTL entry, called synchronously on the trio thread.

        Returns 0 once the request is answered (or will be, by an enable task),
        else the errno to answer with.  Never blocks: the tree build of an
        enable runs in a worker thread.
        """
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
                request.reply(vioctl.measure_reply(data, v.alg, v.digest))
            elif cmd == uapi.FS_IOC_ENABLE_VERITY:
                self._start_enable(request, ino, h if isinstance(h, FileHandle) else None, data)
            else:
                # FS_IOC_READ_VERITY_METADATA included: its buffer is in the
                # caller's memory, which a FUSE server cannot write.
                return errno.ENOTTY
            return 0
        except (VerityError, OSError) as e:
            return self._errno_of(e, f"ioctl {cmd:#x} on inode {ino}")

    def _start_enable(self, request: Request, ino: int, h: Optional[FileHandle], data: bytes):
        """FS_IOC_ENABLE_VERITY: the argument, then the rules (enable.py) on this thread;
        the rest runs in a task, which answers the request."""
        arg = vioctl.parse_enable(data)                          # EINVAL, EMSGSIZE
        uid, gid, pid = self.shim.ctx(request.req)
        job = self.view.enable_check(ino, h, arg, (uid, gid, set(creds.groups_of(pid))))
        self.nursery.start_soon(self._answer_enable, request, ino, job)

    async def _answer_enable(self, request: Request, ino: int, job):
        try:
            await self._complete_enable(ino, job, request.interrupted)
            request.reply()
        except (VerityError, OSError) as e:
            request.error(self._errno_of(e, f"enable of {job.rel}"))
        except BaseException:
            request.error(errno.EIO)
            raise

    async def enable(self, ino: int, arg: vioctl.EnableArg):
        """FUSE_FSVERITY ENABLE, which brings no file (the view opens one) and no
        credentials: the same rules, build and commit as FS_IOC_ENABLE_VERITY."""
        job = self.view.enable_check(ino, None, arg, None)
        await self._complete_enable(ino, job, lambda: False)

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
