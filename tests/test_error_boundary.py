"""The FUSE error boundary (ops.py), with a fake view and no mount.

Every handler of VerityOperations runs behind one boundary: a core error becomes its errno,
an OSError its errno, an integrity failure EIO with exactly one log line, a resource error its
errno with none, and a bug EIO with one line and never a traceback.  pyfuse3's handlers are
coroutines: they are called here in a trio run of their own, as the daemon's loop would.
"""

import errno
import itertools
import logging
import os
import struct
import threading
import time
from types import SimpleNamespace

import pyfuse3
import pytest
import trio
import trio.testing

from verityfuse import errors, ioctl, merkle, uapi
from verityfuse.ops import VerityOperations
from verityfuse.stats import Stats

_unique = itertools.count()


class FakeView:
    """A view whose getattr raises what the test gives it."""

    posix_acl = False

    def __init__(self, exc: BaseException):
        self.exc = exc

    def getattr(self, ino):
        raise self.exc


def errno_of_getattr(exc: BaseException, stats=None) -> int:
    ops = VerityOperations(FakeView(exc), stats=stats)

    async def main():
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.getattr(1, None)
        return e.value.errno

    return trio.run(main)


def lines(caplog):
    """What the daemon logged at INFO and above (the debug lines are --debug's)."""
    return [r for r in caplog.records if r.name == "verityfuse" and r.levelno >= logging.INFO]


def _integrity():
    n = next(_unique)
    return errors.IntegrityError(f"dir/file{n}", 4096 * n, b"\x01" * 32, b"\x02" * 32)


# (what the view raises, the errno the request gets)
QUIET = [
    (errors.Errno(errno.ENODATA, "not a verity file"), errno.ENODATA),
    (errors.Errno(errno.EBUSY, "enable already running"), errno.EBUSY),
    (errors.InvalidParameters("unknown hash algorithm 257"), errno.EINVAL),
    (errors.SaltTooLong("salt of 33 bytes"), errno.EMSGSIZE),
    (errors.FileTooLarge("needs more than 8 tree levels"), errno.EFBIG),
    (errors.InvalidDescriptor("bad descriptor"), errno.EINVAL),
    (errors.ManifestError("not in the manifest"), errno.EINVAL),
    (FileNotFoundError(errno.ENOENT, "gone"), errno.ENOENT),
    (PermissionError(errno.EACCES, "no"), errno.EACCES),
    (OSError(errno.EROFS, "read-only"), errno.EROFS),
    (OSError(0, "no errno"), errno.EIO),
    # ENOSYS would switch the operation off for the whole mount (OPEN, GETXATTR...): what
    # the kernel tells a program on the backing file system instead
    (OSError(errno.ENOSYS, "a backing file system's answer"), errno.EOPNOTSUPP),
    # resource errors: the daemon ran out of something; not the file's fault, not logged
    (OSError(errno.EMFILE, "too many open files"), errno.EMFILE),
    (OSError(errno.ENFILE, "file table full"), errno.ENFILE),
    (OSError(errno.ENOSPC, "disk full"), errno.ENOSPC),
    (OSError(errno.ENOMEM, "no memory"), errno.ENOMEM),
    (MemoryError(), errno.ENOMEM),
]


@pytest.mark.parametrize("exc,want", QUIET, ids=[f"{type(e).__name__}-{errno.errorcode.get(w)}"
                                                 for e, w in QUIET])
def test_quiet_errors_become_their_errno_without_a_log_line(caplog, exc, want):
    caplog.set_level(logging.DEBUG, logger="verityfuse")
    stats = Stats()
    assert errno_of_getattr(exc, stats) == want
    assert lines(caplog) == []
    assert stats.snapshot()["integrity_failures"] == 0


