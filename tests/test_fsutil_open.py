"""fsutil.open_regular's one errno policy, each kind of file in turn (no mount).

A symlink not followed: ELOOP; a directory: EISDIR (also an IsADirectoryError); a FIFO,
socket or device: EINVAL, without ever opening it (a FIFO would block, a device's driver
would run); a missing file and a file the caller may not read: what open(2) says, naming
the file. The message names the file and what it is.

Every test runs twice: with the native system calls (``_sysopen``) and with ctypes,
the fallback where the module is not built: the two must not differ in any answer.
"""

import errno
import os
import socket
import threading

import pytest

from verityfuse import fsutil, identity
from conftest import write

IMPLEMENTATIONS = ["native", "ctypes"] if fsutil.native_sys is not None else ["ctypes"]


@pytest.fixture(autouse=True, params=IMPLEMENTATIONS)
def implementation(request, monkeypatch):
    if request.param == "ctypes":
        monkeypatch.setattr(fsutil, "native_sys", None)
    return request.param


def test_the_native_module_is_built():
    """A silent build failure of the optional extension would leave every test here on
    ctypes: the install must have built it where _hashblocks was built."""
    from verityfuse import merkle
    assert fsutil._load_native() is not None or not merkle.NATIVE


@pytest.mark.parametrize("route", ["openat2", "walk"])
@pytest.mark.parametrize("path, err", [
    (b"a/link/f", None),            # a symlink in the middle: never followed (errno below)
    (b"link", None),                # a final symlink: the O_PATH fd is the link itself
    (b"../escape", errno.EXDEV),    # out of the base
    (b"a/../../escape", errno.EXDEV),
    (b"a/../a/f", errno.EXDEV),     # a '..' is refused even inside: the walk could not tell
    (b"a/f/x", errno.ENOTDIR),
    (b"a/missing", errno.ENOENT),
])
def test_open_beneath(tmp_path, monkeypatch, route, path, err):
    """Both routes: openat2 (RESOLVE_BENEATH, no symlinks) and the walk one directory at a
    time that kernels without openat2 get.  They refuse the same paths, with the errno
    the kernel gives, naming the whole path."""
    if route == "walk":
        monkeypatch.setattr(fsutil, "_have_openat2", False)
    if path == b"a/link/f":  # both routes say ELOOP (the walk finds the link is one)
        err = errno.ELOOP
    base = tmp_path / "base"
    (base / "a" / "d").mkdir(parents=True)
    write(base / "a" / "f", b"data")
    os.symlink("d", base / "a" / "link")
    os.symlink("a/f", base / "link")
    dfd = os.open(base, os.O_PATH | os.O_DIRECTORY)
    try:
        if err is None:
            pfd = fsutil.open_beneath(dfd, path)
            with pytest.raises(fsutil.NotRegular) as e:
                fsutil.reopen_regular(pfd, "it")
            assert (e.value.errno, e.value.strerror) == (
                errno.ELOOP, "it is a symlink, not a regular file")
            return
        with pytest.raises(OSError) as e:
            fsutil.open_beneath(dfd, path)
        assert (e.value.errno, e.value.filename) == (err, path.decode())
    finally:
        os.close(dfd)


def test_a_path_with_a_nul_is_refused_not_cut_short(tmp_path):
    write(tmp_path / "a", b"data")
    dfd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        with pytest.raises(ValueError, match="embedded null byte"):
            fsutil.open_beneath(dfd, b"a\0/x")  # cut at the NUL, it would open "a"
    finally:
        os.close(dfd)


