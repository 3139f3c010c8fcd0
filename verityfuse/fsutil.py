"""Opening files that an attacker may swap for something else (pure, stdlib + ctypes;
the native ``_sysopen`` makes the same system calls faster where it is built).

The rule everywhere: open with O_PATH first (which neither blocks on a FIFO
nor runs a device driver's open), check the type of what was opened, and only
then open it for reading through /proc/self/fd, which reopens that very inode
and walks no path again.  Paths inside an untrusted tree are resolved with
openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS), or component by component with
O_NOFOLLOW where openat2 is missing.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import stat
from typing import Callable, Iterator, List, Optional

O_PATH_NOFOLLOW = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_openat2 = 437  # x86_64, aarch64 and the generic table agree
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08


def _load_native():
    if os.environ.get("VERITYFUSE_PURE_PYTHON"):
        return None
    try:
        from . import _sysopen
    except ImportError:  # not built (no compiler at install time): ctypes does the same
        return None
    return _sysopen


native_sys = _load_native()


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_have_openat2 = True
_BENEATH = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS


def _openat2(dirfd: int, path: bytes, flags: int, resolve: int) -> int:
    if native_sys is not None:
        return native_sys.openat2(dirfd, path, flags, resolve)
    if b"\0" in path:  # ctypes would cut the path there
        raise ValueError("embedded null byte")
    how = _OpenHow(flags, 0, resolve)
    fd = _libc.syscall(_SYS_openat2, dirfd, path, ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path.decode(errors="replace"))
    return fd


def open_beneath(dirfd: int, path: bytes, flags: int = O_PATH_NOFOLLOW) -> int:
    """O_PATH fd of ``path`` (relative, normalized) under ``dirfd``, following no
    symlink anywhere: a symlink as the last component is returned as itself (the
    caller checks the type), one in the middle fails with ELOOP or ENOTDIR.  A ``..``
    is refused (EXDEV) on both routes: the kernel's refuses one that leaves ``dirfd``,
    and the walk below, for kernels without openat2, could not tell.  ``flags``: other
    open flags for what the last component must be (O_DIRECTORY | O_NOFOLLOW for a
    directory to list: a symlink there is then ELOOP too)."""
    global _have_openat2
    if b".." in path and b".." in path.split(b"/"):
        raise OSError(errno.EXDEV, "a path with '..' is refused here",
                      path.decode(errors="replace"))
    if _have_openat2:
        try:
            return _openat2(dirfd, path, flags, _BENEATH)
        except OSError as e:
            if e.errno != errno.ENOSYS:
                raise
            _have_openat2 = False  # kernel < 5.6
    parts = path.split(b"/")
    fd = os.dup(dirfd)
    try:
        for part in parts[:-1]:
            try:
                nfd = os.open(part, O_PATH_NOFOLLOW | os.O_DIRECTORY, dir_fd=fd)
            except NotADirectoryError:  # ELOOP for a symlink, as openat2 says
                if stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP)) from None
                raise
            os.close(fd)
            fd = nfd
        return os.open(parts[-1], flags | os.O_NOFOLLOW, dir_fd=fd)
    except OSError as e:  # the whole path named, as openat2's error names it
        raise type(e)(e.errno, e.strerror, path.decode(errors="replace")) from None
    finally:
        os.close(fd)


def type_name(mode: int) -> str:
    return {stat.S_IFDIR: "a directory", stat.S_IFLNK: "a symlink", stat.S_IFIFO: "a FIFO",
            stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
            stat.S_IFSOCK: "a socket", stat.S_IFREG: "a regular file"}.get(stat.S_IFMT(mode), "unknown")


class WouldWait(Exception):
    """Opening a file would wait for another process: a lease on it being broken (a
    file's owner may take one; the open then waits up to lease-break-time, 45 s).  On
    the request thread that would stall every request of the mount, so the open is
    made with O_NONBLOCK, and this says so: ``finish()`` opens the same file again,
    waiting, from state of its own (safe in a worker thread), and returns the fd."""

    def __init__(self, finish: Callable[[], int]):
        super().__init__("the open would wait for a lease to be broken")
        self.finish = finish


def open_nowait(opener: Callable[[int], int], flags: int,
                finish: Callable[[], Callable[[], int]]) -> int:
    """``opener(flags | O_NONBLOCK)`` on a regular file; when it would wait, WouldWait
    with ``finish()``'s closure (made now, on this thread).  The flag stays on the fd:
    reads and writes of a regular file ignore it (it sets no IOCB_NOWAIT; only
    RWF_NOWAIT does), so clearing it would cost two system calls an open for nothing."""
    try:
        return opener(flags | os.O_NONBLOCK)
    except BlockingIOError:
        raise WouldWait(finish()) from None


def open_noatime(path: str, flags: int, noatime: bool) -> int:
    """O_NOATIME when asked for.  It needs the file's owner or CAP_FOWNER (EPERM
    otherwise): a daemon without either reads as the kernel would without noatime."""
    if noatime:
        try:
            return os.open(path, flags | os.O_NOATIME)
        except PermissionError as e:
            if e.errno != errno.EPERM:
                raise
    return os.open(path, flags)


def reopen_nowait(path_fd: int, flags: int, noatime: bool = False) -> int:
    """The regular file behind O_PATH ``path_fd`` (kept) opened with ``flags`` through
    /proc/self/fd, without waiting (``open_nowait``).  The WouldWait's ``finish`` opens
    from a copy of ``path_fd``, so the caller may close its own meanwhile."""
    def finish():
        copy = os.dup(path_fd)

        def open_waiting() -> int:
            try:
                return open_noatime(f"/proc/self/fd/{copy}", flags, noatime)
            finally:
                os.close(copy)
        return open_waiting
    return open_nowait(lambda f: open_noatime(f"/proc/self/fd/{path_fd}", f, noatime),
                       flags, finish)


class NotRegular(OSError):
    """What was opened is not a regular file: ``open_regular``'s errno says which kind
    (ELOOP, EISDIR or EINVAL) and its message names the file and its type."""


class NotRegularDirectory(NotRegular, IsADirectoryError):
    """A directory where a regular file was wanted (EISDIR): caught as either."""


def reopen_regular(path_fd: int, what: str, flags: int = os.O_RDONLY) -> int:
    """Open the inode behind O_PATH ``path_fd`` with ``flags``, if it is a regular file.

    The one policy for opening a file that must be regular (``open_regular`` is this
    after an O_PATH open).  ``path_fd`` is consumed.  What is not a regular file raises
    NotRegular, message ``"<what> is <its type>, not a regular file"``, errno:

    - a symlink (opened itself, not followed): ELOOP, as ``open(O_NOFOLLOW)`` says;
    - a directory: EISDIR (a ``NotRegularDirectory``, also an ``IsADirectoryError``);
    - a FIFO, socket or device: EINVAL.  Never opened, so a FIFO never blocks and a
      device driver's open never runs: only the O_PATH fd's fstat looks at it.

    A regular file is reopened through /proc/self/fd, which is that very inode (no path
    is walked again, nothing can be swapped in between); an error there (EACCES) names
    ``what``, not the /proc path.
    """
    if native_sys is not None:
        try:
            fd, mode, regular = native_sys.reopen(path_fd, flags)  # closes path_fd
        except OSError as e:
            raise type(e)(e.errno, e.strerror, what) from None
        if not regular:
            raise not_regular(mode, what)
        return fd
    try:
        try:
            fd, st = _reopen_if_regular(path_fd, flags)
        except OSError as e:  # named as the native path names it
            raise type(e)(e.errno, e.strerror, what) from None
        if fd < 0:
            raise not_regular(st.st_mode, what)
        return fd
    finally:
        try:
            os.close(path_fd)
        except OSError:
            pass  # a stale fd (EBADF): its fstat's error, naming the file, is the answer


def _reopen_if_regular(path_fd: int, flags: int):
    """``(fd, stat)``: the file behind O_PATH ``path_fd`` (kept open) opened with ``flags``
    through /proc/self/fd if its fstat says it is a regular file, else ``(-1, stat)`` and
    nothing opened: the native reopen's steps, for the pure-Python routes."""
    st = os.fstat(path_fd)
    if not stat.S_ISREG(st.st_mode):
        return -1, st
    return os.open(f"/proc/self/fd/{path_fd}", flags | os.O_CLOEXEC | os.O_NOCTTY), st


