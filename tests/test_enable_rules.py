"""The enable rules, at the layer that owns them (verityfuse/enable.py), without a mount.

Each case sets up a real file under a temporary SOURCE with a real store, then runs the steps
a request runs: ``ioctl.parse_enable`` (the argument rules), ``Enabler.check`` (the rules of
fs/verity/enable.c in its order), the build and the commit.  Cases that break two rules at once
pin the order: the first rule's errno wins, as in the kernel (reference: fsverity.md §1.5).
"""

import errno
import os
import shutil
import struct
import subprocess

import pytest

from verityfuse import ioctl, merkle, uapi
from verityfuse.errors import Errno, VerityError
from verityfuse.store import Store
from verityfuse.verifier import TreeBlockCache
from verityfuse.view_local import LocalView

from conftest import FSVERITY, pattern, write

NOBODY = (65534, 65534, set())
ROOT = (0, 0, set())
GOOD = ioctl.pack_enable(merkle.Params())


def arg_with(**fields) -> bytes:
    """GOOD with fields of struct fsverity_enable_arg replaced (and the salt/signature
    bytes it then announces appended)."""
    v = dict(version=1, alg=1, bs=4096, salt=0, sig=0, reserved1=0, reserved2=b"")
    v.update(fields)
    head = uapi.ENABLE_ARG_STRUCT.pack(v["version"], v["alg"], v["bs"], v["salt"], 0, v["sig"],
                                       v["reserved1"], 0, v["reserved2"])
    return head + bytes(v["salt"] + v["sig"])


def chattr(flag: str, path):
    """chattr on the backing file; skips where the filesystem has no such flag."""
    r = subprocess.run(["chattr", flag, str(path)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"chattr {flag}: {r.stderr.strip()}")


class Setup:
    """A temporary SOURCE with one file ``f`` (and whatever a case adds), its store and a
    local view over them; every handle opened here is released by ``close``."""

    def __init__(self, tmp_path, **view_kw):
        self.src = tmp_path / "src"
        self.src.mkdir()
        write(self.src / "f", pattern(3 * 4096 + 5))
        os.chmod(self.src / "f", 0o644)
        self.store = Store(str(tmp_path / "store"), create=True)
        self.view_kw = view_kw
        self.view = None
        self.handles = []
        self.flagged = []

    def start(self):
        self.view = LocalView(str(self.src), self.store, TreeBlockCache(), **self.view_kw)

    def inode(self, name: bytes = b"f"):
        return self.view.inodes[self.view.lookup(1, name).ino]

    def open(self, flags: int, name: bytes = b"f"):
        fh = self.view.open(self.view.lookup(1, name).ino, flags)
        self.handles.append(fh)
        return fh

    def close(self):
        for fh in self.handles:
            self.view.release(fh)
        for path in self.flagged:
            subprocess.run(["chattr", "-i", "-a", str(path)], capture_output=True)
        if self.view is not None:
            self.view.close()
        self.store.close()


@pytest.fixture
def setup(tmp_path):
    made = []

    def make(**view_kw):
        s = Setup(tmp_path, **view_kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def attempt(s: Setup, data: bytes = GOOD, name: bytes = b"f", open_flags=os.O_RDONLY,
            caller=ROOT):
    """One FS_IOC_ENABLE_VERITY as the daemon runs it: the argument, the rules, the build,
    the commit.  Returns None on success, else the errno."""
    fh = s.open(open_flags, name) if open_flags is not None else None
    try:
        arg = ioctl.parse_enable(data)
        job = s.view.enabler.check(s.inode(name), fh, arg, caller)
    except (VerityError, OSError) as e:
        return e.errno
    try:
        s.view.enabler.build(job)
        s.view.enabler.commit(job)
    except (VerityError, OSError) as e:
        return e.errno
    finally:
        s.view.enabler.finish(job)
    return None


# -- each rule alone, in the kernel's order ------------------------------------------------

def _verity(s):
    s.start()
    assert attempt(s) is None


def _busy(s):
    """An enable of the file is between its check and its finish."""
    s.start()
    s.pending = s.view.enabler.check(s.inode(), s.open(os.O_RDONLY), ioctl.parse_enable(GOOD))


def _writer(s):
    s.start()
    s.open(os.O_WRONLY)


def _immutable(s):
    s.flagged.append(s.src / "f")
    chattr("+i", s.src / "f")
    s.start()


def _append(s):
    s.flagged.append(s.src / "f")
    chattr("+a", s.src / "f")
    s.start()


def _mode_0444(s):
    os.chmod(s.src / "f", 0o444)
    s.start()


def _dir(s):
    os.mkdir(s.src / "d")
    s.start()


def _fifo(s):
    os.mkfifo(s.src / "p")
    s.start()


def _symlink(s):
    os.symlink("f", s.src / "l")
    s.start()


def _started(s):
    s.start()


def _acl(entries):
    """Give ``f`` an access ACL (system.posix_acl_access, as setfacl writes it) of
    (tag, perms, id) entries; skips where the filesystem has none."""
    def prepare(s):
        value = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, ident)
                                                for tag, perm, ident in entries)
        try:
            os.setxattr(s.src / "f", "system.posix_acl_access", value)
        except OSError as e:
            pytest.skip(f"no POSIX ACLs here: {e}")
        s.start()
    return prepare


