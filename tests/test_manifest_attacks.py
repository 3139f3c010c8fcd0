"""The attacks of manifest_attacks.py as ordinary mount tests on this machine.

The same attacks run in a Linux guest over virtio-fs in ``make e2e``
(e2e/run.py); here the "guest" is a manifest-mode mount on the host, so a
failure shows up without QEMU.  Every test gets a fresh share, mounts it with
the pinned manifest digest and trusted key (``--policy require``), reads
everything, lets the attack's host side act, runs its check, and checks that
every file the attack did not touch reads back identical.  The fixture
unmounts even when a check fails.
"""

import errno
import os
import shutil

import pytest

import manifest_attacks as ma

pytestmark = pytest.mark.mount


@pytest.fixture(scope="module")
def sealed_share(tmp_path_factory):
    """One sealed share, copied for each test (sealing 10 MiB costs a second)."""
    base = tmp_path_factory.mktemp("sealed")
    src = base / "share"
    src.mkdir()
    ma.make_corpus(src)
    trust = ma.seal_share(src, base / "keys")
    return src, trust, ma.expected(src)


@pytest.fixture
def guest(sealed_share, tmp_path, verified_mount):
    """A fresh copy of the share mounted in manifest mode; yields a manifest_attacks.Ctx."""
    base_src, trust, exp = sealed_share
    src = tmp_path / "share"
    shutil.copytree(base_src, src, symlinks=True)  # keeps modes and mtimes; we own both
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = verified_mount(src, seal=False, mountpoint=mnt, policy="require",
                       extra_args=ma.mount_args(src, trust))
    ctx = ma.Ctx(mnt=mnt, source=src, exp=exp, log=m.log)
    yield ctx
    for fd in list(ctx.state.get("fds", {}).values()) + ([ctx.state["fd"]] if "fd" in ctx.state else []):
        os.close(fd)  # a check that failed before closing what its prepare opened


@pytest.mark.parametrize("check", ma.BASELINE, ids=lambda c: c.name)
def test_baseline(guest, check):
    check.run(guest)


@pytest.mark.parametrize("attack", ma.ATTACKS, ids=lambda a: a.name)
def test_attack(guest, attack):
    ma.check_read_all(guest)  # everything read once, as the guest does
    guest.mark_log()
    if attack.prepare:
        attack.prepare(guest)
    attack.host(guest.source, guest.exp)
    attack.check(guest)
    ma.check_read_all(guest, exclude=attack.touches)


# -- the host's errnos ------------------------------------------------------------------

@pytest.mark.parametrize("op, err", [("getattr", errno.ENOSYS), ("open", errno.EACCES),
                                     ("read", errno.ENOSYS), ("read", errno.EAGAIN)])
def test_an_errno_the_host_chooses_is_eio_for_that_file_only(tmp_path, verified_mount, op, err):
    """The host chooses the errno of every reply of its share.  The kernel takes ENOSYS
    to OPEN or GETXATTR as "this file system has no such operation", for the whole mount:
    passed through, one file's ENOSYS left every other file unreadable (opens no longer
    reached the daemon) and nothing was measured.  A blocking read answered EAGAIN
    confuses its caller, and EACCES for a file the manifest lets everyone read says what
    the manifest does not.  Each is EIO, for that file only.  (ENOSYS to the share's own
    OPEN switches opens off in the share's kernel connection, the host's to break: not
    one of these.)"""
    from conftest import fuse_helper

    size = 3 * 4096
    share, args = _hostile_share(tmp_path, {"bad": size, "good": size, "other": size})
    with fuse_helper("short_read_fs.py", share, f"bad={size}:{size}:{op}:{err}",
                     f"good={size}:{size}", f"other={size}:{size}", what="the hostile share"):
        m = verified_mount(share, seal=False, extra_args=args)
        try:
            _errno_attack(m.mountpoint, op, size)
        finally:
            m.unmount()  # before the share's: it holds the share's files open


