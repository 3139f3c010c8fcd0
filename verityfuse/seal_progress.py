"""The one progress line of `seal`, on a terminal only (files are sealed by several
threads: every update takes the line's lock)."""

from __future__ import annotations

import sys
import threading
import time


class Progress:
    """One progress line for a whole run, on a terminal only: bytes and files done
    out of the total, the rate, and the time left."""

    MIN_TOTAL = 16 << 20  # shorter runs finish before a line would help

    def __init__(self, total_bytes: int, total_files: int, stream=sys.stderr):
        self.enabled = stream.isatty() and total_bytes >= self.MIN_TOTAL
        self.total, self.files, self.stream = total_bytes, total_files, stream
        self.done = self.done_files = 0
        self.start = time.monotonic()
        self.last = float("-inf")  # the first update draws at once
        self._lock = threading.Lock()

    def for_file(self, label: str, size: int) -> "FileProgress":
        """A callable for treebuild.build_tree's progress(bytes_done_in_this_file)."""
        return FileProgress(self, size)

    def worker_done(self, staged):
        """A file a seal_pool worker staged (it had no progress line there): counted whole."""
        self.advance(staged.data_size, files=1)

    def advance(self, nbytes: int, files: int = 0):
        with self._lock:
            self.done += nbytes
            self.done_files += files
            self._show(force=files > 0)

    def _show(self, force: bool):
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.2 and not force):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else 0
        self.stream.write(f"\r[{100 * self.done // max(self.total, 1):3d}%] "
                          f"{self.done / 2**20:.0f}/{self.total / 2**20:.0f} MiB, "
                          f"{self.done_files}/{self.files} files, {rate / 2**20:.0f} MiB/s, "
                          f"ETA {int(left) // 60}:{int(left) % 60:02d}\033[K")
        self.stream.flush()

    def close(self):
        if self.enabled:
            with self._lock:
                self.stream.write("\r\033[K")
                self.stream.flush()


class FileProgress:
    """One file's part of a Progress: ``progress(done)`` as build_tree calls it, then
    ``close()`` once the file is done."""

    __slots__ = ("outer", "size", "seen")

    def __init__(self, outer: Progress, size: int):
        self.outer, self.size, self.seen = outer, size, 0

    def __call__(self, done: int):
        done = min(done, self.size)
        self.outer.advance(done - self.seen)
        self.seen = done

    def close(self):
        self.outer.advance(self.size - self.seen, files=1)
        self.seen = self.size
