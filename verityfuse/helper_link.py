"""The mount(8) helper link: ``DIR/mount.fuse.verityfuse`` -> this installation's helper.

mount(8) runs ``/sbin/mount.fuse.verityfuse`` for ``-t fuse.verityfuse``.  The link
must name *this* installation's helper script, never the first one on PATH (another
installation's helper would mount with other code), and it must be found the same way
under ``verityfuse`` and ``python -m verityfuse``.  The helper of an installation is
the console script that pip put next to it, whose ``#!`` line runs the interpreter
running now: that interpreter imports this very package.
"""

from __future__ import annotations

import os
import secrets
import sys
import sysconfig
from typing import List, Optional

HELPER_NAME = "mount.fuse.verityfuse"
DEFAULT_DIR = "/sbin"  # libmount's search path (/sbin:/sbin/fs.d:/sbin/fs); merged /usr: /usr/sbin


class HelperError(Exception):
    """Installing or removing the link was refused; the message says why."""


def _runs_this_python(script: str) -> bool:
    try:
        with open(script, "rb") as f:
            first = f.readline(4096)
    except OSError:
        return False
    if not first.startswith(b"#!"):
        return False
    interp = os.fsdecode(first[2:].strip().split(b" ", 1)[0])
    mine = sys.executable
    return interp == mine or os.path.realpath(interp) == os.path.realpath(mine)


def candidates() -> List[str]:
    """Where pip puts this installation's console scripts (a venv's bin, the scheme's
    scripts directory), in that order, without duplicates."""
    dirs = [os.path.dirname(sys.executable), sysconfig.get_path("scripts")]
    out: List[str] = []
    for d in dirs:
        p = os.path.join(d, HELPER_NAME)
        if d and p not in out:
            out.append(p)
    return out


def own_helper() -> str:
    """This installation's helper script (absolute), or HelperError naming where it looked."""
    for p in candidates():
        if os.path.isfile(p) and _runs_this_python(p):
            return os.path.abspath(p)
    raise HelperError(f"this installation ({sys.executable}) has no {HELPER_NAME} script; looked "
                      f"at {', '.join(candidates())}. Install the package (pip install verityfuse) "
                      f"so that pip creates it")


def _current(link: str) -> Optional[str]:
    """What ``link`` names now: its target, '' for a file that is not a link, None if absent."""
    try:
        return os.readlink(link)
    except FileNotFoundError:
        return None
    except OSError:
        return ""


def install(directory: str = DEFAULT_DIR, force: bool = False) -> List[str]:
    """Point ``directory/mount.fuse.verityfuse`` at this installation's helper, atomically
    (a link under an unpredictable name, renamed into place).  Returns what to print."""
    helper = own_helper()
    if not os.path.isdir(directory):
        raise HelperError(f"{directory} is not a directory")
    link = os.path.join(directory, HELPER_NAME)
    old = _current(link)
    if old == "" and not force:
        raise HelperError(f"{link} exists and is not a link (another package's helper?); "
                          f"remove it or use --force")
    tmp = os.path.join(directory, f".{HELPER_NAME}.{secrets.token_hex(8)}")
    os.symlink(helper, tmp)  # fails with EEXIST rather than follow anything there
    try:
        os.rename(tmp, link)
    except OSError:
        os.unlink(tmp)
        raise
    lines = [f"{link} -> {helper}"]
    if old == helper:
        lines.append("(it pointed there already)")
    elif old == "":
        lines.append("replaced a file that was not a link (--force)")
    elif old is not None:
        lines.append(f"replaced {link} -> {old}")
    return lines


def uninstall(directory: str = DEFAULT_DIR, force: bool = False) -> List[str]:
    """Remove ``directory/mount.fuse.verityfuse`` if it is this installation's link (any
    link with ``force``).  Returns what to print."""
    link = os.path.join(directory, HELPER_NAME)
    old = _current(link)
    if old is None:
        return [f"{link} does not exist: nothing to remove"]
    if old == "":
        raise HelperError(f"{link} is not a link: not removing a file verityfuse did not make")
    mine = None
    try:
        mine = own_helper()
    except HelperError:
        pass
    if old != mine and not force:
        raise HelperError(f"{link} -> {old} is another installation's helper (this one's is "
                          f"{mine or 'missing'}); use --force to remove it anyway")
    os.unlink(link)
    return [f"removed {link} -> {old}"]
