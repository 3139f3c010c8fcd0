"""The bench's files: a tmpfs it mounts (and always unmounts), the sealed tree and its manifest.

    WORK/src/big            --size-mib of random bytes (the file every read test reads)
    WORK/src/medium         64 MiB (memory after a smaller file, to show it flat in size)
    WORK/src/many/NNNNN     --files small files (4-16 KiB), for memory after many files
    WORK/src/.verityfuse    the store: `verityfuse seal WORK/src --manifest ... --sign-key ...`
    WORK/manifest.json      the signed manifest of src; WORK/key.pem, WORK/pub.pem
    WORK/mnt-*              mount points; WORK/*.log daemon logs
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile

from common import MiB, run, verityfuse_cmd

MEDIUM_MIB = 64


class Workspace:
    def __init__(self, size_mib: int, files: int, parent: str = "/tmp"):
        self.size_mib, self.files = size_mib, files
        self.root = tempfile.mkdtemp(prefix="verityfuse-bench.", dir=parent)
        self.mounted = False
        self.src = self.path("src")
        self.big = os.path.join(self.src, "big")
        self.medium = os.path.join(self.src, "medium")
        self.many = os.path.join(self.src, "many")
        self.manifest = self.path("manifest.json")
        self.key, self.pub = self.path("key.pem"), self.path("pub.pem")
        self.manifest_digest = None
        self.where = None

    def path(self, *names):
        return os.path.join(self.root, *names)

    def mount_tmpfs(self):
        # Room for the files, their trees (1/128 of the data), the 100k-entry manifest.
        size = self.size_mib + MEDIUM_MIB + self.files * 20 // 1024 + 512
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}m,mode=0755",
                            "verityfuse-bench", self.root], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"cannot mount a tmpfs on {self.root}: {r.stderr.strip()}")
        self.mounted = True
        self.where = f"tmpfs of {size} MiB on {self.root}"

    def create(self, log=print):
        os.mkdir(self.src)
        log(f"writing {self.size_mib} MiB of random data and {self.files} small files ...")
        write_random(self.big, self.size_mib * MiB)
        write_random(self.medium, MEDIUM_MIB * MiB)
        os.mkdir(self.many)
        rng = random.Random(1)
        for i in range(self.files):
            with open(os.path.join(self.many, f"{i:05d}"), "wb") as f:
                # Over 4 KiB, so each has a Merkle tree block for the daemon to cache.
                f.write(os.urandom(rng.randrange(4096 + 1, 16 * 1024 + 1)))
        log("sealing (verityfuse seal --manifest --sign-key) ...")
        run(verityfuse_cmd() + ["keygen", self.key, self.pub], stdout=subprocess.DEVNULL)
        run(verityfuse_cmd() + ["seal", self.src, "--manifest", self.manifest,
                                "--sign-key", self.key], stdout=subprocess.DEVNULL)
        self.manifest_digest = run(verityfuse_cmd() + ["measure-manifest", self.manifest],
                                   stdout=subprocess.PIPE, text=True).stdout.split()[0]

    def small_files(self):
        return sorted(os.listdir(self.many))

    def cleanup(self):
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
