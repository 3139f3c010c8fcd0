"""Loads the native FUSE_IOCTL shim (_fuseshim.c) and binds it with ctypes.

It must be loaded RTLD_GLOBAL before pyfuse3 is imported: pyfuse3 binds
fuse_session_new when it is imported, and only a definition already in the
global scope takes its place.  ``load`` refuses (returns None, with the
reason) when that order cannot be had, when the shim was not built, or when
VERITYFUSE_NO_IOCTL_SHIM is set; the daemon then answers every ioctl with
ENOTTY.
"""

from __future__ import annotations

import ctypes
import errno
import importlib.util
import logging
import os
import sys
import threading
from typing import Optional, Tuple

from .logs import requests as ratelog


CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint,
                            ctypes.c_uint64, ctypes.c_uint, ctypes.c_void_p, ctypes.c_size_t,
                            ctypes.c_size_t)


class Shim:
    def __init__(self, lib):
        self.lib = lib
        lib.vf_set_handler.argtypes = [CALLBACK]
        lib.vf_reply_ioctl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
        lib.vf_reply_err.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.vf_req_interrupted.argtypes = [ctypes.c_void_p]
        lib.vf_req_ctx.argtypes = [ctypes.c_void_p] + [ctypes.POINTER(ctypes.c_uint32)] * 3
        self._callback = None  # kept referenced for the life of the process

    def hook_count(self) -> int:
        return self.lib.vf_hook_count()

    def set_dont_mask(self, on: bool):
        """Ask the kernel not to apply the caller's umask (the daemon applies it,
        so that a default ACL wins over it); before pyfuse3.init."""
        self.lib.vf_set_dont_mask(int(on))

    def set_max_background(self, n: int) -> bool:
        """Let the kernel keep ``n`` reads in flight to the daemon (its default is 12);
        before pyfuse3.init, which applies it if it hooks libfuse (``hook_count``).  False
        from a shim built before this existed: the default stays."""
        fn = getattr(self.lib, "vf_set_max_background", None)
        if fn is None:
            return False
        fn.argtypes = [ctypes.c_uint]
        fn(n)
        return True

    def set_noflush_ro(self, on: bool):
        """Mark handles opened read-only FOPEN_NOFLUSH: their close sends no FLUSH.
        A shim built before this existed lacks it: then FLUSH comes, as before."""
        fn = getattr(self.lib, "vf_set_noflush_ro", None)
        if fn is not None:
            fn(int(on))

    def _set_pair(self, what: str, abi: int, entry: Optional[Tuple[int, int]]) -> bool:
        """vf_set_fast_<what>(entry[0], entry[1]) (None: both NULL), if the shim has it at
        ABI ``abi`` (a shim built otherwise would call the functions wrongly)."""
        fn = getattr(self.lib, f"vf_set_fast_{what}", None)
        version = getattr(self.lib, f"vf_fast_{what}_abi", None)
        if fn is None or version is None or version() != abi:
            return False
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        first, second = entry if entry is not None else (None, None)
        return bool(fn(first, second))

    def set_fast_read(self, entry: Optional[Tuple[int, int]]) -> bool:
        """Hand every FUSE_READ to the C function at ``entry[0]`` first, which
        ``entry[1]`` tells when a reply it made was sent (None: no function); False if
        the shim cannot (built before this existed, or libfuse not hooked)."""
        return self._set_pair("read", 2, entry)

    def set_fast_open(self, entry: Optional[Tuple[int, int]]) -> bool:
        """Hand every FUSE_OPEN to the C function at ``entry[0]`` first and every
        FUSE_RELEASE to the one at ``entry[1]`` (None: neither); False as set_fast_read."""
        return self._set_pair("open", 1, entry)

    def set_fast_lookup(self, entry: Optional[Tuple[int, int]]) -> bool:
        """Hand every FUSE_LOOKUP to the C function at ``entry[0]`` first, which the one
        at ``entry[1]`` tells of a reply the kernel did not take (None: neither); False
        as set_fast_read."""
        return self._set_pair("lookup", 1, entry)

    def replies_sent_apart(self) -> int:
        """Fast reads whose reply the shim's reply thread sent (0 if it has none)."""
        fn = getattr(self.lib, "vf_replies_sent_apart", None)
        if fn is None:
            return 0
        fn.restype = ctypes.c_ulonglong
        return int(fn())

    def set_handler(self, fn):
        """fn(req, ino, cmd, fh, flags, data: bytes, out_size) -> 0 or errno."""

        def trampoline(req, ino, cmd, fh, flags, in_buf, in_size, out_size):
            # Copy now: in_buf is pyfuse3's receive buffer, reused after we return.
            # Nothing may escape a ctypes callback (it would return garbage).
            try:
                data = ctypes.string_at(in_buf, in_size) if in_size else b""
                return fn(req, ino, cmd, fh, flags, data, out_size)
            except BaseException as e:  # a bug: one rate-limited line, never a traceback per request
                ratelog.log(logging.ERROR, ("ioctl", type(e).__name__),
                            f"ioctl handler failed, replying EIO: {type(e).__name__}: {e}")
                return errno.EIO

        self._callback = CALLBACK(trampoline)
        self.lib.vf_set_handler(self._callback)

    def interrupted(self, req) -> bool:
        return bool(self.lib.vf_req_interrupted(req))

    def ctx(self, req):
        uid, gid, pid = ctypes.c_uint32(), ctypes.c_uint32(), ctypes.c_uint32()
        self.lib.vf_req_ctx(req, ctypes.byref(uid), ctypes.byref(gid), ctypes.byref(pid))
        return uid.value, gid.value, pid.value


class Request:
    """One FUSE_IOCTL request, answered exactly once (a lost reply hangs the caller
    in D state; a second one is a use-after-free in libfuse)."""

    def __init__(self, shim: Shim, req, out_size: int):
        self.shim, self.req, self.out_size = shim, req, out_size
        self._lock = threading.Lock()
        self.done = False

    def _claim(self) -> bool:
        with self._lock:
            if self.done:
                return False
            self.done = True
            return True

    def reply(self, data: bytes = b"", result: int = 0):
        if len(data) > self.out_size:
            raise ValueError(f"ioctl reply of {len(data)} bytes exceeds out_size {self.out_size}")
        if self._claim():
            self.shim.lib.vf_reply_ioctl(self.req, result, data, len(data))

    def error(self, err: int):
        if self._claim():
            self.shim.lib.vf_reply_err(self.req, err)

    def interrupted(self) -> bool:
        return self.shim.interrupted(self.req)


def load():
    """Load the shim; returns (Shim or None, reason it could not be loaded)."""
    if os.environ.get("VERITYFUSE_NO_IOCTL_SHIM"):
        return None, "disabled by VERITYFUSE_NO_IOCTL_SHIM"
    if "pyfuse3" in sys.modules:
        return None, "pyfuse3 was imported before the ioctl shim could be loaded"
    spec = importlib.util.find_spec("verityfuse._fuseshim")
    if spec is None or not spec.origin:
        return None, "the native ioctl shim was not built (no compiler or libfuse3 headers at install)"
    try:
        lib = ctypes.CDLL(spec.origin, mode=os.RTLD_GLOBAL | os.RTLD_NOW)
    except OSError as e:
        return None, f"cannot load {spec.origin}: {e}"
    return Shim(lib), None
