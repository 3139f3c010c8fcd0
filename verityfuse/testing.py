"""Helpers for tests and benchmarks that need a real verified mount (no pytest needed).

``seal_tree`` seals a directory; ``VerifiedMount`` runs ``verityfuse mount -f``
as a child process, waits until the mount is ready and unmounts on exit;
``fuse_unavailable_reason`` says why this process cannot mount FUSE, if it cannot.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, Iterable, Optional, Sequence, Union

from .daemon import STOP_AT_STDIN_EOF
from .mountinfo import devices

__all__ = ["FUSE_DEVICE", "FUSERMOUNT", "FuseUnavailable", "VerifiedMount",
           "fuse_unavailable_reason", "mount_denied", "seal_tree"]

StrPath = Union[str, "os.PathLike[str]"]

#: The FUSE device and the mount helper that ``fuse_unavailable_reason`` checks
#: (module attributes, so that a test can point them elsewhere).
FUSE_DEVICE = "/dev/fuse"
FUSERMOUNT = "fusermount3"


class FuseUnavailable(RuntimeError):
    """This process may not mount FUSE here: no device, or no permission to mount.

    Raised by ``VerifiedMount`` when the daemon's mount fails for lack of
    permission; the ``verified_mount`` fixture turns it into a skip.
    """


def fuse_unavailable_reason() -> Optional[str]:
    """Why this process cannot mount a FUSE filesystem, or None if it can, as far as
    can be told without mounting.

    Checks that ``/dev/fuse`` exists and that this process can open it (a
    container without the device, or with it denied, fails here), and that
    ``fusermount3`` exists (unmounting uses it) and, for a process that is not
    root, is setuid root (what lets a user mount).  What only a mount attempt can
    tell (a user namespace, a seccomp filter, ``user_allow_other`` missing from
    /etc/fuse.conf) surfaces as ``FuseUnavailable`` from ``VerifiedMount``.
    """
    dev = FUSE_DEVICE
    if not os.path.exists(dev):
        return f"{dev} does not exist (no fuse kernel module, or a container without the device)"
    try:
        os.close(os.open(dev, os.O_RDWR | os.O_CLOEXEC))
    except OSError as e:
        return f"cannot open {dev} as uid {os.geteuid()}: {e.strerror}"
    helper = shutil.which(FUSERMOUNT)
    if helper is None:
        return f"{FUSERMOUNT} is not installed (Debian package fuse3)"
    if os.geteuid() != 0:
        st = os.stat(helper)
        if not (st.st_mode & stat.S_ISUID and st.st_uid == 0):
            return f"{helper} is not setuid root, and this process (uid {os.geteuid()}) is not root"
    return None


# What libfuse and fusermount3 print when mounting is not allowed for this process.
_DENIED = re.compile(r"^\s*(?:fusermount3?|fuse): .*(?:operation not permitted|permission denied|"
                     r"device not found|user_allow_other).*$", re.IGNORECASE | re.MULTILINE)


def mount_denied(stderr: str) -> Optional[str]:
    """The line of a failed mount's stderr saying that mounting was not permitted, if any."""
    m = _DENIED.search(stderr)
    return m.group(0).strip() if m else None


def seal_tree(source: StrPath, paths: Optional[Iterable[StrPath]] = None,
              store: Optional[StrPath] = None) -> Dict[str, str]:
    """Seal ``paths`` (default: every regular file) under ``source`` with the default
    parameters (``verityfuse.seal`` takes others); returns {relpath: digest text}."""
    from .api import seal

    return {rel: str(d) for rel, d in seal(source, paths, store=store).items()}


