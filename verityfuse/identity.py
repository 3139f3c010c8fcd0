"""File identity that survives renames and is never reused: (filesystem, file handle).

``name_to_handle_at`` gives a handle that names one inode for the life of the
filesystem (ext4, xfs, btrfs and tmpfs encode the inode number and its
generation, so a deleted inode's number, reused later, yields another handle).
``open_by_handle_at`` reopens it without any path, which needs
CAP_DAC_READ_SEARCH.  The filesystem is named by statfs's ``f_fsid``.

Not every filesystem's handles last: a FUSE filesystem's (virtio-fs too) is the node
id its server gave, which the server may change, or give to another file, once the
kernel forgets the inode; and a filesystem whose ``f_fsid`` is 0 cannot be told
from another.  A key made there would let a file lose its verity, or take a deleted
file's: where verity is kept with the inode (a local mount, a seal for one) there is
none (``lasting=True``: NoLastingHandles).  A manifest's seal may still key such
files: a manifest mount looks their trees up by digest, never by key.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import struct
from typing import Dict, Optional, Tuple, Union

from . import fsutil

_libc = ctypes.CDLL(None, use_errno=True)
AT_EMPTY_PATH = 0x1000
MAX_HANDLE_SZ = 128


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ)]


def _err(what: str):
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}")


def handle_of(fd: int) -> Tuple[int, bytes]:
    """(handle type, handle bytes) of the inode ``fd`` refers to (O_PATH is fine).

    OSError EOPNOTSUPP when the filesystem cannot export handles."""
    if fsutil.native_sys is not None:
        return fsutil.native_sys.handle_of(fd)
    h = _FileHandle()
    h.handle_bytes = MAX_HANDLE_SZ
    mount_id = ctypes.c_int()
    if _libc.name_to_handle_at(fd, b"", ctypes.byref(h), ctypes.byref(mount_id), AT_EMPTY_PATH):
        raise _err("name_to_handle_at")
    return h.handle_type, bytes(h.f_handle[:h.handle_bytes])


def open_by_handle(mount_fd: int, handle: Tuple[int, bytes], flags: int) -> int:
    htype, raw = handle
    h = _FileHandle()
    h.handle_bytes, h.handle_type = len(raw), htype
    ctypes.memmove(h.f_handle, raw, len(raw))
    fd = _libc.open_by_handle_at(mount_fd, ctypes.byref(h), flags | os.O_CLOEXEC)
    if fd < 0:
        raise _err("open_by_handle_at")
    return fd


FUSE_SUPER_MAGIC = 0x65735546


class NoLastingHandles(OSError):
    """The filesystem gives no file handles that name one inode for its life (EOPNOTSUPP)."""


def fsid(fd: int) -> int:
    return os.fstatvfs(fd).f_fsid


def lasting_fsid(fd: int) -> int:
    """``fd``'s filesystem's fsid, if its file handles last; else NoLastingHandles."""
    try:
        fs, ftype = fsid(fd), fsutil.fs_type(fd)
    except OSError as e:
        if e.errno != errno.ENOSYS:
            raise
        fs, ftype = 0, FUSE_SUPER_MAGIC  # a FUSE server without statfs: only FUSE says so
    kind = "fuse" if ftype == FUSE_SUPER_MAGIC else "f_fsid 0" if fs == 0 else None
    if kind is not None:
        raise NoLastingHandles(errno.EOPNOTSUPP, f"its file system ({kind}) gives no file "
                               f"handles that last: verity cannot be kept with the inode")
    return fs


def store_key(fs: int, handle: Tuple[int, bytes]) -> str:
    """The store's name for an inode: hex SHA-256 of fsid || handle type || handle."""
    htype, raw = handle
    return hashlib.sha256(struct.pack("<QI", fs & (2**64 - 1), htype & 0xFFFFFFFF) + raw).hexdigest()


def key_of(fd: int, lasting: bool = False) -> str:
    """store_key of the inode behind ``fd``; EOPNOTSUPP if its filesystem has no handles,
    or, with ``lasting``, none that last (NoLastingHandles)."""
    return store_key(lasting_fsid(fd) if lasting else fsid(fd), handle_of(fd))


class Keys:
    """``key_of`` for the many files of one run (a seal) or one mount (the inode table):
    each filesystem's fsid is asked once, by device number, instead of a statfs per
    file.  A device number names another filesystem only after an unmount and a new
    mount, which neither outlives."""

    def __init__(self, lasting: bool = False):
        self.lasting = lasting  # key_of's
        self._fsids: Dict[int, Union[int, NoLastingHandles]] = {}

    def of(self, fd: int, dev: int, handle: Optional[Tuple[int, bytes]] = None) -> str:
        """key_of(fd), for ``fd`` on device ``dev`` (its st_dev); ``handle``: its handle,
        when the caller has it already."""
        fs = self._fsids.get(dev)
        if fs is None:
            try:
                fs = lasting_fsid(fd) if self.lasting else fsid(fd)
            except NoLastingHandles as e:
                fs = e
            self._fsids[dev] = fs
        if isinstance(fs, NoLastingHandles):
            raise NoLastingHandles(fs.errno, fs.strerror)
        return store_key(fs, handle if handle is not None else handle_of(fd))


def can_reopen(fd: int) -> bool:
    """Whether open_by_handle_at works here (it needs CAP_DAC_READ_SEARCH); ``fd``
    is a directory opened for reading (not O_PATH)."""
    try:
        os.close(open_by_handle(fd, handle_of(fd), os.O_PATH))
        return True
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EACCES, errno.ESTALE):
            return False
        raise
