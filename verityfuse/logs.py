"""The one rate limiter for log lines a request can trigger (no pyfuse3/trio).

A client can make the daemon log at will (read a corrupt block, open a
refused file): each such line goes through ``requests`` so that no request
pattern can flood the log.  Each message key is logged once, and at most
``per_sec`` lines a second; suppressed lines are counted and reported.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

log = logging.getLogger("verityfuse")


class RateLimitedLog:
    def __init__(self, per_sec: int = 20, remember: int = 4096):
        self.seen: "OrderedDict[object, bool]" = OrderedDict()
        self.per_sec, self.remember = per_sec, remember
        self.window, self.count, self.dropped = 0, 0, 0
        self.lock = threading.Lock()

    def log(self, level: int, key, msg: str):
        """Log ``msg`` unless ``key`` was logged before (None: no such check)."""
        with self.lock:
            if key is not None:
                if key in self.seen:
                    return
                self.seen[key] = True
                if len(self.seen) > self.remember:
                    self.seen.popitem(last=False)
            now = int(time.monotonic())
            if now != self.window:
                if self.dropped:
                    log.warning("%d log lines suppressed (rate limit)", self.dropped)
                self.window, self.count, self.dropped = now, 0, 0
            self.count += 1
            if self.count > self.per_sec:
                self.dropped += 1
                return
        log.log(level, "%s", msg)

    def warning(self, key, msg: str):
        self.log(logging.WARNING, key, msg)


requests = RateLimitedLog()


FORMAT = "%(asctime)s verityfuse[%(process)d] %(levelname)s: %(message)s"


def _journal_stream() -> bool:
    """stderr is the journal's stream (systemd sets JOURNAL_STREAM to its dev:ino)."""
    import os
    want = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


def fallback_log_file(mountpoint: str) -> str:
    """Where a background daemon logs when there is no syslog socket and no journal."""
    import os
    name = mountpoint.strip("/").replace("/", "-") or "root"
    if os.geteuid() == 0:
        base = "/var/log/verityfuse"
    else:
        base = os.path.join(os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"),
                            "verityfuse")
    return os.path.join(base, f"{name}.log")


def setup(debug: bool, log_file=None, background: bool = False, mountpoint: str = "") -> str:
    """Send the log somewhere it is kept; returns where, for the user.

    Integrity failures must never be dropped: a background daemon logs to
    syslog if /dev/log exists, else to the journal if stderr is one, else to a
    file (minimal guests have neither).
    """
    import logging.handlers
    import os
    import stat
    import sys

    fmt = FORMAT
    handler: logging.Handler
    if log_file:
        handler = logging.FileHandler(log_file)
        where = f"file {log_file}"
    elif not background:
        handler, where = logging.StreamHandler(sys.stderr), "stderr"
    elif os.path.exists("/dev/log") and stat.S_ISSOCK(os.stat("/dev/log").st_mode):
        handler = logging.handlers.SysLogHandler("/dev/log")
        fmt, where = "verityfuse[%(process)d]: %(levelname)s: %(message)s", "syslog (/dev/log)"
    elif _journal_stream():
        handler = logging.StreamHandler(sys.stderr)
        fmt, where = "%(levelname)s: %(message)s", "the journal (JOURNAL_STREAM)"
    else:
        path = fallback_log_file(mountpoint)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        handler, where = logging.FileHandler(path), f"file {path} (no /dev/log, no journal)"
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    if not debug:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)
    return where
