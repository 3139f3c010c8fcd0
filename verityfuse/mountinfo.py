"""/proc/self/mountinfo, read without touching the mount point (pure).

Never stat() a verityfuse mount point from its own daemon before its FUSE loop
runs: the kernel would wait for a GETATTR answer that this very thread has to
give.  Mount points are compared as bytes, after undoing mountinfo's octal
escapes (space, tab, newline, backslash), so any name works.
"""

from __future__ import annotations

import os
import re
from typing import List, Optional

_ESCAPE = re.compile(rb"\\([0-7]{3})")


def _unescape(field: bytes) -> bytes:
    return _ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field)


def _mounts_at(mountpoint: str) -> List[List[bytes]]:
    """The fields of every mount at ``mountpoint`` (an absolute, resolved path), bottom
    to top."""
    target = os.fsencode(mountpoint)
    with open("/proc/self/mountinfo", "rb") as f:
        return [parts for parts in map(bytes.split, f) if _unescape(parts[4]) == target]


def fields(mountpoint: str) -> Optional[List[bytes]]:
    """The fields of the topmost mount at ``mountpoint`` (an absolute, resolved path)."""
    found = _mounts_at(mountpoint)
    return found[-1] if found else None


def devices(mountpoint: str) -> List[str]:
    """"major:minor" of every mount at ``mountpoint``, bottom to top: a FUSE mount whose
    daemon died is listed too (os.path.ismount, whose stat fails with ENOTCONN, says no)."""
    return [parts[2].decode() for parts in _mounts_at(mountpoint)]


def is_mounted(mountpoint: str) -> bool:
    return fields(mountpoint) is not None


def device_mounted(dev: str) -> bool:
    """Whether a file system of "major:minor" ``dev`` is mounted anywhere (a bind mount of
    one is the same file system)."""
    want = dev.encode()
    with open("/proc/self/mountinfo", "rb") as f:
        return any(parts[2] == want for parts in map(bytes.split, f))


def device(mountpoint: str) -> Optional[str]:
    """"major:minor" of the filesystem mounted at ``mountpoint``."""
    f = fields(mountpoint)
    return f[2].decode() if f else None


def options(mountpoint: str) -> List[str]:
    """The per-mount options (ro, nosuid, relatime ...) of the mount at ``mountpoint``."""
    f = fields(mountpoint)
    return f[5].decode().split(",") if f else []


def read_only(mountpoint: str) -> bool:
    """Whether the mount is read-only now (``mount -o remount,ro`` included): the
    per-mount options, then the superblock's after the " - " separator."""
    f = fields(mountpoint)
    if f is None:
        return False
    sep = f.index(b"-")
    return b"ro" in f[5].split(b",") or b"ro" in f[sep + 3].split(b",")


def fstype(mountpoint: str) -> Optional[str]:
    f = fields(mountpoint)
    return f[f.index(b"-") + 1].decode() if f else None


def source(mountpoint: str) -> Optional[str]:
    """The mount's source (fsname), unescaped, or None if nothing is mounted there."""
    f = fields(mountpoint)
    return os.fsdecode(_unescape(f[f.index(b"-") + 2])) if f else None
