"""Create files as the caller would: fsuid, fsgid, supplementary groups and umask.

A root daemon that creates files as root and chowns them afterwards gets
several things wrong that the kernel gets right when the caller's own
credentials create them: chown clears setuid and setgid, a setgid directory's
group is not inherited, S_ISGID of a non-member is not cleared, and a default
ACL is not applied instead of the umask.  So inode-creating requests run with
the caller's filesystem credentials on the thread that performs them.

fsuid, fsgid and the group list are per thread when set with raw system calls
(glibc's setgroups would change every thread), and leaving fsuid 0 drops the
filesystem capabilities for exactly that call, as for the caller.  The umask
is per process; only the request thread creates files under it, and the
store's own files use explicit modes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform

_libc = ctypes.CDLL(None, use_errno=True)
_SYSCALLS = {"x86_64": (116, 122, 123), "aarch64": (159, 151, 152)}  # setgroups, setfsuid, setfsgid
SYS_setgroups, SYS_setfsuid, SYS_setfsgid = _SYSCALLS.get(platform.machine(), (None, None, None))
SYS_faccessat2 = 439  # the same number on every architecture (Linux >= 5.8)
_AT_FDCWD, _AT_EACCESS = -100, 0x200


def groups_of(pid: int):
    """The supplementary groups of process ``pid`` (from /proc; () if it is gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return tuple(int(g) for g in line.split()[1:])
    except OSError:
        pass
    return ()


def _setgroups(groups):
    arr = (ctypes.c_uint32 * max(1, len(groups)))(*groups)
    if _libc.syscall(SYS_setgroups, len(groups), arr) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setgroups: {os.strerror(e)}")


def supported() -> bool:
    return os.geteuid() == 0 and SYS_setgroups is not None


@contextlib.contextmanager
def as_ids(uid: int, gid: int, groups):
    """Run the body with these filesystem uid, gid and supplementary groups (this thread
    only).  A no-op for a daemon that is not root."""
    if not supported():
        yield
        return
    own_groups = os.getgroups()
    _setgroups(tuple(groups))
    _libc.syscall(SYS_setfsgid, gid)
    _libc.syscall(SYS_setfsuid, uid)
    try:
        yield
    finally:
        _libc.syscall(SYS_setfsuid, 0)
        _libc.syscall(SYS_setfsgid, os.getegid())
        _setgroups(own_groups)


@contextlib.contextmanager
def as_caller(ctx):
    """Run the body with ``ctx``'s uid, gid, groups and umask (a pyfuse3 RequestContext
    or anything with uid, gid, pid, umask).  A no-op for a daemon that is not root."""
    umask = os.umask(getattr(ctx, "umask", 0) & 0o777)
    try:
        if ctx is None or not supported():
            yield
        else:
            with as_ids(ctx.uid, ctx.gid, groups_of(ctx.pid)):
                yield
    finally:
        os.umask(umask)


def access_errno(path: str, mode: int) -> int:
    """faccessat2(path, mode, AT_EACCESS) with this thread's filesystem credentials (as
    ``as_ids`` sets them): 0 if granted, else its errno.  The file system's own rule,
    ACLs, the immutable flag and a read-only file system included.  glibc's faccessat
    is not used: where the system call is missing it falls back to the real uid."""
    r = _libc.syscall(SYS_faccessat2, _AT_FDCWD, os.fsencode(path), mode, _AT_EACCESS)
    return 0 if r == 0 else ctypes.get_errno()
