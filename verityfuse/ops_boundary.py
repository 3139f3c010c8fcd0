"""The one boundary where errors become errnos, for every pyfuse3 handler.

In pyfuse3 an exception that escapes a handler ends the daemon, so each public
handler of VerityOperations is wrapped here: a core error (VerityError) or an
OSError becomes its errno, out of memory ENOMEM, anything unexpected is logged
(one line, rate-limited, never a traceback) and answered EIO.  With --debug
every request is logged with its outcome.
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
from typing import Optional

import pyfuse3

from .errors import RESOURCE_ERRNOS, Corruption, VerityError
from .logs import escape
from .logs import requests as ratelog

log = logging.getLogger("verityfuse")


def fail(err: int):
    raise pyfuse3.FUSEError(err)


def unexpected(name: str, e: BaseException) -> int:
    """A bug met while handling ``name``: one rate-limited line (never a traceback), and
    the errno to answer: ENOMEM for out of memory (a resource error, not logged), else EIO."""
    if isinstance(e, MemoryError):
        return errno.ENOMEM
    ratelog.log(logging.ERROR, (name, type(e).__name__),
                f"unexpected error in {name}: {type(e).__name__}: {e}")
    return errno.EIO


def errno_of(e: Exception, what: str, stats=None, untrusted: bool = False) -> int:
    """The one mapping from a core error or OSError to an errno.

    Integrity failures are logged here, once per block, whichever request
    (read, open, ioctl, enable) ran into them, and counted in ``stats``.

    An OSError's ENOSYS never reaches the kernel, which takes it, to OPEN, GETXATTR and
    others, as "this file system has no such operation" for the whole mount: a file's
    error must not switch an operation off (a host's share chooses any errno it likes).
    It is EOPNOTSUPP, what a program on the backing file system is told of its ENOSYS,
    or, with ``untrusted`` (a manifest mount: the share is the host's), EIO.  There a
    read's error other than the daemon's own lack of a resource is EIO too: a blocking
    read answered EAGAIN, or ENOENT, would mislead its caller.
    """
    if isinstance(e, Corruption):
        # The message names the file: escaped here, exact in the status.
        ratelog.integrity((type(e).__name__, str(e)), f"integrity failure: {escape(str(e))}")
        if stats is not None:
            stats.failure(str(e), getattr(e, "path", ""), getattr(e, "offset", None))
    elif isinstance(e, VerityError):
        log.debug("%s: %s", what, e)
    err = getattr(e, "errno", None) or errno.EIO
    if isinstance(e, OSError):
        if untrusted and (err == errno.ENOSYS or (what == "read" and err not in RESOURCE_ERRNOS)):
            return errno.EIO
        if err == errno.ENOSYS:
            return errno.EOPNOTSUPP
    return err


def sync_errno(e: Exception, name: str, errno_of) -> Optional[int]:
    """What the boundary answers ``e`` from handler ``name`` with, for a handler run as a
    plain call (fast_lookups; ``errno_of(e, name)``: the mount's mapping); None for an
    integrity failure, whose measurement waits: pyfuse3's handler then runs again."""
    if isinstance(e, Corruption):
        return None
    if isinstance(e, (VerityError, OSError)):
        return errno_of(e, name)
    return unexpected(name, e)


def _brief(a):
    """A request argument for the debug log (no buffers, no contexts)."""
    if isinstance(a, (bytes, bytearray, memoryview)):
        return bytes(a) if len(a) <= 64 else f"<{len(a)} bytes>"
    return a if isinstance(a, (int, str, type(None))) else type(a).__name__


def _boundary(fn):
    """``fn``'s errors become errnos (``self._errno_of``: errno_of with the mount's
    counters); a first integrity failure goes to ``self._tripwire_hit`` first."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self, *args):
        debug = log.isEnabledFor(logging.DEBUG)
        try:
            result = await fn(self, *args)
            if debug:
                log.debug("%s%r: ok", name, tuple(map(_brief, args)))
            return result
        except pyfuse3.FUSEError as e:
            if debug:
                log.debug("%s%r: %s", name, tuple(map(_brief, args)), errno.errorcode.get(e.errno))
            raise
        except (VerityError, OSError) as e:
            if isinstance(e, Corruption):
                await self._tripwire_hit(name, args, e)
            err = self._errno_of(e, name)
            if debug:
                log.debug("%s%r: %s", name, tuple(map(_brief, args)), errno.errorcode.get(err))
            raise pyfuse3.FUSEError(err) from None
        except Exception as e:  # a bug, or out of memory: never a traceback per request
            raise pyfuse3.FUSEError(unexpected(name, e)) from None

    return wrapper


def with_boundary(cls):
    """Wrap every public coroutine handler defined in ``cls`` itself."""
    for name, fn in list(vars(cls).items()):
        if inspect.iscoroutinefunction(fn) and not name.startswith("_"):
            setattr(cls, name, _boundary(fn))
    return cls
