"""Open handles per uid and in all, within what the daemon's fd limit affords (pure).

A user allowed on the mount (``allow_other``) must not be able to take every file
descriptor of the daemon: each uid may hold ``per_uid`` open files and directories
(EMFILE beyond, as a process over its own RLIMIT_NOFILE), and all together at most
``total`` (ENFILE beyond, as the system's file table), so that the fds the daemon
needs for its own work (inodes.FD_RESERVE, the inode LRU) are always there.
"""

from __future__ import annotations

import errno
from typing import Dict, Optional

from . import inodes
from .errors import Errno
from .logs import requests as ratelog


class HandleBudget:
    def __init__(self, per_uid: Optional[int] = None, max_fds: Optional[int] = None):
        self.total, self.per_uid = inodes.handle_limits(per_uid, max_fds)
        self._owner: Dict[int, int] = {}  # fh -> the uid that opened it
        self._held: Dict[int, int] = {}   # uid -> open handles
        self._next_fh = 1

    def _refusal(self, uid: int) -> Optional[int]:
        """EMFILE if ``uid`` holds its share, ENFILE if all hold the total, else None."""
        if self._held.get(uid, 0) >= self.per_uid:
            return errno.EMFILE
        if len(self._owner) >= self.total:
            return errno.ENFILE
        return None

    def admit(self, uid: int):
        """Refuse (Errno) a new handle for ``uid`` over its share or the total; called
        before anything is opened or created."""
        refusal = self._refusal(uid)
        if refusal == errno.EMFILE:
            ratelog.warning(("max_handles_per_uid", uid),
                            f"uid {uid} holds {self.per_uid} open handles "
                            f"(max_handles_per_uid): refusing more with EMFILE")
            raise Errno(errno.EMFILE, "max_handles_per_uid reached")
        if refusal == errno.ENFILE:
            ratelog.warning(("max_handles",), f"{self.total} handles open, all the fd "
                                              f"limit affords: refusing more with ENFILE")
            raise Errno(errno.ENFILE, "the daemon's handle budget is spent")

    def take(self, uid: int) -> int:
        """A new handle number, counted as ``uid``'s (once ``admit`` let it open)."""
        fh = self._next_fh
        self._next_fh += 1
        self._owner[fh] = uid
        self._held[uid] = self._held.get(uid, 0) + 1
        return fh

    def offer(self, uid: int) -> Optional[int]:
        """``take`` if ``uid`` may hold one more handle, else None, quietly: the native
        open that asks then lets Python's open refuse it (``admit`` says why)."""
        return None if self._refusal(uid) is not None else self.take(uid)

    def remove(self, fh: int):
        uid = self._owner.pop(fh)
        n = self._held[uid] - 1
        if n:
            self._held[uid] = n
        else:
            del self._held[uid]

    def clear(self):
        self._owner.clear()
        self._held.clear()
