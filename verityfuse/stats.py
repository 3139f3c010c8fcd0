"""A running mount's counters, for `verityfuse status` (pure, thread-safe).

Fed by the verifier (blocks verified, tree-block cache), the reader (bytes
served) and the error boundary (integrity failures, with the last few named).
Read as one JSON object through the mount root's ``user.verityfuse.status``
extended attribute.
"""

from __future__ import annotations

import threading
import time
from collections import deque

RECENT_FAILURES = 8


class Stats:
    def __init__(self):
        self._lock = threading.Lock()
        self.started = time.time()
        self.blocks_verified = 0
        self.bytes_served = 0
        self.reads = 0
        self.integrity_failures = 0
        self.recent = deque(maxlen=RECENT_FAILURES)

    def verified(self, blocks: int, nbytes: int):
        # Unlocked on the read path: reads are counted from the request thread, and a
        # worker thread's increment can only race with another worker's (rarely).
        self.blocks_verified += blocks
        self.bytes_served += nbytes
        self.reads += 1

    def failure(self, message: str, path: str = "", offset=None):
        with self._lock:
            self.integrity_failures += 1
            self.recent.append({"time": round(time.time(), 3), "file": path, "offset": offset,
                                "message": message})

    def snapshot(self) -> dict:
        with self._lock:
            return {"blocks_verified": self.blocks_verified, "bytes_served": self.bytes_served,
                    "verified_reads": self.reads, "integrity_failures": self.integrity_failures,
                    "recent_failures": list(self.recent),
                    "uptime_s": round(time.time() - self.started, 1)}
