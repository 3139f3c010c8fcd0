"""fs-verity ioctls through a real mount, driven by the real fsverity-utils and lsattr.

Ports the behaviour checks of xfstests generic/572 (API), 573 (permissions) and
575 (digests).  Exact stderr lines and errnos are asserted.
"""

import errno
import fcntl
import os
import pathlib
import sys
import shutil
import struct
import subprocess
import tempfile

import pytest

from verityfuse.sealing import entry_of_path

from verityfuse import ioctl, merkle, uapi
from verityfuse.errors import Errno
from verityfuse.store import Store
from conftest import drop_caches, flip, pattern, wait_building, write
from test_mount import pread_errno


def fsv(*args, check=False):
    r = subprocess.run(["fsverity", *map(str, args)], capture_output=True, text=True)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def enable_error(path, *opts):
    r = fsv("enable", *opts, path)
    return r.stderr.strip().removeprefix(f"ERROR: FS_IOC_ENABLE_VERITY failed on '{path}': ")


@pytest.fixture
def mnt(tmp_path, verified_mount):
    src = tmp_path / "src"
    src.mkdir()
    m = verified_mount(src, seal=False)
    return m


# -- pure codec checks -------------------------------------------------------

def test_parse_enable_table():
    good = ioctl.pack_enable(merkle.Params(merkle.SHA512, 1024, b"ab"), b"sig")
    arg = ioctl.parse_enable(good)
    assert (arg.hash_algorithm, arg.block_size, arg.salt, arg.signature) == (2, 1024, b"ab", b"sig")
    hdr = bytearray(good[:128])
    cases = [
        (good[:100], errno.EINVAL),
        (b"\x02" + good[1:], errno.EINVAL),                                # version
        (good[:28] + b"\x01" + good[29:], errno.EINVAL),                   # __reserved1
        (good[:60] + b"\x01" + good[61:], errno.EINVAL),                   # __reserved2
        (good[:8] + (3000).to_bytes(4, "little") + good[12:], errno.EINVAL),  # block size
        (good[:12] + (33).to_bytes(4, "little") + good[16:], errno.EMSGSIZE),
        (good[:24] + (16129).to_bytes(4, "little") + good[28:], errno.EMSGSIZE),
        (good + b"extra", errno.EINVAL),                                   # length mismatch
        (bytes(hdr[:12]) + (1).to_bytes(4, "little") + bytes(hdr[16:]), errno.EINVAL),
    ]
    for data, err in cases:
        with pytest.raises(Errno) as e:
            ioctl.parse_enable(data)
        assert e.value.errno == err, data[:32]


def test_enable_params_and_measure_codec():
    arg = ioctl.parse_enable(ioctl.pack_enable(merkle.Params()))
    assert ioctl.enable_params(arg) == merkle.Params()
    for alg, bs in [(257, 4096), (0, 4096), (1, 512), (1, 131072)]:
        bad = ioctl.EnableArg(1, alg, bs, b"", b"")
        with pytest.raises(Errno) as e:
            ioctl.enable_params(bad)
        assert e.value.errno == errno.EINVAL
    d = bytes(range(32))
    assert ioctl.measure_reply((1).to_bytes(2, "little") + (64).to_bytes(2, "little"),
                               merkle.SHA256, d, 4 + 64) == b"\x01\x00\x20\x00" + d
    # The header's size, and what the kernel copies back (the header again after a
    # thread of the caller changed it): the smaller one is the buffer.
    for header, out_size in [(16, 4 + 64), (64, 4), (64, 4 + 31), (0xFFFF, 0)]:
        with pytest.raises(Errno) as e:
            ioctl.measure_reply(b"\x00\x00" + header.to_bytes(2, "little"), merkle.SHA256, d,
                                out_size)
        assert e.value.errno == errno.EOVERFLOW


# -- through the mount --------------------------------------------------------

CASES = [([], 10000), (["--hash-alg=sha512"], 10000), (["--block-size=1024", "--salt=abcd"], 300000),
         (["--hash-alg=sha512", "--block-size=1024", "--salt=" + "ee" * 32], 1 << 20),
         (["--block-size=65536"], 200000), ([], 0), ([], 1), (["--block-size=1024"], 1024 * 32 * 33)]


