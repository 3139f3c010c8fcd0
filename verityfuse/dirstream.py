"""A directory read in place, resumable at the backing filesystem's own offsets (pure).

Local mode lists a directory as passthrough_hp does: one libc DIR stream per open
handle, read as the kernel asks, each entry's offset the backing filesystem's
cookie (``d_off``, what telldir gives and seekdir takes).  So a handle costs a
DIR buffer whatever the directory's size (a snapshot per handle of a 50,000-entry
directory cost megabytes each), and the guarantees of a listing are the backing
filesystem's: an entry that stays during the listing is listed exactly once, and
one added or removed meanwhile appears at most once.
"""

from __future__ import annotations

import ctypes
import os
from typing import Iterator, Optional, Tuple


class _Dirent(ctypes.Structure):  # glibc's struct dirent on 64-bit Linux (== dirent64)
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64),
                ("d_reclen", ctypes.c_ushort), ("d_type", ctypes.c_ubyte),
                ("d_name", ctypes.c_char * 256)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fdopendir.restype = ctypes.c_void_p
_libc.fdopendir.argtypes = [ctypes.c_int]
_libc.readdir.restype = ctypes.POINTER(_Dirent)
_libc.readdir.argtypes = [ctypes.c_void_p]
_libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
_libc.rewinddir.argtypes = [ctypes.c_void_p]
_libc.closedir.argtypes = [ctypes.c_void_p]


class DirStream:
    """The entries of the directory open as ``fd`` (which it owns from now on)."""

    def __init__(self, fd: int):
        self._dir = _libc.fdopendir(fd)
        if not self._dir:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        # The offset the stream is at (0: the start), None when unknown (an entry was
        # read but not delivered): then the next listing seeks.
        self.pos: Optional[int] = 0

    def seek(self, offset: int):
        if offset != self.pos:
            if offset == 0:
                _libc.rewinddir(self._dir)
            else:
                _libc.seekdir(self._dir, offset)
            self.pos = offset

    def entries(self) -> Iterator[Tuple[bytes, int]]:
        """(name, the offset after it) from the current position to the end.  The
        caller sets ``pos`` to an entry's offset once it delivered that entry."""
        while True:
            self.pos = None
            ctypes.set_errno(0)
            ent = _libc.readdir(self._dir)
            if not ent:
                e = ctypes.get_errno()
                if e:
                    raise OSError(e, os.strerror(e))
                return
            d = ent.contents
            yield d.d_name, d.d_off

    def close(self):
        if self._dir:
            _libc.closedir(self._dir)
            self._dir = None
