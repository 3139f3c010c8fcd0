"""A running mount's counters, for `verityfuse status` (pure, thread-safe), and the
words status prints them in.

Fed by the verifier (blocks verified, tree-block cache), the reader (bytes
served) and the error boundary (integrity failures).  Read as one JSON object
through the mount root's ``user.verityfuse.status`` extended attribute.

A failing block fails every read of it: failures are kept per (file, offset)
with a count and the first and last time, so one bad block read a thousand
times is one line, not a thousand, and cannot push out the others.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

# Distinct (file, offset) failures kept; beyond it the one seen longest ago is dropped
# (and counted), so a tree full of bad blocks costs bounded memory.  With names and
# messages cut at SHOWN_CHARS, the status object stays under the 64 KiB an xattr can
# carry even when every character needs a 6-byte JSON escape.
FAILURE_GROUPS = 16
SHOWN_CHARS = 256


class Stats:
    def __init__(self):
        self._lock = threading.Lock()
        self.started = time.time()
        self.blocks_verified = 0
        self.bytes_served = 0
        self.reads = 0
        self.integrity_failures = 0
        self.failures: OrderedDict = OrderedDict()  # (file, offset) -> group; last seen last
        self.failure_groups_dropped = 0

    def verified(self, blocks: int, nbytes: int):
        # Unlocked on the read path: reads are counted from the request thread, and a
        # worker thread's increment can only race with another worker's (rarely).
        self.blocks_verified += blocks
        self.bytes_served += nbytes
        self.reads += 1

    def failure(self, message: str, path: str = "", offset=None):
        now = round(time.time(), 3)
        with self._lock:
            self.integrity_failures += 1
            group = self.failures.pop((path, offset), None)
            if group is None:
                group = {"file": _cut(path), "offset": offset, "count": 0, "first": now}
            group.update(count=group["count"] + 1, last=now, message=_cut(message))
            self.failures[(path, offset)] = group
            while len(self.failures) > FAILURE_GROUPS:
                self.failures.popitem(last=False)
                self.failure_groups_dropped += 1

    def snapshot(self) -> dict:
        with self._lock:
            return {"blocks_verified": self.blocks_verified, "bytes_served": self.bytes_served,
                    "verified_reads": self.reads, "integrity_failures": self.integrity_failures,
                    "failures": [dict(g) for g in self.failures.values()],
                    "failure_groups_dropped": self.failure_groups_dropped,
                    "uptime_s": round(time.time() - self.started, 1)}


def _cut(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


# -- for people ----------------------------------------------------------------------------

def human_bytes(n: int) -> str:
    """1023 bytes, 1.5 KiB, 32.0 MiB: binary units, as the cache size is given."""
    if n < 1024:
        return f"{n} byte" + ("" if n == 1 else "s")
    size = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024:
            return f"{size:.1f} {unit}"
    return f"{size / 1024:.1f} TiB"


def human_duration(seconds: float) -> str:
    """2d 3h 4m 5s; the larger units only when they are not zero."""
    s = int(seconds)
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size or parts:
            parts.append(f"{s // size}{unit}")
            s %= size
    return " ".join(parts + [f"{s}s"])


_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def escape_name(name: str) -> str:
    """A file name as a terminal can show it without being driven by it: control
    characters and other unprintables as escapes, undecodable bytes (Python's
    surrogateescape) as \\xNN, backslash doubled so the escaping is unambiguous."""
    out = []
    for ch in name:
        c = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif 0xDC80 <= c <= 0xDCFF:
            out.append(f"\\x{c - 0xDC00:02x}")
        elif ch.isprintable():
            out.append(ch)
        elif c < 0x100:
            out.append(f"\\x{c:02x}")
        else:
            out.append(f"\\u{c:04x}" if c < 0x10000 else f"\\U{c:08x}")
    return "".join(out)