_ALL = 0xFFFFFFFF  # ACL_UNDEFINED_ID
# user::rw- user:nobody:r-- group::rw- mask::rw- other::rw-: a 0666 file nobody may not write
_ACL_DENIES = _acl([(1, 6, _ALL), (2, 4, 65534), (4, 6, _ALL), (0x10, 6, _ALL), (0x20, 6, _ALL)])
# user::rw- user:nobody:rw- group::r-- mask::rw- other::r--: a 0644 file nobody may write
_ACL_GRANTS = _acl([(1, 6, _ALL), (2, 6, 65534), (4, 4, _ALL), (0x10, 6, _ALL), (0x20, 4, _ALL)])


def _ioctl_only_handle(s):
    """Another process holds the file open with access mode 3, which reads and writes
    nothing: the kernel counts no writer for it."""
    s.start()
    s.open(3)


# (name, view options, setup, attempt keywords, errno)
RULES = [
    ("version 2", {}, _started, dict(data=arg_with(version=2)), errno.EINVAL),
    ("reserved field", {}, _started, dict(data=arg_with(reserved1=1)), errno.EINVAL),
    ("block size not a power of 2", {}, _started, dict(data=arg_with(bs=3000)), errno.EINVAL),
    ("33-byte salt", {}, _started, dict(data=arg_with(salt=33)), errno.EMSGSIZE),
    ("16129-byte signature", {}, _started, dict(data=arg_with(sig=16129)), errno.EMSGSIZE),
    ("immutable", {}, _immutable, {}, errno.EPERM),
    ("no write permission", {}, _mode_0444, dict(caller=NOBODY), errno.EACCES),
    ("an ACL denies write", {}, _ACL_DENIES, dict(caller=NOBODY), errno.EACCES),
    ("opened for ioctls only (access mode 3)", {}, _started, dict(open_flags=3), errno.EBADF),
    ("opened write-only", {}, _started, dict(open_flags=os.O_WRONLY), errno.EBADF),
    ("append-only", {}, _append, {}, errno.EPERM),
    ("directory", {}, _dir, dict(name=b"d", open_flags=None), errno.EISDIR),
    ("FIFO (never opened)", {}, _fifo, dict(name=b"p", open_flags=None), errno.EINVAL),
    ("symlink", {}, _symlink, dict(name=b"l", open_flags=None), errno.EINVAL),
    ("read-only mount", dict(read_only=True), _started, {}, errno.EROFS),
    ("remounted read-only", dict(remounted_ro=lambda: True), _started, {}, errno.EROFS),
    ("another file open for writing", {}, _writer, {}, errno.ETXTBSY),
    ("its own file open read-write", {}, _started, dict(open_flags=os.O_RDWR), errno.ETXTBSY),
    ("hash algorithm 257", {}, _started, dict(data=arg_with(alg=257)), errno.EINVAL),
    ("block size 512", {}, _started, dict(data=arg_with(bs=512)), errno.EINVAL),
    ("block size 128 KiB", {}, _started, dict(data=arg_with(bs=131072)), errno.EINVAL),
    ("already verity", {}, _verity, {}, errno.EEXIST),
    ("enable running", {}, _busy, {}, errno.EBUSY),
    ("signatures required, none given", dict(require_signatures=True), _started, {}, errno.EPERM),
]

