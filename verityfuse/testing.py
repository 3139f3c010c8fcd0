"""Helpers for tests and benchmarks that need a real verified mount (no pytest needed).

``seal_tree`` seals a directory; ``VerifiedMount`` runs ``verityfuse mount -f``
as a child process, waits until the mount is ready and unmounts on exit.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Optional

from . import merkle
from .seal import seal_path, walk_files
from .store import Store, default_store


def seal_tree(source, paths=None, store=None, params: Optional[merkle.Params] = None):
    """Seal ``paths`` (default: every regular file) under ``source``; returns {relpath: digest text}."""
    source = str(source)
    params = params or merkle.Params()
    out = {}
    with Store(str(store) if store else default_store(source), create=True) as st:
        rels = [os.path.relpath(os.path.join(source, p), source) for p in paths] \
            if paths is not None else list(walk_files(source, st))
        for rel in rels:
            out[rel] = seal_path(st, source, rel, params).digest_text
    return out


class VerifiedMount:
    """A running ``verityfuse mount -f`` whose lifetime the caller controls."""

    def __init__(self, source, mountpoint, store=None, policy="enforce", options=(),
                 extra_args=(), timeout=15.0):
        self.source = pathlib.Path(source)
        self.mountpoint = pathlib.Path(mountpoint)
        self.store = pathlib.Path(store) if store else pathlib.Path(default_store(str(source)))
        fd, log = tempfile.mkstemp(prefix="verityfuse-", suffix=".log")
        os.close(fd)
        self.log_path = pathlib.Path(log)
        cmd = [sys.executable, "-m", "verityfuse.cli", "mount", "-f", str(source), str(mountpoint),
               "--policy", policy, "--log-file", log, *extra_args]
        if store:
            cmd += ["--store", str(store)]
        for o in options:
            cmd += ["-o", o]
        self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while not os.path.ismount(self.mountpoint):
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace")
                raise RuntimeError(f"verityfuse mount exited with {self.process.returncode}: "
                                   f"{err}{self.log()}")
            if time.monotonic() > deadline:
                self.unmount()
                raise RuntimeError(f"verityfuse mount not ready after {timeout}s: {self.log()}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except FileNotFoundError:
            return ""

    def unmount(self, timeout=10.0) -> Optional[int]:
        """Unmount and wait for the daemon; returns its exit code."""
        if self.process.poll() is None and os.path.ismount(self.mountpoint):
            for _ in range(50):
                r = subprocess.run(["fusermount3", "-u", str(self.mountpoint)],
                                   capture_output=True)
                if r.returncode == 0 or not os.path.ismount(self.mountpoint):
                    break
                time.sleep(0.1)  # busy: a test's file still open
            else:
                subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)])
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            if os.path.ismount(self.mountpoint):
                subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)])
        if self.process.stderr:
            self.process.stderr.close()
        return self.process.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.unmount()
