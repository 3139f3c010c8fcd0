"""Shared helpers.  Test rules for this suite:

- Assert exact bytes, digests and errnos; never timings.
- fsverity-utils is the oracle wherever a digest, tree or descriptor is compared.
- Anything mounted is unmounted by a fixture, even when the test fails.
- Tests that make a real FUSE mount carry the ``mount`` marker, so ``pytest -m "not mount"`` is
  the fast tier (see README): a test that requests a mounting fixture (MOUNT_FIXTURES, directly
  or through another fixture) is marked here; a file whose tests mount by running the command
  line marks itself (``pytestmark``) or the test (``@pytest.mark.mount``).
- Tests leave the machine as they found it: ``system_paths_unchanged`` fails a test that
  wrote where verityfuse may write outside a temporary directory, ``machine_unchanged``
  the session if a mount or a process the tests started is left.
"""

import contextlib
import os
import shutil
import subprocess
import sys
import time

import pytest

FSVERITY = shutil.which("fsverity")

# Fixtures that mount (or set up a mount for the test): the plugin's verified_mount and the
# module-local ones built on the command line rather than on it.
MOUNT_FIXTURES = frozenset({
    "verified_mount",
    "oci_mount",  # test_oci: mounts oci:// references
    "sides",  # test_conformance: one mount for the module
    "fake_tsm",  # test_attest: the configfs-tsm stand-in is a FUSE file system
})


class PortTaken(RuntimeError):
    """A port picked free was bound by another process before the server started on it
    (tests/registry.py, tests/tpmsim.py: they start again on other ports)."""


@contextlib.contextmanager
def fuse_helper(script, mnt, *args, what="the test file system", before=()):
    """``python tests/SCRIPT [BEFORE...] MNT ARGS...`` (a pyfuse3 file system of the tests',
    or the bench's passthrough with its source ``before``) mounted on ``mnt`` while the
    block runs; unmounted and its process reaped after, failed or not."""
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.Popen([sys.executable, os.path.join(here, script), *before, str(mnt),
                             *args], stderr=subprocess.PIPE)
    try:
        for _ in range(500):
            if os.path.ismount(mnt) or proc.poll() is not None:
                break
            time.sleep(0.02)
        if not os.path.ismount(mnt):
            if proc.poll() is None:
                proc.kill()  # running but not mounted there: its stderr would never end
            pytest.fail(f"{what} did not mount: {proc.communicate(timeout=10)[1].decode()}")
        yield
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if os.path.ismount(mnt):  # busy (a mount over its files still up): never left behind
            subprocess.run(["umount", "--lazy", str(mnt)], capture_output=True)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    # tryfirst: the marker must be on the item before -m deselects by it.
    for item in items:
        if MOUNT_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.mount)


def pattern(n: int) -> bytes:
    """fsverity-utils' test_compute_digest.c input: byte i = (i%11 + i%439 + i%1103) & 0xff."""
    return bytes(((i % 11) + (i % 439) + (i % 1103)) & 0xFF for i in range(n))