class ReadFailed(OSError):
    """``read_beneath`` opened the file and reading it failed (EIO, ...): an error of the
    read, to report as such, never a statement about what the file holds."""


def read_beneath(dirfd: int, path: bytes, nbytes: int, keep: bool = False):
    """``(fd, mode, size, head)`` of ``path`` under ``dirfd``: resolved as ``open_beneath``
    resolves it, opened by ``reopen_regular``'s policy, and its first ``nbytes`` read
    (one pread, of at most one byte more than its fstat size).  ``fd`` is -1 unless
    ``keep`` (then it is the caller's).  What is not a regular file is never opened:
    ``head`` is None and ``mode`` says what it is.

    One native call where built: a store reads an index entry and an object header
    per file opened, and four calls' worth of interpreter cost more than the system
    calls.  Errors: ``open_beneath``'s (naming ``path``), then the fstat's or reopen's
    (naming no file), then ReadFailed; either way no fd is left open."""
    global _have_openat2
    if nbytes < 0:
        raise ValueError("negative byte count")
    if native_sys is not None and _have_openat2 and b".." not in path:
        try:
            return native_sys.read_beneath(dirfd, path, O_PATH_NOFOLLOW, _BENEATH, nbytes, keep)
        except native_sys.ReadError as e:
            raise ReadFailed(e.errno, e.strerror) from None
        except OSError as e:
            if e.errno != errno.ENOSYS or e.filename is None:  # named: openat2's own error
                raise
            _have_openat2 = False  # kernel < 5.6: the walk below
    pfd = open_beneath(dirfd, path)
    try:
        fd, st = _reopen_if_regular(pfd, os.O_RDONLY)
    except OSError as e:
        raise type(e)(e.errno, e.strerror) from None  # not the /proc path: as natively
    finally:
        os.close(pfd)
    if fd < 0:
        return -1, st.st_mode, 0, None
    try:
        head = os.pread(fd, min(nbytes, st.st_size + 1), 0)
    except OSError as e:
        os.close(fd)
        raise ReadFailed(e.errno, e.strerror) from None
    if not keep:
        os.close(fd)
        fd = -1
    return fd, st.st_mode, st.st_size, head