# Two rules broken at once: the first one in the kernel's order answers.
PAIRS = [
    ("salt too long, no write permission", {}, _mode_0444,
     dict(data=arg_with(salt=33), caller=NOBODY), errno.EMSGSIZE),
    ("bad version, directory", {}, _dir,
     dict(data=arg_with(version=2), name=b"d", open_flags=None), errno.EINVAL),
    ("immutable, no write permission", {}, lambda s: (os.chmod(s.src / "f", 0o444), _immutable(s)),
     dict(caller=NOBODY), errno.EPERM),
    ("no write permission, opened write-only", {}, _started,
     dict(open_flags=os.O_WRONLY, caller=NOBODY), errno.EACCES),
    ("opened write-only, append-only", {}, _append,
     dict(open_flags=os.O_WRONLY | os.O_APPEND), errno.EBADF),
    # file_permission(MAY_WRITE) says EROFS first on a read-only mount (sb_permission),
    # for a file, directory or symlink; a FIFO is EINVAL before the mount is asked.
    ("no write permission, read-only mount", dict(read_only=True), _mode_0444,
     dict(caller=NOBODY), errno.EROFS),
    ("immutable, read-only mount", dict(read_only=True), _immutable, {}, errno.EROFS),
    ("append-only, read-only mount", dict(read_only=True), _append, {}, errno.EROFS),
    ("no write permission, directory", {}, lambda s: (os.mkdir(s.src / "d", 0o555), s.start()),
     dict(name=b"d", open_flags=None, caller=NOBODY), errno.EACCES),
    ("directory, read-only mount", dict(read_only=True), _dir,
     dict(name=b"d", open_flags=None), errno.EROFS),
    ("an ACL denies write, read-only mount", dict(read_only=True), _ACL_DENIES,
     dict(caller=NOBODY), errno.EROFS),
    ("FIFO, read-only mount", dict(read_only=True), _fifo,
     dict(name=b"p", open_flags=None), errno.EINVAL),
    ("read-only mount, open for writing", dict(read_only=True), _started,
     dict(open_flags=os.O_RDWR), errno.EROFS),
    ("open for writing, hash algorithm 257", {}, _started,
     dict(open_flags=os.O_RDWR, data=arg_with(alg=257)), errno.ETXTBSY),
    ("hash algorithm 257, already verity", {}, _verity, dict(data=arg_with(alg=257)),
     errno.EINVAL),
    ("block size 512, enable running", {}, _busy, dict(data=arg_with(bs=512)), errno.EINVAL),
]


@pytest.mark.parametrize("name,view_kw,prepare,kw,want", RULES + PAIRS,
                         ids=[c[0] for c in RULES + PAIRS])
def test_rule(setup, name, view_kw, prepare, kw, want):
    s = setup(**view_kw)
    prepare(s)
    assert attempt(s, **kw) == want
    inode = s.inode(kw.get("name", b"f"))
    if "already verity" not in name:
        assert s.view.verity.info(inode) is None  # nothing committed
    if "enable running" not in name:
        assert not inode.enabling  # and nothing left busy
    else:
        assert inode.enabling           # the running one is untouched
        s.view.enabler.finish(s.pending)
        assert not inode.enabling
    # The check opened nothing it kept: only the handles this test opened are open.
    assert set(inode.files) == {fh for fh in s.handles if fh.node is inode}


@pytest.mark.parametrize("prepare", [_ACL_GRANTS, _ioctl_only_handle],
                         ids=["an ACL grants write", "another handle of access mode 3"])
