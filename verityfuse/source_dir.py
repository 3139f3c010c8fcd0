"""SOURCE as seal and verify read it: one directory fd, and every path beneath it.

A tree may change while it is sealed: a build step still writing, or a process
that can write in SOURCE but cannot read what root can.  Joining a path to
SOURCE's name lets the kernel follow a directory that was swapped for a symlink
between two steps of the walk (listed as a directory, then listed or opened
through the symlink), so a file from outside SOURCE would be sealed, and in
manifest mode signed, under a name inside it.  Here every path is resolved
beneath SOURCE's fd with no symlink anywhere on it (fsutil.open_beneath): the
swapped path is refused with ELOOP, naming it, and nothing outside is read.

A SourceDir opened before seal's workers fork is theirs too (they inherit the fd).
"""

from __future__ import annotations

import errno
import os
import stat
from contextlib import contextmanager
from typing import Iterator, List, Union

from . import fsutil

_LIST = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

def unlistable(e: OSError) -> OSError:
    """``e``, raised listing a directory, saying so: what seal and verify report for it."""
    return type(e)(e.errno, f"{e.strerror or e} (a directory that could not be listed: "
                            f"nothing under it was read)", e.filename)


SYMLINK_ON_PATH = ("it or a directory on its path is a symlink, and no symlink is followed "
                   "under the source directory (a path named through one, or a tree that "
                   "changed while it was read)")


class SourceDir:
    """SOURCE, opened once (a symlink naming SOURCE itself is followed, as the user
    chose it); paths are relative to it, "" or "." for SOURCE itself."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._prefix = os.path.join(path, "")  # what os.path.join puts before a relative path

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "SourceDir":
        return self

    def __exit__(self, *exc):
        self.close()

    def full(self, rel: str) -> str:
        """SOURCE/rel, for messages and output."""
        if rel in ("", "."):
            return self.path
        # Once per sealed file: a concatenation, not os.path.join (2 us a call).
        return self._prefix + rel if not rel.startswith("/") else rel

    def _beneath(self, rel: str, flags: int) -> int:
        rel = rel.rstrip("/")
        try:
            return fsutil.open_beneath(self.fd, os.fsencode(rel or "."), flags)
        except OSError as e:
            why = SYMLINK_ON_PATH if e.errno == errno.ELOOP else e.strerror
            raise type(e)(e.errno, why, self.full(rel)) from None

    def open_regular(self, rel: str) -> int:
        """A read-only fd of the regular file SOURCE/rel (fsutil.reopen_regular's policy:
        never a FIFO waited on, never a device opened)."""
        return fsutil.reopen_regular(self._beneath(rel, fsutil.O_PATH_NOFOLLOW), self.full(rel))

    @contextmanager
    def listing(self, rel: str) -> Iterator[List[os.DirEntry]]:
        """The entries of directory SOURCE/rel; their ``stat()`` works inside the block
        (it asks the directory's fd, closed after)."""
        try:
            fd = self._beneath(rel, _LIST)
        except NotADirectoryError:
            # O_DIRECTORY says ENOTDIR for a symlink too: say which it is.
            if stat.S_ISLNK(self.lstat(rel).st_mode):
                raise OSError(errno.ELOOP, SYMLINK_ON_PATH, self.full(rel)) from None
            raise
        try:
            with os.scandir(fd) as it:
                yield list(it)
        finally:
            os.close(fd)

    def lstat(self, rel: str) -> os.stat_result:
        """The lstat of SOURCE/rel (SOURCE's own stat for the root)."""
        if rel in ("", "."):
            return os.fstat(self.fd)
        pfd = self._beneath(rel, fsutil.O_PATH_NOFOLLOW)
        try:
            return os.fstat(pfd)
        finally:
            os.close(pfd)

    def readlink(self, rel: str) -> str:
        """The target of the symlink SOURCE/rel (EINVAL if it is no longer one)."""
        pfd = self._beneath(rel, fsutil.O_PATH_NOFOLLOW)
        try:
            if not stat.S_ISLNK(os.fstat(pfd).st_mode):
                raise OSError(errno.EINVAL, "no longer a symlink", self.full(rel))
            return os.fsdecode(os.readlink(b"", dir_fd=pfd))  # readlinkat() of the link itself
        finally:
            os.close(pfd)


@contextmanager
def opened(source: Union[str, SourceDir]) -> Iterator[SourceDir]:
    """``source`` itself if it is open already, else SOURCE opened for this block."""
    if isinstance(source, SourceDir):
        yield source
        return
    with SourceDir(source) as s:
        yield s