@pytest.mark.parametrize("make", [
    _integrity,
    lambda: errors.SizeMismatch(f"f{next(_unique)}: backing file is 5 bytes, sealed size 4"),
    lambda: errors.StoreCorrupt(f"f{next(_unique)}: index entry truncated"),
    lambda: errors.Corruption(f"f{next(_unique)}: descriptor does not hash to the digest"),
], ids=["IntegrityError", "SizeMismatch", "StoreCorrupt", "Corruption"])
def test_integrity_failure_is_eio_and_exactly_one_line(caplog, make):
    caplog.set_level(logging.DEBUG, logger="verityfuse")
    exc = make()
    stats = Stats()
    assert errno_of_getattr(exc, stats) == errno.EIO
    logged = lines(caplog)
    assert [(r.levelno, r.getMessage()) for r in logged] == [
        (logging.WARNING, f"integrity failure: {exc}")]
    assert logged[0].exc_info is None
    assert stats.snapshot()["integrity_failures"] == 1
    # The same failure again (a client retrying): EIO again, counted, not logged again.
    assert errno_of_getattr(exc, stats) == errno.EIO
    assert len(lines(caplog)) == 1
    assert stats.snapshot()["integrity_failures"] == 2


def test_integrity_failure_names_the_file_escaped(caplog):
    caplog.set_level(logging.INFO, logger="verityfuse")
    n = next(_unique)
    exc = errors.IntegrityError(f"evil\nname{n}", 0, b"\x00" * 32, b"\xff" * 32)
    assert errno_of_getattr(exc) == errno.EIO
    (line,) = lines(caplog)
    assert "\n" not in line.getMessage() and f"evil\\nname{n}" in line.getMessage()


def test_a_bug_is_eio_one_line_and_never_a_traceback(caplog):
    caplog.set_level(logging.DEBUG, logger="verityfuse")
    # A class of its own: the line is logged once per (handler, exception type).
    bug = type(f"BoundaryBug{next(_unique)}", (Exception,), {})
    assert errno_of_getattr(bug("index out of range")) == errno.EIO
    assert errno_of_getattr(bug("again")) == errno.EIO
    logged = lines(caplog)
    assert [(r.levelno, r.getMessage()) for r in logged] == [
        (logging.ERROR, f"unexpected error in getattr: {bug.__name__}: index out of range")]
    assert logged[0].exc_info is None and "Traceback" not in caplog.text


def test_fuse_errors_pass_through_untouched(caplog):
    caplog.set_level(logging.DEBUG, logger="verityfuse")
    assert errno_of_getattr(pyfuse3.FUSEError(errno.ENOTEMPTY)) == errno.ENOTEMPTY
    assert lines(caplog) == []


# -- the ioctl entry (ops_ioctl), called by the native shim: errors become a returned errno --

class FakeShim:
    """What IoctlHandlers needs of fuseshim.Shim: the caller and two ways to answer."""

    def __init__(self):
        self.answers = []
        self.lib = self

    def ctx(self, req):
        return 0, 0, os.getpid()

    def interrupted(self, req):
        return False

    def vf_reply_ioctl(self, req, result, data, size):
        self.answers.append((req, "reply", bytes(data[:size])))

    def vf_reply_err(self, req, err):
        self.answers.append((req, "error", err))


class EnableView:
    """A view whose verity_info raises ``exc`` and whose enable build waits to be cancelled."""

    posix_acl = False

    def __init__(self, exc=None):
        self.exc = exc
        self.finished = []

    def verity_info(self, ino):
        if self.exc is not None:
            raise self.exc
        return None

    def enable_check(self, ino, fh, arg, caller):
        return SimpleNamespace(rel=f"file{ino}", caller=caller)

    def enable_build(self, job, cancel):
        while not cancel():
            time.sleep(0.001)
        raise errors.Errno(errno.EINTR, "enable interrupted; nothing committed")

    def enable_commit(self, job):
        raise AssertionError("nothing to commit after a cancelled build")

    def enable_finish(self, job):
        self.finished.append(job.rel)


