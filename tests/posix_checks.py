"""POSIX conformance checks: the table behind tests/test_conformance.py.

A check is a function ``check(ctx) -> record`` that runs a list of POSIX
operations in the current directory (a fresh, empty directory) and returns a
*record*: return values, errno names, file types, octal modes, owners, sizes,
link counts, contents, listings, xattr values, and *relations* between inode
numbers and timestamps (never raw inode numbers or timestamps).  The same check
runs on a plain directory of the backing filesystem (the oracle) and on the
mount; the two records must be equal.

Checks run in a forked child that enters the directory first and then takes the
identity and umask of its variant (see ``run_check``); a check running as root
runs single steps as an unprivileged user with ``as_user``.  Relative paths
only: the unprivileged identities cannot traverse pytest's 0700 directories.

Everything here is plain Python + ctypes: no pytest, no verityfuse.  To see one
record: ``python tests/posix_checks.py CHECK DIR [user] [umask]`` (DIR must be empty).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import pickle
import select
import signal
import stat
import struct
import subprocess
import sys
import time
import traceback
from typing import Callable, Dict, List, NamedTuple, Optional

libc = ctypes.CDLL(None, use_errno=True)

PATH_MAX = 4096
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_SYMLINK_FOLLOW = 0x400
AT_EMPTY_PATH = 0x1000

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

XATTR_CREATE = 1
XATTR_REPLACE = 2

FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IOC_FSGETXATTR = 0x801C581F
FS_IOC_FSSETXATTR = 0x401C5820
FS_SECRM_FL = 0x1
FS_UNRM_FL = 0x2
FS_COMPR_FL = 0x4
FS_SYNC_FL = 0x8
FS_IMMUTABLE_FL = 0x10
FS_APPEND_FL = 0x20
FS_NODUMP_FL = 0x40
FS_NOATIME_FL = 0x80
FS_EXTENT_FL = 0x80000
FS_VERITY_FL = 0x100000
FS_XFLAG_REALTIME = 0x1
FS_XFLAG_IMMUTABLE = 0x8
FS_XFLAG_APPEND = 0x10
FS_XFLAG_NODUMP = 0x80
FSXATTR = struct.Struct("<IIIII8s")  # xflags, extsize, nextents, projid, cowextsize, pad
assert FSXATTR.size == 0x1C

SYS_getdents64 = 217  # x86_64
SYS_fchmodat2 = 452

# POSIX ACL xattr encoding (include/uapi/linux/posix_acl_xattr.h)
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 1, 2, 4, 8, 0x10, 0x20
ACL_UNDEFINED_ID = 0xFFFFFFFF


# -- identities -------------------------------------------------------------

class Who(NamedTuple):
    name: str
    uid: int
    gid: int
    groups: tuple


ROOT = None
USER = Who("user", 40001, 40001, (40001, 40002))   # member of UGROUP
OTHER = Who("other", 40003, 40003, (40003,))
UGROUP = 40002   # a supplementary group of USER
NOGROUP = 40004  # a group USER is not in
NAMES = {0: "root", 40001: "user", 40002: "ugroup", 40003: "other", 40004: "nogroup"}


def idname(n: int) -> str:
    return NAMES.get(n, str(n))


# -- results ------------------------------------------------------------------

def ename(e: OSError) -> str:
    return "!" + errno.errorcode.get(e.errno, str(e.errno))


def attempt(fn: Callable, *a, **kw):
    """``fn(*a, **kw)``: "ok" (or its non-None result), or "!ERRNO"."""
    try:
        r = fn(*a, **kw)
    except OSError as e:
        return ename(e)
    return "ok" if r is None else r


class Rec(dict):
    """A record: ``r("label", fn, *args)`` stores attempt(fn, *args) under a new label."""

    def __setitem__(self, key, value):
        if key in self:
            raise KeyError(f"duplicate record label {key!r}")
        super().__setitem__(key, value)

    def __call__(self, key, fn, *a, **kw):
        self[key] = attempt(fn, *a, **kw)
        return self[key]


def try_open(path, flags, mode=0o666, dir_fd=None, then=None):
    """Open, optionally run ``then(fd)``, close.  "ok" / then's result / "!ERRNO"."""
    try:
        fd = os.open(path, flags, mode, dir_fd=dir_fd)
    except OSError as e:
        return ename(e)
    try:
        return "ok" if then is None else attempt(then, fd)
    finally:
        os.close(fd)


def fmode(m: int) -> str:
    return "0o%04o" % stat.S_IMODE(m)


_TYPES = [(stat.S_ISREG, "reg"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "lnk"),
          (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "sock"), (stat.S_ISCHR, "chr"),
          (stat.S_ISBLK, "blk")]


def ftype(m: int) -> str:
    for test, name in _TYPES:
        if test(m):
            return name
    return "?"


def describe_st(st: os.stat_result) -> Dict:
    d = {"type": ftype(st.st_mode), "mode": fmode(st.st_mode), "nlink": st.st_nlink,
         "owner": f"{idname(st.st_uid)}:{idname(st.st_gid)}"}
    if not stat.S_ISDIR(st.st_mode):
        d["size"] = st.st_size
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        d["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
    return d


def describe(path, dir_fd=None, data=True) -> Dict:
    """Type, mode, nlink, owner, size (+ contents of small files, symlink target); or "!ERRNO"."""
    try:
        st = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as e:
        return ename(e)
    d = describe_st(st)
    if stat.S_ISLNK(st.st_mode):
        d["target"] = os.readlink(path, dir_fd=dir_fd)
    elif data and stat.S_ISREG(st.st_mode) and st.st_size <= 4096:
        d["data"] = try_open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd,
                             then=lambda fd: os.pread(fd, 8192, 0))
    return d


def mode_of(path, follow=False) -> str:
    try:
        return fmode(os.stat(path, follow_symlinks=follow).st_mode)
    except OSError as e:
        return ename(e)


def owner_of(path, follow=False) -> str:
    try:
        st = os.stat(path, follow_symlinks=follow)
    except OSError as e:
        return ename(e)
    return f"{idname(st.st_uid)}:{idname(st.st_gid)}"


def size_of(path) -> object:
    try:
        return os.stat(path, follow_symlinks=False).st_size
    except OSError as e:
        return ename(e)


def nlink_of(path) -> object:
    try:
        return os.stat(path, follow_symlinks=False).st_nlink
    except OSError as e:
        return ename(e)


def ino(path, follow=False) -> int:
    return os.stat(path, follow_symlinks=follow).st_ino


def read_file(path) -> object:
    return try_open(path, os.O_RDONLY | os.O_NONBLOCK, then=lambda fd: os.pread(fd, 1 << 20, 0))


