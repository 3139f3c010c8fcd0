"""The bench's files: a tmpfs it mounts (and always unmounts), the sealed tree and its manifest.

    WORK/src/big            --size-mib of random bytes (the file every read test reads)
    WORK/src/medium         64 MiB (memory after a smaller file, to show it flat in size)
    WORK/src/.verityfuse    the store: `verityfuse seal WORK/src --manifest ... --sign-key ... --local`
    WORK/manifest.json      the signed manifest of src; WORK/key.pem, WORK/pub.pem
    WORK/ctr/dNN/dNN/dNN/f* the container-start tree (bench/smalltree.py), --ctr-files files
    WORK/ctr-store          its local store (`seal WORK/ctr --store WORK/ctr-store`)
    WORK/ctr-mstore, WORK/ctr-manifest.json   its store and signed manifest (`seal --manifest`)
    WORK/mnt-*              mount points; WORK/*.log daemon logs

Everything is in a tmpfs the bench mounts: no disk, and nothing left behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time

import smalltree
from common import MiB, run, verityfuse_cmd

MEDIUM_MIB = 64


class Workspace:
    def __init__(self, size_mib: int, ctr_files: int, parent: str = "/tmp"):
        self.size_mib, self.ctr_files = size_mib, ctr_files
        self.root = tempfile.mkdtemp(prefix="verityfuse-bench.", dir=parent)
        self.mounted = False
        self.src = self.path("src")
        self.big = os.path.join(self.src, "big")
        self.medium = os.path.join(self.src, "medium")
        self.ctr = self.path("ctr")
        self.ctr_store, self.ctr_mstore = self.path("ctr-store"), self.path("ctr-mstore")
        self.ctr_manifest = self.path("ctr-manifest.json")
        self.ctr_digest = None
        self.ctr_names, self.ctr_sizes = [], []
        self.manifest = self.path("manifest.json")
        self.key, self.pub = self.path("key.pem"), self.path("pub.pem")
        self.manifest_digest = None
        self.where = None

    def path(self, *names):
        return os.path.join(self.root, *names)

    def mount_tmpfs(self):
        # Room for the files, their trees (1/128 of the data), the 200k-entry manifest,
        # and the container tree: ~3.3 KiB a file, ~9 KiB of store a file in each of
        # two stores, ~0.8 KiB of manifest.  tmpfs takes only what is written.
        size = self.size_mib * 2 + MEDIUM_MIB + self.ctr_files * 24 // 1024 + 1024
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}m,mode=0755",
                            "verityfuse-bench", self.root], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"cannot mount a tmpfs on {self.root}: {r.stderr.strip()}")
        self.mounted = True
        self.where = f"tmpfs of {size} MiB on {self.root}"

    def create(self, log=print):
        os.mkdir(self.src)
        log(f"writing {self.size_mib} + {MEDIUM_MIB} MiB of random data ...")
        write_random(self.big, self.size_mib * MiB)
        write_random(self.medium, MEDIUM_MIB * MiB)
        log("sealing (verityfuse seal --manifest --sign-key --local) ...")
        run(verityfuse_cmd() + ["keygen", self.key, self.pub], stdout=subprocess.DEVNULL)
        # --local: the local-mode daemon serves the same files, verified by their index
        # entries (a manifest seal alone writes none: its reads would go unverified).
        run(verityfuse_cmd() + ["seal", self.src, "--manifest", self.manifest,
                                "--sign-key", self.key, "--local"], stdout=subprocess.DEVNULL)
        self.manifest_digest = run(verityfuse_cmd() + ["measure-manifest", self.manifest],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True).stdout.split()[0]

    def create_tree(self, log=print):
        """The container-start tree (not sealed: bench/seal.py seals it, timed)."""
        t0 = time.perf_counter()
        self.ctr_names, self.ctr_sizes = smalltree.create(self.ctr, self.ctr_files)
        log(f"container tree: {len(self.ctr_names)} files, {sum(self.ctr_sizes) / MiB:.0f} MiB, "
            f"written in {time.perf_counter() - t0:.1f} s")

    def measure_ctr_manifest(self):
        # stderr: the manifest's sequence and expiry, not worth a line of the report.
        self.ctr_digest = run(verityfuse_cmd() + ["measure-manifest", self.ctr_manifest],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True).stdout.split()[0]

    def cleanup(self):
        """Unmount whatever is still mounted under the workspace (a daemon left by an
        interrupted pass), stop any child still running, unmount the tmpfs, remove all."""
        for mp in sorted(mounts_under(self.root), key=len, reverse=True):
            if mp != self.root:
                subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True)
                subprocess.run(["umount", "-l", mp], capture_output=True)
        stop_children()
        if self.mounted:
            r = subprocess.run(["umount", self.root], capture_output=True, text=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", self.root])
            self.mounted = False
        shutil.rmtree(self.root, ignore_errors=True)


def write_random(path, size):
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(os.urandom(n))
            left -= n


def mounts_under(root):
    """Mount points at or below ``root`` (from /proc/self/mountinfo; octal escapes kept)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4]
            if mp == root or mp.startswith(root + "/"):
                out.append(mp)
    return out


def stop_children(grace=5.0):
    """SIGTERM then SIGKILL every process whose parent is this one (the bench is a
    child subreaper: daemons started by `verityfuse mount` in the background are its
    children too), and reap them."""
    me = os.getpid()
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                        pids.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            for p in list(pids):
                try:
                    if os.waitpid(p, os.WNOHANG)[0] == p:
                        pids.remove(p)
                except ChildProcessError:
                    pids.remove(p)
            time.sleep(0.05)
