"""Log lines a request can trigger: the one rate limiter, and escaping of names.

A client can make the daemon log at will (read a corrupt block, open a
refused file, enable a file): each such line goes through ``requests`` so
that no request pattern can flood the log.  Each message key is logged once,
and at most ``per_sec`` lines a second per kind.  Integrity failures have a
budget of their own, so a flood of other lines cannot hide them; a line over
its budget is not marked as logged (it is written when it recurs), and the
next line of any kind in a later second says how many were suppressed and
names the first.

Names a client chooses (file names) are escaped with ``escape`` wherever they
go into a log line, and every record is kept to one line by the handler, so a
name cannot forge a log line.  (Exceptions and the status JSON keep names
exact: JSON escapes control characters itself, and `verityfuse status`
escapes names for a terminal.)
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from typing import Dict, Union

from .jsonout import shown, shown_text

log = logging.getLogger("verityfuse")

INTEGRITY = "integrity-failure"
REQUEST = "request-triggered"


def escape(name: Union[str, bytes]) -> str:
    """``name`` (str or bytes) for a log line: jsonout.shown's notation."""
    if isinstance(name, (bytes, bytearray, memoryview)):
        name = os.fsdecode(bytes(name))
    return shown(name)


# Applied to every record, so even a message that formats a name without ``escape``
# stays one line.
one_line = shown_text


class _OneLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a malformed record: the handler reports it as it always does
            return True
        if not msg.isprintable():
            record.msg, record.args = one_line(msg), ()
        return True


class _Budget:
    """Lines of one kind in the current second."""

    def __init__(self, per_sec: int, remember: int):
        self.per_sec, self.remember = per_sec, remember
        self.seen: "OrderedDict[object, bool]" = OrderedDict()
        self.window = self.count = self.dropped = 0
        self.first = ""  # the first suppressed line of the window


class RateLimitedLog:
    def __init__(self, per_sec: int = 20, integrity_per_sec: int = 20, remember: int = 4096,
                 clock=time.monotonic):
        self.budgets: Dict[str, _Budget] = {REQUEST: _Budget(per_sec, remember),
                                            INTEGRITY: _Budget(integrity_per_sec, remember)}
        self.clock = clock
        self.lock = threading.Lock()

    def log(self, level: int, key, msg: str, kind: str = REQUEST):
        """Log ``msg`` unless ``key`` was logged before (None: no such check) or the
        budget of ``kind`` for this second is spent."""
        summaries = []
        with self.lock:
            now = int(self.clock())
            for name, past in self.budgets.items():  # any line reports every kind's last second
                if now != past.window:
                    if past.dropped:
                        summaries.append(
                            f"rate limit: {past.dropped} {name} log lines suppressed in one "
                            f"second (at most {past.per_sec} a second), the first: {past.first}")
                    past.window, past.count, past.dropped = now, 0, 0
            b = self.budgets[kind]
            write = key is None or key not in b.seen
            if write:
                b.count += 1
                if b.count > b.per_sec:
                    if not b.dropped:
                        b.first = msg[:300]
                    b.dropped += 1
                    write = False
                elif key is not None:  # marked only once written: a dropped line recurs
                    b.seen[key] = True
                    if len(b.seen) > b.remember:
                        b.seen.popitem(last=False)
        for summary in summaries:
            log.warning("%s", summary)
        if write:
            log.log(level, "%s", msg)

    def warning(self, key, msg: str):
        self.log(logging.WARNING, key, msg)

    def info(self, key, msg: str):
        self.log(logging.INFO, key, msg)

    def integrity(self, key, msg: str):
        """An integrity failure (a WARNING), with the integrity failures' own budget."""
        self.log(logging.WARNING, key, msg, INTEGRITY)


requests = RateLimitedLog()


FORMAT = "%(asctime)s verityfuse[%(process)d] %(levelname)s: %(message)s"


def _journal_stream() -> bool:
    """stderr is the journal's stream (systemd sets JOURNAL_STREAM to its dev:ino)."""
    want = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


def _log_name(mountpoint: str) -> str:
    """The mount point as one file name: '/' as '-', escaped as log lines are (a newline
    or ESC in a file name is an operator's trap), and cut within NAME_MAX with a hash of
    the whole (a kubelet volume's path is near 300 bytes: the file could not be made)."""
    name = escape(mountpoint.strip("/")).replace("/", "-") or "root"
    if len(os.fsencode(name)) > 200:
        import hashlib

        tail = hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:16]
        name = f"{os.fsencode(name)[:180].decode(errors='ignore')}-{tail}"
    return name + ".log"


def fallback_log_file(mountpoint: str) -> str:
    """Where a background daemon logs when there is no syslog socket and no journal."""
    if os.geteuid() == 0:
        base = "/var/log/verityfuse"
    else:
        base = os.path.join(os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"),
                            "verityfuse")
    return os.path.join(base, _log_name(mountpoint))