@pytest.mark.parametrize("opts,size", CASES)
def test_enable_then_measure_equals_digest(mnt, opts, size):
    src, mp = mnt.source, mnt.mountpoint
    write(src / "f", pattern(size))
    expected = fsv("digest", *opts, src / "f", check=True).stdout.split()[0]
    fsv("enable", *opts, mp / "f", check=True)
    assert fsv("measure", mp / "f", check=True).stdout == f"{expected} {mp}/f\n"
    assert os.getxattr(mp / "f", "user.fsverity.digest").decode() == expected
    r = subprocess.run(["lsattr", mp / "f"], capture_output=True, text=True)
    assert r.stdout.split()[0].endswith("V-") and "V" in r.stdout.split()[0]
    with pytest.raises(PermissionError):
        open(mp / "f", "ab")
    if size > 8192:
        flip(src / "f", size // 2)
        drop_caches()
        assert pread_errno(mp / "f", 0, 4096) is None
        assert pread_errno(mp / "f", size // 2, 1) == errno.EIO


def test_xfstests_575_digests_through_the_mount(mnt):
    from test_merkle import SALT_575, XFSTESTS_575
    src, mp = mnt.source, mnt.mountpoint
    for (alg, bs), want in XFSTESTS_575.items():
        for n, (size, salt) in enumerate([(0, ""), (4096, ""), (65536, ""), (65536, "=")]):
            name = f"{alg}-{bs}-{n}"
            with open(src / name, "wb") as f:
                f.truncate(size)
            opts = [f"--hash-alg={alg}", f"--block-size={bs}"] + (["--salt="] if salt else [])
            fsv("enable", *opts, mp / name, check=True)
            assert fsv("measure", mp / name).stdout == f"{alg}:{want[min(n, 2)]} {mp}/{name}\n"
    big = src / "big"
    with open(big, "wb") as f:
        f.truncate(100000000)
    fsv("enable", "--salt=" + SALT_575.hex(), mp / "big", check=True)
    assert fsv("measure", mp / "big").stdout.split()[0] == "sha256:" + XFSTESTS_575[("sha256", 4096)][3]
    assert subprocess.run(["cmp", big, mp / "big"]).returncode == 0


def test_generic_572_api_errors(mnt):
    src, mp = mnt.source, mnt.mountpoint
    f = mp / "file.fsv"
    write(src / "file.fsv", bytes(8192))
    r = fsv("measure", f)
    assert r.stderr.strip() == f"ERROR: FS_IOC_MEASURE_VERITY failed on '{f}': No data available"
    assert enable_error(f, "--hash-alg=257") == "Invalid argument"
    assert (mp / "file.fsv").read_bytes() == bytes(8192)  # still readable
    assert enable_error(f, "--block-size=1") == "Invalid argument"
    assert enable_error(f, "--salt=" + "00" * 1000) == "Message too long"
    os.mkdir(mp / "dir")
    assert enable_error(mp / "dir") == "Is a directory"
    fd = os.open(f, os.O_RDWR)
    try:
        assert enable_error(f) == "Text file busy"
    finally:
        os.close(fd)
    fsv("enable", f, check=True)
    assert enable_error(f) == "File exists"
    for mode in (os.O_RDWR, os.O_WRONLY | os.O_APPEND | os.O_CREAT, os.O_WRONLY | os.O_CREAT | os.O_TRUNC):
        with pytest.raises(OSError) as e:
            os.open(f, mode)
        assert e.value.errno == errno.EPERM
    # a verity file can be renamed, hard-linked, chmod'ed, chown'ed, unlinked
    os.rename(f, mp / "renamed")
    os.link(mp / "renamed", mp / "link")
    os.chmod(mp / "link", 0o444)
    os.chown(mp / "link", 1, 1)
    assert fsv("measure", mp / "link").returncode == 0
    os.unlink(mp / "renamed")
    assert fsv("measure", mp / "link").returncode == 0


def test_dump_metadata_is_enotty(mnt):
    write(mnt.source / "f", b"x" * 5000)
    fsv("enable", mnt.mountpoint / "f", check=True)
    r = fsv("dump_metadata", "merkle_tree", mnt.mountpoint / "f")
    assert r.returncode == 1 and "Inappropriate ioctl for device" in r.stderr and r.stdout == ""


@pytest.fixture
def public_dir():
    """A directory every user can traverse (pytest's tmp dirs are 0700)."""
    d = tempfile.mkdtemp(prefix="verityfuse-test-", dir="/tmp")
    os.chmod(d, 0o755)
    yield pathlib.Path(d)
    shutil.rmtree(d, ignore_errors=True)


def test_permissions_generic_573(tmp_path, public_dir, verified_mount):
    src = tmp_path / "src"
    src.mkdir()
    (public_dir / "mnt").mkdir()
    m = verified_mount(src, seal=False, options=["allow_other"], mountpoint=public_dir / "mnt")
    mp = m.mountpoint
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "fsverity"]
    write(src / "rw", b"a" * 5000)
    write(src / "ro", b"b" * 5000)
    os.chmod(src / "rw", 0o666)
    os.chmod(src / "ro", 0o444)
    r = subprocess.run([*as_nobody, "enable", mp / "rw"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*as_nobody, "enable", mp / "ro"], capture_output=True, text=True)
    assert "Permission denied" in r.stderr
    fsv("enable", mp / "ro", check=True)  # root may
    r = subprocess.run([*as_nobody, "measure", mp / "ro"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("sha256:")
    # POSIX ACLs count as the kernel counts them: the mode bits alone let nobody make
    # root's 0666 file read-only for good, and refused the 0644 file its ACL lets it write.
    undefined = 0xFFFFFFFF
    for name, mode, nobody_perm in [("acl-denies", 0o666, 4), ("acl-grants", 0o644, 6)]:
        write(src / name, b"c" * 5000)
        os.chmod(src / name, mode)
        entries = [(1, 6, undefined), (2, nobody_perm, 65534), (4, mode >> 3 & 7, undefined),
                   (0x10, 6, undefined), (0x20, mode & 7, undefined)]
        os.setxattr(src / name, "system.posix_acl_access", struct.pack("<I", 2) + b"".join(
            struct.pack("<HHI", *e) for e in entries))
    r = subprocess.run([*as_nobody, "enable", mp / "acl-denies"], capture_output=True, text=True)
    assert "Permission denied" in r.stderr, (r.returncode, r.stderr)
    r = subprocess.run([*as_nobody, "enable", mp / "acl-grants"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # `verityfuse status` as a user the status is not for says so (it said "not a running
    # verityfuse mount"); in a child that becomes nobody (the venv is not theirs to run).
    import importlib
    for module in ("cli_mount", "stats"):  # imported while root (the venv is not nobody's)
        importlib.import_module(f"verityfuse.{module}")
    from verityfuse import cli
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            sys.stderr = os.fdopen(out_w, "w")
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            rc = cli.main(["status", str(mp)])
            sys.stderr.flush()
            os._exit(rc)
        finally:
            os._exit(99)
    os.close(out_w)
    with os.fdopen(out_r) as f:
        said = f.read()
    assert os.waitpid(pid, 0)[1] >> 8 == 1 and said == (
        f"ERROR: the status of '{mp}' is for root and the user who mounted it (Operation not "
        f"permitted; without allow_other only that user reaches the mount)\n"), said
    assert [fsv("measure", mp / n).returncode for n in ("acl-denies", "acl-grants")] == [1, 0]


def test_an_ioctl_only_open_is_neither_a_reader_nor_a_writer(mnt):
    """open(2) with access mode 3 gives an fd for ioctls only: enable on it is EBADF (it
    was ETXTBSY: counted as a writer), it keeps no one else from enabling, and a verity
    file may be opened so (it was EPERM) and measured through it."""
    src, mp = mnt.source, mnt.mountpoint
    write(src / "f", pattern(9000))
    fd = os.open(mp / "f", 3)
    try:
        with pytest.raises(OSError) as e:
            fcntl.ioctl(fd, uapi.FS_IOC_ENABLE_VERITY, ioctl.pack_enable(merkle.Params()))
        assert e.value.errno == errno.EBADF
        fsv("enable", mp / "f", check=True)  # while that fd is open
    finally:
        os.close(fd)
    fd = os.open(mp / "f", 3)
    try:
        buf = bytearray(struct.pack("<HH", 0, 64) + bytes(64))
        fcntl.ioctl(fd, uapi.FS_IOC_MEASURE_VERITY, buf)
        assert f"sha256:{bytes(buf[4:36]).hex()}" == fsv("measure", mp / "f").stdout.split()[0]
        with pytest.raises(OSError) as e:
            os.read(fd, 1)
        assert e.value.errno == errno.EBADF  # the kernel's: no FMODE_READ
    finally:
        os.close(fd)


def test_interrupted_enable_and_concurrent_requests(mnt):
    """generic/572: an enable of a 16 GiB sparse file, killed, stops quickly and
    leaves the file non-verity; a second enable meanwhile is EBUSY; other
    requests are served meanwhile."""
    src, mp = mnt.source, mnt.mountpoint
    with open(src / "huge", "wb") as f:
        f.truncate(16 << 30)
    write(src / "other", b"other data")
    p = subprocess.Popen(["fsverity", "enable", mp / "huge"], stderr=subprocess.PIPE, text=True)
    wait_building(src, p)  # the daemon has the enable: 16 GiB takes seconds to hash
    assert enable_error(mp / "huge") == "Device or resource busy"
    # other requests go on while the build runs
    assert (mp / "other").read_bytes() == b"other data"
    assert fsv("measure", mp / "other").returncode == 1  # ENODATA, answered
    os.listdir(mp)
    with pytest.raises(OSError) as e:  # a write open during enable: ETXTBSY
        os.open(mp / "huge", os.O_WRONLY)
    assert e.value.errno == errno.ETXTBSY
    assert p.poll() is None  # all of that was served while the build ran
    p.send_signal(2)  # SIGINT
    p.wait(5)         # generic/572: must end within 5 s
    assert fsv("measure", mp / "huge").stderr.strip().endswith("No data available")
    assert "enable of huge interrupted; nothing committed" in mnt.log()
    with os.scandir(mnt.source / ".verityfuse" / "tmp") as it:
        assert [e.name for e in it] == []


@pytest.mark.daemon_exit  # killed here
def test_daemon_killed_mid_enable_damages_nothing(tmp_path, verified_mount):
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "huge", "wb") as f:
        f.truncate(16 << 30)
    write(src / "keep", b"k" * 10000)
    from verityfuse.testing import seal_tree
    seal_tree(src, ["keep"])
    m = verified_mount(src, seal=False)
    p = subprocess.Popen(["fsverity", "enable", m.mountpoint / "huge"], stderr=subprocess.PIPE)
    wait_building(src, p)  # killed with a tree half built in tmp/
    m.process.kill()  # SIGKILL: no cleanup code runs
    m.process.wait(10)
    p.wait(10)
    assert p.returncode != 0
    subprocess.run(["fusermount3", "-u", "-z", m.mountpoint])
    with Store(str(src / ".verityfuse")) as st:
        assert entry_of_path(st, src / "huge") is None   # nothing half-committed
        assert entry_of_path(st, src / "keep") is not None
        assert os.listdir(src / ".verityfuse" / "tmp")  # the half-built tree is only in tmp/
    m2 = verified_mount(src, seal=False)                 # the next daemon collects it
    assert os.listdir(src / ".verityfuse" / "tmp") == []
    assert (m2.mountpoint / "keep").read_bytes() == b"k" * 10000
    assert fsv("measure", m2.mountpoint / "huge").stderr.strip().endswith("No data available")


def test_without_the_shim_ioctls_are_enotty(tmp_path, verified_mount, monkeypatch):
    monkeypatch.setenv("VERITYFUSE_NO_IOCTL_SHIM", "1")
    src = tmp_path / "src"
    src.mkdir()
    write(src / "f", b"x" * 5000)
    m = verified_mount(src)
    assert "fs-verity ioctls unavailable, answering ENOTTY: disabled by VERITYFUSE_NO_IOCTL_SHIM" in m.log()
    assert fsv("measure", m.mountpoint / "f").stderr.strip().endswith("Inappropriate ioctl for device")
    assert enable_error(m.mountpoint / "f") == "Inappropriate ioctl for device"
    assert (m.mountpoint / "f").read_bytes() == b"x" * 5000  # still a verified mount
    assert os.getxattr(m.mountpoint / "f", "user.fsverity.digest").startswith(b"sha256:")


def test_enable_on_read_only_mount_and_across_remount(tmp_path, verified_mount):
    """generic/572: ro remount -> EROFS; 100000 random bytes keep contents, size and
    digest across a remount after enable."""
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(100000)
    write(src / "f", data)
    ro = verified_mount(src, seal=False, options=["ro"])
    assert enable_error(ro.mountpoint / "f") == "Read-only file system"
    ro.unmount()
    m = verified_mount(src, seal=False)
    fsv("enable", m.mountpoint / "f", check=True)
    digest = fsv("measure", m.mountpoint / "f", check=True).stdout.split()[0]
    m.unmount()
    m2 = verified_mount(src, seal=False)
    f = m2.mountpoint / "f"
    assert fsv("measure", f, check=True).stdout.split()[0] == digest
    assert os.stat(f).st_size == 100000 and f.read_bytes() == data
    with pytest.raises(PermissionError):
        open(f, "r+b")


# -- FS_IOC_FSGETXATTR: FS_XFLAG_VERITY, the 2026 kernel interface -----------------------------

FS_XFLAG_NODUMP = 0x80


def _fsx(buf: bytes) -> int:
    assert len(buf) == uapi.FSXATTR_SIZE
    return int.from_bytes(buf[:4], "little")


def _make_view(src, mnt, settings):
    from verityfuse.daemon import Trust, make_view
    return make_view(str(src), str(mnt), settings, Trust(settings), None)


def _xflags_of(view, name: bytes, directory=False):
    ino = view.lookup(1, name).ino
    fh = view.opendir(ino) if directory else view.open(ino, os.O_RDONLY)
    try:
        return _fsx(view.fsxattr(ino, fh))
    finally:
        (view.releasedir if directory else view.release)(fh)


def test_fsgetxattr_answers_fs_xflag_verity_on_verity_files(tmp_path):
    """What the daemon answers FS_IOC_FSGETXATTR (the kernel's fileattr path for
    FS_IOC_FSGETXATTR and file_getattr()) with, in both modes: the backing file's
    xflags (local mode) with FS_XFLAG_VERITY exactly on verity files; FSSETXATTR can
    neither set nor clear it."""
    from verityfuse.mountopts import Settings

    src = tmp_path / "src"
    src.mkdir()
    (src / "d").mkdir()
    write(src / "v", pattern(10000))
    write(src / "p", b"plain")
    assert subprocess.run(["chattr", "+d", src / "v", src / "p"]).returncode == 0  # nodump
    assert subprocess.run([sys.executable, "-m", "verityfuse", "seal", src, src / "v"],
                          capture_output=True).returncode == 0
    view, store = _make_view(src, tmp_path, Settings())
    try:
        assert _xflags_of(view, b"v") == uapi.FS_XFLAG_VERITY | FS_XFLAG_NODUMP
        assert _xflags_of(view, b"p") == FS_XFLAG_NODUMP
        assert _xflags_of(view, b"d", directory=True) == 0
        for name, verity in ((b"p", False), (b"v", True)):
            ino = view.lookup(1, name).ino
            fh = view.open(ino, os.O_RDONLY)
            try:  # xfs_io chattr writes back what it read, with a flag flipped
                view.fsxattr(ino, fh, ioctl.with_xflag_verity(bytes(uapi.FSXATTR_SIZE), not verity))
                assert _fsx(view.fsxattr(ino, fh)) == (uapi.FS_XFLAG_VERITY if verity else 0)
            finally:
                view.release(fh)
    finally:
        store.close()

    key, pub, m = tmp_path / "k.pem", tmp_path / "p.pem", tmp_path / "m"
    for args in (["keygen", key, pub], ["seal", src, "--manifest", m, "--sign-key", key]):
        r = subprocess.run([sys.executable, "-m", "verityfuse", *args], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    view, store = _make_view(src, tmp_path, Settings(manifest=str(m), trust_key=[str(pub)]))
    try:
        assert _xflags_of(view, b"v") == _xflags_of(view, b"p") == uapi.FS_XFLAG_VERITY
        assert _xflags_of(view, b"d", directory=True) == 0
    finally:
        store.close()


def test_xfs_io_and_fsgetxattr_through_the_mount(mnt):
    """Through the kernel: the backing xflags pass, and FS_XFLAG_VERITY does where the
    kernel knows it.  Kernels before it mask xflags they do not know on the way out
    (fileattr_to_fsxattr: & FS_XFLAGS_MASK), so there the bit cannot reach userspace."""
    src, mp = mnt.source, mnt.mountpoint
    write(src / "v", pattern(10000))
    assert subprocess.run(["chattr", "+d", src / "v"]).returncode == 0
    fsv("enable", mp / "v", check=True)
    import fcntl
    fd = os.open(mp / "v", os.O_RDONLY)
    try:
        buf = bytearray(uapi.FSXATTR_SIZE)
        fcntl.ioctl(fd, uapi.FS_IOC_FSGETXATTR, buf)
    finally:
        os.close(fd)
    xflags = _fsx(bytes(buf))
    assert xflags & ~uapi.FS_XFLAG_VERITY == FS_XFLAG_NODUMP
    if shutil.which("xfs_io"):
        r = subprocess.run(["xfs_io", "-r", "-c", "lsattr -v", mp / "v"], capture_output=True, text=True)
        assert r.returncode == 0 and "no-dump" in r.stdout, r.stdout + r.stderr
    assert subprocess.run(["lsattr", mp / "v"], capture_output=True, text=True).stdout.split()[0][-2] == "V"