class VerifiedMount:
    """A running ``verityfuse mount -f`` whose lifetime the caller controls.

    Ready (mounted) when the constructor returns; ``unmount()`` (or leaving a
    ``with`` block) unmounts and waits for the daemon.  The daemon logs to
    ``log_path``: a temporary file removed by ``unmount()`` unless the caller
    gave ``log_file``; ``log()`` keeps returning its text afterwards.

    Raises ``FuseUnavailable`` when the mount fails because this process may not
    mount FUSE, ``RuntimeError`` (with the daemon's stderr and log) when it fails
    otherwise or is not ready within ``timeout`` seconds.
    """

    #: How the daemon is started (before ``mount -f SOURCE MOUNTPOINT ...``).
    command: Sequence[str] = (sys.executable, "-m", "verityfuse.cli")

    def __init__(self, source: StrPath, mountpoint: StrPath, store: Optional[StrPath] = None,
                 policy: str = "enforce", options: Iterable[str] = (),
                 extra_args: Iterable[str] = (), timeout: float = 15.0,
                 log_file: Optional[StrPath] = None) -> None:
        self.source = pathlib.Path(source)
        self.mountpoint = pathlib.Path(mountpoint)
        self.store = pathlib.Path(store) if store else self.source / ".verityfuse"
        self._own_log = log_file is None
        if log_file is None:
            fd, log = tempfile.mkstemp(prefix="verityfuse-", suffix=".log")
            os.close(fd)
        else:
            log = os.fspath(log_file)
        self.log_path = pathlib.Path(log)
        self._log_text: Optional[str] = None
        self.unmount_asked = False  # unmount() was called (by its owner, or a fixture)
        cmd = [*self.command, "mount", "-f", str(source), str(mountpoint),
               "--policy", policy, "--log-file", log, *extra_args]
        if store:
            cmd += ["--store", str(store)]
        for o in options:
            cmd += ["-o", o]
        # Ours is the mount that appears at the mount point from now on: the path may be
        # a mount point already (a mount of a mount), which is not this one's readiness.
        self._path = os.path.realpath(self.mountpoint)
        self._before = len(devices(self._path))
        self._dev: Optional[str] = None  # our mount's "major:minor", once it is there
        self._pid = os.getpid()  # a forked child of the caller's leaves the mount alone
        # Its stdin is a pipe only this process holds: should it die without unmounting
        # (SIGKILL, a CI job cancelled), the daemon sees EOF and unmounts (daemon.py).
        env = {**os.environ, STOP_AT_STDIN_EOF: "1"}
        self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, env=env)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.unmount()
            raise

    def _ours_mounted(self) -> bool:
        """Our mount is still at the mount point (its daemon alive or not)."""
        if self._dev is None:  # not seen yet: whatever appeared since we started
            devs = devices(self._path)
            if len(devs) > self._before:
                self._dev = devs[-1]
            return self._dev is not None
        return self._dev in devices(self._path)

    def _answering(self) -> bool:
        """Our mount is there and answers (its stat waits for the daemon's FUSE_INIT)."""
        if not self._ours_mounted():
            return False
        try:
            dev = os.stat(self._path).st_dev
        except OSError:  # ENOTCONN: the daemon died meanwhile (poll() says so next)
            return False
        return f"{os.major(dev)}:{os.minor(dev)}" == self._dev

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._answering():
            if self.process.poll() is not None:
                assert self.process.stderr is not None
                err = self.process.stderr.read().decode(errors="replace")
                denied = mount_denied(err)
                if denied:
                    raise FuseUnavailable(f"mounting FUSE is not permitted here: {denied}")
                raise RuntimeError(f"verityfuse mount exited with {self.process.returncode}: "
                                   f"{err}{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"verityfuse mount not ready after {timeout}s: {self.log()}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        """The daemon's log so far (all of it, once unmounted)."""
        if self._log_text is not None:
            return self._log_text
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def unmount(self, timeout: float = 10.0) -> Optional[int]:
        """Unmount and wait for the daemon; returns its exit code.  Idempotent.  A mount
        whose daemon died (or was killed here, not having exited in ``timeout``) is
        detached all the same; a mount of a mount leaves the lower one in place.  In a
        forked child of the caller's it does nothing (the mount is the caller's)."""
        if os.getpid() != self._pid:
            return None
        self.unmount_asked = True
        if self.process.poll() is None and self._ours_mounted():
            for _ in range(50):
                r = subprocess.run(["fusermount3", "-u", self._path], capture_output=True)
                if r.returncode == 0 or not self._ours_mounted():
                    break
                time.sleep(0.1)  # busy: a test's file still open
            else:
                subprocess.run(["fusermount3", "-u", "-z", self._path])
        elif self.process.poll() is None:
            self.process.terminate()  # not mounted yet (or not any more): it stops cleanly
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self._ours_mounted():  # its daemon is gone: only a lazy detach removes it
            subprocess.run(["fusermount3", "-u", "-z", self._path], capture_output=True)
        for pipe in (self.process.stdin, self.process.stderr):
            if pipe:
                pipe.close()
        self._release_log()
        return self.process.returncode

    def _release_log(self) -> None:
        """Keep the log's text and remove our temporary file (the daemon is gone)."""
        if self._log_text is None and self._own_log:
            self._log_text = self.log()
            try:
                self.log_path.unlink()
            except OSError:
                pass

    def __enter__(self) -> "VerifiedMount":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.unmount()
