"""Names of the store's tmp/ files, and whose they are.

A tmp/ file is named ``<pid>.<unique>``: ``Store.cleanup_tmp`` removes only the files
of processes that no longer run, so a seal's or a mount's cleanup never takes a file
another live process (or a seal's worker, named for its parent) is still writing.
"""

from __future__ import annotations

import itertools
import os
from typing import Optional

from . import fsutil


class _TmpNames:
    """Names for tmp/ files: ``<pid>.<unique>``, the pid telling ``cleanup_tmp`` whose
    file it is.  The random part is drawn once per process and followed by a counter:
    a name costs no getpid or getrandom system call (four per sealed file otherwise).
    A forked child draws its own (the counter alone would repeat the parent's names)."""

    def __init__(self):
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self, owner: Optional[int] = None):
        self.prefix = f"{owner or os.getpid()}.{os.urandom(6).hex()}"
        self.counter = itertools.count()  # next() is atomic: threads stage at once

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter):x}"


tmp_names = _TmpNames()


def alive(pid: str) -> bool:
    """Whether process ``pid`` runs: a zombie (exited, not yet reaped by a parent that
    may never reap it) does not, and will never finish its tmp/ files."""
    fields = fsutil.process_stat(pid)
    return fields is not None and len(fields) > 0 and fields[0] != "Z"


def remove_if_dead(dfd: int, name: str, pid: str, own: bool = False) -> bool:
    """Remove file ``name`` of ``dfd``, which process ``pid`` (digits) made, if that is
    another process and no longer runs, or (``own``) this one; True if it was removed.
    One another cleanup removed first, or a directory (never such a file), is left alone."""
    if int(pid) == os.getpid():
        if not own:
            return False
    elif alive(pid):
        return False
    try:
        os.unlink(name, dir_fd=dfd)
        return True
    except (FileNotFoundError, IsADirectoryError):
        return False


def name_tmp_files_for(pid: int):
    """In a worker process of ``pid`` (seal_pool): the tmp/ files it stages are ``pid``'s
    until ``pid`` publishes or removes them, so another seal's or a mount's
    ``cleanup_tmp`` keeps them while ``pid`` lives, also once the worker has exited."""
    tmp_names.reset(owner=pid)
