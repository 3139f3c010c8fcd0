"""The daemons under test, all mounted at once, each on its own mount point.

- ``plain``: bench/plain_passthrough.py, every read answered on the trio thread
  into a reused buffer, as verityfuse answers verified reads of in-memory
  files: the reference of every ratio;
- ``plain-thr`` (only with --plain-thr): the same passthrough handing reads
  over 16 KiB to a worker thread, as verityfuse does when data would wait for
  a disk: what that hand-off costs without hashing;
- ``local``: ``verityfuse mount -f -o ro`` (local mode);
- ``manifest``: ``verityfuse mount -f -o ro --manifest M --trust-key PUB
  --manifest-digest D`` (read-only by itself; ``-o ro`` keeps the options
  identical whatever the daemon adds).

All four get the same mount options (default_permissions, ro), the same
readahead (1024 KiB, set right after FUSE_INIT by the daemon itself) and
keep_cache; ``check_same_settings`` reads them back from the kernel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from common import HERE, proc_cpu, proc_mem, verityfuse_cmd, wait_for

READAHEAD_KB = 1024


def mountinfo(mountpoint):
    """(major:minor, per-mount options, superblock options) of the topmost mount, or None."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == mountpoint:
                sep = fields.index("-")
                found = (fields[2], fields[5], fields[sep + 3])
    return found


def bdi_readahead(mountpoint):
    info = mountinfo(mountpoint)
    if info is None:
        return None
    with open(f"/sys/class/bdi/{info[0]}/read_ahead_kb") as f:
        return int(f.read())


class Mount:
    """One daemon serving ``source`` on ``mountpoint`` in the foreground, as our child."""

    def __init__(self, name, label, mountpoint, cmd, log_path):
        self.name, self.label, self.mountpoint = name, label, mountpoint
        self.cmd, self.log_path = cmd, log_path
        self.proc = None

    @property
    def pid(self):
        return self.proc.pid

    def start(self):
        os.makedirs(self.mountpoint, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            # A session of its own: a Ctrl-C reaches the bench only, which unmounts
            # the daemon in order instead of having it vanish under a pass.
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()

    def wait_ready(self, timeout=30.0):
        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited with {self.proc.returncode}: "
                                   f"{self.log_tail()}")
            # Mounted, and the daemon has applied its readahead after FUSE_INIT.
            return os.path.ismount(self.mountpoint) and \
                bdi_readahead(self.mountpoint) == READAHEAD_KB
        wait_for(ready, timeout, f"{self.label} on {self.mountpoint}")

    def log_tail(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""

    def cpu(self):
        return proc_cpu(self.pid)

    def mem(self):
        return proc_mem(self.pid)

    def tree_cache(self):
        """verityfuse's tree-block cache ({"bytes", "max_bytes"}: the LRU and the native
        leaf table), from its status attribute; None for the plain passthrough."""
        try:
            return json.loads(os.getxattr(self.mountpoint, "user.verityfuse.status"))["tree_cache"]
        except (OSError, ValueError, KeyError):
            return None

    def blocks_verified(self):
        """Data blocks verityfuse verified so far (its status attribute); None for the
        plain passthrough."""
        try:
            return json.loads(os.getxattr(self.mountpoint, "user.verityfuse.status"))[
                "blocks_verified"]
        except (OSError, ValueError, KeyError):
            return None

    def stop(self):
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                for _ in range(50):
                    r = subprocess.run(["fusermount3", "-u", self.mountpoint],
                                       capture_output=True)
                    if r.returncode == 0 or not os.path.ismount(self.mountpoint):
                        break
                    time.sleep(0.1)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        finally:
            if os.path.ismount(self.mountpoint):
                subprocess.run(["fusermount3", "-u", "-z", self.mountpoint])
            self.proc = None


class MountSet:
    """All daemons; ``with MountSet(...) as ms:`` mounts them all and always unmounts."""

    def __init__(self, ws, plain_thr=False):
        self.ws = ws
        plain = [sys.executable, os.path.join(HERE, "plain_passthrough.py"), ws.src]
        vf = verityfuse_cmd() + ["mount", "-f"]
        self.mounts = [
            Mount("plain", "plain passthrough (unverified)",
                  ws.path("mnt-plain"), plain + [ws.path("mnt-plain")], ws.path("plain.log")),
        ]
        if plain_thr:
            self.mounts.append(
                Mount("plain-thr", "plain passthrough (unverified, reads > 16 KiB in a thread)",
                      ws.path("mnt-plain-thr"), plain + [ws.path("mnt-plain-thr"),
                                                         "--thread-reads"],
                      ws.path("plain-thr.log")))
        self.mounts += [
            Mount("local", "verityfuse, local mode",
                  ws.path("mnt-local"), vf + [ws.src, ws.path("mnt-local"), "-o", "ro",
                                              "--log-file", ws.path("local.log")],
                  ws.path("local.out")),
            Mount("manifest", "verityfuse, manifest mode",
                  ws.path("mnt-manifest"),
                  vf + [ws.src, ws.path("mnt-manifest"), "-o", "ro", "--manifest", ws.manifest,
                        "--trust-key", ws.pub, "--manifest-digest", ws.manifest_digest,
                        "--log-file", ws.path("manifest.log")],
                  ws.path("manifest.out")),
        ]
        self.by_name = {m.name: m for m in self.mounts}

    def __getitem__(self, name):
        return self.by_name[name]

    def start(self):
        for m in self.mounts:
            m.start()
        for m in self.mounts:
            m.wait_ready()

    def stop(self):
        errors = []
        for m in self.mounts:
            try:
                m.stop()
            except Exception as e:  # keep unmounting the others
                errors.append(e)
        if errors:
            raise errors[0]

    def restart(self):
        self.stop()
        self.start()

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    def settings(self):
        """What the kernel says about each mount: the settings that must be identical."""
        out = {}
        for m in self.mounts:
            dev, opts, sb = mountinfo(m.mountpoint)
            # default_permissions and allow_other are superblock options; ro is per mount.
            keep = {"ro", "rw", "default_permissions", "allow_other"}
            out[m.name] = {"readahead_kb": bdi_readahead(m.mountpoint),
                           "options": ",".join(sorted({o for o in (opts + "," + sb).split(",")
                                                       if o in keep}))}
        return out
