"""Mount time of a large signed manifest, and the daemon's memory.

The manifest is written directly (manifest_tree.make_payload + manifest.sign):
a root, 100 directories and files up to --manifest-entries (200,000) entries in all.  Its
files need not exist: mounting authenticates and parses the whole payload
before anything is read.  Each run times ``verityfuse mount SRC MNT --manifest
M --trust-key PUB --manifest-digest D`` in background mode, which returns once
the mount is ready (the user-visible mount time: interpreter start, imports,
signature check, parse, FUSE init), then reads the daemon's VmHWM/VmRSS and
unmounts.  The bench is a child subreaper, so the daemon (the background
child) is reaped here.
"""

from __future__ import annotations

import ctypes
import os
import resource
import subprocess
import time

from common import proc_cpu, proc_mem, verityfuse_cmd, wait_for
from passlog import Others, settle

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper():
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def write_manifest(path, key_path, entries):
    from verityfuse import manifest, manifest_tree

    ndirs = 100
    items = [{"path": ".", "type": "dir", "mode": 0o755, "uid": 0, "gid": 0, "mtime": 0}]
    items += [{"path": f"d{d:03d}", "type": "dir", "mode": 0o755, "uid": 0, "gid": 0,
               "mtime": 0} for d in range(ndirs)]
    nfiles = max(0, entries - len(items))
    for i in range(nfiles):
        items.append({"path": f"d{i % ndirs:03d}/f{i:06d}", "type": "file", "mode": 0o644,
                      "uid": 0, "gid": 0, "mtime": 1_700_000_000_000_000_000 + i,
                      "size": 4096 + i, "digest": "sha256:" + os.urandom(32).hex(),
                      "block_size": 4096, "salt": ""})
    payload = manifest_tree.make_payload(items)
    with open(path, "wb") as f:
        f.write(manifest.sign(payload, manifest.load_private_key(key_path)))
    return manifest.manifest_digest(payload), len(items), len(payload)


def _children_on(mountpoint):
    """PIDs of our children whose command line names ``mountpoint``."""
    me = os.getpid()
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != me:
                continue
            with open(f"/proc/{d}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if os.fsencode(mountpoint) in args:
            out.append(int(d))
    return out


def mount_once(src, mountpoint, manifest, pub, digest, log_file):
    """(seconds until mounted, daemon memory dict, others' CPU share meanwhile)."""
    os.makedirs(mountpoint, exist_ok=True)
    cmd = verityfuse_cmd() + ["mount", src, mountpoint, "--manifest", manifest,
                              "--trust-key", pub, "--manifest-digest", digest,
                              "--log-file", log_file]
    settle()

    def children_cpu():
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime

    pids = []
    c0 = children_cpu()
    # Ours: the mount command (reaped: RUSAGE_CHILDREN) and the daemon it left behind.
    others = Others(label="mount", extra_ours=lambda: children_cpu() - c0 +
                    sum(proc_cpu(p) for p in pids))
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, start_new_session=True)
    dt = time.perf_counter() - t0
    pids[:] = _children_on(mountpoint)
    try:
        if r.returncode != 0:
            raise RuntimeError(f"mount failed: {r.stderr.strip()}")
        if not os.path.ismount(mountpoint):
            raise RuntimeError("mount returned but nothing is mounted")
        if len(pids) != 1:
            raise RuntimeError(f"cannot identify the daemon of {mountpoint}: {pids}")
        others_s = others.stop()
        mem = proc_mem(pids[0])
    finally:
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True)
        for pid in pids:
            try:
                wait_for(lambda: os.waitpid(pid, os.WNOHANG)[0] == pid, 15, f"daemon {pid} to exit")
            except (RuntimeError, ChildProcessError):
                try:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", mountpoint])
    return dt, mem, Others.share(others_s, dt)