def test_fsync_and_long_names_on_a_read_only_view(tmp_path, verified_mount):
    """fsync of a directory of a manifest mount was EIO (and an ERROR line: its handles
    have no fd); fsync of a file asked the untrusted share and passed on the errno it
    chose (EACCES, for a file the manifest lets everyone read); a name over 255 bytes
    was ENOENT, not ENAMETOOLONG (found by review, s44).  Nothing is written through the
    mount: there is nothing to sync, and the share is not asked."""
    from conftest import fuse_helper, pattern, write

    plain, share = tmp_path / "plain", tmp_path / "share"
    plain.mkdir()
    share.mkdir()
    write(plain / "f", pattern(8192))
    ma.vf("keygen", tmp_path / "key.pem", tmp_path / "pub.pem")
    ma.vf("seal", plain, "--manifest", tmp_path / "m.json", "--sign-key", tmp_path / "key.pem")
    args = ["--manifest", str(tmp_path / "m.json"), "--trust-key", str(tmp_path / "pub.pem"),
            "--store", str(plain / ".verityfuse")]
    with fuse_helper("short_read_fs.py", share, f"f=8192:8192:fsync:{errno.EACCES}",
                     what="the hostile share"):
        m = verified_mount(share, seal=False, extra_args=args)
        try:
            mnt = m.mountpoint
            fd = os.open(mnt / "f", os.O_RDONLY)
            try:
                assert os.read(fd, 8192) == pattern(8192)
                os.fsync(fd)
                os.fdatasync(fd)
            finally:
                os.close(fd)
            fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            for n in (256, 1024):
                with pytest.raises(OSError) as e:
                    os.lstat(mnt / ("a" * n))
                assert e.value.errno == errno.ENAMETOOLONG
            with pytest.raises(FileNotFoundError):
                os.lstat(mnt / ("a" * 255))
            assert "ERROR" not in m.log()
        finally:
            m.unmount()  # before the share's: it holds the share's files open


def _hostile_share(tmp_path, sizes, *specs):
    """A plain directory of files of ``sizes`` (name: size, conftest.pattern's bytes)
    sealed into a signed manifest, and the mount arguments that serve it from a
    short_read_fs share of ``specs`` (the same bytes, answered as the host chooses)."""
    from conftest import pattern, write

    plain, share = tmp_path / "plain", tmp_path / "share"
    plain.mkdir()
    share.mkdir()
    for name, size in sizes.items():
        write(plain / name, pattern(size))
    ma.vf("keygen", tmp_path / "key.pem", tmp_path / "pub.pem")
    ma.vf("seal", plain, "--manifest", tmp_path / "m.json", "--sign-key", tmp_path / "key.pem")
    return share, ["--manifest", str(tmp_path / "m.json"), "--trust-key",
                   str(tmp_path / "pub.pem"), "--store", str(plain / ".verityfuse")]


def test_a_share_that_reads_short_serves_small_files_intact(tmp_path, verified_mount):
    """A share that answers every read with at most 1000 bytes (a network or FUSE file
    system may): a file of one block, which has no store object, is read on at open
    until its bytes are whole, not taken for a changed file (found by review: EIO, a
    measured violation naming the same digest twice); the other sizes as before."""
    from conftest import fuse_helper, pattern

    sizes = {"one": 1, "part": 3000, "block": 4096, "two": 4097, "small": 9000, "big": 70000}
    share, args = _hostile_share(tmp_path, sizes)
    with fuse_helper("short_read_fs.py", share,
                     *(f"{n}={s}:{s}:chunk:1000" for n, s in sizes.items()),
                     what="the hostile share"):
        m = verified_mount(share, seal=False, extra_args=args + ["--on-corruption", "refuse"])
        try:
            for name, size in sizes.items():
                assert (m.mountpoint / name).read_bytes() == pattern(size), name
            assert "integrity" not in m.log(), m.log()
        finally:
            m.unmount()  # before the share's: it holds the share's files open


def test_the_daemons_own_want_at_open_is_no_integrity_failure(tmp_path, verified_mount):
    """ENOMEM from the read a file of one block needs at open (it has no object): the
    open fails with ENOMEM, as the read did when an object let the open succeed, and is
    neither logged nor measured as an integrity failure (found by review: measured, with
    --on-corruption refuse every later open failed)."""
    from conftest import fuse_helper, pattern

    share, args = _hostile_share(tmp_path, {"bad": 3000, "good": 3000})
    with fuse_helper("short_read_fs.py", share, f"bad=3000:3000:read:{errno.ENOMEM}",
                     "good=3000:3000", what="the hostile share"):
        m = verified_mount(share, seal=False, extra_args=args + ["--on-corruption", "refuse"])
        try:
            with pytest.raises(OSError) as e:
                (m.mountpoint / "bad").read_bytes()
            assert e.value.errno == errno.ENOMEM
            assert (m.mountpoint / "good").read_bytes() == pattern(3000)
            assert "integrity" not in m.log(), m.log()
        finally:
            m.unmount()


def _errno_attack(mnt, op, size):
    from conftest import pattern

    with pytest.raises(OSError) as e:
        (mnt / "bad").read_bytes()
    assert e.value.errno == errno.EIO
    if op == "getattr":  # a small file's tree is made from the share's bytes...
        try:  # ...or, when those cannot be read, comes from its object
            os.getxattr(mnt / "bad", "user.fsverity.descriptor")
        except OSError as e:
            assert e.errno == errno.EIO
    assert (mnt / "good").read_bytes() == pattern(size)
    assert (mnt / "other").read_bytes() == pattern(size)
    assert os.getxattr(mnt / "other", "user.fsverity.digest").startswith(b"sha256:")
    assert b'"tripwire"' in os.getxattr(mnt, "user.verityfuse.status")