def runtime_log_file(mountpoint: str) -> str:
    """The fallback of the fallback: /run (XDG_RUNTIME_DIR for a user), a tmpfs that a
    read-only /var/log (an image, a minimal guest) leaves writable."""
    base = "/run" if os.geteuid() == 0 else os.environ.get("XDG_RUNTIME_DIR") or "/run/user/" \
        f"{os.getuid()}"
    return os.path.join(base, "verityfuse", _log_name(mountpoint))


def _file_handler(path: str) -> logging.Handler:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    return _log_file(path)


def _log_file(path: str) -> logging.Handler:
    """A handler appending to ``path``, opened now (a failure shows here, not at the first
    line): never through a symlink (one planted where root's daemon logs would send its
    lines anywhere, as logging.FileHandler followed it), nothing but a regular file (a FIFO
    would block it, O_NONBLOCK says ENXIO instead), and 0640 whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                 | os.O_CLOEXEC, 0o640)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return logging.StreamHandler(open(fd, "a", encoding="utf-8", errors="backslashreplace"))


def remove_if_empty(path: str):
    """Remove the log file ``path`` if nothing was written to it, and its directory if
    that leaves it empty (both as a failed mount found them: absent)."""
    for h in logging.getLogger().handlers:
        h.flush()
    try:
        if os.path.getsize(path) == 0:
            os.unlink(path)
            os.rmdir(os.path.dirname(path))  # only if nothing else is in it
    except OSError:
        pass


def _fallback(mountpoint: str):
    """(handler, where) for a daemon with no syslog and no journal: the documented file,
    else one in /run, else stderr (kept open by the daemon: the caller's terminal, or
    the service manager's log), each saying why the place before it could not be used."""
    why = []
    for path in (fallback_log_file(mountpoint), runtime_log_file(mountpoint)):
        try:
            handler = _file_handler(path)
        except OSError as e:
            why.append(f"cannot write {path}: {e.strerror}")
            continue
        extra = f"no /dev/log, no journal{''.join('; ' + w for w in why)}"
        return handler, f"file {path} ({extra})"
    import sys
    return logging.StreamHandler(sys.stderr), f"stderr (no /dev/log, no journal; {'; '.join(why)})"


class _GoneRequest(logging.Filter):
    """pyfuse3 logs an ERROR when the kernel takes a reply with ENOENT, which means no one
    waits for it any more: the request was interrupted, or the mount is going away (a
    release sent as it is unmounted).  libfuse itself is silent about it: nothing is lost,
    so it is a debug line, not an error an operator (or a test's log check) must read."""

    GONE = os.strerror(2)  # ENOENT, as pyfuse3's strerror names it

    def filter(self, record: logging.LogRecord) -> bool:
        if (record.levelno >= logging.ERROR and "fuse_reply_* failed with" in str(record.msg)
                and record.args and record.args[-1] == self.GONE):  # type: ignore[index]
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger("pyfuse3").isEnabledFor(logging.DEBUG)
        return True


_GONE_REQUEST = _GoneRequest()


def setup(debug: bool, log_file=None, background: bool = False, mountpoint: str = "") -> str:
    """Send the log somewhere it is kept; returns where, for the user.

    Integrity failures must never be dropped: a background daemon logs to
    syslog if /dev/log exists (each line naming the mount point), else to the
    journal if stderr is one, else to a file (minimal guests have neither): the
    documented one, else one in /run, else stderr.  Only an explicit ``log_file``
    that cannot be written refuses the mount (OSError naming it).
    """
    import logging.handlers
    import sys

    fmt = FORMAT
    handler: logging.Handler
    if log_file:
        try:
            handler = _log_file(log_file)
        except OSError as e:
            raise OSError(e.errno, f"cannot write the log file {log_file}: {e.strerror}") from None
        where = f"file {log_file}"
    elif not background:
        handler, where = logging.StreamHandler(sys.stderr), "stderr"
    elif os.path.exists("/dev/log") and stat.S_ISSOCK(os.stat("/dev/log").st_mode):
        handler = logging.handlers.SysLogHandler(  # a daemon's facility, as filters expect
            "/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        # One syslog carries every mount's lines: each names its mount point.
        mnt = escape(mountpoint).replace("%", "%%")
        fmt = f"verityfuse[%(process)d]: {mnt}: %(levelname)s: %(message)s"
        where = "syslog (/dev/log)"
    elif _journal_stream():
        handler = logging.StreamHandler(sys.stderr)
        fmt, where = "%(levelname)s: %(message)s", "the journal (JOURNAL_STREAM)"
    else:
        handler, where = _fallback(mountpoint)
    handler.setFormatter(logging.Formatter(fmt))
    handler.addFilter(_OneLine())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    pyfuse3_log = logging.getLogger("pyfuse3")
    if not debug:
        pyfuse3_log.setLevel(logging.WARNING)
    if _GONE_REQUEST not in pyfuse3_log.filters:
        pyfuse3_log.addFilter(_GONE_REQUEST)
    return where
