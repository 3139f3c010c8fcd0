"""What `verityfuse` does to a mount that is running: ``mount -o remount`` (the kernel's
flags change, the daemon's settings must not) and unmount."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from typing import Dict, Optional, Tuple

from . import mountinfo, mountopts
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
    to exit, at most DAEMON_EXIT_WAIT."""
    from .jsonout import error
    from .logs import escape

    path = os.path.abspath(mountpoint)
    kind = mountinfo.fstype(os.path.realpath(path))
    if kind is None:
        error(f"{escape(mountpoint)} is not a mount point")
        return 1
    if kind != "fuse.verityfuse":
        error(f"{escape(mountpoint)} is a {escape(kind)} mount, not a verityfuse one: not unmounted")
        return 1
    daemon = _daemon_of(path)
    cmd = ["umount", path] if os.geteuid() == 0 else ["fusermount3", "-u", path]
    if subprocess.run(cmd).returncode != 0:
        return 1
    if daemon is not None and not _ended(daemon, DAEMON_EXIT_WAIT):
        error(f"{escape(mountpoint)} is unmounted, but its daemon (pid {daemon[0]}) has not "
              f"exited after {DAEMON_EXIT_WAIT:.0f} s")
        return 1
    return 0


# How long umount waits for the daemon's status, and then for it to exit: what it does after
# the unmount (a measured mount's UnmountManifest event, a TPM extend) is done when umount
# returns, so a quote taken next shows it.
STATUS_WAIT = 2.0
DAEMON_EXIT_WAIT = 30.0


def _daemon_of(path: str) -> Optional[Tuple[int, str]]:
    """(pid, start time) of the daemon serving ``path``, from its status; None if it does not
    say within STATUS_WAIT (asked in a thread of its own, which a daemon that never answers
    leaves blocked: it does not keep this process from exiting)."""
    import json

    got: list = []

    def ask():
        try:
            got.append(json.loads(os.getxattr(path, "user.verityfuse.status"))["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            pass

    t = threading.Thread(target=ask, name="verityfuse-status", daemon=True)
    t.start()
    t.join(STATUS_WAIT)
    if not got or not isinstance(got[0], int) or not _holds_fuse_device(got[0]):
        return None  # (its pid in another pid namespace than ours names another process)
    start = _start_time(got[0])
    return None if start is None else (got[0], start)


def _holds_fuse_device(pid: int) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse":
                return True
        except OSError:
            pass
    return False


def _start_time(pid: int) -> Optional[str]:
    """A running process's start time (/proc/PID/stat, field 22: with its pid, it names one
    process, whatever pid is reused later); None once it has exited, also while it is a
    zombie that its parent has not reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if len(fields) < 20 or fields[0] in ("Z", "X") else fields[19]


def _ended(daemon: Tuple[int, str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _start_time(daemon[0]) == daemon[1]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