def test_enables_the_mode_bits_alone_would_refuse(setup, prepare):
    """What the kernel allows: a user an ACL lets write (the mode bits say no: EACCES
    before), and an enable while another handle of access mode 3 is open (counted as a
    writer before: ETXTBSY).  Then a mode-3 open of the verity file is allowed too (only
    FMODE_WRITE is refused: EPERM before)."""
    s = setup()
    prepare(s)
    assert attempt(s, caller=NOBODY if prepare is _ACL_GRANTS else ROOT) is None
    assert s.view.verity.info(s.inode()) is not None
    fh = s.open(3)
    assert (fh.readable, fh.writable) == (False, False)
    with pytest.raises(OSError) as e:
        s.open(os.O_RDWR)
    assert e.value.errno == errno.EPERM


def test_too_many_tree_levels_is_efbig_before_eexist_is_looked_at(setup):
    """sha512 with 1 KiB blocks: 16 hashes a block, so more than 16^8 KiB needs a ninth level
    (EFBIG, from the parameters, which the kernel checks before EEXIST)."""
    s = setup()
    with open(s.src / "huge", "wb") as f:
        f.truncate(16 ** 8 * 1024 + 1)
    s.start()
    data = ioctl.pack_enable(merkle.Params(merkle.SHA512, 1024))
    assert attempt(s, data=data, name=b"huge") == errno.EFBIG
    with open(s.src / "edge", "wb") as f:
        f.truncate(16 ** 8 * 1024)  # exactly 8 levels: allowed (the build is not run here)
    job = s.view.enabler.check(s.inode(b"edge"), s.open(os.O_RDONLY, b"edge"),
                               ioctl.parse_enable(data), ROOT)
    s.view.enabler.finish(job)


def test_fuse_fsverity_enable_opens_the_file_itself(setup, tmp_path):
    """No caller file (FUSE_FSVERITY): the enabler opens the file read-only, builds and
    commits; the digest is fsverity-utils', and a file already open gets a verified reader."""
    if FSVERITY is None:
        pytest.skip("fsverity-utils is not installed")
    s = setup()
    s.start()
    open_before = s.open(os.O_RDONLY)
    assert open_before.reader is None
    params = merkle.Params(merkle.SHA256, 1024, b"\xab\xcd")
    info = s.view.enabler.enable(s.inode(), ioctl.parse_enable(ioctl.pack_enable(params)))
    want = subprocess.run([FSVERITY, "digest", "--block-size=1024", "--salt=abcd", s.src / "f"],
                          check=True, capture_output=True, text=True).stdout.split()[0]
    assert info.digest_text == want
    assert s.inode().verity == info and not s.inode().enabling
    assert bytes(open_before.reader.read(0, 3 * 4096 + 5)) == pattern(3 * 4096 + 5)
    with pytest.raises(Errno) as e:
        s.view.enabler.enable(s.inode(), ioctl.parse_enable(GOOD))
    assert e.value.errno == errno.EEXIST


def test_cancelled_build_is_eintr_and_commits_nothing(setup):
    s = setup()
    s.start()
    job = s.view.enabler.check(s.inode(), s.open(os.O_RDONLY), ioctl.parse_enable(GOOD), ROOT)
    try:
        with pytest.raises(Errno) as e:
            s.view.enabler.build(job, cancel=lambda: True)
        assert e.value.errno == errno.EINTR
        assert job.entry is None
    finally:
        s.view.enabler.finish(job)
    assert s.inode().verity is None and not s.inode().enabling
    assert os.listdir(s.store.path + "/tmp") == []
    assert attempt(s) is None  # and the next enable works


# -- built-in signatures: after the build, before anything is committed --------------------

@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    if FSVERITY is None or shutil.which("openssl") is None:
        pytest.skip("needs fsverity-utils and openssl")
    d = tmp_path_factory.mktemp("certs")
    for name in ("trusted", "other"):
        subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout",
                        d / f"{name}.key", "-x509", "-out", d / f"{name}.pem", "-subj",
                        f"/CN={name}", "-days", "2"], check=True, capture_output=True)
    return d


