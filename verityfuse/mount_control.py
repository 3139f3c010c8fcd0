"""What `verityfuse` does to a mount that is running: ``mount -o remount`` (the kernel's
flags change, the daemon's settings must not) and unmount."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Dict, Optional, Tuple

from . import fsutil, mountinfo, mountopts
from .mountopts import MountError, Settings


def _serves(running: dict, source: str, mountpoint: str) -> bool:
    """Whether ``source``, as a remount names it, is what the mount serves: its path as
    given at mount time (resolved), or the mount table's source field, which mount(8)
    passes for a mount that fstab does not list."""
    from .mount_trust import is_oci

    if source in (running["source"], mountinfo.source(mountpoint)):
        return True
    return not is_oci(source) and os.path.realpath(source) == running["source"]


def remount(mountpoint: str, s: Settings, source: str) -> int:
    """``mount -o remount,...``: the kernel's flags (ro/rw ...) change; what the
    daemon was started with stays.  A daemon setting given again (mount(8) merges
    fstab's options in) must equal the running one, and so must SOURCE."""
    import json

    try:
        running = json.loads(os.getxattr(mountpoint, "user.verityfuse.status"))
    except OSError as e:
        raise MountError(f"'{mountpoint}' is not a running verityfuse mount ({e.strerror})") from None
    if not _serves(running, source, mountpoint):
        raise MountError(f"'{mountpoint}' serves '{running['source']}', not '{source}': a "
                         f"remount cannot change SOURCE; unmount and mount again")
    now = {"policy": running["policy"], "manifest_digest": running["manifest_digest"],
           "store": running["store"],
           "cache_size": running["tree_cache"]["max_bytes"] >> 20}
    want: Dict[str, object] = {"store": os.path.abspath(s.store) if s.store else None,
                               "policy": s.policy, "manifest_digest": s.manifest_digest,
                               "cache_size": s.cache_size}
    if running["mode"] == "manifest":
        del now["policy"]  # no effect in manifest mode: nothing unlisted is reachable
    _measured_settings(running, s, now, want)
    # Every other daemon setting as the daemon was started with it (its status says):
    # require_signatures, trust_cert, log_file, debug ... were accepted and ignored.
    started = running.get("settings") or {}
    given = mountopts.daemon_settings(mountopts.absolute_paths(s))
    for name in s.given:
        if name not in now and name in started:
            now[name], want[name] = started[name], given[name]
    changed = [n for n in now if n in s.given and want[n] != now[n]]
    if changed:
        raise MountError(f"remount cannot change {', '.join(changed)} of a running mount; "
                         f"unmount and mount again")
    flags = [n if v is None else f"{n}={v}" for n, v in s.fuse]
    if running["mode"] == "manifest":  # read-only, as its mount made it: rw changes nothing
        flags = [f for f in flags if f not in ("rw", "ro")] + ["ro"]
    flags += kept_flags(mountinfo.options(os.path.realpath(mountpoint)), [n for n, _ in s.fuse])
    r = subprocess.run(["mount", "-i", "-o", ",".join(["remount"] + flags), mountpoint])
    return r.returncode


# Per-mount flags a remount keeps unless it names their opposite.  mount(8) builds a
# remount's flags from fstab's line and the new options, not from the mount as it is:
# for a mount in fstab (without them there, as libfuse adds them) nosuid and nodev were
# dropped, and a setuid file in SOURCE ran as root for anyone.
_KEPT = {"nosuid": ("suid",), "nodev": ("dev",), "noexec": ("exec",),
         "nosymfollow": ("symfollow",)}
_ATIME = ("noatime", "relatime", "strictatime", "atime")


def kept_flags(current, given) -> list:
    """The flags among a mount's ``current`` options that a remount with FUSE/kernel
    options ``given`` must name again to keep."""
    kept = [f for f in current if f in _KEPT and not set(_KEPT[f]) & set(given)]
    if not set(_ATIME) & set(given):
        kept += [f for f in current if f in _ATIME[:3] or f == "nodiratime"]
    return kept


def _measured_settings(running: dict, s: Settings, now: dict, want: dict):
    """What a mount serves and measures, running (``now``) against given (``want``): a
    remount that names another manifest or measurement must fail, not pass as if it
    had mounted and measured them."""
    from . import manifest
    from .errors import ManifestError
    from .measure import default_log_path
    from .measure_registers import MeasureError, open_register

    trip = running.get("tripwire") or {}
    now.update(manifest=running["manifest_digest"], on_corruption=trip.get("on_corruption"),
               measure=trip.get("register"), event_log=trip.get("event_log"))
    want["on_corruption"] = s.on_corruption
    try:
        want["manifest"] = (manifest.manifest_digest(manifest.read_envelope(s.manifest)[1])
                            if s.manifest else None)
        register = open_register(s.measure) if s.measure else None
    except (OSError, ManifestError, MeasureError) as e:
        raise MountError(f"remount: {e}") from None
    want["measure"] = register.name if register else None
    want["event_log"] = (os.path.abspath(s.event_log or default_log_path(register))
                         if register else None)


def umount(mountpoint: str) -> int:
    """Unmount a verityfuse mount, and nothing else: fusermount3 run by root unmounts any
    file system (a typo's /srv for /srv/app would go).  As root through umount(8), which
    also drops what libmount recorded of the mount (utab: _netdev, x-systemd.*); the path
    is absolute, so that a name starting with '-' is no option.  Then waits for the daemon
    to exit (at most DAEMON_EXIT_WAIT), when it can tell which process it is (its status
    answers within STATUS_WAIT, from this pid namespace) and its file system is mounted
    nowhere else here (a bind mount keeps it serving)."""
    from .jsonout import error
    from .logs import escape

    path = os.path.abspath(mountpoint)
    real = os.path.realpath(path)
    kind = mountinfo.fstype(real)
    if kind is None:
        error(f"{escape(mountpoint)} is not a mount point")
        return 1
    if kind != "fuse.verityfuse":
        error(f"{escape(mountpoint)} is a {escape(kind)} mount, not a verityfuse one: not unmounted")
        return 1
    daemon = _daemon_of(path)
    device = mountinfo.device(real)  # (not a stat, which would wait on the daemon)
    cmd = ["umount", path] if os.geteuid() == 0 else ["fusermount3", "-u", path]
    if subprocess.run(cmd).returncode != 0:
        return 1
    if daemon is None or device is None or mountinfo.device_mounted(device):
        return 0
    if not _ended(daemon, DAEMON_EXIT_WAIT):
        from .jsonout import warning
        warning(f"{escape(mountpoint)} is unmounted, but its daemon (pid {daemon[0]}) still "
                f"runs after {DAEMON_EXIT_WAIT:.0f} s: its tree is mounted elsewhere too (in "
                f"another mount namespace?), or it is still finishing (a measured mount's "
                f"UnmountManifest record)")
    return 0


# How long umount waits for the daemon's status, and then for it to exit: what it does after
# the unmount (a measured mount's UnmountManifest event, a TPM extend) is done when umount
# returns, so a quote taken next shows it.
STATUS_WAIT = 2.0
DAEMON_EXIT_WAIT = 30.0


def _daemon_of(path: str) -> Optional[Tuple[int, str]]:
    """(pid, start time) of the daemon serving ``path``, from its status; None if it does not
    say within STATUS_WAIT.  Asked by a child process, killed if the daemon does not answer:
    a request still waiting would keep the mount busy (a thread of ours blocked in it made
    fusermount3's unmount fail)."""
    import json
    import select

    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # (the CLI has no other thread here)
        try:
            os.close(r)
            pid = json.loads(os.getxattr(path, "user.verityfuse.status"))["pid"]
            if isinstance(pid, int):
                os.write(w, str(pid).encode())
        finally:
            os._exit(0)
    os.close(w)
    answered: list = []
    try:
        answered = select.select([r], [], [], STATUS_WAIT)[0]
        text = os.read(r, 32) if answered else b""
    finally:
        os.close(r)
        if not answered:
            os.kill(child, signal.SIGKILL)  # fatal: a FUSE request's wait ends for it
        os.waitpid(child, 0)
    if not text.isdigit() or next(fsutil.fds_open_on("/dev/fuse", int(text)), None) is None:
        return None  # (a pid of another pid namespace than ours names another process)
    start = _start_time(int(text))
    return None if start is None else (int(text), start)


def _start_time(pid: int) -> Optional[str]:
    """A running process's start time (/proc/PID/stat, field 22: with its pid, it names one
    process, whatever pid is reused later); None once it has exited, also while it is a
    zombie that its parent has not reaped yet."""
    fields = fsutil.process_stat(pid)
    return None if not fields or len(fields) < 20 or fields[0] in ("Z", "X") else fields[19]


def _ended(daemon: Tuple[int, str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _start_time(daemon[0]) == daemon[1]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