def test_ioctl_errors_are_returned_as_errnos(caplog):
    caplog.set_level(logging.DEBUG, logger="verityfuse")
    shim = FakeShim()
    ops = VerityOperations(EnableView(), shim=shim)
    measure = struct.pack("<HH", 0, 64)
    assert ops.ioctls.ioctl(1, 5, uapi.FS_IOC_MEASURE_VERITY, 0, 0, measure, 68) == errno.ENODATA
    bad_version = b"\x02" + ioctl.pack_enable(merkle.Params())[1:]
    assert ops.ioctls.ioctl(2, 5, uapi.FS_IOC_ENABLE_VERITY, 0, 0, bad_version, 0) == errno.EINVAL
    assert ops.ioctls.ioctl(3, 5, uapi.FS_IOC_READ_VERITY_METADATA, 0, 0, bytes(40), 0) \
        == errno.ENOTTY
    assert shim.answers == [] and lines(caplog) == []  # the shim answers with what we return
    exc = _integrity()
    ops = VerityOperations(EnableView(exc), shim=shim)
    assert ops.ioctls.ioctl(4, 5, uapi.FS_IOC_MEASURE_VERITY, 0, 0, measure, 68) == errno.EIO
    assert [r.getMessage() for r in lines(caplog)] == [f"integrity failure: {exc}"]
    # Without the shim no ioctl reaches the daemon; were one to, it is ENOTTY, as libfuse says.
    assert VerityOperations(EnableView()).ioctls.ioctl(5, 5, uapi.FS_IOC_MEASURE_VERITY, 0, 0,
                                                       measure, 68) == errno.ENOTTY


class MeasureView:
    posix_acl = False

    def verity_info(self, ino):
        return SimpleNamespace(alg=merkle.SHA256, digest=bytes(range(32)))


def test_a_measure_whose_header_changed_during_the_call_is_eoverflow(caplog):
    """The kernel sized the reply (out_size) from the caller's digest_size, then copied
    the header again: a thread of the caller that raised digest_size in between made the
    reply too large for out_size, a ValueError, EIO and a traceback in the log, as often
    as any user liked.  The smaller buffer is the one there is: EOVERFLOW."""
    caplog.set_level(logging.DEBUG, logger="verityfuse")
    shim = FakeShim()
    ops = VerityOperations(MeasureView(), shim=shim)
    grown = struct.pack("<HH", 0, 64)
    assert ops.ioctls.ioctl(1, 5, uapi.FS_IOC_MEASURE_VERITY, 0, 0, grown, 4) == errno.EOVERFLOW
    assert ops.ioctls.ioctl(2, 5, uapi.FS_IOC_MEASURE_VERITY, 0, 0, grown, 4 + 32) == 0
    assert shim.answers == [(2, "reply", b"\x01\x00\x20\x00" + bytes(range(32)))]
    assert lines(caplog) == []


def test_a_bug_in_an_ioctl_handler_is_eio_and_one_line(caplog):
    """What escapes the ioctl handler is caught in the shim's callback (nothing may leave
    a ctypes callback): EIO, and one line per exception type, never a traceback (there
    was one per request)."""
    from verityfuse.fuseshim import Shim

    class Fn:  # a libfuse-shim function: records its calls; ctypes sets its argtypes
        def __init__(self):
            self.calls = []

        def __call__(self, *args):
            self.calls.append(args)

    lib = SimpleNamespace(**{name: Fn() for name in (
        "vf_set_handler", "vf_reply_ioctl", "vf_reply_err", "vf_req_interrupted", "vf_req_ctx")})
    caplog.set_level(logging.DEBUG, logger="verityfuse")
    bug = type(f"IoctlBug{next(_unique)}", (Exception,), {})

    def handler(*args):
        raise bug("boom")

    Shim(lib).set_handler(handler)
    (trampoline,), = lib.vf_set_handler.calls
    assert [trampoline(None, 1, 2, 3, 0, None, 0, 0) for _ in range(50)] == [errno.EIO] * 50
    logged = lines(caplog)
    assert [(r.levelno, r.getMessage()) for r in logged] == [
        (logging.ERROR, f"ioctl handler failed, replying EIO: {bug.__name__}: boom")]
    assert logged[0].exc_info is None and "Traceback" not in caplog.text