def test_handle_and_filesystem_type(tmp_path):
    write(tmp_path / "f", b"data")
    os.link(tmp_path / "f", tmp_path / "g")
    fds = [os.open(tmp_path / n, os.O_RDONLY) for n in ("f", "g")]
    try:
        htype, raw = identity.handle_of(fds[0])
        assert identity.handle_of(fds[1]) == (htype, raw) and isinstance(raw, bytes) and raw
        assert os.fstat(identity.open_by_handle(fds[0], (htype, raw), os.O_RDONLY)).st_ino == \
            os.stat(tmp_path / "f").st_ino
        with pytest.raises(OSError) as e:
            identity.handle_of(-1)
        assert (e.value.errno, e.value.strerror) == (
            errno.EBADF, "name_to_handle_at: Bad file descriptor")
        shm = os.open("/dev/shm", os.O_PATH)
        try:
            assert fsutil.in_memory(shm) is True
        finally:
            os.close(shm)
        assert fsutil.in_memory(-1) is False
    finally:
        for fd in fds:
            os.close(fd)


def _regular(d):
    write(d / "x", b"data")


def _symlink(d):
    write(d / "target", b"data")
    os.symlink("target", d / "x")


def _dangling(d):
    os.symlink("nowhere", d / "x")


def _link_to_fifo(d):
    os.mkfifo(d / "fifo")
    os.symlink("fifo", d / "x")


def _dir(d):
    os.mkdir(d / "x")


def _fifo(d):
    os.mkfifo(d / "x")


def _socket(d):
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(d / "x"))
    return s  # closed by the test


def _missing(d):
    pass


NOT_REG = "{} is {}, not a regular file"
# (what is at the path, follow, expected exception, errno, message (None: the file opened))
CASES = {
    "regular": (_regular, False, None, None, None),
    "regular-follow": (_regular, True, None, None, None),
    "symlink": (_symlink, False, fsutil.NotRegular, errno.ELOOP, NOT_REG.format("{}", "a symlink")),
    "symlink-follow": (_symlink, True, None, None, None),
    "dangling-follow": (_dangling, True, FileNotFoundError, errno.ENOENT, "No such file or directory"),
    "symlink-to-fifo-follow": (_link_to_fifo, True, fsutil.NotRegular, errno.EINVAL,
                               NOT_REG.format("{}", "a FIFO")),
    "directory": (_dir, False, IsADirectoryError, errno.EISDIR, NOT_REG.format("{}", "a directory")),
    "fifo": (_fifo, False, fsutil.NotRegular, errno.EINVAL, NOT_REG.format("{}", "a FIFO")),
    "socket": (_socket, False, fsutil.NotRegular, errno.EINVAL, NOT_REG.format("{}", "a socket")),
    "missing": (_missing, False, FileNotFoundError, errno.ENOENT, "No such file or directory"),
}


def _without_blocking(fn, fifo_paths):
    """fn(), failing (not hanging) if it blocks: a blocked open of a FIFO is released by
    opening the FIFO for writing too."""
    out = {}

    def run():
        try:
            out["fd"] = fn()
        except BaseException as e:  # handed to the test thread
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():
        for p in fifo_paths:
            os.close(os.open(p, os.O_RDWR | os.O_NONBLOCK))
        t.join(10)
        pytest.fail("open_regular blocked on a FIFO")
    if "error" in out:
        raise out["error"]
    return out["fd"]


@pytest.mark.parametrize("case", CASES)
def test_open_regular_policy(tmp_path, case):
    make, follow, exc, err, msg = CASES[case]
    keep = make(tmp_path)
    path = str(tmp_path / "x")
    fifos = [p for p in (tmp_path / "x", tmp_path / "fifo") if os.path.exists(p)]
    try:
        if exc is None:
            fd = _without_blocking(lambda: fsutil.open_regular(path, follow=follow), fifos)
            try:
                assert os.read(fd, 100) == b"data"
                assert os.get_inheritable(fd) is False
            finally:
                os.close(fd)
            return
        with pytest.raises(exc) as e:
            _without_blocking(lambda: fsutil.open_regular(path, follow=follow), fifos)
        assert e.value.errno == err
        assert e.value.strerror == msg.format(path)
        if issubclass(exc, fsutil.NotRegular) or exc is IsADirectoryError:
            assert isinstance(e.value, fsutil.NotRegular)  # one type to catch them all
    finally:
        if keep is not None:
            keep.close()