def write(path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def fsverity_digest(path, *opts, tree=None, desc=None):
    """Run the real `fsverity digest`; returns (stdout line, tree bytes, descriptor bytes)."""
    if FSVERITY is None:
        pytest.skip("fsverity-utils is not installed")
    d = os.path.dirname(str(path))
    cmd = [FSVERITY, "digest", str(path), *opts,
           f"--out-merkle-tree={d}/.oracle.tree", f"--out-descriptor={d}/.oracle.desc"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
    with open(f"{d}/.oracle.tree", "rb") as f:
        t = f.read()
    with open(f"{d}/.oracle.desc", "rb") as f:
        ds = f.read()
    return out, t, ds


def drop_caches():
    """Drop the page cache, so that the next read reaches the daemon."""
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def daemon_fds(pid):
    """How many fds process ``pid`` (a daemon) holds now."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_daemon_fds(pid, want, timeout=10):
    """Until daemon ``pid`` holds ``want`` fds, or ``timeout`` seconds: how many it holds
    then.  Forgets are asynchronous: the kernel sends them when it drops its inodes."""
    deadline = time.monotonic() + timeout
    while daemon_fds(pid) != want and time.monotonic() < deadline:
        time.sleep(0.05)
    return daemon_fds(pid)


def wait_building(src, p, timeout=30):
    """Until the enable started by ``p`` has an object in the making."""
    tmp = src / ".verityfuse" / "tmp"
    deadline = time.monotonic() + timeout
    while not (tmp.exists() and os.listdir(tmp)):
        assert p.poll() is None, p.stderr.read()
        if time.monotonic() > deadline:
            raise TimeoutError("the enable never started building")
        time.sleep(0.01)


def flip(path, offset, data=None, length=1):
    """Overwrite bytes at ``offset`` with ``data``, or invert the ``length`` bytes there
    (never a no-op, whatever random data held)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        if data is None:
            old = f.read(length)
            assert len(old) == length, f"{path}: {len(old)} bytes at {offset}, not {length}"
            data = bytes(b ^ 0xFF for b in old)
            f.seek(offset)
        f.write(data)



# What verityfuse itself may write outside a test's temporary directory, if a test let it.
SYSTEM_PATHS = ("/usr/sbin/mount.fuse.verityfuse", "/var/log/verityfuse", "/run/verityfuse")
UTAB = "/run/mount/utab"  # libmount's record of mounts made with _netdev, x-systemd.*


def _system_paths():
    paths = {}
    try:  # a test's own mounts only (their paths name pytest's temporary directories)
        with open(UTAB) as f:
            paths[UTAB] = sorted(line for line in f if "/pytest-" in line)
    except OSError:
        paths[UTAB] = []
    for p in SYSTEM_PATHS:
        if os.path.islink(p):
            paths[p] = os.readlink(p)
        elif os.path.isdir(p):
            paths[p] = sorted(os.listdir(p))
        else:
            paths[p] = "a file" if os.path.lexists(p) else None
    return paths


@pytest.fixture(autouse=True)
def system_paths_unchanged():
    """Fail the test that wrote where verityfuse may write outside a temporary directory
    (a helper link in /usr/sbin, a log under /var/log or /run, a utab line of a mount it
    left libmount's record of): tests name their own."""
    before = _system_paths()
    yield
    after = _system_paths()
    changed = [f"{p}: {before[p]!r} before, {after[p]!r} after" for p in (*SYSTEM_PATHS, UTAB)
               if before[p] != after[p]]
    if changed:
        pytest.fail("this test changed the machine:\n  " + "\n  ".join(changed), pytrace=False)


def _machine_state(basetemp: str):
    # A process a test started names the test's temporary directory (a daemon's source, a
    # TPM's state, a registry's configuration): other processes on the machine are not ours.
    procs = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if basetemp + os.sep in cmd and int(pid) != os.getpid():  # not popen-gw1 for gw10
            procs.add((int(pid), cmd[:120]))
    with open("/proc/self/mountinfo") as f:
        mounts = {line.split()[4] for line in f
                  if "fuse.verityfuse" in line and line.split()[4].startswith(basetemp + os.sep)}
    return procs, mounts


@pytest.fixture(scope="session", autouse=True)
def machine_unchanged(tmp_path_factory):
    """Fail the run if the tests changed the machine outside their temporary directories."""
    base = str(tmp_path_factory.getbasetemp())
    procs, mounts = _machine_state(base)
    yield
    procs2, mounts2 = _machine_state(base)
    left = [f"process {pid} ({name}) still running" for pid, name in sorted(procs2 - procs)]
    left += [f"{m} still mounted" for m in sorted(mounts2 - mounts)]
    if left:
        pytest.fail("the tests left the machine changed:\n  " + "\n  ".join(left), pytrace=False)


def children_of(pid):
    """Live processes whose parent is ``pid``."""
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(d))
    return found