def write_file(path, data: bytes, mode=0o644):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def snapshot(path=".", dir_fd=None) -> Dict:
    """The whole tree under ``path``: {name: description}, subdirectories nested.

    Walks with directory fds, so trees deeper than PATH_MAX are described too.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        return _snap(fd, 0)
    finally:
        os.close(fd)


def _snap(fd, depth):
    out = {}
    for n in sorted(os.listdir(fd)):
        d = describe(n, dir_fd=fd)
        if isinstance(d, dict) and d["type"] == "dir" and depth < 64:
            try:
                sub = os.open(n, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as e:
                d["entries"] = ename(e)
            else:
                try:
                    d["entries"] = _snap(sub, depth + 1)
                finally:
                    os.close(sub)
        out[n] = d
    return out


def times_ns(path, follow=False):
    st = os.stat(path, follow_symlinks=follow)
    return st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns


def now_ns() -> int:
    return time.time_ns()


# File timestamps come from the kernel's coarse clock, which lags time.time_ns()
# by up to a tick; a timestamp is "now" if it falls in [before - SLACK, after + SLACK].
SLACK = 50_000_000


def is_now(t: int, before: int, after: int) -> bool:
    return before - SLACK <= t <= after + SLACK


def split_ns(t: int):
    return divmod(t, 1_000_000_000)


# -- directory entries, the way the kernel returns them ----------------------

DT = {0: "unknown", 1: "fifo", 2: "chr", 4: "dir", 6: "blk", 8: "reg", 10: "lnk", 12: "sock"}


def getdents_once(fd, bufsize) -> List[tuple]:
    buf = ctypes.create_string_buffer(bufsize)
    n = libc.syscall(SYS_getdents64, fd, buf, bufsize)
    if n < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return _parse_dents(buf.raw[:n])


def getdents(path_or_fd=".", bufsize=32768) -> List[tuple]:
    """Every entry getdents64 returns, '.' and '..' included: [(name, d_ino, d_type)]."""
    own = not isinstance(path_or_fd, int)
    fd = os.open(path_or_fd, os.O_RDONLY | os.O_DIRECTORY) if own else path_or_fd
    try:
        out = []
        while True:
            chunk = getdents_once(fd, bufsize)
            if not chunk:
                return out
            out.extend(chunk)
    finally:
        if own:
            os.close(fd)


def _parse_dents(raw: bytes) -> List[tuple]:
    out, pos = [], 0
    while pos < len(raw):
        d_ino, _d_off, reclen, d_type = struct.unpack_from("<QqHB", raw, pos)
        name = raw[pos + 19:pos + reclen].split(b"\0", 1)[0]
        out.append((os.fsdecode(name), d_ino, d_type))
        pos += reclen
    return out


def listing(path=".") -> List:
    """Sorted [name, d_type, d_ino == lstat(name).st_ino] of every getdents64 entry."""
    out = []
    for name, d_ino, d_type in getdents(path):
        try:
            same = d_ino == os.stat(os.path.join(path, name), follow_symlinks=False).st_ino
        except OSError as e:
            same = ename(e)
        out.append([name, DT.get(d_type, d_type), same])
    return sorted(out)


# -- syscalls Python does not expose -----------------------------------------

def _ck(ret):
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def linkat(old, new, flags=0, olddirfd=AT_FDCWD):
    """linkat(2) with explicit flags (os.link(follow_symlinks=True) calls link(2), which
    does not follow)."""
    _ck(libc.linkat(olddirfd, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags))


def renameat2(old, new, flags=0):
    _ck(libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags))


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat(path, atime, mtime, follow=True):
    """Times are (sec, nsec), UTIME_NOW or UTIME_OMIT; ``atime is mtime is None`` = NULL."""
    if atime is None and mtime is None:
        ts = None
    else:
        ts = (_Timespec * 2)()
        for i, t in enumerate((atime, mtime)):
            if t in (UTIME_NOW, UTIME_OMIT):
                ts[i].tv_sec, ts[i].tv_nsec = 0, t
            else:
                ts[i].tv_sec, ts[i].tv_nsec = t
    _ck(libc.utimensat(AT_FDCWD, os.fsencode(path), ts, 0 if follow else AT_SYMLINK_NOFOLLOW))


def fchmodat_nofollow(path, mode):
    """fchmodat2(AT_SYMLINK_NOFOLLOW) (Linux >= 6.6)."""
    _ck(libc.syscall(SYS_fchmodat2, AT_FDCWD, os.fsencode(path), mode, AT_SYMLINK_NOFOLLOW))


def readlink_buf(path, size):
    """readlink(2) into a ``size``-byte buffer: the (possibly truncated) bytes."""
    buf = ctypes.create_string_buffer(size)
    n = _ck(libc.readlink(os.fsencode(path), buf, ctypes.c_size_t(size)))
    return buf.raw[:n]


def setxattr_flags(path, name, value: bytes, flags, follow=True):
    os.setxattr(path, name, value, flags, follow_symlinks=follow)


def getxattr_size(path, name, size, follow=True):
    """getxattr into a ``size``-byte buffer (0: the size probe); returns the length or value."""
    fn = libc.getxattr if follow else libc.lgetxattr
    buf = ctypes.create_string_buffer(max(size, 1))
    n = _ck(fn(os.fsencode(path), name.encode(), buf if size else None, ctypes.c_size_t(size)))
    return n if size == 0 else buf.raw[:n]


def listxattr_size(path, size, follow=True, prefix=("user.", "trusted.")):
    """listxattr into a ``size``-byte buffer (0: the size probe, needs no other names present)."""
    fn = libc.listxattr if follow else libc.llistxattr
    buf = ctypes.create_string_buffer(max(size, 1))
    n = _ck(fn(os.fsencode(path), buf if size else None, ctypes.c_size_t(size)))
    return n if size == 0 else sorted(x.decode() for x in buf.raw[:n].split(b"\0")
                                      if x and x.decode().startswith(prefix))


def xnames(path, follow=True, prefix=("user.", "trusted.")):
    """Sorted xattr names in the given namespaces, or "!ERRNO"."""
    try:
        return sorted(n for n in os.listxattr(path, follow_symlinks=follow) if n.startswith(prefix))
    except OSError as e:
        return ename(e)


def xattrs(path, follow=True, prefix=("user.", "trusted.")) -> Dict[str, bytes]:
    """{name: value} of the xattrs in the given namespaces, or "!ERRNO"."""
    try:
        out = {}
        for n in sorted(os.listxattr(path, follow_symlinks=follow)):
            if n.startswith(prefix):
                out[n] = os.getxattr(path, n, follow_symlinks=follow)
        return out
    except OSError as e:
        return ename(e)


# -- inode flags (chattr/lsattr) -----------------------------------------------

def _flag_fd(path):
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)


def getflags(path) -> int:
    fd = _flag_fd(path)
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf)
        return struct.unpack_from("<I", buf)[0]
    finally:
        os.close(fd)


def setflags(path, flags: int):
    fd = _flag_fd(path)
    try:
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, bytearray(struct.pack("<I", flags) + bytes(4)))
    finally:
        os.close(fd)


def fsgetxattr(path) -> Dict:
    fd = _flag_fd(path)
    try:
        buf = bytearray(FSXATTR.size)
        fcntl.ioctl(fd, FS_IOC_FSGETXATTR, buf)
        xflags, extsize, nextents, projid, cow, _ = FSXATTR.unpack(buf)
        return {"xflags": hex(xflags), "extsize": extsize, "nextents": nextents,
                "projid": projid, "cowextsize": cow}
    finally:
        os.close(fd)


def fssetxattr(path, xflags, extsize=0, projid=0, cowextsize=0):
    fd = _flag_fd(path)
    try:
        fcntl.ioctl(fd, FS_IOC_FSSETXATTR, bytearray(FSXATTR.pack(xflags, extsize, 0, projid,
                                                                  cowextsize, bytes(8))))
    finally:
        os.close(fd)


def letters(path) -> str:
    """FS_IOC_GETFLAGS as letters (flag_letters), or "!ERRNO"."""
    r = attempt(getflags, path)
    return r if isinstance(r, str) else flag_letters(r)


def flag_letters(flags: int) -> str:
    order = [(FS_SECRM_FL, "s"), (FS_UNRM_FL, "u"), (FS_SYNC_FL, "S"), (FS_IMMUTABLE_FL, "i"),
             (FS_APPEND_FL, "a"), (FS_NODUMP_FL, "d"), (FS_NOATIME_FL, "A"), (FS_COMPR_FL, "c"),
             (FS_EXTENT_FL, "e"), (FS_VERITY_FL, "V")]
    known = sum(b for b, _ in order)
    return "".join(ch for bit, ch in order if flags & bit) + (
        "+%#x" % (flags & ~known) if flags & ~known else "") or "-"


def _tool(*cmd) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if r.returncode:
        msg = r.stderr.strip().rsplit(":", 1)[-1].strip()
        return f"!exit {r.returncode}: {msg}"
    return r.stdout.strip()


def lsattr(path) -> str:
    """The flag string ``lsattr -d`` prints, or "!exit N: message"."""
    out = _tool("lsattr", "-d", path)
    return out if out.startswith("!") else out.split()[0]


def chattr(path, spec) -> str:
    return _tool("chattr", spec, path) or "ok"


def clear_flags_tree(root):
    """Drop immutable/append-only on everything under ``root`` (fd walk, any depth), so
    that the tree can be removed.  Errors are ignored."""
    def unflag(fd):
        buf = bytearray(8)
        try:
            fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf)
            fl = struct.unpack_from("<I", buf)[0]
            if fl & (FS_IMMUTABLE_FL | FS_APPEND_FL):
                fcntl.ioctl(fd, FS_IOC_SETFLAGS, bytearray(
                    struct.pack("<I", fl & ~(FS_IMMUTABLE_FL | FS_APPEND_FL)) + bytes(4)))
        except OSError:
            pass

    def walk(dfd):
        unflag(dfd)
        for n in os.listdir(dfd):
            try:
                st = os.stat(n, dir_fd=dfd, follow_symlinks=False)
                if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                    continue
                fd = os.open(n, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW, dir_fd=dfd)
            except OSError:
                continue
            try:
                if stat.S_ISDIR(st.st_mode):
                    walk(fd)
                else:
                    unflag(fd)
            finally:
                os.close(fd)

    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        walk(fd)
    finally:
        os.close(fd)


# -- POSIX ACLs as xattrs -------------------------------------------------------

def acl_xattr(entries) -> bytes:
    """entries: [(tag, perm, id)] with id None for the *_OBJ, MASK and OTHER tags."""
    out = struct.pack("<I", 2)
    for tag, perm, ident in entries:
        out += struct.pack("<HHI", tag, perm, ACL_UNDEFINED_ID if ident is None else ident)
    return out


# -- caches -------------------------------------------------------------------------

def drop_caches():
    """Make the kernel forget unused dentries and inodes (on FUSE: FORGET them)."""
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")
    time.sleep(0.2)  # FORGETs reach the daemon asynchronously


# -- running a check in a child process ---------------------------------------------

class ChildCrash(Exception):
    """A check (or an as_user step) raised: the traceback text."""


def run_as(fn: Callable, who: Optional[Who] = ROOT, umask: Optional[int] = None,
           cwd=None, timeout: float = 60.0):
    """Run ``fn()`` in a forked child that enters ``cwd`` (as root), then takes ``who``'s
    identity (None: stays root) and ``umask``; returns fn's (pickled) result.

    Raises ChildCrash with the child's traceback if fn raised, or if it hung (it is
    then killed)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        code = 0
        try:
            os.close(r)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            try:
                if cwd is not None:
                    os.chdir(cwd)
                if umask is not None:
                    os.umask(umask)
                if who is not None:
                    os.setgroups(list(who.groups))
                    os.setresgid(who.gid, who.gid, who.gid)
                    os.setresuid(who.uid, who.uid, who.uid)
                res = ("ok", fn())
            except BaseException:
                res = ("crash", traceback.format_exc())
            view = memoryview(pickle.dumps(res))
            while view:
                view = view[os.write(w, view):]
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([r], [], [], left)
            if not ready:
                continue
            chunk = os.read(r, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        if timed_out:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    if timed_out:
        raise ChildCrash(f"timed out after {timeout}s (killed)")
    if not chunks:
        raise ChildCrash("the child died without a result")
    kind, value = pickle.loads(b"".join(chunks))
    if kind == "crash":
        raise ChildCrash(value)
    return value


def as_user(fn: Callable, *a, who: Who = USER, **kw):
    """One step of a check as an unprivileged user (same cwd and umask): attempt(fn, *a, **kw)."""
    um = os.umask(0)
    os.umask(um)
    return run_as(lambda: attempt(fn, *a, **kw), who, um, None, 30.0)


class Ctx(NamedTuple):
    """What a check may know about where it runs (nothing that differs in its record)."""
    backing: str      # absolute path of this directory in the backing filesystem (root only)
    prefix_max: int   # the longest absolute backing path of a check directory, on either side


def run_check(fn: Callable, cwd: str, ctx: Ctx, who: Optional[Who], umask: int):
    return run_as(lambda: fn(ctx), who=who, umask=umask, cwd=cwd, timeout=120.0)


# ===================================================================================
# The checks.  Each runs in an empty directory it may use freely; `who` is the
# identity of the whole body (the directory is owned by it), `umasks` its variants.
# ===================================================================================

class Check(NamedTuple):
    id: str
    fn: Callable
    who: Optional[Who]
    umask: int


CHECKS: List[Check] = []


def check(whos=(ROOT,), umasks=(0o022,)):
    """Register a check for each identity and umask: ids like ``name-user-umask077``."""
    def deco(fn):
        base = fn.__name__[len("check_"):]
        for who in whos:
            for um in umasks:
                suffix = ("-" + who.name if who else ("-root" if len(whos) > 1 else "")) + \
                    (f"-umask{um:03o}" if len(umasks) > 1 else "")
                CHECKS.append(Check(base + suffix, fn, who, um))
        return fn
    return deco


def chown(path, who: Optional[Who], gid=None, follow=False):
    os.chown(path, who.uid if who else 0, gid if gid is not None else (who.gid if who else 0),
             follow_symlinks=follow)


def mkfile(path, data=b"", mode=0o644, who=None, gid=None):
    """A file with exactly ``mode`` (chmod after create), owned by ``who``."""
    write_file(path, data)
    if who is not None or gid is not None:
        chown(path, who, gid)
    os.chmod(path, mode)


def mkdir_as(path, mode=0o755, who=None, gid=None):
    os.mkdir(path)
    if who is not None or gid is not None:
        chown(path, who, gid)
    os.chmod(path, mode)


# -- creation modes and umask ----------------------------------------------------------

def _create_modes():
    r = Rec()
    for m in (0o777, 0o666, 0o644, 0o600, 0o4755, 0o2755, 0o1777, 0o7777):
        n = f"f{m:o}"
        r(f"open {n} O_CREAT|O_EXCL {m:o}", lambda: os.close(os.open(n, os.O_WRONLY | os.O_CREAT | os.O_EXCL, m)))
        r[f"{n}"] = describe(n)
    r("reopen f600 O_CREAT 0777 keeps its mode", try_open, "f600", os.O_WRONLY | os.O_CREAT, 0o777)
    r["f600 after"] = mode_of("f600")
    for m in (0o777, 0o755, 0o700, 0o1777, 0o2777, 0o7777):
        n = f"d{m:o}"
        r(f"mkdir {n} {m:o}", os.mkdir, n, m)
        r[n] = describe(n)
    for m in (0o666, 0o640):
        r(f"mknod S_IFREG {m:o}", os.mknod, f"n{m:o}", stat.S_IFREG | m)
        r[f"n{m:o}"] = describe(f"n{m:o}")
        r(f"mkfifo {m:o}", os.mkfifo, f"p{m:o}", m)
        r[f"p{m:o}"] = describe(f"p{m:o}")
    r("mknod S_IFSOCK 0777", os.mknod, "sock", stat.S_IFSOCK | 0o777)
    r["sock"] = describe("sock")
    r("symlink", os.symlink, "f644", "sl")
    r["sl"] = describe("sl")
    r["touch t (coreutils)"] = subprocess.run(["touch", "t"]).returncode
    r["t"] = describe("t")
    r["mkdir md (coreutils)"] = subprocess.run(["mkdir", "md"]).returncode
    r["md"] = describe("md")
    r["mkfifo mp (coreutils)"] = subprocess.run(["mkfifo", "mp"]).returncode
    r["mp"] = describe("mp")
    return r


@check((ROOT, USER), umasks=(0, 0o022, 0o077))
def check_create_modes(ctx):
    """Bug 1: modes of create, mkdir, mknod, mkfifo, symlink under each umask."""
    return _create_modes()


@check()
def check_setgid_dir_inheritance(ctx):
    """New entries in a setgid directory take its group; S_ISGID is stripped from a new file
    of a non-member; new directories inherit S_ISGID."""
    r = Rec()
    mkdir_as("sg", 0o2777, gid=UGROUP)
    os.chmod("sg", 0o2777)
    r["sg"] = describe("sg")
    for who, tag in ((USER, "user"), (OTHER, "other"), (ROOT, "root")):
        run = (lambda fn, *a: as_user(fn, *a, who=who)) if who else (lambda fn, *a: attempt(fn, *a))
        r[f"{tag}: create file 2755"] = run(lambda n: os.close(os.open(n, os.O_WRONLY | os.O_CREAT, 0o2755)),
                                           f"sg/{tag}-f")
        r[f"{tag}: create file 0644"] = run(lambda n: os.close(os.open(n, os.O_WRONLY | os.O_CREAT, 0o644)),
                                           f"sg/{tag}-g")
        r[f"{tag}: mkdir 0755"] = run(os.mkdir, f"sg/{tag}-d", 0o755)
        r[f"{tag}: mkdir 02755"] = run(os.mkdir, f"sg/{tag}-d2", 0o2755)
        r[f"{tag}: mkfifo"] = run(os.mkfifo, f"sg/{tag}-p", 0o644)
        r[f"{tag}: symlink"] = run(os.symlink, "x", f"sg/{tag}-l")
        r[f"{tag}: mkdir in new dir"] = run(os.mkdir, f"sg/{tag}-d/sub", 0o755)
    r["tree"] = snapshot("sg")
    return r


@check(umasks=(0o077,))
def check_acl_default_inheritance(ctx):
    """A default ACL replaces the umask for new entries, and is inherited."""
    r = Rec()
    mkdir_as("a", 0o777)
    acl = acl_xattr([(ACL_USER_OBJ, 7, None), (ACL_GROUP_OBJ, 7, None), (ACL_OTHER, 5, None)])
    r("set default ACL", os.setxattr, "a", "system.posix_acl_default", acl)
    r("get default ACL", os.getxattr, "a", "system.posix_acl_default")
    for who, tag in ((ROOT, "root"), (USER, "user")):
        run = (lambda fn, *a: as_user(fn, *a, who=who)) if who else (lambda fn, *a: attempt(fn, *a))
        r[f"{tag}: create 0666"] = run(lambda n: os.close(os.open(n, os.O_WRONLY | os.O_CREAT, 0o666)),
                                      f"a/{tag}-f")
        r[f"{tag}: mkdir 0777"] = run(os.mkdir, f"a/{tag}-d", 0o777)
        r[f"{tag}: mkfifo 0666"] = run(os.mkfifo, f"a/{tag}-p", 0o666)
    r["tree"] = snapshot("a")
    r["new dir inherits the default ACL"] = attempt(os.getxattr, "a/root-d", "system.posix_acl_default") == acl
    return r


# -- open and create flags ------------------------------------------------------------

def _open_flags():
    r = Rec()
    A = os.O_ACCMODE
    write_file("f", b"hello")
    rd = lambda fd: os.pread(fd, 100, 0)  # noqa: E731
    r("O_RDWR|O_CREAT existing keeps data", try_open, "f", os.O_RDWR | os.O_CREAT, 0o600, then=rd)
    r["f mode"] = mode_of("f")
    r("O_CREAT|O_EXCL existing", try_open, "f", os.O_RDWR | os.O_CREAT | os.O_EXCL)
    r("O_EXCL without O_CREAT existing", try_open, "f", os.O_RDONLY | os.O_EXCL, then=rd)
    for fl, nm in ((os.O_RDONLY, "O_RDONLY"), (os.O_WRONLY, "O_WRONLY"), (os.O_RDWR, "O_RDWR")):
        r(f"missing {nm}", try_open, "missing", fl)
    r("missing O_CREAT|O_EXCL", try_open, "new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    r["new"] = describe("new")
    r("O_WRONLY|O_TRUNC", try_open, "f", os.O_WRONLY | os.O_TRUNC)
    r["after O_TRUNC"] = describe("f")
    write_file("f", b"hello")
    r("O_RDONLY|O_TRUNC", try_open, "f", os.O_RDONLY | os.O_TRUNC, then=rd)
    r["after O_RDONLY|O_TRUNC"] = describe("f")
    # O_APPEND: every write goes to the end, whatever the offset
    write_file("a", b"0123456789")
    fd = os.open("a", os.O_RDWR | os.O_APPEND)
    try:
        r["append: initial offset"] = os.lseek(fd, 0, os.SEEK_CUR)
        os.lseek(fd, 2, os.SEEK_SET)
        r("append: write after lseek(2)", os.write, fd, b"X")
        r["append: offset after write"] = os.lseek(fd, 0, os.SEEK_CUR)
        r("append: pwrite at 0", os.pwrite, fd, b"Y", 0)
        r["append: offset after pwrite"] = os.lseek(fd, 0, os.SEEK_CUR)
        os.lseek(fd, 0, os.SEEK_SET)
        r("append: read from 0", os.read, fd, 100)
    finally:
        os.close(fd)
    r["a"] = describe("a")
    r("read on O_WRONLY fd", try_open, "f", os.O_WRONLY, then=lambda fd: os.read(fd, 1))
    r("write on O_RDONLY fd", try_open, "f", os.O_RDONLY, then=lambda fd: os.write(fd, b"x"))
    r("fcntl F_GETFL access mode", try_open, "f", os.O_RDWR | os.O_APPEND,
      then=lambda fd: oct(fcntl.fcntl(fd, fcntl.F_GETFL) & (A | os.O_APPEND)))
    os.mkdir("d")
    r("O_DIRECTORY on a file", try_open, "f", os.O_RDONLY | os.O_DIRECTORY)
    r("O_DIRECTORY on a dir", try_open, "d", os.O_RDONLY | os.O_DIRECTORY)
    r("O_DIRECTORY|O_CREAT missing", try_open, "nd", os.O_RDONLY | os.O_DIRECTORY | os.O_CREAT)
    r("dir O_WRONLY", try_open, "d", os.O_WRONLY)
    r("dir O_RDWR", try_open, "d", os.O_RDWR)
    r("dir O_CREAT", try_open, "d", os.O_RDONLY | os.O_CREAT)
    r("O_CREAT with trailing slash", try_open, "newdir/", os.O_WRONLY | os.O_CREAT)
    r("file with trailing slash", try_open, "f/", os.O_RDONLY)
    r("O_CREAT under a file", try_open, "f/x", os.O_WRONLY | os.O_CREAT)
    r("O_CREAT in a missing dir", try_open, "nodir/x", os.O_WRONLY | os.O_CREAT)
    r("name of 255 bytes", try_open, "n" * 255, os.O_WRONLY | os.O_CREAT)
    r("name of 256 bytes", try_open, "n" * 256, os.O_WRONLY | os.O_CREAT)
    # symlinks
    os.symlink("f", "l")
    os.symlink("d", "ld")
    r("via symlink", try_open, "l", os.O_RDONLY, then=rd)
    r("O_NOFOLLOW on a symlink", try_open, "l", os.O_RDONLY | os.O_NOFOLLOW)
    r("O_NOFOLLOW|O_PATH on a symlink", try_open, "l", os.O_PATH | os.O_NOFOLLOW,
      then=lambda fd: ftype(os.fstat(fd).st_mode))
    r("O_NOFOLLOW|O_DIRECTORY on a dir symlink", try_open, "ld", os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY)
    r("O_DIRECTORY via a dir symlink", try_open, "ld", os.O_RDONLY | os.O_DIRECTORY)
    r("O_CREAT|O_EXCL on a symlink", try_open, "l", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    os.symlink("target", "dangling")
    r("O_CREAT|O_EXCL on a dangling symlink", try_open, "dangling", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    r["target after O_EXCL"] = describe("target")
    r("O_CREAT through a dangling symlink", try_open, "dangling", os.O_WRONLY | os.O_CREAT, 0o600,
      then=lambda fd: os.write(fd, b"via"))
    r["target after O_CREAT"] = describe("target")
    os.symlink("nodir/target", "dangling2")
    r("O_CREAT through a symlink into a missing dir", try_open, "dangling2", os.O_WRONLY | os.O_CREAT)
    os.symlink("loop2", "loop1")
    os.symlink("loop1", "loop2")
    r("open a symlink loop", try_open, "loop1", os.O_RDONLY)
    r("O_CREAT on a symlink loop", try_open, "loop1", os.O_WRONLY | os.O_CREAT)
    r["tree"] = snapshot()
    return r


@check((ROOT, USER))
def check_open_flags(ctx):
    return _open_flags()


@check()
def check_open_tmpfile(ctx):
    """O_TMPFILE: an unnamed file, linked in later with linkat(/proc/self/fd/N)."""
    r = Rec()
    os.mkdir("d")
    try:
        fd = os.open("d", os.O_TMPFILE | os.O_RDWR, 0o600)
    except OSError as e:
        r["O_TMPFILE"] = ename(e)
        return r
    try:
        r["O_TMPFILE"] = "ok"
        r("write", os.write, fd, b"tmp")
        st = os.fstat(fd)
        r["fstat"] = describe_st(st)
        r["listing while unnamed"] = listing("d")
        r("linkat /proc/self/fd/N AT_SYMLINK_FOLLOW", linkat, f"/proc/self/fd/{fd}", "d/named",
          AT_SYMLINK_FOLLOW)
        r["fstat nlink after linkat"] = os.fstat(fd).st_nlink
        r("linkat AT_EMPTY_PATH", linkat, "", "d/named2", AT_EMPTY_PATH, olddirfd=fd)
    finally:
        os.close(fd)
    r("O_TMPFILE|O_EXCL then linkat", _tmpfile_excl)
    r["tree"] = snapshot()
    return r


def _tmpfile_excl():
    fd = os.open("d", os.O_TMPFILE | os.O_RDWR | os.O_EXCL, 0o600)
    try:
        return attempt(linkat, f"/proc/self/fd/{fd}", "d/excl", AT_SYMLINK_FOLLOW)
    finally:
        os.close(fd)


@check()
def check_permissions(ctx):
    """Access checks by owner, group, other; directory x/r/w bits; root's DAC override."""
    r = Rec()
    mkfile("own0444", b"x", 0o444, USER)
    mkfile("own0200", b"x", 0o200, USER)
    mkfile("own0066", b"x", 0o066, USER)
    mkfile("root0644", b"x", 0o644)
    mkfile("root0000", b"x", 0o000)
    mkfile("grp0660", b"x", 0o660, gid=UGROUP)
    mkfile("grp0606", b"x", 0o606, gid=UGROUP)
    mkfile("nogrp0606", b"x", 0o606, gid=NOGROUP)
    mkfile("exec0644", b"#!/bin/sh\n", 0o644)
    W, R_ = os.O_WRONLY, os.O_RDONLY
    for name, flags, tag in (("own0444", W, "W"), ("own0444", R_, "R"), ("own0200", R_, "R"),
                             ("own0200", W, "W"), ("own0066", R_, "R"), ("root0644", R_, "R"),
                             ("root0644", W, "W"), ("root0644", R_ | os.O_TRUNC, "R|TRUNC"),
                             ("grp0660", os.O_RDWR, "RW"), ("grp0606", R_, "R"),
                             ("nogrp0606", os.O_RDWR, "RW"), ("root0000", R_, "R")):
        r[f"user open {name} {tag}"] = as_user(try_open, name, flags)
    r["user truncate root0644"] = as_user(os.truncate, "root0644", 0)
    r["user access own0444 W_OK"] = as_user(os.access, "own0444", os.W_OK)
    r["user access root0644 R_OK"] = as_user(os.access, "root0644", os.R_OK)
    r["root open root0000 RW"] = try_open("root0000", os.O_RDWR)
    r["root access exec0644 X_OK"] = os.access("exec0644", os.X_OK)
    r["root access root0000 W_OK"] = os.access("root0000", os.W_OK)
    # directories
    for name, mode in (("nox", 0o666), ("nor", 0o333), ("now", 0o555)):
        os.mkdir(name)
        mkfile(f"{name}/f", b"in", 0o666)
        chown(name, USER)
        os.chmod(name, mode)
    r["user stat nox/f"] = as_user(lambda: describe_st(os.stat("nox/f")))
    r["user listdir nox"] = as_user(lambda: sorted(os.listdir("nox")))
    r["user listdir nor"] = as_user(lambda: sorted(os.listdir("nor")))
    r["user open nor/f"] = as_user(try_open, "nor/f", R_)
    r["user create in now"] = as_user(try_open, "now/new", W | os.O_CREAT)
    r["user O_CREAT existing in now"] = as_user(try_open, "now/f", W | os.O_CREAT)
    r["user O_CREAT|O_EXCL existing in now"] = as_user(try_open, "now/f", W | os.O_CREAT | os.O_EXCL)
    r["user unlink in now"] = as_user(os.unlink, "now/f")
    r["user rename in now"] = as_user(os.rename, "now/f", "now/g")
    r["user mkdir in now"] = as_user(os.mkdir, "now/sub")
    r["other open own0066 R"] = as_user(try_open, "own0066", R_, who=OTHER)
    r["other listdir nor"] = as_user(lambda: sorted(os.listdir("nor")), who=OTHER)
    r["tree"] = snapshot()
    return r


# -- chmod / chown -------------------------------------------------------------------------

@check()
def check_chmod_rules(ctx):
    r = Rec()
    mkfile("f", b"x", 0o644, USER)
    mkfile("g", b"x", 0o644, USER, gid=0)        # group the owner is not in
    mkfile("h", b"x", 0o644, USER, gid=UGROUP)   # a supplementary group of the owner
    mkdir_as("dg", 0o755, USER, gid=0)
    os.symlink("f", "l")
    chown("l", USER)
    r["user chmod f 0600"] = as_user(os.chmod, "f", 0o600)
    r["f"] = mode_of("f")
    r["other chmod f 0666"] = as_user(os.chmod, "f", 0o666, who=OTHER)
    r["user chmod f 04755"] = as_user(os.chmod, "f", 0o4755)
    r["f after 04755"] = mode_of("f")
    r["user chmod f 01644 (sticky on a file)"] = as_user(os.chmod, "f", 0o1644)
    r["f after 01644"] = mode_of("f")
    r["user chmod g 02755 (not in group)"] = as_user(os.chmod, "g", 0o2755)
    r["g after user"] = mode_of("g")
    r["root chmod g 02755"] = attempt(os.chmod, "g", 0o2755)
    r["g after root"] = mode_of("g")
    r["user chmod h 02755 (supplementary group)"] = as_user(os.chmod, "h", 0o2755)
    r["h"] = mode_of("h")
    r["user chmod dg 02775 (not in group)"] = as_user(os.chmod, "dg", 0o2775)
    r["dg"] = mode_of("dg")
    r["user fchmod f 0640"] = as_user(lambda: try_open("f", os.O_RDONLY, then=lambda fd: os.fchmod(fd, 0o640)))
    r["f after fchmod"] = mode_of("f")
    r["user chmod via symlink"] = as_user(os.chmod, "l", 0o604)
    r["f after chmod via symlink"] = mode_of("f")
    r["l after chmod via symlink"] = mode_of("l")
    r["user fchmodat2 NOFOLLOW on symlink"] = as_user(fchmodat_nofollow, "l", 0o600)
    r["root fchmodat2 NOFOLLOW on symlink"] = attempt(fchmodat_nofollow, "l", 0o600)
    r["root fchmodat2 NOFOLLOW on file"] = attempt(fchmodat_nofollow, "h", 0o640)
    r["l after fchmodat2"] = mode_of("l")
    r["other chmod via symlink"] = as_user(os.chmod, "l", 0o777, who=OTHER)
    r["chmod missing"] = attempt(os.chmod, "missing", 0o644)
    r["tree"] = snapshot()
    return r


@check()
def check_chown_rules(ctx):
    r = Rec()
    mkfile("f", b"x", 0o644, USER)
    mkfile("s", b"x", 0o6755, USER)
    mkfile("s2", b"x", 0o6755, USER)
    mkfile("s3", b"x", 0o6745, USER)    # setgid without group exec: kept on chown
    mkfile("rs", b"x", 0o6755, USER)
    mkdir_as("sd", 0o2755, USER)
    os.symlink("f", "l")
    chown("l", USER)
    r["user chown f to other"] = as_user(os.chown, "f", OTHER.uid, -1)
    r["user chown f to self"] = as_user(os.chown, "f", USER.uid, -1)
    r["user chown f -1 -1"] = as_user(os.chown, "f", -1, -1)
    r["user chgrp f to supplementary group"] = as_user(os.chown, "f", -1, UGROUP)
    r["f after chgrp"] = owner_of("f")
    r["user chgrp f to a group it is not in"] = as_user(os.chown, "f", -1, NOGROUP)
    r["other chgrp f"] = as_user(os.chown, "f", -1, OTHER.gid, who=OTHER)
    r["other chown f -1 -1"] = as_user(os.chown, "f", -1, -1, who=OTHER)
    r["user chgrp s (06755)"] = as_user(os.chown, "s", -1, UGROUP)
    r["s after user chgrp"] = describe("s")
    r["user chown s2 -1 -1 (06755)"] = as_user(os.chown, "s2", -1, -1)
    r["s2 after"] = describe("s2")
    r["user chgrp s3 (06745)"] = as_user(os.chown, "s3", -1, UGROUP)
    r["s3 after"] = describe("s3")
    r["root chown rs to other (06755)"] = attempt(os.chown, "rs", OTHER.uid, OTHER.gid)
    r["rs after"] = describe("rs")
    r["root chown sd (dir 02755)"] = attempt(os.chown, "sd", OTHER.uid, UGROUP)
    r["sd after"] = describe("sd")
    r["user lchown l to supplementary group"] = as_user(os.chown, "l", -1, UGROUP, follow_symlinks=False)
    r["l after lchown"] = owner_of("l")
    r["f after lchown of l"] = owner_of("f")
    r["root chown via symlink"] = attempt(os.chown, "l", OTHER.uid, -1)
    r["f after chown via symlink"] = owner_of("f")
    r["l after chown via symlink"] = owner_of("l")
    r["root chown missing"] = attempt(os.chown, "missing", 0, 0)
    r["tree"] = snapshot()
    return r


@check()
def check_suid_kill(ctx):
    """Writes and truncates by non-root clear set-user-ID (and set-group-ID with group exec)."""
    r = Rec()
    for n, m in (("w", 0o6777), ("t", 0o6777), ("o", 0o4757), ("k", 0o2676), ("rw", 0o6777)):
        mkfile(n, b"data", m, USER)
    r["other writes w"] = as_user(try_open, "w", os.O_WRONLY, then=lambda fd: os.write(fd, b"X"), who=OTHER)
    r["w"] = describe("w")
    r["other truncates t"] = as_user(os.truncate, "t", 1, who=OTHER)
    r["t"] = describe("t")
    r["owner writes o"] = as_user(try_open, "o", os.O_WRONLY | os.O_APPEND, then=lambda fd: os.write(fd, b"Y"))
    r["o"] = describe("o")
    r["other writes k (setgid, no group exec)"] = as_user(
        try_open, "k", os.O_WRONLY, then=lambda fd: os.write(fd, b"Z"), who=OTHER)
    r["k"] = describe("k")
    r["root writes rw"] = try_open("rw", os.O_WRONLY, then=lambda fd: os.write(fd, b"R"))
    r["rw"] = describe("rw")
    return r


# -- link, unlink, rename ------------------------------------------------------------------

@check()
def check_link_unlink(ctx):
    r = Rec()
    write_file("f", b"F")
    os.mkdir("d")
    os.symlink("f", "l")
    os.symlink("missing", "dangling")
    r("link f g", os.link, "f", "g")
    r["f nlink"] = nlink_of("f")
    r["f and g share st_ino"] = ino("f") == ino("g")
    r("link onto existing", os.link, "f", "g")
    r("link missing", os.link, "missing", "x")
    r("link a dir", os.link, "d", "d2")
    r("link into a missing dir", os.link, "f", "nodir/x")
    r("link with a trailing slash", os.link, "f/", "x2")
    r("link a symlink (no follow)", linkat, "l", "l2", 0)
    r["l2"] = describe("l2")
    r["l and l2 share st_ino"] = ino("l") == ino("l2")
    r("link a symlink (AT_SYMLINK_FOLLOW)", linkat, "l", "f3", AT_SYMLINK_FOLLOW)
    r["f3"] = describe("f3")
    r["f nlink after 3 links"] = nlink_of("f")
    r("link a dangling symlink (AT_SYMLINK_FOLLOW)", linkat, "dangling", "x3", AT_SYMLINK_FOLLOW)
    r("unlink a dir", os.unlink, "d")
    r("unlink missing", os.unlink, "missing")
    r("unlink with a trailing slash", os.unlink, "f/")
    r("unlink g", os.unlink, "g")
    r["f nlink after unlink"] = nlink_of("f")
    os.mkdir("full")
    write_file("full/x", b"")
    r("rmdir non-empty", os.rmdir, "full")
    r("rmdir a file", os.rmdir, "f")
    r("rmdir .", os.rmdir, ".")
    r("rmdir ..", os.rmdir, "full/..")
    r("rmdir missing", os.rmdir, "missing")
    os.symlink("d", "ld")
    r("rmdir a symlink to a dir", os.rmdir, "ld")
    r("unlink a symlink to a dir", os.unlink, "ld")
    r("mkdir existing", os.mkdir, "d")
    r("mkdir on a dangling symlink", os.mkdir, "dangling")
    r("symlink onto existing", os.symlink, "x", "f")
    r("mkfifo onto existing", os.mkfifo, "f")
    r("mknod onto existing", os.mknod, "f", stat.S_IFREG | 0o644)
    # a renamed hard link keeps the other name
    write_file("a", b"A")
    os.link("a", "b")
    r("rename a hard link", os.rename, "a", "c")
    r["b"] = describe("b")
    r["b and c share st_ino"] = ino("b") == ino("c")
    # unlink while open
    write_file("open", b"still here")
    fd = os.open("open", os.O_RDWR)
    try:
        r("unlink an open file", os.unlink, "open")
        r["fstat after unlink"] = describe_st(os.fstat(fd))
        r("pwrite after unlink", os.pwrite, fd, b"S", 0)
        r("pread after unlink", os.pread, fd, 100, 0)
        r("ftruncate after unlink", os.ftruncate, fd, 3)
        r["fstat size after ftruncate"] = os.fstat(fd).st_size
    finally:
        os.close(fd)
    # directory link counts
    r["base nlink"] = nlink_of(".")
    os.mkdir("p")
    r["p nlink"] = nlink_of("p")
    os.mkdir("p/a")
    os.mkdir("p/b")
    write_file("p/file", b"")
    r["p nlink with 2 subdirs"] = nlink_of("p")
    os.rmdir("p/a")
    r["p nlink after rmdir"] = nlink_of("p")
    r["base nlink after"] = nlink_of(".")
    r["tree"] = snapshot()
    return r


@check()
def check_rename_edges(ctx):
    r = Rec()
    write_file("a", b"A")
    write_file("b", b"B")
    os.mkdir("e")
    os.mkdir("e2")
    os.mkdir("n")
    write_file("n/x", b"")
    os.mkdir("d")
    os.mkdir("d/sub")
    write_file("f", b"F")
    r("file onto file", os.rename, "a", "b")
    r["b"] = describe("b")
    r["a"] = describe("a")
    r("dir onto empty dir", os.rename, "e2", "e")
    r("dir onto non-empty dir", os.rename, "e", "n")
    r("file onto dir", os.rename, "f", "e")
    r("dir onto file", os.rename, "e", "f")
    r("file to itself", os.rename, "f", "f")
    r("dir to itself", os.rename, "e", "e")
    os.link("f", "f2")
    r("onto another link of the same inode", os.rename, "f", "f2")
    r["f after"] = describe("f")
    r["f2 after"] = describe("f2")
    r("dir into its own subdir", os.rename, "d", "d/sub/x")
    r("dir onto its own subdir", os.rename, "d", "d/sub")
    r("rename .", os.rename, ".", "x")
    r("rename d/.", os.rename, "d/.", "x")
    r("rename onto .", os.rename, "e", ".")
    r("rename onto ..", os.rename, "e", "d/..")
    r("missing source", os.rename, "missing", "x")
    r("into a missing dir", os.rename, "f", "nodir/x")
    r("under a file", os.rename, "f", "b/x")
    r("file to a trailing slash", os.rename, "f", "newname/")
    r("dir with trailing slashes", os.rename, "e/", "e3/")
    os.mkdir("p1")
    os.mkdir("p2")
    os.mkdir("p1/m")
    r["p1, p2 nlink before"] = (nlink_of("p1"), nlink_of("p2"))
    r("dir to another parent", os.rename, "p1/m", "p2/m")
    r["p1, p2 nlink after"] = (nlink_of("p1"), nlink_of("p2"))
    r("m/.. is the new parent", lambda: ino("p2/m/..", True) == ino("p2", True))
    os.mkdir("p1/m")
    r("dir onto empty dir in another parent", os.rename, "p2/m", "p1/m")
    r["p1, p2 nlink after replace"] = (nlink_of("p1"), nlink_of("p2"))
    r["base nlink"] = nlink_of(".")
    r["tree"] = snapshot()
    return r


@check()
def check_rename_flags(ctx):
    """renameat2: RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT."""
    r = Rec()
    write_file("a", b"A")
    write_file("b", b"B")
    os.mkdir("d")
    write_file("d/in", b"I")
    os.mkdir("e")
    r("NOREPLACE onto a file", renameat2, "a", "b", RENAME_NOREPLACE)
    r("NOREPLACE dir onto empty dir", renameat2, "e", "d", RENAME_NOREPLACE)
    r("NOREPLACE onto missing", renameat2, "a", "a2", RENAME_NOREPLACE)
    r("NOREPLACE missing source", renameat2, "missing", "x", RENAME_NOREPLACE)
    ia, ib = ino("a2"), ino("b")
    r("EXCHANGE file/file", renameat2, "a2", "b", RENAME_EXCHANGE)
    r["a2, b"] = (describe("a2"), describe("b"))
    r["inodes swapped"] = (ino("a2"), ino("b")) == (ib, ia)
    r("EXCHANGE file/dir", renameat2, "b", "d", RENAME_EXCHANGE)
    r["b, d"] = (describe("b"), describe("d"))
    r["b/in"] = describe("b/in")
    r("EXCHANGE with missing", renameat2, "a2", "missing", RENAME_EXCHANGE)
    r("EXCHANGE with itself", renameat2, "a2", "a2", RENAME_EXCHANGE)
    os.mkdir("p")
    os.mkdir("p/sub")
    os.mkdir("q")
    write_file("q/file", b"Q")
    r["p, q nlink before"] = (nlink_of("p"), nlink_of("q"))
    r("EXCHANGE dir/file across parents", renameat2, "p/sub", "q/file", RENAME_EXCHANGE)
    r["p, q nlink after"] = (nlink_of("p"), nlink_of("q"))
    r("EXCHANGE a dir with its subdir", renameat2, "b", "b/in", RENAME_EXCHANGE)
    r("NOREPLACE|EXCHANGE", renameat2, "a2", "e", RENAME_NOREPLACE | RENAME_EXCHANGE)
    r("unknown flag 8", renameat2, "a2", "z", 8)
    r("WHITEOUT", renameat2, "a2", "w", RENAME_WHITEOUT)
    r["a2 after WHITEOUT"] = describe("a2")
    r["w after WHITEOUT"] = describe("w")
    r["tree"] = snapshot()
    return r


@check()
def check_sticky_dir(ctx):
    r = Rec()
    mkdir_as("t", 0o1777)
    r["user creates t/uf"] = as_user(write_file, "t/uf", b"u", 0o666)
    r["other creates t/of"] = as_user(write_file, "t/of", b"o", 0o644, who=OTHER)
    r["other unlinks t/uf"] = as_user(os.unlink, "t/uf", who=OTHER)
    r["other renames t/uf"] = as_user(os.rename, "t/uf", "t/x", who=OTHER)
    r["other renames onto t/uf"] = as_user(os.rename, "t/of", "t/uf", who=OTHER)
    r["other O_CREAT opens t/uf (protected_regular)"] = as_user(
        try_open, "t/uf", os.O_WRONLY | os.O_CREAT, who=OTHER)
    r["other unlinks its own t/of"] = as_user(os.unlink, "t/of", who=OTHER)
    mkdir_as("t2", 0o1777, OTHER)
    r["user creates t2/uf"] = as_user(write_file, "t2/uf", b"u", 0o644)
    r["dir owner (other) unlinks t2/uf"] = as_user(os.unlink, "t2/uf", who=OTHER)
    r["root unlinks t/uf"] = attempt(os.unlink, "t/uf")
    r["tree"] = snapshot()
    return r


# -- truncate -----------------------------------------------------------------------------

@check()
def check_truncate(ctx):
    r = Rec()
    write_file("f", b"0123456789")
    r("grow to 20", os.truncate, "f", 20)
    r["after grow"] = describe("f")
    r("shrink to 5", os.truncate, "f", 5)
    r["after shrink"] = describe("f")
    r("grow again to 8 (zero fill after a shrink)", os.truncate, "f", 8)
    r["after regrow"] = describe("f")
    r("truncate to 0", os.truncate, "f", 0)
    r["after 0"] = describe("f")
    r("sparse to 1 TiB", os.truncate, "f", 1 << 40)
    st = os.stat("f")
    r["sparse size, blocks"] = (st.st_size, st.st_blocks)
    r("read in the hole", try_open, "f", os.O_RDONLY, then=lambda fd: os.pread(fd, 8, (1 << 39)))
    r("beyond the max file size", os.truncate, "f", 1 << 50)
    r("negative", os.truncate, "f", -1)
    os.mkdir("d")
    r("a dir", os.truncate, "d", 0)
    r("missing", os.truncate, "missing", 0)
    os.symlink("f", "l")
    r("via a symlink", os.truncate, "l", 3)
    r["f after truncate via symlink"] = size_of("f")
    os.mkfifo("p")
    r("a fifo", os.truncate, "p", 0)
    r("ftruncate O_RDONLY fd", try_open, "f", os.O_RDONLY, then=lambda fd: os.ftruncate(fd, 1))
    r("ftruncate O_WRONLY fd", try_open, "f", os.O_WRONLY, then=lambda fd: os.ftruncate(fd, 2))
    r["after ftruncate"] = describe("f")
    r("ftruncate O_PATH fd", try_open, "f", os.O_PATH, then=lambda fd: os.ftruncate(fd, 1))
    r("ftruncate O_APPEND fd", try_open, "f", os.O_WRONLY | os.O_APPEND, then=lambda fd: os.ftruncate(fd, 1))
    # permissions
    mkfile("ro", b"readonly", 0o444, USER)
    mkfile("rootf", b"root", 0o644)
    r["user truncate own 0444"] = as_user(os.truncate, "ro", 0)
    r["user O_TRUNC own 0444"] = as_user(try_open, "ro", os.O_WRONLY | os.O_TRUNC)
    r["user truncate root 0644"] = as_user(os.truncate, "rootf", 0)
    mkfile("rw", b"rw", 0o644, USER)
    r["user ftruncate via a fd opened before chmod 0444"] = as_user(
        lambda: try_open("rw", os.O_RDWR, then=lambda fd: (os.chmod("rw", 0o444), os.ftruncate(fd, 1))))
    r["rw"] = describe("rw")
    # timestamps: truncate(2) to the same size vs ftruncate vs O_TRUNC
    OLD = 1_000_000_000_000_000_000
    for tag, op in (("truncate same size", lambda: os.truncate("s", 4)),
                    ("truncate new size", lambda: os.truncate("s", 5)),
                    ("ftruncate same size", lambda: try_open("s", os.O_WRONLY, then=lambda fd: os.ftruncate(fd, 5))),
                    ("O_TRUNC of an empty file", lambda: (os.truncate("s", 0), os.utime("s", ns=(OLD, OLD)),
                                                          try_open("s", os.O_WRONLY | os.O_TRUNC)))):
        if not os.path.exists("s"):
            write_file("s", b"1234")
        os.utime("s", ns=(OLD, OLD))
        op()
        r[f"{tag}: mtime changed"] = os.stat("s").st_mtime_ns != OLD
    return r


# -- utimensat ---------------------------------------------------------------------------

def _at_mt(path, follow=False):
    a, m, _ = times_ns(path, follow)
    return split_ns(a), split_ns(m)


@check()
def check_utimens(ctx):
    r = Rec()
    write_file("f", b"x")
    T1, T2 = (1_000_000_000, 123_456_789), (1_100_000_000, 987_654_321)
    r("exact ns", utimensat, "f", T1, T2)
    r["f after exact"] = _at_mt("f")
    r("atime exact, mtime UTIME_OMIT", utimensat, "f", (5, 5), UTIME_OMIT)
    r["f after OMIT"] = _at_mt("f")
    r("both UTIME_OMIT", utimensat, "f", UTIME_OMIT, UTIME_OMIT)
    r["f after both OMIT"] = _at_mt("f")
    lo = now_ns()
    r("mtime UTIME_NOW, atime OMIT", utimensat, "f", UTIME_OMIT, UTIME_NOW)
    hi = now_ns()
    a, m, c = times_ns("f")
    r["after NOW: atime kept, mtime now, ctime now"] = (split_ns(a), is_now(m, lo, hi), is_now(c, lo, hi))
    lo = now_ns()
    r("NULL times", utimensat, "f", None, None)
    hi = now_ns()
    a, m, c = times_ns("f")
    r["after NULL: all now"] = (is_now(a, lo, hi), is_now(m, lo, hi), is_now(c, lo, hi))
    r("before 1970", utimensat, "f", (-1, 500), (-1_000_000, 0))
    r["f before 1970"] = _at_mt("f")
    r("year 2242", utimensat, "f", (1 << 33, 1), (1 << 33, 999_999_999))
    r["f in 2242"] = _at_mt("f")
    r("nsec out of range", utimensat, "f", (1, 1_000_000_000), (1, 0))
    os.mkdir("d")
    r("dir exact", utimensat, "d", T1, T2)
    r["d"] = _at_mt("d")
    write_file("t", b"t")
    utimensat("t", T1, T1)
    os.symlink("t", "l")
    r("symlink NOFOLLOW", utimensat, "l", T2, T2, follow=False)
    r["l (the symlink)"] = _at_mt("l")
    r["t after NOFOLLOW"] = _at_mt("t")
    r("symlink follow", utimensat, "l", (7, 7), (8, 8))
    r["t after follow"] = _at_mt("t")
    r["l mtime after follow"] = _at_mt("l")[1]  # (its atime moves: following reads the link)
    r("futimens", try_open, "t", os.O_RDONLY, then=lambda fd: os.utime(fd, ns=(9, 10)))
    r["t after futimens"] = _at_mt("t")
    # non-owners
    mkfile("w", b"w", 0o666, USER)
    mkfile("ro", b"r", 0o644, USER)
    mkfile("own", b"o", 0o444, OTHER)
    for tag, args in (("NULL", (None, None)), ("NOW/NOW", (UTIME_NOW, UTIME_NOW)),
                      ("exact", (T1, T2)), ("NOW/OMIT", (UTIME_NOW, UTIME_OMIT)),
                      ("OMIT/OMIT", (UTIME_OMIT, UTIME_OMIT))):
        r[f"other {tag} on a writable file"] = as_user(utimensat, "w", *args, who=OTHER)
        r[f"other {tag} on a read-only file"] = as_user(utimensat, "ro", *args, who=OTHER)
        r[f"owner {tag} on its own 0444 file"] = as_user(utimensat, "own", *args, who=OTHER)
    r["own"] = _at_mt("own")[1][0] == T2[0]
    # ctime follows every change, mtime only content changes
    OLD = 1_000_000_000_000_000_000
    write_file("c", b"c")
    os.mkdir("cd")
    for tag, path, op in (("write", "c", lambda: try_open("c", os.O_WRONLY, then=lambda fd: os.write(fd, b"C"))),
                          ("chmod", "c", lambda: os.chmod("c", 0o600)),
                          ("setxattr", "c", lambda: os.setxattr("c", "user.t", b"1")),
                          ("link", "c", lambda: os.link("c", "c2")),
                          ("rename (file)", "c", lambda: os.rename("c", "c3")),
                          ("create in dir", "cd", lambda: write_file("cd/x", b"")),
                          ("rename in dir", "cd", lambda: os.rename("cd/x", "cd/y")),
                          ("unlink in dir", "cd", lambda: os.unlink("cd/y")),
                          ("mkdir in dir", "cd", lambda: os.mkdir("cd/sub")),
                          ("read", "c3", lambda: read_file("c3"))):
        os.utime(path, ns=(OLD, OLD))
        before = os.stat(path).st_ctime_ns
        time.sleep(0.02)
        op()
        after = os.stat("c3" if path == "c" and tag.startswith("rename") else path)
        r[f"{tag}: mtime, ctime changed"] = (after.st_mtime_ns != OLD, after.st_ctime_ns != before)
    return r


# -- xattrs ----------------------------------------------------------------------------

def _xattr_basics():
    r = Rec()
    write_file("f", b"x")
    r("get missing", os.getxattr, "f", "user.a")
    r("remove missing", os.removexattr, "f", "user.a")
    r("set user.a", os.setxattr, "f", "user.a", b"1")
    r("get user.a", os.getxattr, "f", "user.a")
    r("XATTR_CREATE existing", setxattr_flags, "f", "user.a", b"2", XATTR_CREATE)
    r("XATTR_REPLACE missing", setxattr_flags, "f", "user.b", b"2", XATTR_REPLACE)
    r("XATTR_REPLACE existing", setxattr_flags, "f", "user.a", b"22", XATTR_REPLACE)
    r("XATTR_CREATE missing", setxattr_flags, "f", "user.b", b"b", XATTR_CREATE)
    r("XATTR_CREATE|XATTR_REPLACE", setxattr_flags, "f", "user.c", b"c", XATTR_CREATE | XATTR_REPLACE)
    r("flags 4", setxattr_flags, "f", "user.c", b"c", 4)
    r["values"] = xattrs("f")
    r("size probe", getxattr_size, "f", "user.a", 0)
    r("buffer too small", getxattr_size, "f", "user.a", 1)
    r("exact buffer", getxattr_size, "f", "user.a", 2)
    r("list", listxattr_size, "f", 4096)
    r("list buffer too small", listxattr_size, "f", 3)
    r("set empty value", os.setxattr, "f", "user.empty", b"")
    r("get empty value", os.getxattr, "f", "user.empty")
    r("size probe of an empty value", getxattr_size, "f", "user.empty", 0)
    r("binary value", os.setxattr, "f", "user.bin", bytes(range(256)))
    r["binary value back"] = attempt(os.getxattr, "f", "user.bin") == bytes(range(256))
    r("name of 255", os.setxattr, "f", "user." + "n" * 250, b"long")
    r["long name listed"] = "user." + "n" * 250 in xnames("f")
    r("name of 256", os.setxattr, "f", "user." + "n" * 251, b"long")
    r("empty name", os.setxattr, "f", "", b"v")
    r("prefix only", os.setxattr, "f", "user.", b"v")
    r("unknown namespace", os.setxattr, "f", "foo.bar", b"v")
    r("get unknown namespace", os.getxattr, "f", "foo.bar")
    for size in (1000, 3000, 4000, 65536, 65537):
        v = bytes((i * 7) & 0xFF for i in range(size))
        r(f"value of {size}", os.setxattr, "f", f"user.v{size}", v)
        r[f"value of {size} back"] = attempt(os.getxattr, "f", f"user.v{size}") == v
    for n in list(xnames("f")):
        if n.startswith("user.v"):
            os.removexattr("f", n)
    r("remove user.a", os.removexattr, "f", "user.a")
    r("get removed", os.getxattr, "f", "user.a")
    r["final"] = xattrs("f")
    # via fds and symlinks; other file types
    r("fsetxattr", try_open, "f", os.O_RDONLY, then=lambda fd: os.setxattr(fd, "user.fd", b"fd"))
    r("fgetxattr", try_open, "f", os.O_RDONLY, then=lambda fd: os.getxattr(fd, "user.fd"))
    os.mkdir("d")
    r("set on a dir", os.setxattr, "d", "user.d", b"dir")
    r["dir values"] = xattrs("d")
    os.symlink("f", "l")
    r("set via a symlink (follow)", os.setxattr, "l", "user.via", b"v")
    r["f has user.via"] = attempt(os.getxattr, "f", "user.via")
    r("user.* on a symlink (no follow)", os.setxattr, "l", "user.x", b"v", follow_symlinks=False)
    r("get user.* on a symlink (no follow)", os.getxattr, "l", "user.via", follow_symlinks=False)
    r["list a symlink (no follow)"] = xnames("l", follow=False)
    os.mkfifo("p")
    r("user.* on a fifo", os.setxattr, "p", "user.x", b"v", follow_symlinks=False)
    r("trusted.* as this identity", os.setxattr, "f", "trusted.x", b"t")
    r("get trusted.* as this identity", os.getxattr, "f", "trusted.x")
    return r


@check((ROOT, USER))
def check_xattr_user(ctx):
    return _xattr_basics()


@check()
def check_xattr_permissions(ctx):
    r = Rec()
    mkfile("f", b"x", 0o644, USER)
    mkfile("private", b"x", 0o600, USER)
    os.setxattr("f", "user.a", b"1")
    os.setxattr("private", "user.a", b"1")
    os.setxattr("f", "trusted.t", b"root only")
    r["other sets user.* on a 0644 file"] = as_user(os.setxattr, "f", "user.b", b"2", who=OTHER)
    r["other gets user.* on a 0644 file"] = as_user(os.getxattr, "f", "user.a", who=OTHER)
    r["other gets user.* on a 0600 file"] = as_user(os.getxattr, "private", "user.a", who=OTHER)
    r["other lists a 0600 file"] = as_user(xnames, "private", who=OTHER)
    r["other removes user.* on a 0644 file"] = as_user(os.removexattr, "f", "user.a", who=OTHER)
    r["owner sets user.* on its 0644 file"] = as_user(os.setxattr, "f", "user.c", b"3")
    r["user lists (trusted.* hidden from non-root)"] = as_user(xnames, "f")
    r["user gets trusted.*"] = as_user(os.getxattr, "f", "trusted.t")
    r["user sets trusted.*"] = as_user(os.setxattr, "f", "trusted.u", b"u")
    r["user sets security.*"] = as_user(os.setxattr, "f", "security.x", b"u")
    r["root lists"] = xnames("f")
    mkdir_as("sd", 0o1777, OTHER)
    r["user sets user.* on other's sticky dir"] = as_user(os.setxattr, "sd", "user.x", b"v")
    r["final"] = xattrs("f")
    return r


@check()
def check_xattr_trusted_symlink(ctx):
    """Bug 5: trusted.* xattrs on symlinks themselves (setfattr -h), as root."""
    r = Rec()
    write_file("f", b"x")
    os.symlink("f", "l")
    os.symlink("missing", "dangling")
    r("lsetxattr trusted.x", os.setxattr, "l", "trusted.x", b"on the link", follow_symlinks=False)
    r("lgetxattr trusted.x", os.getxattr, "l", "trusted.x", follow_symlinks=False)
    r["llistxattr"] = xnames("l", follow=False)
    r("getxattr via the link (target)", os.getxattr, "l", "trusted.x")
    r["target xattrs"] = xattrs("f")
    r("XATTR_CREATE on the link, existing", setxattr_flags, "l", "trusted.x", b"2", XATTR_CREATE, follow=False)
    r("XATTR_REPLACE on the link", setxattr_flags, "l", "trusted.x", b"3", XATTR_REPLACE, follow=False)
    r("lgetxattr after replace", os.getxattr, "l", "trusted.x", follow_symlinks=False)
    r("size probe on the link", getxattr_size, "l", "trusted.x", 0, follow=False)
    r("lsetxattr on a dangling link", os.setxattr, "dangling", "trusted.y", b"d", follow_symlinks=False)
    r["dangling xattrs"] = xattrs("dangling", follow=False)
    r("lremovexattr", os.removexattr, "l", "trusted.x", follow_symlinks=False)
    r("lgetxattr removed", os.getxattr, "l", "trusted.x", follow_symlinks=False)
    r("user.* on the link by root", os.setxattr, "l", "user.x", b"u", follow_symlinks=False)
    r["setfattr -h (attr tools)"] = _tool("setfattr", "-h", "-n", "trusted.tool", "-v", "v", "l") or "ok"
    r["getfattr -h"] = _tool("getfattr", "-h", "--only-values", "-n", "trusted.tool", "l")
    return r


@check()
def check_acl_access(ctx):
    """POSIX ACLs (as system.posix_acl_access xattrs) grant and deny like the kernel does."""
    r = Rec()
    mkfile("grant", b"g", 0o640, USER)
    mkfile("deny", b"d", 0o644, USER)
    grant = acl_xattr([(ACL_USER_OBJ, 6, None), (ACL_USER, 6, OTHER.uid), (ACL_GROUP_OBJ, 4, None),
                       (ACL_MASK, 6, None), (ACL_OTHER, 0, None)])
    deny = acl_xattr([(ACL_USER_OBJ, 6, None), (ACL_USER, 0, OTHER.uid), (ACL_GROUP_OBJ, 4, None),
                      (ACL_MASK, 4, None), (ACL_OTHER, 4, None)])
    r("set grant ACL", os.setxattr, "grant", "system.posix_acl_access", grant)
    r("set deny ACL", os.setxattr, "deny", "system.posix_acl_access", deny)
    r["modes after set"] = (mode_of("grant"), mode_of("deny"))
    r["ACL reads back"] = (attempt(os.getxattr, "grant", "system.posix_acl_access") == grant,
                           attempt(os.getxattr, "deny", "system.posix_acl_access") == deny)
    r["other (named in the ACL) opens grant O_RDWR"] = as_user(try_open, "grant", os.O_RDWR, who=OTHER)
    r["other (named in the ACL) opens deny O_RDONLY"] = as_user(try_open, "deny", os.O_RDONLY, who=OTHER)
    r["user (owner) opens deny O_RDONLY"] = as_user(try_open, "deny", os.O_RDONLY)
    r["chmod 0600 rewrites the mask"] = attempt(os.chmod, "grant", 0o600)
    r["grant ACL after chmod"] = attempt(os.getxattr, "grant", "system.posix_acl_access")
    r["other opens grant after chmod"] = as_user(try_open, "grant", os.O_RDWR, who=OTHER)
    return r


@check()
def check_acl_sgid(ctx):
    """Issue 17 (generic/375): setting an access ACL clears S_ISGID when the caller is
    neither in the file's group nor CAP_FSETID (posix_acl_update_mode); the daemon
    applies the ACL with its own credentials, which would keep it."""
    r = Rec()
    acl = acl_xattr([(ACL_USER_OBJ, 7, None), (ACL_USER, 5, OTHER.uid), (ACL_GROUP_OBJ, 5, None),
                     (ACL_MASK, 5, None), (ACL_OTHER, 5, None)])
    for name, gid, who in (("outside", NOGROUP, USER), ("member", UGROUP, USER),
                           ("root-sets", NOGROUP, None)):
        mkfile(name, b"x", 0o2775, USER, gid)
        if who is None:
            r(f"{name}: set ACL", os.setxattr, name, "system.posix_acl_access", acl)
        else:
            r[f"{name}: set ACL"] = as_user(os.setxattr, name, "system.posix_acl_access", acl, who=who)
        r[f"{name}: mode after"] = mode_of(name)
        r[f"{name}: ACL"] = attempt(os.getxattr, name, "system.posix_acl_access") == acl
    # an ACL equivalent to the mode is stored as the mode alone; the rule still applies
    mkfile("equiv", b"x", 0o2775, USER, NOGROUP)
    plain = acl_xattr([(ACL_USER_OBJ, 7, None), (ACL_GROUP_OBJ, 5, None), (ACL_OTHER, 5, None)])
    r["equiv: set ACL"] = as_user(os.setxattr, "equiv", "system.posix_acl_access", plain)
    r["equiv: mode after"] = mode_of("equiv")
    mkdir_as("dir", 0o2775, USER, NOGROUP)
    r["dir: set ACL"] = as_user(os.setxattr, "dir", "system.posix_acl_access", acl)
    r["dir: mode after"] = mode_of("dir")
    return r


# -- directories ---------------------------------------------------------------------------

@check()
def check_readdir(ctx):
    """Bug 4: getdents64 returns '.' and '..'; d_type and d_ino agree with lstat."""
    r = Rec()
    os.mkdir("empty")
    r["empty dir"] = listing("empty")
    write_file("reg", b"")
    os.mkdir("dir")
    os.symlink("reg", "lnk")
    os.mkfifo("fifo")
    os.mknod("sock", stat.S_IFSOCK | 0o644)
    os.mknod("chr", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mknod("blk", stat.S_IFBLK | 0o600, os.makedev(7, 200))
    os.link("reg", "hard")
    write_file("x" * 255, b"")
    r["all types"] = listing(".")
    r["subdir"] = listing("dir")
    r["dir/.. entry is this dir"] = ino(".", True) == dict((n, i) for n, i, _ in getdents("dir")).get("..")
    r["listdir (glibc)"] = sorted(os.listdir("."))
    r["ls -a"] = subprocess.run(["ls", "-a"], capture_output=True, text=True).stdout.split()
    os.unlink("reg")
    r["after unlink"] = [e[0] for e in listing(".")]
    return r


@check()
def check_readdir_large(ctx):
    """Many entries read through a small buffer, and a rewind."""
    r = Rec()
    os.mkdir("big")
    expect = {f"entry-{i:04d}-" + "p" * (i % 50) for i in range(400)} | {".", ".."}
    for n in expect - {".", ".."}:
        write_file("big/" + n, b"")
    fd = os.open("big", os.O_RDONLY | os.O_DIRECTORY)
    try:
        got, calls = [], 0
        while True:
            chunk = getdents_once(fd, 512)
            calls += 1
            if not chunk or calls > 10000:
                break
            got.extend(e[0] for e in chunk)
        r["small-buffer listing complete"] = sorted(got) == sorted(expect)
        r["no duplicates"] = len(got) == len(set(got))
        r["missing"] = sorted(expect - set(got))[:10]
        r["unexpected"] = sorted(set(got) - expect)[:10]
        r("rewind", os.lseek, fd, 0, os.SEEK_SET)
        again = [e[0] for e in getdents(fd)]
        r["after rewind complete"] = sorted(again) == sorted(expect)
    finally:
        os.close(fd)
    # entries added and removed between two listings
    os.unlink("big/entry-0000-")
    write_file("big/late", b"")
    r["second listing"] = sorted(set(e[0] for e in getdents("big")) ^ expect)
    return r


# -- stat relations ----------------------------------------------------------------------

@check()
def check_stat_relations(ctx):
    """Bug 2: st_ino is stable across the kernel forgetting the inode; links share st_ino."""
    r = Rec()
    write_file("f", b"data")
    os.mkdir("d")
    os.symlink("f", "l")
    os.mkfifo("p")
    os.link("f", "h")
    write_file("d/inner", b"")
    names_ = ["f", "d", "l", "p", "h", "d/inner", "."]
    before = {n: ino(n) for n in names_}
    r["f and h share st_ino"] = before["f"] == before["h"]
    r["st_ino distinct"] = len(set(before.values())) == len(before) - 1
    drop_caches()
    after = {n: ino(n) for n in names_}
    r["st_ino unchanged after drop_caches"] = {n: before[n] == after[n] for n in names_}
    r["d_ino == st_ino after drop_caches"] = listing(".")
    r["f and h share st_ino after drop_caches"] = ino("f") == ino("h")
    pre = ino("f")
    os.rename("f", "g")
    r["st_ino unchanged by rename"] = ino("g") == pre
    drop_caches()
    r["st_ino unchanged by rename + drop_caches"] = ino("g") == pre
    r["h still shares st_ino with g"] = ino("h") == ino("g")
    fd = os.open("g", os.O_RDONLY)
    try:
        pre = ino("g")
        drop_caches()
        r["open file: fstat == stat across drop_caches"] = os.fstat(fd).st_ino == ino("g") == pre
    finally:
        os.close(fd)
    r["stat(d/..) == stat(.)"] = ino("d/..", True) == ino(".", True)
    r["st_dev same for all"] = len({os.stat(n, follow_symlinks=False).st_dev for n in ["g", "d", "l", "p", "."]}) == 1
    # sizes, blocks, block size
    write_file("one", b"1")
    write_file("big", b"b" * 5000)
    write_file("sparse", b"")
    os.truncate("sparse", 1 << 20)
    for n in ("one", "big", "sparse", "d", "l", "p"):
        st = os.stat(n, follow_symlinks=False)
        r[f"{n}: size, blocks, blksize"] = (st.st_size, st.st_blocks, st.st_blksize)
    return r


@check()
def check_statfs(ctx):
    """statvfs of a directory: the backing filesystem's geometry (free counts move: not compared)."""
    r = Rec()
    write_file("f", b"")
    for path in (".", "f"):
        st = os.statvfs(path)
        r[f"{path}: bsize, frsize, blocks, files, namemax"] = (
            st.f_bsize, st.f_frsize, st.f_blocks, st.f_files, st.f_namemax)
        r[f"{path}: bfree <= blocks, bavail <= bfree"] = st.f_bfree <= st.f_blocks and st.f_bavail <= st.f_bfree
    return r


# -- readlink and symlink resolution -----------------------------------------------------

@check()
def check_readlink(ctx):
    r = Rec()
    targets = {"rel": "a", "up": "../x/y", "abs": "/nonexistent/abs/path", "space": "with space",
               "newline": "tr\nail", "latin1": b"\xff\xfe-bytes", "dots": "./././f",
               "k1": "k" * 1000, "max": "m" * 4095}
    for tag, t in targets.items():
        r(f"symlink {tag}", os.symlink, t, tag)
        got = attempt(os.readlink, os.fsencode(tag))
        r[f"readlink {tag} exact"] = got == os.fsencode(t) if isinstance(got, bytes) else got
        r[f"lstat size {tag}"] = size_of(tag)
    r("symlink of 4096 bytes", os.symlink, "z" * 4096, "toolong")
    r("empty target", os.symlink, "", "empty")
    r("readlink with a 3-byte buffer", readlink_buf, "rel", 3)
    r("readlink with a 3-byte buffer (long)", readlink_buf, "k1", 3)
    write_file("file", b"")
    r("readlink a file", os.readlink, "file")
    r("readlink missing", os.readlink, "missing")
    r("readlink with a trailing slash", os.readlink, "rel/")
    # resolution: chains and loops
    write_file("end", b"END")
    prev = "end"
    for i in range(41):
        os.symlink(prev, f"c{i}")
        prev = f"c{i}"
    r("chain of 40", read_file, "c39")
    r("chain of 41", read_file, "c40")
    os.symlink("self", "self")
    r("self loop", read_file, "self")
    os.mkdir("d")
    os.symlink("../end", "d/up")
    r("relative to the link's dir", read_file, "d/up")
    os.symlink("d", "ld")
    r("through a dir symlink", read_file, "ld/up")
    return r


@check()
def check_fifo_mknod(ctx):
    r = Rec()
    r("mkfifo", os.mkfifo, "p", 0o640)
    r["p"] = describe("p")
    r("open O_RDONLY|O_NONBLOCK", try_open, "p", os.O_RDONLY | os.O_NONBLOCK)
    r("open O_WRONLY|O_NONBLOCK without a reader", try_open, "p", os.O_WRONLY | os.O_NONBLOCK)
    rfd = os.open("p", os.O_RDONLY | os.O_NONBLOCK)
    try:
        r("write with a reader", try_open, "p", os.O_WRONLY | os.O_NONBLOCK, then=lambda fd: os.write(fd, b"pipe"))
        r("read it", os.read, rfd, 100)
    finally:
        os.close(rfd)
    r("mknod S_IFREG", os.mknod, "reg", stat.S_IFREG | 0o600)
    r("mknod type 0 (regular)", os.mknod, "zero", 0o600)
    r("mknod S_IFCHR", os.mknod, "chr", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    r("mknod S_IFBLK", os.mknod, "blk", stat.S_IFBLK | 0o600, os.makedev(7, 100))
    r("mknod S_IFSOCK", os.mknod, "sock", stat.S_IFSOCK | 0o600)
    r("mknod S_IFDIR", os.mknod, "dir", stat.S_IFDIR | 0o700)
    r("mknod S_IFLNK", os.mknod, "lnk", stat.S_IFLNK | 0o700)
    os.chmod(".", 0o777)
    r["user mknod S_IFCHR"] = as_user(os.mknod, "uchr", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    r["user mknod S_IFIFO"] = as_user(os.mknod, "ufifo", stat.S_IFIFO | 0o600)
    r["user mknod S_IFSOCK"] = as_user(os.mknod, "usock", stat.S_IFSOCK | 0o600)
    r["tree"] = snapshot()
    return r


# -- paths longer than PATH_MAX --------------------------------------------------------

COMP = "d" * 200


@check()
def check_deep_paths(ctx):
    """Bug 7: entries made relative to directory fds, deeper than PATH_MAX.

    While the absolute path fits in PATH_MAX on both sides, results must equal
    ext4's.  Beyond, the mount may refuse (the store is keyed by path), but each
    result must agree with SOURCE: a refused create leaves nothing behind, a
    successful one exists.
    """
    r = Rec()
    inconsistent = []
    dfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    bfd = os.open(ctx.backing, os.O_PATH | os.O_DIRECTORY)
    try:
        for depth in range(1, 26):
            rel_len = depth * (len(COMP) + 1)
            fits = ctx.prefix_max + rel_len + 32 < PATH_MAX
            ops = (("mkdir", lambda: os.mkdir(COMP, dir_fd=dfd), COMP),
                   ("create", lambda: os.close(os.open("f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644,
                                                      dir_fd=dfd)), "f"),
                   ("mkfifo", lambda: os.mkfifo("p", dir_fd=dfd), "p"),
                   ("symlink", lambda: os.symlink("t", "s", dir_fd=dfd), "s"),
                   ("link", lambda: os.link("f", "h", src_dir_fd=dfd, dst_dir_fd=dfd), "h"),
                   ("rename", lambda: os.rename("h", "h2", src_dir_fd=dfd, dst_dir_fd=dfd), "h2"))
            for op, fn, name in ops:
                res = attempt(fn)
                exists = _exists(bfd, name)
                if fits:
                    r[f"depth {depth} {op}"] = (res, exists)
                elif (res == "ok") != exists:
                    inconsistent.append(f"depth {depth} {op}: returned {res}, "
                                        f"{'exists' if exists else 'absent'} in the backing directory")
            if not _exists(bfd, COMP):
                break
            try:
                nd = os.open(COMP, os.O_RDONLY | os.O_DIRECTORY, dir_fd=dfd)
            except OSError as e:
                inconsistent.append(f"depth {depth}: cannot open the new dir: {ename(e)}")
                break
            os.close(dfd)
            dfd = nd
            nb = os.open(COMP, os.O_PATH | os.O_DIRECTORY, dir_fd=bfd)
            os.close(bfd)
            bfd = nb
    finally:
        os.close(dfd)
        os.close(bfd)
    r["beyond PATH_MAX: results that disagree with the backing directory"] = inconsistent
    return r


def _exists(dirfd, name) -> bool:
    try:
        os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


@check()
def check_deep_paths_existing(ctx):
    """Files deeper than PATH_MAX made in the backing directory: stat, read, write,
    list, xattrs, rename and unlink through the view."""
    r = Rec()
    # build in the backing directory (on the plain side, that is this directory)
    bfd = os.open(ctx.backing, os.O_RDONLY | os.O_DIRECTORY)
    depth = 24
    for _ in range(depth):
        os.mkdir(COMP, dir_fd=bfd)
        nb = os.open(COMP, os.O_RDONLY | os.O_DIRECTORY, dir_fd=bfd)
        os.close(bfd)
        bfd = nb
    fd = os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=bfd)
    os.write(fd, b"deep data")
    os.close(fd)
    os.close(bfd)
    dfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            nd = os.open(COMP, os.O_RDONLY | os.O_DIRECTORY, dir_fd=dfd)
            os.close(dfd)
            dfd = nd
        r("stat", lambda: describe_st(os.stat("f", dir_fd=dfd)))
        r("read", try_open, "f", os.O_RDONLY, dir_fd=dfd, then=lambda fd: os.pread(fd, 100, 0))
        r("write", try_open, "f", os.O_WRONLY | os.O_APPEND, dir_fd=dfd, then=lambda fd: os.write(fd, b"+"))
        r("listdir", lambda: sorted(os.listdir(dfd)))
        r("fsetxattr", try_open, "f", os.O_RDONLY, dir_fd=dfd, then=lambda fd: os.setxattr(fd, "user.x", b"1"))
        r("fgetxattr", try_open, "f", os.O_RDONLY, dir_fd=dfd, then=lambda fd: os.getxattr(fd, "user.x"))
        r("rename", os.rename, "f", "g", src_dir_fd=dfd, dst_dir_fd=dfd)
        r("read renamed", try_open, "g", os.O_RDONLY, dir_fd=dfd, then=lambda fd: os.pread(fd, 100, 0))
        r("unlink", os.unlink, "g", dir_fd=dfd)
        r("listdir after", lambda: sorted(os.listdir(dfd)))
    finally:
        os.close(dfd)
    return r


# -- inode flags: chattr / lsattr -------------------------------------------------------

@check()
def check_chattr_immutable(ctx):
    """Bug 6: chattr +i works and is enforced; lsattr shows it."""
    r = Rec()
    write_file("f", b"data")
    os.mkdir("d")
    write_file("d/in", b"")
    r["lsattr f"] = lsattr("f")
    r["lsattr d"] = lsattr("d")
    r["GETFLAGS f"] = letters("f")
    r["GETFLAGS d"] = letters("d")
    try:
        r["chattr +i f"] = chattr("f", "+i")
        r["lsattr f after +i"] = lsattr("f")
        r["GETFLAGS f after +i"] = letters("f")
        r("SETFLAGS +i on d", lambda: setflags("d", getflags("d") | FS_IMMUTABLE_FL))
        r["lsattr d after +i"] = lsattr("d")
        r("open O_WRONLY", try_open, "f", os.O_WRONLY)
        r("open O_WRONLY|O_APPEND", try_open, "f", os.O_WRONLY | os.O_APPEND)
        r("open O_RDONLY", try_open, "f", os.O_RDONLY, then=lambda fd: os.read(fd, 10))
        r("truncate", os.truncate, "f", 0)
        r("unlink", os.unlink, "f")
        r("rename", os.rename, "f", "g")
        write_file("other", b"o")
        r("rename onto", os.rename, "other", "f")
        r("link", os.link, "f", "f2")
        r("chmod", os.chmod, "f", 0o600)
        r("chown", os.chown, "f", 1, 1)
        r("utimes", os.utime, "f", (1, 1))
        r("utimes NULL", os.utime, "f")
        r("setxattr", os.setxattr, "f", "user.x", b"1")
        r("create in d", try_open, "d/new", os.O_WRONLY | os.O_CREAT)
        r("unlink in d", os.unlink, "d/in")
        r("open in d O_WRONLY", try_open, "d/in", os.O_WRONLY)
        r("listdir d", lambda: sorted(os.listdir("d")))
        write_file("uf", b"")
        os.chown("uf", USER.uid, USER.gid)
        r["user SETFLAGS +i on its own file"] = as_user(lambda: setflags("uf", getflags("uf") | FS_IMMUTABLE_FL))
        r["user SETFLAGS +d on its own file"] = as_user(lambda: setflags("uf", getflags("uf") | FS_NODUMP_FL))
        r["lsattr uf"] = lsattr("uf")
        r["other SETFLAGS +d on user's file"] = as_user(
            lambda: setflags("uf", getflags("uf") & ~FS_NODUMP_FL), who=OTHER)
        r["chattr -i f"] = chattr("f", "-i")
        r("SETFLAGS -i on d", lambda: setflags("d", getflags("d") & ~FS_IMMUTABLE_FL))
        r["lsattr f after -i"] = lsattr("f")
        r("write after -i", try_open, "f", os.O_WRONLY | os.O_APPEND, then=lambda fd: os.write(fd, b"!"))
    finally:
        clear_flags_tree(".")
    r["tree"] = snapshot()
    return r


def _clear_append_then_pwrite(fd):
    """fcntl(F_SETFL) without O_APPEND, then pwrite at 0.  Not recorded: fcntl's own result
    (an append-only file refuses it; on FUSE the kernel checks S_APPEND of its own inode,
    which no FUSE server can set), only where the write lands."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, 0)
    except OSError:
        pass
    return os.pwrite(fd, b"Q", 0)


@check()
def check_chattr_append(ctx):
    """Bug 6: chattr +a: only appends."""
    r = Rec()
    write_file("f", b"0123")
    try:
        r["chattr +a f"] = chattr("f", "+a")
        r["lsattr f"] = lsattr("f")
        r("open O_WRONLY", try_open, "f", os.O_WRONLY)
        r("open O_RDWR", try_open, "f", os.O_RDWR)
        r("open O_WRONLY|O_TRUNC|O_APPEND", try_open, "f", os.O_WRONLY | os.O_TRUNC | os.O_APPEND)
        r("append", try_open, "f", os.O_WRONLY | os.O_APPEND, then=lambda fd: os.write(fd, b"AB"))
        r("pwrite at 0 on an O_APPEND fd", try_open, "f", os.O_WRONLY | os.O_APPEND,
          then=lambda fd: os.pwrite(fd, b"P", 0))
        r("pwrite at 0 after clearing O_APPEND with fcntl", try_open, "f", os.O_WRONLY | os.O_APPEND,
          then=_clear_append_then_pwrite)
        r["data"] = read_file("f")
        r("truncate", os.truncate, "f", 1)
        r("ftruncate on an O_APPEND fd", try_open, "f", os.O_WRONLY | os.O_APPEND,
          then=lambda fd: os.ftruncate(fd, 1))
        r("unlink", os.unlink, "f")
        r("rename", os.rename, "f", "g")
        r("link", os.link, "f", "h")
        r("chmod", os.chmod, "f", 0o600)
        r("utimes", os.utime, "f", (1, 1))
        r("utimes NULL", os.utime, "f")
        r("setxattr", os.setxattr, "f", "user.x", b"1")
        r["f"] = describe("f")
        os.mkdir("d")
        write_file("d/in", b"")
        r("SETFLAGS +a on d", lambda: setflags("d", getflags("d") | FS_APPEND_FL))
        r("create in an append-only dir", try_open, "d/new", os.O_WRONLY | os.O_CREAT)
        r("unlink in an append-only dir", os.unlink, "d/in")
        r["chattr -a f"] = chattr("f", "-a")
        r("SETFLAGS -a on d", lambda: setflags("d", getflags("d") & ~FS_APPEND_FL))
        r("truncate after -a", os.truncate, "f", 1)
    finally:
        clear_flags_tree(".")
    r["tree"] = snapshot()
    return r


@check()
def check_inode_flags(ctx):
    """Bug 6: FS_IOC_{GET,SET}FLAGS and FS_IOC_FS{GET,SET}XATTR pass through for the flags
    the backing filesystem supports, and refuse the rest as it does."""
    r = Rec()
    write_file("f", b"x")
    os.mkdir("d")
    try:
        r["GETFLAGS"] = letters("f")
        r["FSGETXATTR"] = attempt(fsgetxattr, "f")
        r["FSGETXATTR d"] = attempt(fsgetxattr, "d")
        for tag, bit in (("d", FS_NODUMP_FL), ("A", FS_NOATIME_FL), ("S", FS_SYNC_FL), ("s", FS_SECRM_FL),
                         ("u", FS_UNRM_FL), ("c", FS_COMPR_FL), ("V", FS_VERITY_FL)):
            r(f"SETFLAGS +{tag}", lambda: setflags("f", getflags("f") | bit))
            r[f"after +{tag}"] = letters("f")
            r(f"SETFLAGS -{tag}", lambda: setflags("f", getflags("f") & ~bit))
        r("SETFLAGS with the flags it has", lambda: setflags("f", getflags("f")))
        r("SETFLAGS unknown bit 0x80000000", lambda: setflags("f", getflags("f") | 0x80000000))
        r["after SETFLAGS"] = letters("f")
        # Clearing the extents flag migrates the file on ext4, which depends on the
        # writeback state of its data: only on an empty file is the result stable.
        write_file("empty", b"")
        r("SETFLAGS 0 (no extents flag) on an empty file", setflags, "empty", 0)
        r["empty after SETFLAGS 0"] = letters("empty")
        r("chattr +d (e2fsprogs)", chattr, "f", "+d")
        r["lsattr after chattr +d"] = lsattr("f")
        r("chattr -d", chattr, "f", "-d")
        r("FSSETXATTR immutable", lambda: fssetxattr("f", FS_XFLAG_IMMUTABLE))
        r["after FSSETXATTR immutable"] = (letters("f"), attempt(fsgetxattr, "f"))
        r("write while immutable (FSSETXATTR)", try_open, "f", os.O_WRONLY)
        r("FSSETXATTR clear", lambda: fssetxattr("f", 0))
        r("FSSETXATTR append|nodump", lambda: fssetxattr("f", FS_XFLAG_APPEND | FS_XFLAG_NODUMP))
        r["after FSSETXATTR append|nodump"] = letters("f")
        r("FSSETXATTR clear again", lambda: fssetxattr("f", 0))
        r("FSSETXATTR realtime (unsupported)", lambda: fssetxattr("f", FS_XFLAG_REALTIME))
        r("FSSETXATTR projid 7", lambda: fssetxattr("f", 0, projid=7))
        r("FSSETXATTR extsize 4096", lambda: fssetxattr("f", 0, extsize=4096))
        r["final FSGETXATTR"] = attempt(fsgetxattr, "f")
        r("SETFLAGS +d on d", lambda: setflags("d", getflags("d") | FS_NODUMP_FL))
        r["lsattr d"] = lsattr("d")
        os.mkfifo("p")
        r["lsattr p (fifo)"] = lsattr("p")
    finally:
        clear_flags_tree(".")
    return r


def _backing_flags(ctx, name, add=0, remove=0):
    """Change inode flags of ``name`` in the backing directory (not through the view)."""
    bfd = os.open(ctx.backing, os.O_PATH | os.O_DIRECTORY)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW, dir_fd=bfd)
    finally:
        os.close(bfd)
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf)
        fl = (struct.unpack_from("<I", buf)[0] | add) & ~remove
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, bytearray(struct.pack("<I", fl) + bytes(4)))
    finally:
        os.close(fd)


@check()
def check_flags_enforced(ctx):
    """Immutable and append-only set on the backing inodes (not through the view) are
    enforced through the view, and GETFLAGS reports them."""
    r = Rec()
    write_file("i", b"data")
    write_file("a", b"0123")
    write_file("spare", b"s")
    for d in ("di", "da"):
        os.mkdir(d)
        write_file(f"{d}/in", b"")
    try:
        _backing_flags(ctx, "i", add=FS_IMMUTABLE_FL)
        _backing_flags(ctx, "di", add=FS_IMMUTABLE_FL)
        _backing_flags(ctx, "a", add=FS_APPEND_FL)
        _backing_flags(ctx, "da", add=FS_APPEND_FL)
        for n in ("i", "di", "a", "da"):
            r[f"lsattr {n}"] = lsattr(n)
        for n in ("i", "a"):
            r(f"{n}: open O_WRONLY", try_open, n, os.O_WRONLY)
            r(f"{n}: open O_WRONLY|O_APPEND, write", try_open, n, os.O_WRONLY | os.O_APPEND,
              then=lambda fd: os.write(fd, b"+"))
            r(f"{n}: pwrite at 0 on an O_APPEND fd", try_open, n, os.O_WRONLY | os.O_APPEND,
              then=lambda fd: os.pwrite(fd, b"P", 0))
            r(f"{n}: pwrite at 0 after clearing O_APPEND with fcntl", try_open, n, os.O_WRONLY | os.O_APPEND,
              then=_clear_append_then_pwrite)
            r[f"{n}: data"] = read_file(n)
            r(f"{n}: open O_TRUNC", try_open, n, os.O_WRONLY | os.O_APPEND | os.O_TRUNC)
            r(f"{n}: read", read_file, n)
            r(f"{n}: truncate", os.truncate, n, 1)
            r(f"{n}: unlink", os.unlink, n)
            r(f"{n}: rename", os.rename, n, n + "2")
            r(f"{n}: rename onto", lambda: (write_file("spare", b"s"), os.rename("spare", n)))
            r(f"{n}: link", os.link, n, n + "3")
            r(f"{n}: chmod", os.chmod, n, 0o600)
            r(f"{n}: chown", os.chown, n, 1, 1)
            r(f"{n}: utimes", os.utime, n, (1, 1))
            r(f"{n}: utimes NULL", os.utime, n)
            r(f"{n}: setxattr", os.setxattr, n, "user.x", b"1")
        for d in ("di", "da"):
            r(f"{d}: create", try_open, f"{d}/new", os.O_WRONLY | os.O_CREAT)
            r(f"{d}: mkdir", os.mkdir, f"{d}/sub")
            r(f"{d}: unlink", os.unlink, f"{d}/in")
            r(f"{d}: rename out", os.rename, f"{d}/in", "out")
            r(f"{d}: write an entry", try_open, f"{d}/in", os.O_WRONLY, then=lambda fd: os.write(fd, b"w"))
            r(f"{d}: listdir", lambda: sorted(os.listdir(d)))
    finally:
        clear_flags_tree(".")
        clear_flags_tree(ctx.backing)
    r["tree"] = snapshot()
    return r


# -- a command line for looking at one record ------------------------------------------

def main(argv):
    if len(argv) < 3:
        print(__doc__)
        print("checks:", " ".join(c.id for c in CHECKS))
        return 2
    name, d = argv[1], os.path.abspath(argv[2])
    c = next(c for c in CHECKS if c.id == name)
    rec = run_check(c.fn, d, Ctx(d, len(d)), c.who, c.umask)
    for k, v in rec.items():
        print(f"{k}: {v!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