def test_a_device_is_refused_unopened():
    # /dev/null opened would succeed and read nothing; refused on its type instead.
    with pytest.raises(fsutil.NotRegular) as e:
        fsutil.open_regular("/dev/null", follow=True)
    assert (e.value.errno, e.value.strerror) == (
        errno.EINVAL, "/dev/null is a character device, not a regular file")


def test_what_names_the_file_and_dir_fd_is_the_base(tmp_path):
    os.mkfifo(tmp_path / "p")
    dfd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        with pytest.raises(fsutil.NotRegular) as e:
            fsutil.open_regular("p", dir_fd=dfd, what="STORE/objects/p")
        assert (e.value.errno, e.value.strerror) == (
            errno.EINVAL, "STORE/objects/p is a FIFO, not a regular file")
    finally:
        os.close(dfd)


def test_reopen_regular_consumes_the_path_fd_even_with_bad_flags(tmp_path):
    """Flags out of range: the caller handed the fd over, so it is closed all the same."""
    write(tmp_path / "f", b"data")
    pfd = os.open(tmp_path / "f", os.O_PATH)
    with pytest.raises(OverflowError):
        fsutil.reopen_regular(pfd, "f", flags=1 << 40)
    with pytest.raises(OSError) as e:
        os.fstat(pfd)
    assert e.value.errno == errno.EBADF


def test_reopen_regular_names_the_file_when_fstat_fails(tmp_path):
    pfd = os.open(tmp_path, os.O_PATH)
    os.close(pfd)  # a stale fd: fstat fails with EBADF
    with pytest.raises(OSError) as e:
        fsutil.reopen_regular(pfd, "the file")
    assert (e.value.errno, e.value.filename) == (errno.EBADF, "the file")


def test_reopen_regular_consumes_the_path_fd_on_every_outcome(tmp_path):
    write(tmp_path / "f", b"data")
    os.mkdir(tmp_path / "d")
    for name in ("f", "d"):
        pfd = os.open(tmp_path / name, os.O_PATH)
        try:
            os.close(fsutil.reopen_regular(pfd, name))
        except IsADirectoryError as e:
            assert (e.errno, e.strerror) == (errno.EISDIR, "d is a directory, not a regular file")
        with pytest.raises(OSError) as e:
            os.fstat(pfd)
        assert e.value.errno == errno.EBADF


