"""Whole files a command reads or writes (pure): a bounded read of a file a user named,
and an atomic write that never follows a symlink planted where it writes.  fsutil holds
the policy for opening what an attacker may swap; these build on it."""

from __future__ import annotations

import errno
import os
import secrets

from .fsutil import open_regular


class TooLarge(OSError):
    """A file is larger than the caller's limit (found on its fstat size, before reading)."""


def read_regular(path, limit: int, what: str = "") -> bytes:
    """The bytes of a regular file (symlinks followed: the caller chose the path).

    A file whose fstat size is over ``limit`` raises TooLarge before a byte is
    read; one that grows while it is read is cut at ``limit`` + 1 bytes, so that
    the caller can tell it was too large."""
    fd = open_regular(path, follow=True, what=what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise TooLarge(errno.EFBIG, f"{size} bytes")
        chunks, got = [], 0
        while got <= limit:
            b = os.read(fd, min(1 << 20, limit + 1 - got))
            if not b:
                break
            chunks.append(b)
            got += len(b)
        return b"".join(chunks)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes, mode: int = 0o644, replace: bool = True):
    """Create ``path`` holding ``data``, whole or not at all, without following any
    symlink planted where we write.

    The bytes go to a new file under an unpredictable name in ``path``'s directory,
    created with O_EXCL|O_NOFOLLOW (a name an attacker guessed and planted makes
    us try another, never writes through it), fsynced, then renamed over ``path``
    (which replaces a symlink there rather than writing where it points); with
    ``replace=False`` it is hard-linked instead, which fails with FileExistsError
    when anything, a dangling symlink included, is at ``path``.  The directory is
    fsynced last, so the new name survives a crash.  ``mode`` is reduced by the
    umask, as open(2) does."""
    directory, name = os.path.split(os.path.abspath(path))
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        while True:
            tmp = f".{name[:200]}.{secrets.token_hex(8)}.tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             mode, dir_fd=dfd)
                break
            except FileExistsError:
                continue  # 2^-64 by chance, or planted: another name
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                if replace:
                    os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
                else:
                    os.link(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
                    os.unlink(tmp, dir_fd=dfd)
            except OSError as e:  # name the file the caller asked for, not our temporary one
                raise type(e)(e.errno, e.strerror, path) from None
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except FileNotFoundError:
                pass
            raise
        os.fsync(dfd)
    finally:
        os.close(dfd)