def test_unmount_stops_a_running_enable_which_answers_eintr():
    """The enable task outlives its ioctl callback in IoctlHandlers.run; cancelling that (the
    daemon does at unmount) makes the build see ``stopping``: EINTR, the job finished."""
    shim, view = FakeShim(), EnableView()
    ops = VerityOperations(view, shim=shim)

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(ops.ioctls.run)
            data = ioctl.pack_enable(merkle.Params())
            assert ops.ioctls.ioctl(7, 5, uapi.FS_IOC_ENABLE_VERITY, 0, 0, data, 0) == 0
            await trio.sleep(0.05)
            assert shim.answers == [] and view.finished == []  # still building
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert ops.ioctls.stopping
    assert shim.answers == [(7, "error", errno.EINTR)]
    assert view.finished == ["file5"]


class ViolatedView:
    """A manifest view whose every getattr fails its integrity check, for one path."""

    posix_acl = False

    def getattr(self, ino):
        raise errors.IntegrityError("dir/file", 0, b"\x01" * 32, b"\x02" * 32)

    def path_of(self, ino):
        return "dir/file"


class HeldMeasurer:
    """A register extend that takes until the test lets it finish (a slow TPM)."""

    def __init__(self, done: list):
        self.register = SimpleNamespace(name="test-register")
        self.release = threading.Event()
        self.done = done

    def record(self, event):
        self.release.wait(30)
        self.done.append("extended")


def test_every_eio_of_a_violated_file_waits_for_its_measurement(caplog):
    """A client that saw EIO can be quoted, and the quote shows the violation: a second
    failing request on the same file, while the first one's extend is still running, is
    answered only once the violation is in the register, not at once."""
    from verityfuse.tripwire import Tripwire

    done: list = []
    ops = VerityOperations(ViolatedView())
    measurer = HeldMeasurer(done)
    ops.tripwire = Tripwire("sha256:" + "11" * 32, measurer, "eio")

    async def failing_getattr():
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.getattr(1, None)
        done.append(f"EIO {e.value.errno == errno.EIO}")

    async def main():
        async with trio.open_nursery() as n:
            n.start_soon(failing_getattr)
            n.start_soon(failing_getattr)
            await trio.testing.wait_all_tasks_blocked()
            answered_early = list(done)
            measurer.release.set()
        return answered_early

    assert trio.run(main) == []
    assert done == ["extended", "EIO True", "EIO True"]
    assert ops.tripwire.measured == 1


class _Served:
    """A handle whose reader would serve the block (the host put the byte back)."""
    node = SimpleNamespace(path="dir/file")
    keep_cache = True


class ServedView:
    posix_acl = False

    def open(self, ino, flags, ctx):
        return _Served()

    def path_of(self, ino):
        return "dir/file"


class MismatchSeenNatively:
    """The native read path declined a read whose block did not hash (fast_reads)."""

    def register(self, fh, h):
        pass

    def seen_mismatch(self, fh, h):
        raise errors.IntegrityError("dir/file", 8192, b"\x01" * 32, b"\x02" * 32)

    def came_to_python(self, fh, h):
        raise AssertionError("the read went on to be served")


def test_a_read_the_native_path_saw_mismatch_fails_and_is_measured():
    """Whatever the block holds when Python would read it again, the read that saw it
    not hash is EIO, and the manifest path's violation is measured (review, s44)."""
    from verityfuse.tripwire import Tripwire

    done: list = []
    measurer = HeldMeasurer(done)
    measurer.release.set()
    ops = VerityOperations(ServedView())
    ops.fast = MismatchSeenNatively()
    ops.tripwire = Tripwire("sha256:" + "11" * 32, measurer, "eio")

    async def main():
        fi = await ops.open(5, os.O_RDONLY, SimpleNamespace(uid=0, gid=0, pid=0, umask=0))
        with pytest.raises(pyfuse3.FUSEError) as e:
            await ops.read(fi.fh, 8192, 4096)
        return e.value.errno

    assert trio.run(main) == errno.EIO
    assert done == ["extended"] and ops.tripwire.measured == 1