def test_permission_is_open2s_answer_naming_the_file(tmp_path):
    """A file the caller may not read: EACCES naming the file, not the /proc/self/fd
    path it is reopened through."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another uid")
    d = tmp_path / "d"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    write(d / "secret", b"data")
    os.chmod(d / "secret", 0o600)
    dfd = os.open(d, os.O_PATH | os.O_DIRECTORY)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child drops to nobody, tries, reports through the pipe
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                os.close(fsutil.open_regular("secret", dir_fd=dfd))
                out = "opened"
            except OSError as e:
                out = f"{type(e).__name__}|{e.errno}|{e.strerror}|{e.filename}"
            os.write(w, out.encode())
        finally:
            os._exit(0)
    os.close(w)
    os.close(dfd)
    try:
        got = os.read(r, 1000).decode()
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert got == f"PermissionError|{errno.EACCES}|Permission denied|secret"


def _open_fds():
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("route", ["openat2", "walk"])
def test_read_beneath_reads_a_regular_file_and_opens_nothing_else(tmp_path, monkeypatch, route):
    """The store's one-call read (an index entry, an object header): the first bytes and
    the size of a regular file, its fd kept only when asked for; anything else is
    reported by its type and never opened (a FIFO would block: the test would hang);
    a symlink is not followed, at the end or in the middle.  The same answers on every
    route, and no fd left behind by any of them."""
    if route == "walk":
        monkeypatch.setattr(fsutil, "_have_openat2", False)
    base = tmp_path / "base"
    (base / "d").mkdir(parents=True)
    write(base / "d" / "f", b"0123456789")
    os.mkfifo(base / "d" / "fifo")
    os.symlink("f", base / "d" / "link")
    os.symlink("d", base / "dlink")
    if os.geteuid() == 0:
        os.mknod(base / "d" / "null", 0o600 | 0o020000, os.makedev(1, 3))  # /dev/null's
    dfd = os.open(base, os.O_PATH | os.O_DIRECTORY)
    before = _open_fds()
    try:
        assert fsutil.read_beneath(dfd, b"d/f", 4) == (-1, os.stat(base / "d" / "f").st_mode,
                                                       10, b"0123")
        assert fsutil.read_beneath(dfd, b"d/f", 100)[2:] == (10, b"0123456789")
        assert fsutil.read_beneath(dfd, b"d/f", 0)[2:] == (10, b"")
        fd, mode, size, head = fsutil.read_beneath(dfd, b"d/f", 2, keep=True)
        try:
            assert (size, head, os.pread(fd, 3, 7), os.get_inheritable(fd)) == (10, b"01", b"789", False)
            assert os.fstat(fd).st_ino == os.stat(base / "d" / "f").st_ino
        finally:
            os.close(fd)
        kinds = {"d/fifo": 0o010000, "d/link": 0o120000, "d": 0o040000}
        if os.geteuid() == 0:
            kinds["d/null"] = 0o020000
        for path, kind in kinds.items():
            fd, mode, size, head = fsutil.read_beneath(dfd, path.encode(), 10, keep=True)
            assert (fd, mode & 0o170000, size, head) == (-1, kind, 0, None), path
        for path, err in ((b"dlink/f", errno.ELOOP), (b"d/missing", errno.ENOENT),
                          (b"d/f/x", errno.ENOTDIR), (b"d/../d/f", errno.EXDEV)):
            with pytest.raises(OSError) as e:
                fsutil.read_beneath(dfd, path, 10)
            assert (e.value.errno, e.value.filename) == (err, path.decode())
        assert _open_fds() == before
    finally:
        os.close(dfd)


def test_read_beneath_says_a_failed_read_is_the_reads_and_closes_the_file():
    """A regular file that opens but cannot be read (/proc/self/mem at address 0: EIO)
    raises ReadFailed, which the store reports as the I/O error it is, never as a
    damaged store; the file is closed either way."""
    dfd = os.open("/proc/self", os.O_PATH | os.O_DIRECTORY)
    before = _open_fds()
    try:
        for keep in (False, True):
            with pytest.raises(fsutil.ReadFailed) as e:
                fsutil.read_beneath(dfd, b"mem", 10, keep=keep)
            assert e.value.errno == errno.EIO
        assert _open_fds() == before
    finally:
        os.close(dfd)


@pytest.mark.parametrize("named", [True, False])
def test_only_openat2s_own_enosys_turns_openat2_off(tmp_path, monkeypatch, named):
    """ENOSYS from openat2 (it names the path) means a kernel without it: the walk takes
    over.  ENOSYS from a later call (a file system's fstat or open) is that file's
    error, and every later open still uses openat2."""
    class Native:
        ReadError = type("ReadError", (OSError,), {})

        @staticmethod
        def read_beneath(*args):
            raise OSError(errno.ENOSYS, "Function not implemented", "f" if named else None)

    write(tmp_path / "f", b"data")
    monkeypatch.setattr(fsutil, "native_sys", Native)
    monkeypatch.setattr(fsutil, "_have_openat2", True)
    dfd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        if named:
            assert fsutil.read_beneath(dfd, b"f", 10)[2:] == (4, b"data")
            assert fsutil._have_openat2 is False
        else:
            with pytest.raises(OSError) as e:
                fsutil.read_beneath(dfd, b"f", 10)
            assert e.value.errno == errno.ENOSYS
            assert fsutil._have_openat2 is True
    finally:
        os.close(dfd)
