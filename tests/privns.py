"""A private mount namespace for tests that need a file in a system directory.

mount(8) runs helpers from /sbin only (libmount's compiled-in search path), so a test
of `mount -t fuse.verityfuse` needs /sbin/mount.fuse.verityfuse.  Rather than write
there, the test process moves into a mount namespace of its own (a slave of the
machine's: the machine's mounts still appear in it, its own never leave it), lays a
writable overlay over /usr/sbin, installs the helper into the overlay, and on the way
out removes the overlay and returns to the machine's namespace.  Nothing on the
machine changes, and FUSE mounts made meanwhile are visible to this process only.
"""

import contextlib
import ctypes
import os
import re
import subprocess

import pytest

CLONE_NEWNS = 0x00020000
_libc = ctypes.CDLL(None, use_errno=True)


def _call(fn, *args):
    if fn(*args) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _run(*cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise OSError(f"{' '.join(cmd)}: {r.stderr.strip()}")


@contextlib.contextmanager
def private_mounts():
    """A mount namespace of this process's own for the block: yields ``mount(*args)``
    (mount(8)'s arguments, the target last); every mount made through it is undone,
    and the process returns to the namespace it was in (which may be private too)."""
    if os.geteuid() != 0:
        pytest.fail("this test needs a private mount namespace, which needs root")
    home = os.open("/proc/self/ns/mnt", os.O_RDONLY)
    made = []

    def mount(*args):
        _run("mount", *args)
        made.append(args[-1])

    try:
        try:
            _call(_libc.unshare, CLONE_NEWNS)
            _run("mount", "--make-rslave", "/")
        except OSError as e:
            pytest.fail(f"cannot make a private mount namespace: {e}")
        _drop_fuse_copies()
        try:
            yield mount
        finally:
            for target in reversed(made):
                subprocess.run(["umount", "-l", target], capture_output=True)
            try:
                _call(_libc.setns, home, CLONE_NEWNS)
            except OSError:
                pass  # another thread shares our fs state: stay in the (now clean) private one
    finally:
        os.close(home)


def _drop_fuse_copies():
    """Detach, in this new namespace only, the copies of FUSE mounts it was made with:
    other tests' (another xdist worker's) verified mounts.  A copy kept here holds its
    FUSE connection open, so that daemon never learns of its unmount and is killed
    (test_no_leaks_and_clean_exit failed so, -9, now and then)."""
    with open("/proc/self/mountinfo", "rb") as f:
        fuse = [line.split()[4] for line in f
                if line.split(b" - ", 1)[1].startswith(b"fuse.")]
    for target in reversed(fuse):  # the innermost first
        subprocess.run(["umount", "-l", _unescape(target)], capture_output=True)


def _unescape(field: bytes) -> str:
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field))


@contextlib.contextmanager
def writable_system_dir(tmp, target="/usr/sbin"):
    """Make ``target`` writable for this process only, for the duration of the block: a
    writable overlay over it (upper layer in ``tmp``) in a private mount namespace."""
    up, work = os.path.join(tmp, "upper"), os.path.join(tmp, "work")
    os.makedirs(up)
    os.makedirs(work)
    with private_mounts() as mount:
        try:
            mount("-t", "overlay", "overlay", "-o",
                  f"lowerdir={target},upperdir={up},workdir={work}", target)
        except OSError as e:
            pytest.fail(f"cannot lay a private overlay over {target}: {e}")
        yield target
