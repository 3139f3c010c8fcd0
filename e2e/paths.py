"""Which paths the ``make e2e`` guest can reach, and how they are written into
QEMU's options: the guest's root is the host's / (read-only, over virtio-fs),
with its own filesystems on a few directories (e2e/guest-init.sh), and paths
travel on the kernel command line (quoted) and in virtiofsd's and QEMU's
comma-separated options."""

from __future__ import annotations

import sys
from pathlib import Path

# Covered in the guest by its own proc, sysfs, devtmpfs and tmpfs (e2e/guest-init.sh).
GUEST_HIDDEN = ("/proc", "/sys", "/dev", "/run")


def qemu_escape(value) -> str:
    """A value inside a QEMU option list: a comma is written twice."""
    return str(value).replace(",", ",,")


def validate_paths(repo: Path, build: Path):
    """Refuse, up front, a checkout, build directory or interpreter the guest cannot reach
    or whose path its kernel command line or virtiofsd cannot carry."""
    for what, p in (("the checkout", repo), ("the build directory", build),
                    ("the interpreter", Path(sys.executable)),
                    ("the interpreter", Path(sys.executable).resolve())):
        s = str(p)
        hidden = [h for h in GUEST_HIDDEN if s == h or s.startswith(h + "/")]
        if hidden:
            raise SystemExit(f"e2e: {what} {s} is under {hidden[0]}, which the guest covers with "
                             f"its own filesystem, so the guest could not reach it; use one "
                             f"elsewhere (a checkout, a venv, or --build DIR)")
        bad = sorted({c for c in s if c == '"' or not c.isprintable()})
        if bad:
            raise SystemExit(f"e2e: {what} {s!r} holds {bad}, which the guest's kernel command line "
                             f"cannot carry; use a path without them")
        if what != "the interpreter" and "," in s:
            raise SystemExit(f"e2e: {what} {s} holds a ',', which virtiofsd's -o source= cannot "
                             f"carry; use a path without one")