def not_regular(mode: int, what: str) -> NotRegular:
    msg = f"{what} is {type_name(mode)}, not a regular file"
    kind = stat.S_IFMT(mode)
    if kind == stat.S_IFDIR:
        return NotRegularDirectory(errno.EISDIR, msg)
    return NotRegular(errno.ELOOP if kind == stat.S_IFLNK else errno.EINVAL, msg)


def open_regular(path, dir_fd=None, follow: bool = False, what: str = "") -> int:
    """A read-only fd of the regular file at ``path``, never blocking on a FIFO, never
    opening a device: ``reopen_regular``'s policy.  A final symlink is refused (ELOOP)
    unless ``follow``; ``what`` names the file in messages (default: ``path``).  A
    missing file raises FileNotFoundError, as open(2) would."""
    what = what or os.fsdecode(path)
    pfd = os.open(path, os.O_PATH | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW), dir_fd=dir_fd)
    return reopen_regular(pfd, what)


# Filesystems whose reads never wait for a device (statfs f_type).
_MEMORY_FS = {0x01021994, 0x858458F6}  # TMPFS_MAGIC, RAMFS_MAGIC


def nowait_supported(fd: int) -> bool:
    """Whether ``fd``'s file system answers RWF_NOWAIT (a read that would wait fails with
    EAGAIN instead); FUSE and virtio-fs refuse it (EOPNOTSUPP).  One byte, never waits."""
    try:
        os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
    except OSError as e:
        return e.errno not in (errno.EOPNOTSUPP, errno.EINVAL)
    return True


_SYS_cachestat = 451  # Linux >= 6.5, every architecture


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("nr_cache", "nr_dirty", "nr_writeback",
                                               "nr_evicted", "nr_recently_evicted")]


def all_cached(fd: int, offset: int, length: int) -> Optional[bool]:
    """Whether every page of ``[offset, offset + length)`` of ``fd`` is in the page cache
    now (cachestat(2)); None if the kernel cannot tell (before 6.5).  For a file system
    that refuses RWF_NOWAIT (FUSE, virtio-fs): a read of cached pages does not wait,
    unless memory pressure evicts one in between."""
    if length <= 0:
        return True
    page = mmap.PAGESIZE
    first, last = offset // page, (offset + length - 1) // page
    rng, cs = _CachestatRange(first * page, (last + 1 - first) * page), _Cachestat()
    if _libc.syscall(_SYS_cachestat, fd, ctypes.byref(rng), ctypes.byref(cs), 0) != 0:
        return None
    return cs.nr_cache >= last + 1 - first


def within(path: str, top: str) -> bool:
    """Whether resolved ``path`` is ``top`` or below it (both resolved)."""
    return path == top or path.startswith(top.rstrip("/") + "/")


def fs_type(fd: int) -> int:
    """fstatfs's f_type of ``fd``'s file system; OSError if it cannot be had."""
    if native_sys is not None:
        return native_sys.fs_type(fd)
    buf = ctypes.create_string_buffer(128)  # struct statfs; f_type comes first
    if _libc.fstatfs(fd, buf) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return int.from_bytes(buf.raw[:ctypes.sizeof(ctypes.c_long)], "little")


def in_memory(fd: int) -> bool:
    """Whether ``fd``'s file lives in memory (tmpfs, ramfs): reading it never waits."""
    try:
        return fs_type(fd) in _MEMORY_FS
    except OSError:
        return False


def process_stat(pid) -> Optional[List[str]]:
    """The fields of /proc/PID/stat after the command name (the state first, the start
    time at index 19), or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].decode("ascii", "replace").split()
    except (OSError, IndexError):
        return None


def fds_open_on(path: str, pid="self") -> Iterator[int]:
    """The fds of process ``pid`` open on ``path``, as /proc/PID/fd names their files."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return
    for name in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == path:
                yield int(name)
        except OSError:
            continue