def _signature(certs, path, out, name="trusted") -> bytes:
    subprocess.run([FSVERITY, "sign", path, out, f"--key={certs}/{name}.key",
                    f"--cert={certs}/{name}.pem"], check=True, capture_output=True)
    return out.read_bytes()


def test_signature_rules(setup, certs, tmp_path):
    from verityfuse.signature import load_certificates

    s = setup(trust_certs=load_certificates([str(certs / "trusted.pem")]))
    write(s.src / "g", b"other file" * 100)
    s.start()
    good = _signature(certs, s.src / "f", tmp_path / "f.sig")
    cases = [
        (b"foobarbaz", errno.EBADMSG),                                             # malformed
        (_signature(certs, s.src / "g", tmp_path / "g.sig"), errno.EKEYREJECTED),  # another file's
        (_signature(certs, s.src / "f", tmp_path / "o.sig", "other"), errno.ENOKEY),  # untrusted
    ]
    for sig, want in cases:
        assert attempt(s, data=ioctl.pack_enable(merkle.Params(), sig)) == want
        assert s.inode().verity is None
    assert os.listdir(s.store.path + "/tmp") == []
    assert attempt(s, data=ioctl.pack_enable(merkle.Params(), good)) is None
    assert s.inode().verity.signature == good


def test_fuse_fsverity_enable_of_a_leased_file_does_not_wait_on_the_request_thread(setup):
    """FUSE_FSVERITY brings no file, so the enabler opens it; a write lease on it made
    that open wait (up to lease-break-time, 45 s) on the request thread, stalling the
    mount.  The check now says WouldWait at once; its ``finish`` waits in a worker
    thread, and the check goes on with the file it opened."""
    import threading

    from test_local_edges import Lease
    from verityfuse.fsutil import WouldWait

    s = setup()
    s.start()
    with Lease(s.src / "f") as lease:
        assert lease.said() == b"L"
        arg = ioctl.parse_enable(GOOD)
        got = {}

        def check():
            try:
                got["job"] = s.view.enable_check(s.inode().ino, None, arg, None)
            except WouldWait as w:
                got["wait"] = w
        t = threading.Thread(target=check, daemon=True)
        t.start()
        t.join(10)
        blocked = t.is_alive()
        if blocked:
            lease.release()  # let the blocked open end
            t.join(60)
        assert not blocked, "the enable's open waited for the lease on the request thread"
        assert list(got) == ["wait"] and not s.inode().enabling
        opened = {}
        waiter = threading.Thread(target=lambda: opened.update(fd=got["wait"].finish()))
        waiter.start()
        assert lease.said() == b"B"  # asked to give the lease up
        lease.release()
        assert lease.said() == b"U"
        waiter.join(60)
        job = s.view.enable_check(s.inode().ino, None, arg, None, opened["fd"])
        s.view.enabler.build(job)
        s.view.enabler.commit(job)
        s.view.enabler.finish(job)
    if FSVERITY is not None:
        want = subprocess.run([FSVERITY, "digest", s.src / "f"], check=True, capture_output=True,
                              text=True).stdout.split()[0]
        assert s.inode().verity.digest_text == want


def test_an_enable_without_a_request_loop_waits_for_the_lease_itself(setup):
    """Enabler.enable runs every step on the calling thread (a caller with no request
    loop): on a leased file it waits for the lease to be given up, as the kernel would,
    instead of passing the request thread's WouldWait up to its caller."""
    import threading

    from test_local_edges import Lease

    s = setup()
    s.start()
    got = {}
    with Lease(s.src / "f") as lease:
        assert lease.said() == b"L"

        def enable():
            try:
                got["info"] = s.view.enabler.enable(s.inode(), ioctl.parse_enable(GOOD))
            except BaseException as e:
                got["error"] = e
        t = threading.Thread(target=enable, daemon=True)
        t.start()
        assert lease.said() == b"B"  # its open asked for the lease
        lease.release()
        assert lease.said() == b"U"
        t.join(60)
    assert "error" not in got, got
    assert s.inode().verity == got["info"]
