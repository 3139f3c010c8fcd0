"""FUSE_LOOKUP answered by the view's lookup called as a plain function, from the shim.

pyfuse3 answers each LOOKUP through its coroutine machinery: a coroutine for its
handler awaited in its request loop, the handler's own and the error boundary's
around it, a request context and an EntryAttributes to copy into the reply.  A
view's lookup never waits, so none of that is needed: the FUSE shim hands each
FUSE_LOOKUP to ``_fastlookup.c``, which calls ``lookup`` below on the request thread
and replies with the attributes it returns, or with its errno.  In local mode that
was ~11 us of the daemon's ~250 a file over a container start (alternating runs).

Nothing is decided natively: the view looks the name up and counts the lookup as
before, and its errors become the errnos the error boundary answers (``errno_for``:
``ops_boundary.sync_errno``).  An integrity failure, whose measurement waits, is not
answered here: the request goes to pyfuse3, whose handler looks it up again and
reports it as before (no lookup is counted twice: a view's lookup that raises has
counted none).  A reply the kernel did not take (the request was interrupted) gives
its count back (``view.unlookup``).

Off with --debug (the native path never reaches the log), for an OCI view (which
has no native read path), and with VERITYFUSE_NO_FAST_LOOKUP=1.

Pure: this module neither imports pyfuse3 nor trio (the shim is passed in).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

from . import merkle


class NativeLookups:
    def __init__(self, native: Any, shim):
        self.native, self.shim = native, shim

    @classmethod
    def load(cls, shim, view, errno_for: Callable[[Exception], Optional[int]]
             ) -> "Optional[NativeLookups]":
        """Hook the shim's lookup (None if the engine or shim lacks it, or
        VERITYFUSE_NO_FAST_LOOKUP is set).  ``errno_for(e)``: the errno to answer an
        error of the view's lookup with, or None to pass the request to pyfuse3."""
        native = merkle._hashblocks
        if (shim is None or native is None or not hasattr(native, "fast_lookup_entry")
                or os.environ.get("VERITYFUSE_NO_FAST_LOOKUP")):
            return None

        def lookup(parent: int, name: bytes):  # called by fast_lookup, on the request thread
            try:
                a = view.lookup(parent, name, None)
            except Exception as e:
                return errno_for(e)
            return (a.ino, a.mode, a.nlink, a.uid, a.gid, a.rdev, a.size, a.blksize,
                    a.blocks, a.atime_ns, a.mtime_ns, a.ctime_ns, a.timeout)

        native.fast_lookup_set(lookup, view.unlookup)
        if not shim.set_fast_lookup(native.fast_lookup_entry()):
            native.fast_lookup_set(None, None)
            return None
        return cls(native, shim)

    def close(self) -> None:
        """Every lookup is pyfuse3's again."""
        self.shim.set_fast_lookup(None)
        self.native.fast_lookup_set(None, None)

    def counts(self) -> dict:
        """Lookups answered, errors replied, declined (to pyfuse3) and given back."""
        return self.native.fast_lookup_info()
