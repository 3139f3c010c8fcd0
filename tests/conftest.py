"""Shared helpers.  Test rules for this suite:

- Assert exact bytes, digests and errnos; never timings.
- fsverity-utils is the oracle wherever a digest, tree or descriptor is compared.
- Anything mounted is unmounted by a fixture, even when the test fails.
"""

import os
import shutil
import subprocess

import pytest

FSVERITY = shutil.which("fsverity")


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


def flip(path, offset, data=None):
    """Overwrite bytes at ``offset`` with ``data``, or invert the byte there."""
    with open(path, "r+b") as f:
        f.seek(offset)
        if data is None:
            data = bytes([f.read(1)[0] ^ 0xFF])
            f.seek(offset)
        f.write(data)



@pytest.fixture(scope="session", autouse=True)
def private_var_log():
    """A daemon mounted in the background without --log-file logs to
    /var/log/verityfuse/: for the whole session /var/log is a tmpfs of a private mount
    namespace (as root; the machine's /var/log is never written).  Mounts the tests
    make are then this process tree's only; every fixture unmounts them in it."""
    if os.geteuid() != 0:
        yield
        return
    import privns

    with privns.private_mounts() as mount:
        mount("-t", "tmpfs", "-o", "mode=755", "tmpfs", "/var/log")
        yield
