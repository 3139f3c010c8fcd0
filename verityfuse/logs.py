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
