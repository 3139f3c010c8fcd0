"""The verified mount, with real clients (cat, cmp, dd, mmap, getfattr) on a real FUSE mount.

Rules: every read that must reach the daemon follows a drop of the page cache;
assertions are on exact bytes and errnos; mounts are made through the
``verified_mount`` fixture, which always unmounts.
"""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from verityfuse import api, merkle
from verityfuse.sealing import entry_of_path
from verityfuse.store import Store
from verityfuse.store_object import TREE_OFFSET
from conftest import children_of, daemon_fds, drop_caches, flip, wait_daemon_fds, write

B = 4096
HPB = B // 32  # hashes per tree block, sha256


def pread_errno(path, offset, size):
    """None if the read succeeds, else its errno."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, size, offset)
        return None
    except OSError as e:
        return e.errno
    finally:
        os.close(fd)


def run_err(*cmd):
    """Run a client with its output discarded; (exit code, stderr text)."""
    r = subprocess.run([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return r.returncode, r.stderr


def object_file(src, rel, **params):
    """The store object of SOURCE/rel: the one its index entry names, or, for a file
    sealed into a manifest (found by digest: no index entry), the one its digest with
    ``params`` (verityfuse.api.digest's) names."""
    with Store(str(src / ".verityfuse")) as st:
        e = entry_of_path(st, src / rel)
        if e is not None:
            return st.object_path(e.alg, e.digest)
        d = api.digest(src / rel, **params)
        return st.object_path(merkle.hash_alg(d.algorithm), d.digest)


SIZES = {"empty": 0, "one": 1, "bm1": B - 1, "b": B, "bp1": B + 1,
         "multi": B * HPB * 2 + 12345,  # two leaf blocks + a level above: 2 levels
         "three": B * HPB * HPB + 1}    # three levels (64 MiB + 1, mostly a hole)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    rng = random.Random(1)
    for name, size in SIZES.items():
        with open(src / name, "wb") as f:
            f.write(rng.randbytes(min(size, 1 << 20)))
            if size > 1 << 20:
                f.seek(size - 3)
                f.write(b"end")
    with open(src / "sparse", "wb") as f:
        f.seek(1000000)
        f.write(b"x")
    return src


def test_roundtrip_edge_sizes(corpus, verified_mount):
    m = verified_mount(corpus)
    drop_caches()
    for name in list(SIZES) + ["sparse"]:
        got = m.mountpoint / name
        assert subprocess.run(["cmp", corpus / name, got]).returncode == 0, name
        assert subprocess.run(["cat", got], capture_output=True).stdout == (corpus / name).read_bytes()
        assert os.stat(got).st_size == os.stat(corpus / name).st_size
    # unaligned reads at odd offsets, from Python
    data = (corpus / "multi").read_bytes()
    fd = os.open(m.mountpoint / "multi", os.O_RDONLY)
    try:
        for off, n in [(1, 10), (B - 3, 7), (B * HPB - 1, B + 2), (len(data) - 5, 100)]:
            assert os.pread(fd, n, off) == data[off:off + n]
    finally:
        os.close(fd)


def test_xattrs_show_verity_state(corpus, verified_mount):
    m = verified_mount(corpus)
    out = subprocess.run(["fsverity", "digest", corpus / "multi"], capture_output=True, text=True).stdout
    digest = out.split()[0]
    r = subprocess.run(["getfattr", "-d", "-m", "-", "--absolute-names", m.mountpoint / "multi"],
                       capture_output=True, text=True)
    assert f'user.fsverity.digest="{digest}"' in r.stdout
    assert 'user.fsverity.hash_algorithm="sha256"' in r.stdout
    assert 'user.fsverity.block_size="4096"' in r.stdout
    assert 'user.fsverity.salt=""' in r.stdout
    plain = m.mountpoint / "unsealed"
    write(corpus / "unsealed", b"u")
    with pytest.raises(OSError) as e:
        os.getxattr(plain, "user.fsverity.digest")
    assert e.value.errno == errno.ENODATA
    with pytest.raises(OSError) as e:
        os.setxattr(m.mountpoint / "multi", "user.fsverity.digest", b"sha256:00")
    assert e.value.errno == errno.EPERM
    os.unlink(corpus / "unsealed")


@pytest.fixture
def fresh(tmp_path):
    """A source tree of its own, for tests that corrupt it."""
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(2)
    write(src / "f", rng.randbytes(B * 300))  # 300 blocks: 3 leaf blocks, 2 levels
    write(src / "zeros", bytes(128 * 1024))
    return src


def test_flipped_data_byte_fails_only_its_block(fresh, verified_mount):
    m = verified_mount(fresh)
    f = m.mountpoint / "f"
    assert (f).read_bytes() == (fresh / "f").read_bytes()
    flip(fresh / "f", 10 * B + 100)
    drop_caches()
    assert pread_errno(f, 10 * B, B) == errno.EIO
    assert pread_errno(f, 10 * B + 100, 1) == errno.EIO
    for blk in (0, 9, 11, 299):
        assert pread_errno(f, blk * B, B) is None, blk
    for cmd in (["cat", f], ["dd", f"if={f}", "of=/dev/null", "bs=4096", "iflag=direct"],
                ["dd", f"if={f}", "of=/dev/null", "bs=1", "skip=41060", "count=5"]):
        code, err = run_err(*cmd)
        assert code == 1 and "Input/output error" in err, cmd
    assert "integrity failure: f: data block at offset 40960: expected hash" in m.log()
    # mmap of the corrupt block: SIGBUS; of a good block: its bytes
    code = ("import mmap,sys; f=open(sys.argv[1],'rb'); m=mmap.mmap(f.fileno(),0,prot=mmap.PROT_READ);"
            "sys.stdout.buffer.write(m[0:16]); sys.stdout.flush(); m[int(sys.argv[2])]")
    r = subprocess.run([sys.executable, "-c", code, f, str(10 * B + 5)], capture_output=True)
    assert r.returncode == -signal.SIGBUS
    assert r.stdout == (fresh / "f").read_bytes()[:16]


@pytest.mark.parametrize("off", [0, 4091, 65536, 131067])
def test_xfstests_574_zero_file_cases(fresh, verified_mount, off):
    m = verified_mount(fresh)
    flip(fresh / "zeros", off, b"XXXXX")
    drop_caches()
    code, err = run_err("cat", m.mountpoint / "zeros")
    assert code == 1 and "Input/output error" in err
    bad = {off // B, (off + 4) // B}
    for blk in range(32):
        assert (pread_errno(m.mountpoint / "zeros", blk * B, B) is None) == (blk not in bad), blk


def test_corrupt_leaf_tree_block_fails_exactly_its_blocks(fresh, verified_mount):
    m = verified_mount(fresh)
    obj = object_file(fresh, "f")
    # tree: level 1 (1 block) at 0, level 0 (3 blocks) at 1..3; corrupt leaf #1
    flip(obj, TREE_OFFSET + 2 * B + 100, None)
    drop_caches()
    f = m.mountpoint / "f"
    for blk in (0, 127, 256, 299):
        assert pread_errno(f, blk * B, B) is None, blk
    for blk in (128, 200, 255):
        assert pread_errno(f, blk * B, B) == errno.EIO, blk
    assert "Merkle tree block (level 0, index 1)" in m.log()


def test_corrupt_root_tree_block_fails_every_block(fresh, verified_mount):
    m = verified_mount(fresh)
    flip(object_file(fresh, "f"), TREE_OFFSET + 7, None)
    drop_caches()
    for blk in (0, 150, 299):
        assert pread_errno(m.mountpoint / "f", blk * B, B) == errno.EIO


def test_corrupt_descriptor_fails_open(fresh, verified_mount):
    m = verified_mount(fresh)
    flip(object_file(fresh, "f"), TREE_OFFSET - 256 + 20, None)  # in the root hash
    drop_caches()
    with pytest.raises(OSError) as e:
        open(m.mountpoint / "f", "rb")
    assert e.value.errno == errno.EIO
    assert "descriptor does not match its digest" in m.log()
    assert (m.mountpoint / "zeros").read_bytes() == bytes(128 * 1024)


@pytest.mark.parametrize("change", ["truncate", "extend", "truncate-zero-tail"])
def test_truncated_or_extended_backing_file(fresh, verified_mount, change):
    m = verified_mount(fresh)
    name = "zeros" if change == "truncate-zero-tail" else "f"
    size = os.path.getsize(fresh / name)
    if change == "extend":
        with open(fresh / name, "ab") as fh:
            fh.write(b"more")
    else:
        os.truncate(fresh / name, size - 1000)
    drop_caches()
    with pytest.raises(OSError) as e:
        (m.mountpoint / name).read_bytes()
    assert e.value.errno == errno.EIO


@pytest.mark.parametrize("backing", ["on-disk", "in-memory"])
def test_backing_file_extended_while_open(fresh, verified_mount, backing):
    """The size is checked at open; extended after it, the read that reaches the sealed
    end fails, on both read paths: data read by a worker thread, and data already in the
    page cache, answered on the request thread (the short path must not skip the check)."""
    m = verified_mount(fresh)
    data = (fresh / "f").read_bytes()  # whole blocks: the end is a block boundary
    assert len(data) % B == 0
    with open(m.mountpoint / "f", "rb", buffering=0) as reader:
        with open(fresh / "f", "ab") as fh:
            fh.write(b"more")
        drop_caches()
        if backing == "in-memory":
            (fresh / "f").read_bytes()  # the backing file's pages, not the mount's
        assert reader.read(B) == data[:B]
        with pytest.raises(OSError) as e:
            os.pread(reader.fileno(), B, len(data) - B)
        assert e.value.errno == errno.EIO


def test_writes_to_verity_files_are_eperm(fresh, verified_mount):
    m = verified_mount(fresh)
    f = str(m.mountpoint / "f")
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_APPEND,
                  os.O_WRONLY | os.O_TRUNC, os.O_WRONLY | os.O_CREAT | os.O_TRUNC):
        with pytest.raises(OSError) as e:
            os.open(f, flags)
        assert e.value.errno == errno.EPERM, flags
    with pytest.raises(OSError) as e:
        os.truncate(f, 0)
    assert e.value.errno == errno.EPERM
    for shell in ("echo x >> ", "echo x > "):
        r = subprocess.run(["bash", "-c", shell + f], capture_output=True, text=True)
        assert "Operation not permitted" in r.stderr
    assert (m.mountpoint / "f").read_bytes() == (fresh / "f").read_bytes()


def test_metadata_changes_keep_verity(fresh, verified_mount):
    m = verified_mount(fresh)
    mp = m.mountpoint
    digest = os.getxattr(mp / "f", "user.fsverity.digest")
    os.chmod(mp / "f", 0o444)
    assert os.stat(fresh / "f").st_mode & 0o777 == 0o444
    os.chmod(mp / "f", 0o777)
    os.chown(mp / "f", 1, 1)
    os.chown(mp / "f", 0, 0)
    os.utime(mp / "f", (1, 2))
    assert os.stat(mp / "f").st_mtime == 2
    os.mkdir(mp / "d")
    os.rename(mp / "f", mp / "d" / "g")
    os.link(mp / "d" / "g", mp / "h")
    os.rename(mp / "d", mp / "e")
    for p in (mp / "e" / "g", mp / "h"):
        assert os.getxattr(p, "user.fsverity.digest") == digest
        with pytest.raises(PermissionError):
            open(p, "ab")
    # after a remount (new daemon, state from the store) both names are still verity
    m.unmount()
    m2 = verified_mount(fresh, seal=False)
    for p in (m2.mountpoint / "e" / "g", m2.mountpoint / "h"):
        assert os.getxattr(p, "user.fsverity.digest") == digest
        with pytest.raises(PermissionError):
            open(p, "ab")
    flip(fresh / "h", 5)  # one inode, two names: both see the corruption
    drop_caches()
    assert pread_errno(m2.mountpoint / "e" / "g", 0, 10) == errno.EIO
    os.unlink(m2.mountpoint / "h")
    os.unlink(m2.mountpoint / "e" / "g")
    with Store(str(fresh / ".verityfuse")) as st:  # the last unlink dropped its entry
        assert [st.get_entry(k).path for k in st.keys()] == ["zeros"]


def test_plain_passthrough(tmp_path, verified_mount):
    src = tmp_path / "src"
    src.mkdir()
    m = verified_mount(src)
    mp = m.mountpoint
    with open(mp / "new", "wb") as f:
        f.write(b"hello ")
        f.write(b"world")
    assert (src / "new").read_bytes() == b"hello world"
    with open(mp / "new", "r+b") as f:
        f.seek(6)
        f.write(b"WORLD")
        f.truncate(9)
    assert (mp / "new").read_bytes() == b"hello WOR"
    os.rename(mp / "new", mp / "renamed")
    assert not (src / "new").exists() and (src / "renamed").exists()
    # unlink while open: the open file stays readable
    f = open(mp / "renamed", "rb")
    os.unlink(mp / "renamed")
    assert f.read() == b"hello WOR"
    f.close()
    # hard links share an inode
    write(mp / "a", b"A")
    os.link(mp / "a", mp / "b")
    assert os.stat(mp / "a").st_ino == os.stat(mp / "b").st_ino
    assert os.stat(mp / "a").st_nlink == 2
    os.symlink("a", mp / "sl")
    assert os.readlink(mp / "sl") == "a" and (mp / "sl").read_bytes() == b"A"
    os.mkfifo(mp / "fifo")
    assert os.path.exists(src / "fifo")
    os.mkdir(mp / "many")
    names = {f"entry-{i:05d}" for i in range(3000)}
    for n in names:
        (src / "many" / n).touch()
    assert set(os.listdir(mp / "many")) == names
    r = subprocess.run(["ls", "-l", mp / "many"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.count("entry-") == 3000
    os.setxattr(mp / "a", "user.test", b"v")
    assert os.getxattr(src / "a", "user.test") == b"v"
    assert "user.test" in os.listxattr(mp / "a")
    st = os.statvfs(mp)
    assert st.f_bsize > 0 and st.f_blocks > 0


def test_store_is_hidden_and_not_writable(fresh, verified_mount):
    m = verified_mount(fresh)
    mp = m.mountpoint
    assert ".verityfuse" not in os.listdir(mp)
    assert not os.path.lexists(mp / ".verityfuse")
    for op in (lambda: os.mkdir(mp / ".verityfuse"), lambda: write(mp / ".verityfuse", b"x"),
               lambda: os.rename(mp / "f", mp / ".verityfuse"), lambda: os.rmdir(mp / ".verityfuse"),
               lambda: os.symlink("x", mp / ".verityfuse")):
        with pytest.raises(OSError):
            op()
    assert (fresh / ".verityfuse" / "VERSION").exists()


def test_policy_require_refuses_unsealed_files(fresh, verified_mount):
    write(fresh / "unsealed", b"not sealed")
    from verityfuse.testing import seal_tree
    seal_tree(fresh, ["f", "zeros"])
    m = verified_mount(fresh, seal=False, policy="require")
    assert (m.mountpoint / "f").read_bytes() == (fresh / "f").read_bytes()
    with pytest.raises(OSError) as e:
        open(m.mountpoint / "unsealed", "rb")
    assert e.value.errno == errno.EPERM
    with pytest.raises(OSError) as e:
        open(m.mountpoint / "created", "wb")
    assert e.value.errno == errno.EPERM
    assert "policy require: refusing unsealed, which has no fs-verity metadata" in m.log()


def test_no_leaks_and_clean_exit(fresh, verified_mount):
    m = verified_mount(fresh)
    drop_caches()
    base = daemon_fds(m.pid)
    for _ in range(3):
        for name in ("f", "zeros"):
            with open(m.mountpoint / name, "rb") as f:
                f.read()
        os.listdir(m.mountpoint)
        write(m.mountpoint / "tmp", b"x")
        os.unlink(m.mountpoint / "tmp")
    drop_caches()
    # the tree objects of f and zeros, kept open for the next open
    assert wait_daemon_fds(m.pid, base + 2) == base + 2
    assert m.unmount() == 0
    assert "0 inodes still had lookups" in m.log()
    assert not os.path.ismount(m.mountpoint)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_unmount_cleanly(fresh, verified_mount, sig):
    m = verified_mount(fresh)
    m.process.send_signal(sig)
    assert m.process.wait(10) == 0
    assert not os.path.ismount(m.mountpoint)


@pytest.mark.mount
def test_background_mount_and_umount_command(fresh, tmp_path):
    from verityfuse.testing import seal_tree
    seal_tree(fresh)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli = [sys.executable, "-m", "verityfuse.cli"]
    r = subprocess.run([*cli, "mount", fresh, mnt, "-o", "ro", "--log-file", tmp_path / "log"],
                       capture_output=True, text=True,
                       timeout=30)
    try:
        assert r.returncode == 0, r.stderr
        assert os.path.ismount(mnt)  # ready when the command returns
        assert (mnt / "zeros").read_bytes() == bytes(128 * 1024)
        with pytest.raises(OSError) as e:
            write(mnt / "x", b"")
        assert e.value.errno == errno.EROFS
    finally:
        r = subprocess.run([*cli, "umount", mnt], capture_output=True, text=True)
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", mnt])
    assert r.returncode == 0
    for _ in range(100):
        if subprocess.run(["pgrep", "-f", f"verityfuse.cli mount {fresh}"]).returncode:
            break
        time.sleep(0.05)
    else:
        pytest.fail("daemon still running after umount")


def test_umount_unmounts_only_a_verityfuse_mount(tmp_path):
    """`verityfuse umount` ran fusermount3 -u, which root may run on any file system: a
    typo's path unmounted a tmpfs (found by review, s43).  What is not a verityfuse
    mount, or no mount at all, is refused by name and left as it is."""
    cli = [sys.executable, "-m", "verityfuse.cli"]
    other, plain = tmp_path / "tmpfs", tmp_path / "dir"
    other.mkdir()
    plain.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", other], check=True)
    try:
        r = subprocess.run([*cli, "umount", other], capture_output=True, text=True)
        assert os.path.ismount(other)
    finally:
        subprocess.run(["umount", other])
    assert (r.returncode, r.stderr) == (1, f"ERROR: {other} is a tmpfs mount, not a verityfuse "
                                           f"one: not unmounted\n")
    r = subprocess.run([*cli, "umount", plain], capture_output=True, text=True)
    assert (r.returncode, r.stderr) == (1, f"ERROR: {plain} is not a mount point\n")


def test_umount_of_a_mount_point_named_like_an_option(fresh, tmp_path):
    """`verityfuse umount -- -mnt` handed '-mnt' to fusermount3, which took it for its
    options ("invalid option -- 'm'"; found by review, s43): the path goes absolute."""
    cli = [sys.executable, "-m", "verityfuse.cli"]
    (tmp_path / "-mnt").mkdir()
    r = subprocess.run([*cli, "mount", "--log-file", tmp_path / "log", "--", fresh, "-mnt"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*cli, "umount", "--", "-mnt"], capture_output=True, text=True,
                       cwd=tmp_path)
    if os.path.ismount(tmp_path / "-mnt"):
        subprocess.run(["umount", "-l", tmp_path / "-mnt"])
    assert r.returncode == 0, r.stderr
    assert not os.path.ismount(tmp_path / "-mnt")


def test_umount_of_a_bind_mounted_tree_leaves_its_daemon_serving_the_other(fresh, tmp_path):
    """`verityfuse umount` waits for the daemon to exit, unless its file system is still
    mounted here (a bind mount): it returns at once and the daemon serves on there."""
    from verityfuse import mount_control
    from verityfuse.testing import seal_tree
    seal_tree(fresh)
    cli = [sys.executable, "-m", "verityfuse.cli"]
    mnt, bound = tmp_path / "mnt", tmp_path / "bound"
    mnt.mkdir()
    bound.mkdir()
    r = subprocess.run([*cli, "mount", fresh, mnt, "--log-file", tmp_path / "log"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    try:
        pid = json.loads(os.getxattr(mnt, "user.verityfuse.status"))["pid"]
        subprocess.run(["mount", "--bind", mnt, bound], check=True)
        r = subprocess.run([*cli, "umount", mnt], capture_output=True, text=True, timeout=60)
        assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
        assert not os.path.ismount(mnt)
        assert (bound / "zeros").read_bytes() == bytes(128 * 1024)
        assert mount_control._start_time(pid) is not None  # serving on
        r = subprocess.run([*cli, "umount", bound], capture_output=True, text=True, timeout=60)
        assert (r.returncode, r.stderr) == (0, "")
        assert mount_control._start_time(pid) is None  # waited for: exited (maybe not yet reaped)
    finally:
        for m in (bound, mnt):
            if os.path.ismount(m):
                subprocess.run(["umount", "-l", m])


def test_umount_asks_a_stopped_daemon_for_its_pid_without_holding_the_mount(fresh,
                                                                          verified_mount):
    """The status is asked by a child process, killed when the daemon does not answer in
    time: a request of this process left waiting would keep the mount busy."""
    from verityfuse import mount_control
    mnt = verified_mount(fresh)
    assert mount_control._daemon_of(str(mnt.mountpoint))[0] == mnt.process.pid
    mnt.process.send_signal(signal.SIGSTOP)
    try:
        assert mount_control._daemon_of(str(mnt.mountpoint)) is None
        assert children_of(os.getpid()) == [mnt.process.pid]  # the asking child is reaped
    finally:
        mnt.process.send_signal(signal.SIGCONT)
    assert (mnt.mountpoint / "zeros").read_bytes() == bytes(128 * 1024)


def test_a_mount_whose_daemon_died_is_named_as_such(tmp_path):
    """After a daemon is killed its mount point answers ENOTCONN; mounting there again
    said "mount point ... is not a directory"."""
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    write(src / "f", b"f")
    cmd = [sys.executable, "-m", "verityfuse.cli", "mount", src, mnt, "-o",
           f"log_file={tmp_path}/log"]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    try:
        pid = json.loads(os.getxattr(mnt, "user.verityfuse.status"))["pid"]
        os.kill(pid, signal.SIGKILL)
        for _ in range(200):  # until it is gone (its mount stays, dead)
            if not os.path.exists(f"/proc/{pid}") or \
                    open(f"/proc/{pid}/stat").read().split(") ")[1][0] == "Z":
                break
            time.sleep(0.05)
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 1 and r.stderr == (
            f"ERROR: mount point '{mnt}' is a mount whose file system daemon is gone (Transport "
            f"endpoint is not connected): unmount it first (umount -l '{mnt}')\n"), r.stderr
    finally:
        for _ in range(3):  # the dead mount, and one made over it by code that let it
            if f" {mnt} " not in open("/proc/self/mountinfo").read():
                break
            subprocess.run(["umount", "-l", mnt], capture_output=True)
    assert f" {mnt} " not in open("/proc/self/mountinfo").read()


def test_mounting_the_same_source_twice_on_one_point_is_refused(tmp_path, verified_mount):
    """`mount MNT` run twice (an fstab entry) stacked a second daemon on the first, with a
    warning only; mount(8) says "already mounted" for a kernel file system."""
    src = tmp_path / "src"
    src.mkdir()
    write(src / "f", b"f")
    m = verified_mount(src, seal=False)
    r = subprocess.run([sys.executable, "-m", "verityfuse.cli", "mount", src, m.mountpoint,
                        "-o", f"log_file={tmp_path}/log2"], capture_output=True, text=True)
    stacked = open("/proc/self/mountinfo").read().count(f" {m.mountpoint} ")
    if stacked > 1:  # (what the code before did) never left behind
        subprocess.run(["umount", m.mountpoint], check=True)
    assert (r.returncode, r.stderr, stacked) == (
        1, f"ERROR: '{src}' is already mounted on '{m.mountpoint}'\n", 1), r.stderr


def test_mount_errors_are_clear(tmp_path):
    r = subprocess.run([sys.executable, "-m", "verityfuse.cli", "mount", tmp_path / "nope", tmp_path],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "is not a directory" in r.stderr
    (tmp_path / "inner").mkdir()
    r = subprocess.run([sys.executable, "-m", "verityfuse.cli", "mount", tmp_path, tmp_path / "inner"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and f"mount point '{tmp_path}/inner' is inside the source" in r.stderr
    assert not os.path.ismount(tmp_path / "inner")
    (tmp_path / "src").mkdir()
    (tmp_path / "mnt").mkdir()
    r = subprocess.run([sys.executable, "-m", "verityfuse.cli", "mount", tmp_path / "src",
                        tmp_path / "mnt", "-o", f"log_file={tmp_path}/no/log"],
                       capture_output=True, text=True)
    assert (r.returncode, r.stderr) == (1, (  # without Python's "[Errno 2]"
        f"ERROR: cannot mount '{tmp_path}/src' on '{tmp_path}/mnt': cannot write the log file "
        f"{tmp_path}/no/log: No such file or directory\n")), r.stderr
    assert not os.path.ismount(tmp_path / "mnt")
    # The source itself, or a directory holding it: its store's path would lead through the
    # mount (the daemon recursed until it died at the first enable).
    for src, mnt in ((tmp_path / "inner", tmp_path / "inner"), (tmp_path / "inner", tmp_path)):
        r = subprocess.run([sys.executable, "-m", "verityfuse.cli", "mount", src, mnt],
                           capture_output=True, text=True)
        if os.path.ismount(mnt):  # (what the code before did) never left behind
            subprocess.run(["umount", mnt], check=True)
        assert r.returncode == 1 and r.stderr == (
            f"ERROR: mount point '{mnt}' is the source '{src}' or holds it: mount the verified "
            f"view somewhere else\n"), r.stderr
